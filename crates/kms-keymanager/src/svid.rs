//! SPIFFE documents signed through the plugin's SignData: a self-signed CA certificate, an
//! X.509-SVID and a JWT-SVID; and their verification with libraries independent of the
//! signer (x509-parser + ring).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keymanager_engine::ecdsa_der_to_fixed;
use keymanager_proto::keymanager::key_manager_client::KeyManagerClient;
use keymanager_proto::keymanager::sign_data_request::SignerOpts;
use keymanager_proto::keymanager::{HashAlgorithm, SignDataRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm, SigningKey,
};
use sha2::Digest as _;
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;

/// A P-256 key that lives in the plugin; rcgen's synchronous signing hook calls SignData.
pub struct RemoteP256Key {
    client: KeyManagerClient<Channel>,
    key_id: String,
    point: Vec<u8>,
    runtime: tokio::runtime::Handle,
    /// Latency of every SignData call made through this key.
    pub sign_latencies: Mutex<Vec<Duration>>,
}

impl RemoteP256Key {
    /// Wraps plugin key `key_id` whose DER SubjectPublicKeyInfo is `spki_der`.
    pub fn new(
        client: KeyManagerClient<Channel>,
        key_id: &str,
        spki_der: &[u8],
    ) -> Result<Self, String> {
        let (_, spki) =
            SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| format!("bad public key: {e}"))?;
        Ok(Self {
            client,
            key_id: key_id.to_string(),
            point: spki.subject_public_key.data.to_vec(),
            runtime: tokio::runtime::Handle::current(),
            sign_latencies: Mutex::new(Vec::new()),
        })
    }

    /// Signs a SHA-256 digest through the plugin; returns the DER signature.
    pub async fn sign_digest(&self, digest: Vec<u8>) -> Result<Vec<u8>, String> {
        let started = Instant::now();
        let response = self
            .client
            .clone()
            .sign_data(SignDataRequest {
                key_id: self.key_id.clone(),
                data: digest,
                signer_opts: Some(SignerOpts::HashAlgorithm(HashAlgorithm::Sha256 as i32)),
            })
            .await
            .map_err(|status| format!("SignData({}) failed: {}", self.key_id, status.message()))?;
        if let Ok(mut latencies) = self.sign_latencies.lock() {
            latencies.push(started.elapsed());
        }
        Ok(response.into_inner().signature)
    }
}

impl PublicKeyData for RemoteP256Key {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for RemoteP256Key {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let digest = sha2::Sha256::digest(msg).to_vec();
        // rcgen's hook is synchronous; SignData is async. Block this worker thread only.
        tokio::task::block_in_place(|| self.runtime.block_on(self.sign_digest(digest)))
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// A local public key (the workload's, which never needs the KMS).
pub struct LocalP256PublicKey {
    point: Vec<u8>,
}

impl LocalP256PublicKey {
    /// From a DER SubjectPublicKeyInfo.
    pub fn from_spki(spki_der: &[u8]) -> Result<Self, String> {
        let (_, spki) =
            SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| format!("bad public key: {e}"))?;
        Ok(Self {
            point: spki.subject_public_key.data.to_vec(),
        })
    }
}

impl PublicKeyData for LocalP256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + lifetime;
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // ring's system RNG, so the serial does not come from the signer's library.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from(bytes.to_vec())
}

/// CA certificate parameters for a trust domain.
pub fn ca_params(trust_domain: &str) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "SPIFFE");
    dn.push(DnType::CommonName, format!("{trust_domain} demo CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|e| format!("{e}"))?,
    )];
    params.serial_number = Some(random_serial());
    validity(&mut params, Duration::from_secs(24 * 3600));
    Ok(params)
}

/// Self-signs the CA certificate through the plugin. Returns DER.
pub fn self_signed_ca(
    params: &CertificateParams,
    ca_key: &RemoteP256Key,
) -> Result<Vec<u8>, String> {
    let cert = params
        .self_signed(ca_key)
        .map_err(|e| format!("CA certificate: {e}"))?;
    Ok(cert.der().to_vec())
}

