//! SPIRE's server KeyManager v1 service, on top of the engine.

use std::sync::Arc;
use std::time::Duration;

use keymanager_engine::PublicKey;
use keymanager_proto::keymanager::key_manager_server::KeyManager;
use keymanager_proto::keymanager::{
    GenerateKeyRequest, GenerateKeyResponse, GetPublicKeyRequest, GetPublicKeyResponse,
    GetPublicKeysRequest, GetPublicKeysResponse, PublicKey as WirePublicKey, SignDataRequest,
    SignDataResponse,
};
use tonic::{Request, Response, Status};

use crate::state::PluginState;
use crate::status::{RequestError, request_error_to_status};
use crate::wire;

/// SPIRE's server calls the KeyManager with a 30 s deadline; assumed when none is sent.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// SPIRE's KeyManager service over a [`PluginState`]; public so that request decoding can
/// be fuzzed without a socket.
pub struct KeyManagerService {
    state: Arc<PluginState>,
}

impl KeyManagerService {
    /// The service answering for `state`.
    pub fn new(state: Arc<PluginState>) -> Self {
        Self { state }
    }
}

fn to_wire(key: PublicKey) -> WirePublicKey {
    WirePublicKey {
        id: key.id.to_string(),
        r#type: wire::key_type_to_wire(key.key_type),
        pkix_data: key.spki_der.to_vec(),
        fingerprint: key.fingerprint.to_string(),
    }
}

fn status(operation: &'static str, key_id: &str, error: RequestError) -> Status {
    let status = request_error_to_status(&error);
    let key_id = keymanager_engine::settings::echo(key_id);
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            tracing::debug!(operation, key_id, error = %error, "request refused");
        }
        _ => tracing::error!(operation, key_id, error = %error, "request failed"),
    }
    status
}

fn deadline<T>(request: &Request<T>) -> Duration {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(wire::grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE)
}

#[tonic::async_trait]
impl KeyManager for KeyManagerService {
    async fn generate_key(
        &self,
        request: Request<GenerateKeyRequest>,
    ) -> Result<Response<GenerateKeyResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            let id = wire::key_id(&request.key_id)?;
            let key_type = wire::key_type(request.key_type)?;
            Ok::<_, RequestError>(self.state.service()?.generate_key(id, key_type).await?)
        }
        .await;
        match result {
            Ok(key) => Ok(Response::new(GenerateKeyResponse {
                public_key: Some(to_wire(key)),
            })),
            Err(error) => Err(status("GenerateKey", &request.key_id, error)),
        }
    }

    async fn get_public_key(
        &self,
        request: Request<GetPublicKeyRequest>,
    ) -> Result<Response<GetPublicKeyResponse>, Status> {
        let request = request.into_inner();
        let result = (|| {
            let id = wire::key_id(&request.key_id)?;
            Ok::<_, RequestError>(self.state.service()?.public_key(&id)?)
        })();
        match result {
            Ok(key) => Ok(Response::new(GetPublicKeyResponse {
                public_key: Some(to_wire(key)),
            })),
            Err(error) => Err(status("GetPublicKey", &request.key_id, error)),
        }
    }

    async fn get_public_keys(
        &self,
        _request: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        let service = self
            .state
            .service()
            .map_err(|e| status("GetPublicKeys", "", e))?;
        Ok(Response::new(GetPublicKeysResponse {
            public_keys: service.public_keys().into_iter().map(to_wire).collect(),
        }))
    }

    async fn sign_data(
        &self,
        request: Request<SignDataRequest>,
    ) -> Result<Response<SignDataResponse>, Status> {
        let deadline = deadline(&request);
        let request = request.into_inner();
        let key_id = request.key_id;
        let result = async {
            let id = wire::key_id(&key_id)?;
            let opts = wire::signer_opts(request.signer_opts)?;
            Ok::<_, RequestError>(
                self.state
                    .service()?
                    .sign(&id, request.data, opts, Some(deadline))
                    .await?,
            )
        }
        .await;
        match result {
            Ok(signature) => Ok(Response::new(SignDataResponse {
                signature: signature.bytes,
                key_fingerprint: signature.fingerprint.to_string(),
            })),
            Err(error) => Err(status("SignData", &key_id, error)),
        }
    }
}
