//! The AWS clients (KMS, Resource Groups Tagging, STS) on one set of credentials that can be
//! swapped at run time: rotated static keys or a new role take effect at the next call,
//! without a restart and without rebuilding the clients.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use keymanager_engine::kit::endpoint::Endpoint;

use crate::config::{AwsKmsSettings, Credentials};

/// One KMS call may take this long; the engine retries inside SPIRE's 30 s deadline.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Credentials whose source can be replaced while clients use them.
#[derive(Clone, Debug)]
pub struct SwappableCredentials {
    current: Arc<RwLock<SharedCredentialsProvider>>,
}

impl SwappableCredentials {
    fn new(provider: SharedCredentialsProvider) -> Self {
        Self {
            current: Arc::new(RwLock::new(provider)),
        }
    }

    /// Every later call uses `provider`.
    pub fn replace(&self, provider: SharedCredentialsProvider) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = provider;
    }
}

impl ProvideCredentials for SwappableCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        // The lock is held to clone the provider only, never across the fetch.
        let provider = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        future::ProvideCredentials::new(async move { provider.provide_credentials().await })
    }
}

/// The three clients and the credentials they share.
#[derive(Clone, Debug)]
pub struct Clients {
    /// KMS.
    pub kms: aws_sdk_kms::Client,
    /// Resource Groups Tagging (tag discovery and the sweep).
    pub tagging: aws_sdk_resourcegroupstagging::Client,
    /// STS (the caller identity for the default key policy).
    pub sts: aws_sdk_sts::Client,
    /// Swapped by a re-Configure with new credentials.
    pub credentials: SwappableCredentials,
}

impl Clients {
    /// Builds the clients for `settings`.
    pub async fn connect(settings: &AwsKmsSettings, endpoint: Option<&Endpoint>) -> Self {
        let provider = credentials_provider(settings, endpoint).await;
        let credentials = SwappableCredentials::new(provider);
        let sdk_config = base_config(settings, endpoint)
            .credentials_provider(credentials.clone())
            .load()
            .await;
        Self {
            kms: aws_sdk_kms::Client::new(&sdk_config),
            tagging: aws_sdk_resourcegroupstagging::Client::new(&sdk_config),
            sts: aws_sdk_sts::Client::new(&sdk_config),
            credentials,
        }
    }

    /// Applies the credential settings of a new configuration.
    pub async fn rotate_credentials(&self, settings: &AwsKmsSettings, endpoint: Option<&Endpoint>) {
        self.credentials
            .replace(credentials_provider(settings, endpoint).await);
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