/// Issues an X.509-SVID for `spiffe_id` to `subject_key`, signed by the CA through the plugin.
pub fn x509_svid(
    spiffe_id: &str,
    subject_key: &LocalP256PublicKey,
    ca_params: CertificateParams,
    ca_key: &RemoteP256Key,
) -> Result<Vec<u8>, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(
        spiffe_id.try_into().map_err(|e| format!("{e}"))?,
    )];
    params.serial_number = Some(random_serial());
    validity(&mut params, Duration::from_secs(3600));
    let issuer = Issuer::new(ca_params, ca_key);
    let cert = params
        .signed_by(subject_key, &issuer)
        .map_err(|e| format!("X.509-SVID: {e}"))?;
    Ok(cert.der().to_vec())
}

/// Builds an ES256 JWT-SVID signed through the plugin.
pub async fn jwt_svid(
    spiffe_id: &str,
    audience: &str,
    kid: &str,
    key: &RemoteP256Key,
) -> Result<String, String> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let claims =
        serde_json::json!({"sub": spiffe_id, "aud": [audience], "iat": now, "exp": now + 300});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let der = key
        .sign_digest(sha2::Sha256::digest(signing_input.as_bytes()).to_vec())
        .await?;
    // JOSE wants the fixed-width r || s form, not DER.
    let fixed =
        ecdsa_der_to_fixed(&der, 32).ok_or("SignData returned a malformed ECDSA signature")?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(fixed)))
}

/// What the independent verification established.
pub struct Verified {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: String,
}

/// Verifies the CA self-signature, that the CA key is the plugin key, and that the SVID
/// chains to the CA and names `expected_id`.
pub fn verify_x509(
    ca_der: &[u8],
    svid_der: &[u8],
    plugin_ca_spki: &[u8],
    expected_id: &str,
) -> Result<Verified, String> {
    let (_, ca) =
        X509Certificate::from_der(ca_der).map_err(|e| format!("CA does not parse: {e}"))?;
    let (_, svid) =
        X509Certificate::from_der(svid_der).map_err(|e| format!("SVID does not parse: {e}"))?;
    if ca.public_key().raw != plugin_ca_spki {
        return Err("the CA certificate's key is not the plugin's CA key".into());
    }
    ca.verify_signature(None)
        .map_err(|e| format!("CA self-signature does not verify: {e}"))?;
    svid.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("SVID signature does not verify against the CA: {e}"))?;
    if svid.issuer() != ca.subject() {
        return Err("SVID issuer is not the CA subject".into());
    }
    let now = x509_parser::time::ASN1Time::now();
    if !svid.validity().is_valid_at(now) || !ca.validity().is_valid_at(now) {
        return Err("certificate not valid now".into());
    }
    let uris: Vec<String> = svid
        .extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect();
    if uris != [expected_id] {
        return Err(format!(
            "SVID URI SANs are {uris:?}, expected [{expected_id}]"
        ));
    }
    Ok(Verified {
        spiffe_id: expected_id.to_string(),
    })
}

/// Verifies an ES256 JWT against the plugin's JWT public key and checks `sub`.
pub fn verify_jwt(token: &str, jwt_spki_der: &[u8], expected_sub: &str) -> Result<(), String> {
    let (signing_input, signature) = token.rsplit_once('.').ok_or("JWT has no signature")?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| format!("JWT signature: {e}"))?;
    let (_, spki) =
        SubjectPublicKeyInfo::from_der(jwt_spki_der).map_err(|e| format!("JWT key: {e}"))?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        spki.subject_public_key.data.as_ref(),
    )
    .verify(signing_input.as_bytes(), &signature)
    .map_err(|_| "JWT signature does not verify against the plugin's JWT key")?;
    let claims = signing_input.split('.').nth(1).ok_or("JWT has no claims")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).map_err(|e| format!("{e}"))?)
            .map_err(|e| format!("JWT claims: {e}"))?;
    if claims["sub"] != expected_sub {
        return Err(format!(
            "JWT sub is {}, expected {expected_sub}",
            claims["sub"]
        ));
    }
    Ok(())
}
