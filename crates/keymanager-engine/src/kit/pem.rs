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

/// A DER SubjectPublicKeyInfo as a `-----BEGIN PUBLIC KEY-----` block (64-column lines).
pub fn public_key_pem(spki_der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(spki_der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0..=200).collect();
        let pem = public_key_pem(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(public_key_der(&pem), Some(der));
    }

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
