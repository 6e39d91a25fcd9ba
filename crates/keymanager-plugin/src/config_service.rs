//! SPIRE's common Config service.

use std::sync::Arc;

use keymanager_engine::CoreConfig;
use keymanager_proto::config::config_server::Config;
use keymanager_proto::config::{
    ConfigureRequest, ConfigureResponse, CoreConfiguration, ValidateRequest, ValidateResponse,
};
use tonic::{Request, Response, Status};

use crate::state::PluginState;

pub(crate) struct ConfigService {
    state: Arc<PluginState>,
}

impl ConfigService {
    pub(crate) fn new(state: Arc<PluginState>) -> Self {
        Self { state }
    }
}

fn core(core: Option<CoreConfiguration>) -> Option<CoreConfig> {
    core.map(|c| CoreConfig {
        trust_domain: c.trust_domain,
    })
}

#[tonic::async_trait]
impl Config for ConfigService {
    async fn configure(
        &self,
        request: Request<ConfigureRequest>,
    ) -> Result<Response<ConfigureResponse>, Status> {
        let request = request.into_inner();
        match self
            .state
            .configure(core(request.core_configuration), &request.hcl_configuration)
            .await
        {
            Ok(()) => Ok(Response::new(ConfigureResponse {})),
            Err(status) => {
                tracing::error!(error = status.message(), "Configure failed");
                Err(status)
            }
        }
    }

    async fn validate(
        &self,
        request: Request<ValidateRequest>,
    ) -> Result<Response<ValidateResponse>, Status> {
        let request = request.into_inner();
        let (valid, notes) = self
            .state
            .validate(core(request.core_configuration), &request.hcl_configuration);
        Ok(Response::new(ValidateResponse { valid, notes }))
    }
}
