//! SPIRE's server KeyManager v1 service, on top of the engine.

use std::sync::Arc;

use keymanager_engine::{
    EngineError, HashAlgorithm, KeyId, KeyType, PssSaltLength, PublicKey, SignerOpts,
};
use keymanager_proto::keymanager::key_manager_server::KeyManager;
use keymanager_proto::keymanager::sign_data_request::SignerOpts as WireSignerOpts;
use keymanager_proto::keymanager::{
    GenerateKeyRequest, GenerateKeyResponse, GetPublicKeyRequest, GetPublicKeyResponse,
    GetPublicKeysRequest, GetPublicKeysResponse, PublicKey as WirePublicKey, SignDataRequest,
    SignDataResponse,
};
use tonic::{Request, Response, Status};

use crate::state::PluginState;
use crate::status::engine_error_to_status;

pub(crate) struct KeyManagerService {
    state: Arc<PluginState>,
}

impl KeyManagerService {
    pub(crate) fn new(state: Arc<PluginState>) -> Self {
        Self { state }
    }
}

fn to_wire(key: PublicKey) -> WirePublicKey {
    WirePublicKey {
        id: key.id.to_string(),
        r#type: key.key_type.to_wire(),
        pkix_data: key.spki_der.to_vec(),
        fingerprint: key.fingerprint.to_string(),
    }
}

fn signer_opts(opts: Option<WireSignerOpts>) -> Result<SignerOpts, EngineError> {
    match opts {
        None => Err(EngineError::SignerOptsRequired),
        Some(WireSignerOpts::HashAlgorithm(hash)) => {
            Ok(SignerOpts::Hash(HashAlgorithm::from_wire(hash)?))
        }
        Some(WireSignerOpts::PssOptions(pss)) => Ok(SignerOpts::Pss {
            hash: HashAlgorithm::from_wire(pss.hash_algorithm)?,
            salt: PssSaltLength::from_wire(pss.salt_length)?,
        }),
    }
}

fn status(operation: &'static str, key_id: &str, error: EngineError) -> Status {
    let status = engine_error_to_status(&error);
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            tracing::debug!(operation, key_id, error = %error, "request refused");
        }
        _ => tracing::error!(operation, key_id, error = %error, "request failed"),
    }
    status
}

#[tonic::async_trait]
impl KeyManager for KeyManagerService {
    async fn generate_key(
        &self,
        request: Request<GenerateKeyRequest>,
    ) -> Result<Response<GenerateKeyResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            let id = KeyId::new(&request.key_id)?;
            let key_type = KeyType::from_wire(request.key_type)?;
            self.state.engine()?.generate_key(id, key_type).await
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
        let result =
            KeyId::new(&request.key_id).and_then(|id| self.state.engine()?.public_key(&id));
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
        let engine = self
            .state
            .engine()
            .map_err(|e| status("GetPublicKeys", "", e))?;
        Ok(Response::new(GetPublicKeysResponse {
            public_keys: engine.public_keys().into_iter().map(to_wire).collect(),
        }))
    }

    async fn sign_data(
        &self,
        request: Request<SignDataRequest>,
    ) -> Result<Response<SignDataResponse>, Status> {
        let request = request.into_inner();
        let key_id = request.key_id;
        let result = async {
            let id = KeyId::new(&key_id)?;
            let opts = signer_opts(request.signer_opts)?;
            self.state.engine()?.sign(&id, request.data, opts).await
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
