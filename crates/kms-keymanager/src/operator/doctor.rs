//! `doctor`: read-only checks an operator runs before (or instead of) opening a cloud
//! console. Each prints ok / warn / FAIL with what was found and what to do; the exit code
//! is 1 when any check fails. Never creates, signs with or deletes a key.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use clap::Args;
use keymanager_engine::admin::{
    Check, CheckOutcome, EntryState, ListScope, ServedKey, clock_check, hand_over_check,
    hand_over_entries, inventory,
};
use serde_json::json;

use super::keys::policy_of;
use super::source::SourceArgs;
use super::{Failure, output};

/// `doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Stable JSON on stdout instead of lines.
    #[arg(long)]
    json: bool,
}

/// Runs every check and prints them.
pub async fn run(args: DoctorArgs) -> Result<(), Failure> {
    let checks = checks(&args.source).await;
    let failed = checks
        .iter()
        .filter(|c| c.outcome == CheckOutcome::Fail)
        .count();
    if args.json {
        let out = json!({
            "ok": failed == 0,
            "checks": checks.iter().map(|c| json!({
                "name": c.name,
                "outcome": match c.outcome {
                    CheckOutcome::Ok => "ok",
                    CheckOutcome::Warn => "warn",
                    CheckOutcome::Fail => "fail",
                },
                "detail": c.detail,
                "fix": c.fix,
            })).collect::<Vec<_>>(),
        });
        println!("{out:#}");
    } else {
        for check in &checks {
            let mark = match check.outcome {
                CheckOutcome::Ok => "ok  ",
                CheckOutcome::Warn => "warn",
                CheckOutcome::Fail => "FAIL",
            };
            println!("[{mark}] {}: {}", check.name, check.detail);
            if check.outcome != CheckOutcome::Ok
                && let Some(fix) = &check.fix
            {
                println!("       → {fix}");
            }
        }
    }
    if failed > 0 {
        return Err(Failure::store_message(format!("{failed} check(s) failed")));
    }
    Ok(())
}

