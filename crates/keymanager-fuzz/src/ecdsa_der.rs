//! ECDSA signature encodings (fixed `r || s` ↔ DER) and the PKCS#11 EC point → SPKI path,
//! checked against RustCrypto's independent encoders.
//!
//! Input: a selector byte, then the bytes to convert.

use keymanager_backend_pkcs11::der;
use keymanager_engine::{KeyType, ecdsa_der_to_fixed, ecdsa_fixed_to_der};
use p256::pkcs8::DecodePublicKey;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => fixed_to_der(body),
        1 => der_to_fixed(body, [32, 48, 66][usize::from(selector / 3) % 3]),
        _ => ec_point(body, selector & 0x80 == 0),
    }
}

/// Fixed → DER: a round trip, and the DER RustCrypto writes for the same signature.
fn fixed_to_der(fixed: &[u8]) {
    let Some(der) = ecdsa_fixed_to_der(fixed) else {
        assert!(
            fixed.is_empty() || fixed.len() % 2 == 1 || fixed.len() > 132,
            "a well-sized fixed signature of {} bytes was refused",
            fixed.len()
        );
        return;
    };
    assert_eq!(
        ecdsa_der_to_fixed(&der, fixed.len() / 2).as_deref(),
        Some(fixed),
        "fixed → DER → fixed does not round-trip"
    );
    let theirs = match fixed.len() {
        64 => p256::ecdsa::Signature::from_slice(fixed)
            .ok()
            .map(|s| s.to_der().as_bytes().to_vec()),
        96 => p384::ecdsa::Signature::from_slice(fixed)
            .ok()
            .map(|s| s.to_der().as_bytes().to_vec()),
        _ => None,
    };
    if let Some(theirs) = theirs {
        assert_eq!(der, theirs, "our DER differs from RustCrypto's");
    }
}

/// DER → fixed: strict DER only, so the canonical encoding round-trips byte for byte, and
/// RustCrypto agrees on every signature with scalars in range.
fn der_to_fixed(der: &[u8], scalar_len: usize) {
    let ours = ecdsa_der_to_fixed(der, scalar_len);
    if let Some(fixed) = &ours {
        assert_eq!(fixed.len(), scalar_len * 2);
        assert_eq!(
            ecdsa_fixed_to_der(fixed).as_deref(),
            Some(der),
            "DER → fixed → DER does not round-trip"
        );
    }
    let theirs = match scalar_len {
        32 => p256::ecdsa::Signature::from_der(der)
            .ok()
            .map(|s| s.to_bytes().to_vec()),
        48 => p384::ecdsa::Signature::from_der(der)
            .ok()
            .map(|s| s.to_bytes().to_vec()),
        _ => None,
    };
    if let Some(theirs) = theirs {
        assert_eq!(
            ours.as_deref(),
            Some(&theirs[..]),
            "RustCrypto reads a DER signature we refuse or read differently"
        );
    }
}

/// A token's `CKA_EC_POINT` (raw or wrapped in an OCTET STRING) → SubjectPublicKeyInfo:
/// whatever is accepted must be a point RustCrypto can read back, or be refused by it too.
fn ec_point(value: &[u8], p256: bool) {
    let key_type = if p256 {
        KeyType::EcP256
    } else {
        KeyType::EcP384
    };
    let Some(point) = der::ec_point(key_type, value) else {
        return;
    };
    assert_eq!(point.first(), Some(&0x04), "not an uncompressed point");
    assert_eq!(point.len(), if p256 { 65 } else { 97 });
    let spki = der::ec_spki(key_type, &point);
    // A point off the curve is the token's problem and is refused when parsed; the SPKI
    // itself must always be well formed.
    let on_curve = if p256 {
        p256::PublicKey::from_sec1_bytes(&point).is_ok()
    } else {
        p384::PublicKey::from_sec1_bytes(&point).is_ok()
    };
    let parsed = if p256 {
        p256::PublicKey::from_public_key_der(&spki).is_ok()
    } else {
        p384::PublicKey::from_public_key_der(&spki).is_ok()
    };
    assert_eq!(on_curve, parsed, "the SPKI does not carry the point");
}
