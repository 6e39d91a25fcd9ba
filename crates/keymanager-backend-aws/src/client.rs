//! The AWS clients (KMS, Resource Groups Tagging, STS) on one set of credentials. A
//! re-Configure with rotated credentials builds new clients (each SDK client caches the
//! credentials it resolved, so swapping the provider underneath would not be enough).

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use keymanager_engine::kit::endpoint::Endpoint;

use crate::config::{AwsKmsSettings, Credentials};

/// One KMS call may take this long; the engine retries inside SPIRE's 30 s deadline.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The three clients on the credentials they share.
#[derive(Clone, Debug)]
pub struct Clients {
    /// KMS.
    pub kms: aws_sdk_kms::Client,
    /// Resource Groups Tagging (tag discovery and the sweep).
    pub tagging: aws_sdk_resourcegroupstagging::Client,
    /// STS (the caller identity for the default key policy).
    pub sts: aws_sdk_sts::Client,
}

impl Clients {
    /// Builds the clients for `settings`.
    pub async fn connect(settings: &AwsKmsSettings, endpoint: Option<&Endpoint>) -> Self {
        let provider = credentials_provider(settings, endpoint).await;
        let sdk_config = base_config(settings, endpoint)
            .credentials_provider(provider)
            .load()
            .await;
        Self {
            kms: aws_sdk_kms::Client::new(&sdk_config),
            tagging: aws_sdk_resourcegroupstagging::Client::new(&sdk_config),
            sts: aws_sdk_sts::Client::new(&sdk_config),
        }
    }
}

fn base_config(settings: &AwsKmsSettings, endpoint: Option<&Endpoint>) -> aws_config::ConfigLoader {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()))
        // The engine retries idempotent calls within SPIRE's deadline; SDK retries on top
        // would multiply attempts (and would retry CreateKey).
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint.as_str());
    }
    loader
}

/// Static keys or the default chain, then the role to assume on top, if any.
async fn credentials_provider(
    settings: &AwsKmsSettings,
    endpoint: Option<&Endpoint>,
) -> SharedCredentialsProvider {
    let base = match &settings.credentials {
        Credentials::Static {
            access_key_id,
            secret_access_key,
        } => SharedCredentialsProvider::new(aws_credential_types::Credentials::new(
            access_key_id,
            secret_access_key.expose(),
            None,
            None,
            "plugin_data",
        )),
        Credentials::DefaultChain => SharedCredentialsProvider::new(
            aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                .region(Region::new(settings.region.clone()))
                .build()
                .await,
        ),
    };
    let Some(role) = &settings.assume_role else {
        return base;
    };
    let sts_config: SdkConfig = base_config(settings, endpoint)
        .credentials_provider(base)
        .load()
        .await;
    let mut provider = aws_config::sts::AssumeRoleProvider::builder(&role.role_arn)
        .session_name(&role.session_name)
        .configure(&sts_config);
    if let Some(external_id) = &role.external_id {
        provider = provider.external_id(external_id.expose());
    }
    SharedCredentialsProvider::new(provider.build().await)
}