async fn checks(source: &SourceArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    let config = match source.config() {
        Ok(config) => config,
        Err(error) => {
            checks.push(Check::fail(
                "configuration",
                error,
                "fix plugin_data; the same rules apply when spire-server configures the plugin",
            ));
            return checks;
        }
    };
    let identity = config.backend.identity();
    checks.push(Check::ok(
        "configuration",
        format!(
            "backend {}, {}, trust domain {}{}",
            config.backend_name,
            identity.store,
            identity.trust_domain,
            identity
                .server
                .as_deref()
                .map_or(String::new(), |s| format!(", server identity from {s}"))
        ),
    ));
    for warning in config.backend.warnings() {
        checks.push(Check::warn(
            "configuration",
            warning,
            "remove or rename the setting",
        ));
    }
    for problem in config.problems() {
        checks.push(Check::fail(
            "configuration",
            problem,
            "spire-server validate reports the same",
        ));
    }
    let policy = policy_of(&config);
    let backend_name = config.backend_name;
    let opened = match config.backend.open().await {
        Ok(opened) => opened,
        Err(error) => {
            checks.push(Check::fail(
                "connect",
                error.to_string(),
                format!("check the {backend_name} credentials and endpoint README lists"),
            ));
            return checks;
        }
    };
    let admin = opened.admin();
    checks.push(Check::ok("connect", format!("{backend_name} client ready")));
    if let Some(url) = admin.clock_url() {
        checks.push(clock(&url, policy.max_clock_skew).await);
    }
    checks.extend(admin.checks().await);
    let served = admin.served().await;
    checks.push(match &served {
        Ok(keys) => Check::ok(
            "discovery",
            format!(
                "{} key(s) of this server: {}",
                keys.len(),
                keys.iter()
                    .map(|k| k.key_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(error) => Check::fail(
            "discovery",
            error.to_string(),
            "spire-server would fail to start the same way; fix what the message names",
        ),
    });
    let records = admin.records().await;
    if let Err(error) = &records {
        checks.push(Check::fail(
            "listing",
            error.to_string(),
            "the stale-key sweep lists the trust domain's keys the same way; grant the listing permission README names",
        ));
    }
    let (Ok(served), Ok(records)) = (served, records) else {
        return checks;
    };
    if let Some(old) = &config.migrate_from {
        checks.push(hand_over(old, &served).await);
    }
    if let Some(records) = &records {
        checks.push(Check::ok(
            "listing",
            format!("{} key(s) of this trust domain in the store", records.len()),
        ));
    }
    let me = admin.identity();
    let entries = inventory(
        SystemTime::now(),
        me.as_ref(),
        policy,
        &served,
        records.as_deref(),
        &HashMap::new(),
        ListScope {
            all_servers: false,
            history: true,
        },
    );
    let mut usable = true;
    for entry in &entries {
        let id = entry.key_id.as_deref().unwrap_or("?");
        match entry.state {
            EntryState::Disabled if !entry.record.as_ref().is_some_and(|r| r.published) => checks
                .push(Check::warn(
                    format!("key {id}"),
                    format!(
                        "{} is disabled; discovery does not use it, so SPIRE's next GenerateKey of {id} replaces it",
                        entry.locator
                    ),
                    format!("kms-keymanager keys enable {id} to use it again, or `keys delete` it"),
                )),
            EntryState::Disabled => {
                usable = false;
                checks.push(Check::fail(
                    format!("key {id}"),
                    format!("{} is disabled: SPIRE cannot sign with it", entry.locator),
                    format!(
                        "kms-keymanager keys enable {id}, or let SPIRE's next rotation replace it"
                    ),
                ))
            }
            EntryState::Inactive
                if entry.created.is_some_and(|c| {
                    SystemTime::now()
                        .duration_since(c)
                        .unwrap_or(Duration::ZERO)
                        < policy.half_created_grace
                }) =>
            {
                checks.push(Check::warn(
                    format!("key {id}"),
                    format!(
                        "{} was created {} and is not published yet: a GenerateKey is in flight or was interrupted",
                        entry.locator,
                        output::when(entry.created)
                    ),
                    "nothing to do if spire-server is rotating; otherwise `keys prune` removes it after the grace period",
                ))
            }
            EntryState::Inactive => checks.push(Check::warn(
                format!("key {id}"),
                format!("{} is a leftover this server does not use", entry.locator),
                "`kms-keymanager keys prune --apply` removes it (the plugin's sweep would too)",
            )),
            _ => {}
        }
    }
    if usable {
        checks.push(Check::ok(
            "keys usable",
            format!(
                "{} current key(s), none disabled",
                entries.iter().filter(|e| e.state.is_current()).count()
            ),
        ));
    }
    checks
}

/// Hand-over mode: the old store must be readable (its keys may be the bundle's), and once
/// it serves no id, the block can go.
async fn hand_over(old: &keymanager_plugin::MigrateFrom, served: &[ServedKey]) -> Check {
    let store = old.backend.identity().to_string();
    let opened = match super::open_old(old).await {
        Ok(opened) => opened,
        Err(failure) => {
            return Check::fail(
                "hand-over",
                failure.message().to_string(),
                "the plugin serves keys from the migrate_from store until SPIRE has rotated them: fix its settings or credentials",
            );
        }
    };
    match opened.admin.served().await {
        Ok(old_served) => hand_over_check(&store, &hand_over_entries(served, &old_served)),
        Err(error) => Check::fail(
            "hand-over",
            format!("the migrate_from store ({store}): {error}"),
            "the plugin serves keys from the migrate_from store until SPIRE has rotated them: fix its settings or credentials",
        ),
    }
}

/// Compares this machine's clock with the store's `Date` header. Only the header is read:
/// no credentials are sent, so the certificate is not checked here (a private CA needs no
/// configuring for this check; the backend's own calls verify it).
async fn clock(url: &str, allowance: Duration) -> Check {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_danger_accept_invalid_certs(true)
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            return Check::warn(
                "clock",
                format!("no HTTP client: {error}"),
                "check the machine's clock with NTP",
            );
        }
    };
    match client.get(url).send().await {
        Ok(response) => {
            let date = response
                .headers()
                .get(reqwest::header::DATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            clock_check(url, date.as_deref(), SystemTime::now(), allowance)
        }
        Err(error) => Check::fail(
            "clock",
            format!("{url} is unreachable: {error}"),
            "check the network path and the endpoint",
        ),
    }
}
