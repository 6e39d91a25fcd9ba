//! Public keys that stores hand out as PEM (`-----BEGIN PUBLIC KEY-----`): Cloud KMS,
//! Vault Transit.

use base64::Engine as _;

/// The DER SubjectPublicKeyInfo inside a `-----BEGIN PUBLIC KEY-----` block; `None` for
/// anything else (another block type, bad base64, an empty body).
pub fn public_key_der(pem: &str) -> Option<Vec<u8>> {
    if !pem.contains("-----BEGIN PUBLIC KEY-----") {
        return None;
    }
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    (!der.is_empty()).then_some(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_bodies_decode_and_anything_else_does_not() {
        let pem = "-----BEGIN PUBLIC KEY-----\nAQID\n-----END PUBLIC KEY-----\n";
        assert_eq!(public_key_der(pem), Some(vec![1, 2, 3]));
        for bad in [
            "-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----",
            "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----",
            "-----BEGIN PRIVATE KEY-----\nAQID\n-----END PRIVATE KEY-----",
            "",
        ] {
            assert_eq!(public_key_der(bad), None, "{bad:?}");
        }
    }
}
