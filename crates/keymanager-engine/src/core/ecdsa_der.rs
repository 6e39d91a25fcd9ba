//! Conversions between the fixed-width `r || s` ECDSA form (PKCS#11, Azure, JOSE) and the
//! ASN.1 DER `SEQUENCE { r INTEGER, s INTEGER }` that SPIRE's Go side expects.

/// Encodes a fixed-width `r || s` signature as minimal DER. Returns `None` when the input
/// has odd length, is empty, or is longer than a P-521 signature.
pub fn ecdsa_fixed_to_der(fixed: &[u8]) -> Option<Vec<u8>> {
    if fixed.is_empty() || !fixed.len().is_multiple_of(2) || fixed.len() > 132 {
        return None;
    }
    let (r, s) = fixed.split_at(fixed.len() / 2);
    let r = der_unsigned_integer(r);
    let s = der_unsigned_integer(s);
    let body_len = r.len() + s.len();
    let mut out = Vec::with_capacity(body_len + 3);
    out.push(0x30);
    push_der_length(&mut out, body_len);
    out.extend_from_slice(&r);
    out.extend_from_slice(&s);
    Some(out)
}

/// Decodes a DER ECDSA signature into `r || s`, each left-padded to `scalar_len` bytes.
/// Returns `None` for anything that is not a well-formed, minimal DER pair of positive
/// integers fitting `scalar_len`.
pub fn ecdsa_der_to_fixed(der: &[u8], scalar_len: usize) -> Option<Vec<u8>> {
    let (tag, body, rest) = read_tlv(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let (r_tag, r, rest) = read_tlv(body)?;
    let (s_tag, s, rest) = read_tlv(rest)?;
    if r_tag != 0x02 || s_tag != 0x02 || !rest.is_empty() {
        return None;
    }
    let mut out = vec![0u8; scalar_len * 2];
    copy_integer(r, &mut out[..scalar_len])?;
    copy_integer(s, &mut out[scalar_len..])?;
    Some(out)
}

fn der_unsigned_integer(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let trimmed = &bytes[start..];
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.is_empty() {
        content.push(0);
    } else {
        if trimmed[0] & 0x80 != 0 {
            content.push(0);
        }
        content.extend_from_slice(trimmed);
    }
    let mut out = Vec::with_capacity(content.len() + 3);
    out.push(0x02);
    push_der_length(&mut out, content.len());
    out.extend_from_slice(&content);
    out
}

fn push_der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => {
            let (&n, rest) = rest.split_first()?;
            if n < 0x80 {
                return None; // not minimal
            }
            (usize::from(n), rest)
        }
        0x82 => {
            let (hi, rest) = rest.split_first_chunk::<2>()?;
            let n = usize::from(u16::from_be_bytes(*hi));
            if n < 0x100 {
                return None;
            }
            (n, rest)
        }
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    let (body, rest) = rest.split_at(len);
    Some((tag, body, rest))
}

fn copy_integer(content: &[u8], out: &mut [u8]) -> Option<()> {
    match content {
        [] => return None,
        [b, ..] if b & 0x80 != 0 => return None, // negative
        [0, next, ..] if next & 0x80 == 0 => return None, // non-minimal
        _ => {}
    }
    let trimmed = match content {
        [0, rest @ ..] => rest,
        all => all,
    };
    if trimmed.len() > out.len() {
        return None;
    }
    let offset = out.len() - trimmed.len();
    out[offset..].copy_from_slice(trimmed);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_including_high_bit_and_leading_zero_scalars() {
        let mut fixed = vec![0u8; 64];
        fixed[0] = 0x80; // r needs a 0x00 pad in DER
        fixed[31] = 1;
        fixed[34] = 0x7f; // s has two leading zero bytes that DER must strip
        let der = ecdsa_fixed_to_der(&fixed).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 33, 0x00]);
        assert_eq!(ecdsa_der_to_fixed(&der, 32).unwrap(), fixed);
    }

    #[test]
    fn p384_uses_long_form_free_lengths_and_round_trips() {
        let fixed: Vec<u8> = (0u8..96).map(|i| i.wrapping_mul(37) | 0x80).collect();
        let der = ecdsa_fixed_to_der(&fixed).unwrap();
        assert_eq!(ecdsa_der_to_fixed(&der, 48).unwrap(), fixed);
    }

    #[test]
    fn rejects_malformed_input() {
        assert!(ecdsa_fixed_to_der(&[]).is_none());
        assert!(ecdsa_fixed_to_der(&[1, 2, 3]).is_none());
        assert!(ecdsa_der_to_fixed(&[0x30, 0x00], 32).is_none());
        assert!(ecdsa_der_to_fixed(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01], 32).is_none());
        // negative r
        assert!(
            ecdsa_der_to_fixed(&[0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x01], 32).is_none()
        );
        // trailing garbage
        assert!(
            ecdsa_der_to_fixed(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x00], 32)
                .is_none()
        );
    }
}
