//! The few DER structures a token's public key attributes must be turned into: the
//! SubjectPublicKeyInfo of an EC point or an RSA modulus and exponent (RFC 5480, RFC 8017).

use keymanager_engine::KeyType;

/// `CKA_EC_PARAMS` of a curve (its named-curve OID, DER) and the SubjectPublicKeyInfo
/// builders, shared with the other backends that get raw key parts (written once in the kit).
pub use keymanager_engine::kit::spki::{curve_oid, ec_spki, rsa_spki};

/// The key type of `CKA_EC_PARAMS`.
pub fn curve_of(params: &[u8]) -> Option<KeyType> {
    [KeyType::EcP256, KeyType::EcP384]
        .into_iter()
        .find(|&t| curve_oid(t) == params)
}

/// The uncompressed point `04 || X || Y` from `CKA_EC_POINT`, which the standard wraps
/// in an OCTET STRING and some tokens return raw.
pub fn ec_point(key_type: KeyType, value: &[u8]) -> Option<Vec<u8>> {
    let len = if key_type == KeyType::EcP256 { 65 } else { 97 };
    let point = if value.len() == len {
        value
    } else {
        match value {
            [0x04, n, rest @ ..] if usize::from(*n) == len && rest.len() == len => rest,
            [0x04, 0x81, n, rest @ ..] if usize::from(*n) == len && rest.len() == len => rest,
            _ => return None,
        }
    };
    (point.first() == Some(&0x04)).then(|| point.to_vec())
}

/// The bit length of a big-endian unsigned number.
pub fn bit_length(bytes: &[u8]) -> usize {
    match bytes.iter().position(|&b| b != 0) {
        Some(i) => (bytes.len() - i) * 8 - bytes[i].leading_zeros() as usize,
        None => 0,
    }
}

/// `%01%ab…` back to bytes.
pub fn percent_decode_hex(text: &str) -> Option<Vec<u8>> {
    text.split('%')
        .skip(1)
        .map(|h| u8::from_str_radix(h, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .filter(|bytes| !bytes.is_empty() && text.starts_with('%'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_unwrap_and_spkis_match_a_known_encoding() {
        let mut raw = vec![0x04];
        raw.extend([0x11; 64]);
        let wrapped = tlv(0x04, &raw);
        assert_eq!(ec_point(KeyType::EcP256, &wrapped), Some(raw.clone()));
        assert_eq!(ec_point(KeyType::EcP256, &raw), Some(raw.clone()));
        assert_eq!(ec_point(KeyType::EcP384, &raw), None);
        let spki = ec_spki(KeyType::EcP256, &raw);
        // The fixed 26-byte header every P-256 SubjectPublicKeyInfo starts with.
        assert_eq!(
            hex(&spki[..26]),
            "3059301306072a8648ce3d020106082a8648ce3d030107034200"
        );
        assert_eq!(spki.len(), 91);
        assert_eq!(curve_of(curve_oid(KeyType::EcP384)), Some(KeyType::EcP384));
    }

    #[test]
    fn rsa_spkis_are_well_formed() {
        let mut modulus = vec![0xc1];
        modulus.extend([0x22; 255]);
        let spki = rsa_spki(&modulus, &[0x01, 0x00, 0x01]);
        // SEQUENCE, long form length 0x0122 = 290 bytes of content.
        assert_eq!(hex(&spki[..4]), "30820122");
        assert_eq!(spki.len(), 294);
        assert_eq!(bit_length(&modulus), 2048);
        assert_eq!(bit_length(&[0, 0x01, 0]), 9);
        assert_eq!(percent_decode_hex("%01%ab"), Some(vec![1, 0xab]));
        assert_eq!(percent_decode_hex("01"), None);
    }

    /// A short-form DER TLV (test data only).
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag, content.len() as u8];
        out.extend_from_slice(content);
        out
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
