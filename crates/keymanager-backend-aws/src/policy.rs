//! The key policy for keys this server creates when `key_policy_file` is not set.
//!
//! When the server runs as an assumed IAM role (the usual case on EC2, ECS and EKS), keys get
//! a least-privilege policy: that role may use and retire the key, and the account root may
//! read it (so the console and auditors can see it). Otherwise the account's default key
//! policy applies, with a warning.

/// The role behind an STS caller ARN `arn:<partition>:sts::<account>:assumed-role/<role>/<session>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerRole {
    /// AWS partition (`aws`, `aws-us-gov`, `aws-cn`).
    pub partition: String,
    /// Account id.
    pub account: String,
    /// Role name (may include a path).
    pub role_name: String,
}

impl CallerRole {
    /// Parses a GetCallerIdentity ARN; `None` for users, root and anything not an assumed role.
    pub fn from_caller_arn(arn: &str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("sts"), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let rest = resource.strip_prefix("assumed-role/")?;
        let (role_name, session) = rest.rsplit_once('/')?;
        if role_name.is_empty() || session.is_empty() || account.is_empty() {
            return None;
        }
        Some(Self {
            partition: partition.to_string(),
            account: account.to_string(),
            role_name: role_name.to_string(),
        })
    }

    /// The IAM role ARN.
    pub fn role_arn(&self) -> String {
        format!(
            "arn:{}:iam::{}:role/{}",
            self.partition, self.account, self.role_name
        )
    }

    /// The least-privilege key policy for this role.
    pub fn key_policy(&self) -> String {
        let root = format!("arn:{}:iam::{}:root", self.partition, self.account);
        serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "SPIRE server role uses and retires the key",
                    "Effect": "Allow",
                    "Principal": {"AWS": self.role_arn()},
                    "Action": [
                        "kms:Sign",
                        "kms:GetPublicKey",
                        "kms:DescribeKey",
                        "kms:TagResource",
                        "kms:ListResourceTags",
                        "kms:CreateAlias",
                        "kms:UpdateAlias",
                        "kms:ScheduleKeyDeletion",
                        // Required by KMS's policy lockout safety check at CreateKey.
                        "kms:PutKeyPolicy"
                    ],
                    "Resource": "*"
                },
                {
                    "Sid": "Account can read the key and its policy",
                    "Effect": "Allow",
                    "Principal": {"AWS": root},
                    "Action": ["kms:Describe*", "kms:Get*", "kms:List*"],
                    "Resource": "*"
                }
            ]
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assumed_roles_are_recognised_and_others_are_not() {
        let role = CallerRole::from_caller_arn(
            "arn:aws:sts::123456789012:assumed-role/spire-server/i-0001f4f25acfd1234",
        )
        .unwrap();
        assert_eq!(
            role.role_arn(),
            "arn:aws:iam::123456789012:role/spire-server"
        );
        let gov = CallerRole::from_caller_arn(
            "arn:aws-us-gov:sts::123456789012:assumed-role/path/role/s",
        )
        .unwrap();
        assert_eq!(
            gov.role_arn(),
            "arn:aws-us-gov:iam::123456789012:role/path/role"
        );
        for arn in [
            "arn:aws:iam::123456789012:user/alice",
            "arn:aws:sts::123456789012:federated-user/bob",
            "arn:aws:iam::123456789012:root",
            "arn:aws:sts::123456789012:assumed-role/only-role",
            "not an arn",
        ] {
            assert_eq!(CallerRole::from_caller_arn(arn), None, "{arn}");
        }
    }

    #[test]
    fn the_policy_grants_the_role_only_what_the_plugin_uses() {
        let role =
            CallerRole::from_caller_arn("arn:aws:sts::123456789012:assumed-role/spire/s").unwrap();
        let policy: serde_json::Value = serde_json::from_str(&role.key_policy()).unwrap();
        let statements = policy["Statement"].as_array().unwrap();
        assert_eq!(
            statements[0]["Principal"]["AWS"],
            "arn:aws:iam::123456789012:role/spire"
        );
        let actions: Vec<&str> = statements[0]["Action"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(actions.contains(&"kms:Sign") && !actions.contains(&"kms:*"));
        assert_eq!(
            statements[1]["Principal"]["AWS"],
            "arn:aws:iam::123456789012:root"
        );
    }
}
