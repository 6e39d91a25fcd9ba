//! What an operator runs by hand on `aws_kms` (the CLI's `keys` and `doctor`): enable and
//! disable a key, read its key policy, and check the permissions README lists with the
//! read-only calls the plugin makes. Nothing here creates, signs with or deletes a key.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kms::error::ProvideErrorMetadata;
use keymanager_engine::admin::{Check, DeletionWindow, KeyOperator};
use keymanager_engine::kit::vocabulary as tags;
use keymanager_engine::lifecycle::KeyRecord;
use keymanager_engine::{BackendError, KeyType};

use crate::backend::{AwsKmsBackend, DELETION_WINDOW_DAYS};
use crate::config::{AwsKmsSettings, Credentials, Discovery};
use crate::errors::{Service, sdk_error};
use crate::naming;

/// Where the credentials of `settings` come from, in words.
pub(crate) fn credential_source(settings: &AwsKmsSettings) -> String {
    let base = match settings.credentials {
        Credentials::Static { .. } => "access_key_id and secret_access_key in plugin_data",
        Credentials::DefaultChain => {
            "the default AWS chain (environment, profile, web identity, container or instance role)"
        }
    };
    match &settings.assume_role {
        Some(role) => format!("{base}, then assume_role_arn {}", role.role_arn),
        None => base.to_string(),
    }
}

/// What to grant when a call is denied.
fn grant(action: &str) -> String {
    format!("grant {action} to this server's role (see README, aws_kms → required permissions)")
}

#[async_trait]
impl KeyOperator for AwsKmsBackend {
    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        self.read_public_key(locator).await
    }

    async fn set_enabled(&self, record: &KeyRecord, enabled: bool) -> Result<(), BackendError> {
        let kms = &self.clients().kms;
        let arn = record.locator.as_str();
        if enabled {
            kms.enable_key()
                .key_id(arn)
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(Service::Kms, "EnableKey", arn, e))
        } else {
            kms.disable_key()
                .key_id(arn)
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(Service::Kms, "DisableKey", arn, e))
        }
    }

    fn deletion_window(&self) -> DeletionWindow {
        DeletionWindow::Scheduled {
            after: Duration::from_secs(u64::from(DELETION_WINDOW_DAYS.unsigned_abs()) * 86400),
            what: "KMS PendingWindowInDays; CancelKeyDeletion undoes it",
        }
    }

    async fn access_summary(&self, locator: &str) -> Result<Vec<String>, BackendError> {
        let out = self
            .clients()
            .kms
            .get_key_policy()
            .key_id(locator)
            .policy_name("default")
            .send()
            .await
            .map_err(|e| sdk_error(Service::Kms, "GetKeyPolicy", locator, e))?;
        Ok(summarise_policy(out.policy().unwrap_or_default()))
    }

    fn clock_url(&self) -> Option<String> {
        Some(self.service_url.clone())
    }

    async fn checks(&self) -> Vec<Check> {
        let clients = self.clients();
        let mut checks = Vec::new();
        let caller = clients.sts.get_caller_identity().send().await;
        checks.push(match &caller {
            Ok(identity) => Check::ok(
                "credentials",
                format!(
                    "{} (from {})",
                    identity.arn().unwrap_or("unknown caller"),
                    self.credential_source
                ),
            ),
            Err(e) => Check::fail(
                "credentials",
                format!(
                    "sts:GetCallerIdentity failed ({}): {}",
                    self.credential_source,
                    e.message().unwrap_or("no message")
                ),
                "check the credentials the README lists for aws_kms; a clock more than 5 minutes off also fails every AWS call (SignatureExpired)",
            ),
        });
        // Discovery's listing: aliases or tags.
        let listing = match self.discovery {
            Discovery::Alias => self
                .trust_domain_aliases()
                .await
                .map(|found| format!("{} aliases of this trust domain", found.len())),
            Discovery::Tags => self
                .tagged_keys(&[(tags::TRUST_DOMAIN, self.trust_domain.as_str())])
                .await
                .map(|found| format!("{} keys tagged with this trust domain", found.len())),
        };
        let (what, action) = match self.discovery {
            Discovery::Alias => ("kms:ListAliases", "kms:ListAliases"),
            Discovery::Tags => ("tag:GetResources", "tag:GetResources"),
        };
        checks.push(match listing {
            Ok(found) => Check::ok(format!("permission {what}"), found),
            Err(e) => Check::fail(format!("permission {what}"), e.to_string(), grant(action)),
        });
        // The sweep lists by tags in both modes.
        if self.discovery == Discovery::Alias {
            let swept = self
                .tagged_keys(&[(tags::TRUST_DOMAIN, self.trust_domain.as_str())])
                .await;
            checks.push(Check::from_result(
                "permission tag:GetResources",
                &swept,
                "the stale-key sweep can list this trust domain's keys",
                grant("tag:GetResources"),
            ));
        }
        // Per-key reads, on this server's keys, else on an alias that cannot exist (a
        // NotFoundException proves the permission without touching a key).
        let keys: Vec<String> = match self.discovery {
            Discovery::Alias => self
                .trust_domain_aliases()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|(alias, _)| {
                    alias.starts_with(&naming::alias_prefix(&self.trust_domain, &self.server_id))
                })
                .map(|(alias, _)| alias)
                .collect(),
            Discovery::Tags => self
                .tagged_keys(&[
                    (tags::TRUST_DOMAIN, self.trust_domain.as_str()),
                    (tags::SERVER_ID, self.server_id.as_str()),
                ])
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|(arn, _)| arn)
                .collect(),
        };
        let probe = keys
            .first()
            .cloned()
            .unwrap_or_else(|| "alias/kms-keymanager-doctor-probe-does-not-exist".to_string());
        let kms = &clients.kms;
        let outcomes = [
            (
                "kms:DescribeKey",
                kms.describe_key()
                    .key_id(&probe)
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| {
                        (
                            e.code().map(str::to_string),
                            e.message().map(str::to_string),
                        )
                    }),
            ),
            (
                "kms:GetPublicKey",
                kms.get_public_key()
                    .key_id(&probe)
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| {
                        (
                            e.code().map(str::to_string),
                            e.message().map(str::to_string),
                        )
                    }),
            ),
            (
                "kms:ListResourceTags",
                kms.list_resource_tags()
                    .key_id(&probe)
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| {
                        (
                            e.code().map(str::to_string),
                            e.message().map(str::to_string),
                        )
                    }),
            ),
        ];
        for (action, outcome) in outcomes {
            checks.push(match outcome {
                Ok(()) => Check::ok(
                    format!("permission {action}"),
                    format!("allowed on {probe}"),
                ),
                Err((Some(code), _)) if code == "NotFoundException" => Check::ok(
                    format!("permission {action}"),
                    "allowed (probed on a key that does not exist)",
                ),
                Err((code, message)) => Check::fail(
                    format!("permission {action}"),
                    format!(
                        "{} on {probe}: {}",
                        code.as_deref().unwrap_or("error"),
                        message.as_deref().unwrap_or("no message")
                    ),
                    grant(action),
                ),
            });
        }
        checks
    }
}

