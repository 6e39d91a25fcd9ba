//! SPIRE's private Init service.

use std::sync::Arc;

use keymanager_proto::init::init_server::Init;
use keymanager_proto::init::{DeinitRequest, DeinitResponse, InitRequest, InitResponse};
use keymanager_proto::service_names;
use tonic::{Request, Response, Status};

use crate::state::PluginState;

pub(crate) struct InitService {
    state: Arc<PluginState>,
}

impl InitService {
    pub(crate) fn new(state: Arc<PluginState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Init for InitService {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        tracing::debug!(host_services = ?request.get_ref().host_service_names, "Init");
        // Exactly the services SPIRE binds; health/broker/controller/stdio are not listed.
        Ok(Response::new(InitResponse {
            plugin_service_names: vec![
                service_names::KEY_MANAGER.into(),
                service_names::CONFIG.into(),
            ],
        }))
    }

    async fn deinit(
        &self,
        _request: Request<DeinitRequest>,
    ) -> Result<Response<DeinitResponse>, Status> {
        tracing::debug!("Deinit");
        self.state.close().await;
        Ok(Response::new(DeinitResponse {}))
    }
}
