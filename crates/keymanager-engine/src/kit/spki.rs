//! SubjectPublicKeyInfo from the raw parts stores hand out (an EC point, an RSA modulus and
//! exponent: PKCS#11 attributes, Azure Key Vault's JWKs), per RFC 5480 and RFC 8017.

use crate::core::key::KeyType;

/// The named-curve OID of an EC key type, DER (`CKA_EC_PARAMS`, the SPKI parameters).
pub fn curve_oid(key_type: KeyType) -> &'static [u8] {
    match key_type {
        // 1.2.840.10045.3.1.7 (prime256v1)
        KeyType::EcP256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        // 1.3.132.0.34 (secp384r1)
        _ => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn spkis_match_known_encodings() {
        let mut point = vec![0x04];
        point.extend([0x11; 64]);
        let spki = ec_spki(KeyType::EcP256, &point);
        // The fixed 26-byte header every P-256 SubjectPublicKeyInfo starts with.
        assert_eq!(
            hex(&spki[..26]),
            "3059301306072a8648ce3d020106082a8648ce3d030107034200"
        );
        assert_eq!(spki.len(), 91);
        let mut modulus = vec![0xc1];
        modulus.extend([0x22; 255]);
        let spki = rsa_spki(&modulus, &[0x01, 0x00, 0x01]);
        assert_eq!(hex(&spki[..4]), "30820122");
        assert_eq!(spki.len(), 294);
    }
}