/// One line per statement of a key policy: `Sid: Effect Principal → Actions`.
fn summarise_policy(policy: &str) -> Vec<String> {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(policy) else {
        return vec!["(the key policy is not JSON)".into()];
    };
    let statements = match json.get("Statement") {
        Some(serde_json::Value::Array(list)) => list.clone(),
        Some(one) => vec![one.clone()],
        None => Vec::new(),
    };
    let flat = |v: Option<&serde_json::Value>| -> String {
        match v {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", "),
            Some(serde_json::Value::Object(map)) => map
                .iter()
                .map(|(k, v)| format!("{k}: {}", flat_value(v)))
                .collect::<Vec<_>>()
                .join("; "),
            Some(other) => other.to_string(),
            None => "-".into(),
        }
    };
    statements
        .iter()
        .map(|st| {
            format!(
                "{}: {} {} → {}",
                st.get("Sid").and_then(|s| s.as_str()).unwrap_or("(no Sid)"),
                flat(st.get("Effect")),
                flat(st.get("Principal")),
                flat(st.get("Action")),
            )
        })
        .collect()
}

fn flat_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(list) => {
            list.iter().map(flat_value).collect::<Vec<_>>().join(", ")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_policies_summarise_one_line_per_statement() {
        let policy = r#"{"Version":"2012-10-17","Statement":[
            {"Sid":"Admin","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::1:root"},"Action":"kms:*","Resource":"*"},
            {"Effect":"Allow","Principal":{"AWS":["arn:aws:iam::1:role/spire"]},"Action":["kms:Sign","kms:GetPublicKey"],"Resource":"*"}]}"#;
        assert_eq!(
            summarise_policy(policy),
            vec![
                "Admin: Allow AWS: arn:aws:iam::1:root → kms:*".to_string(),
                "(no Sid): Allow AWS: arn:aws:iam::1:role/spire → kms:Sign, kms:GetPublicKey"
                    .to_string(),
            ]
        );
        assert_eq!(
            summarise_policy("nope"),
            vec!["(the key policy is not JSON)".to_string()]
        );
    }
}
