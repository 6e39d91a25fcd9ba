//! The few DER structures a token's public key attributes must be turned into: the
//! SubjectPublicKeyInfo of an EC point or an RSA modulus and exponent (RFC 5480, RFC 8017).

use keymanager_engine::KeyType;

/// `CKA_EC_PARAMS` of a curve: its named-curve OID, DER.
pub fn curve_oid(key_type: KeyType) -> &'static [u8] {
    match key_type {
        // 1.2.840.10045.3.1.7 (prime256v1)
        KeyType::EcP256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        // 1.3.132.0.34 (secp384r1)
        _ => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    }
}

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

fn length(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    length(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// A positive INTEGER from big-endian bytes.
fn integer(bytes: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = match bytes.iter().position(|&b| b != 0) {
        Some(i) => &bytes[i..],
        None => &[0],
    };
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed[0] & 0x80 != 0 {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    tlv(0x02, &content)
}

fn spki(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut bits = vec![0];
    bits.extend_from_slice(key);
    let mut content = tlv(0x30, algorithm);
    content.extend(tlv(0x03, &bits));
    tlv(0x30, &content)
}

/// The SubjectPublicKeyInfo of an EC point.
pub fn ec_spki(key_type: KeyType, point: &[u8]) -> Vec<u8> {
    // 1.2.840.10045.2.1 (id-ecPublicKey)
    let mut algorithm = vec![0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    algorithm.extend_from_slice(curve_oid(key_type));
    spki(&algorithm, point)
}

/// The SubjectPublicKeyInfo of an RSA key.
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    // 1.2.840.113549.1.1.1 (rsaEncryption), NULL parameters
    let algorithm = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut key = integer(modulus);
    key.extend(integer(exponent));
    spki(&algorithm, &tlv(0x30, &key))
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

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
