//! Hash algorithms, signer options and the signature schemes they resolve to.
//!
//! SPIRE sends signer options in Go's `crypto.SignerOpts` shape: a bare hash (meaning ECDSA
//! for an EC key and PKCS#1 v1.5 for an RSA key) or PSS options. [`SignatureScheme::resolve`]
//! turns that into one explicit scheme for a given key, or a precise error.

use std::fmt;

use super::key::KeyType;

/// Why signer options do not fit a key or a digest. Core rules only: no wire decoding and no
/// backend knowledge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchemeError {
    /// The digest length does not match its hash.
    #[error("digest is {actual} bytes but {hash} digests are {expected} bytes")]
    DigestLength {
        /// Declared hash.
        hash: HashAlgorithm,
        /// Its output length.
        expected: usize,
        /// What was sent.
        actual: usize,
    },
    /// PSS options for an EC key.
    #[error("RSA-PSS options cannot be used with {0} key")]
    PssOnEcKey(KeyType),
    /// The requested salt does not fit the modulus.
    #[error(
        "PSS salt length {salt} is too long for a {modulus_bits}-bit key with {hash}; the maximum is {max}"
    )]
    PssSaltTooLong {
        /// Requested salt length in bytes.
        salt: usize,
        /// The largest salt that fits.
        max: usize,
        /// The hash.
        hash: HashAlgorithm,
        /// Modulus size.
        modulus_bits: usize,
    },
}

/// Hash algorithms, numbered as Go's `crypto.Hash` (and the protocol enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// SHA3-224.
    Sha3_224,
    /// SHA3-256.
    Sha3_256,
    /// SHA3-384.
    Sha3_384,
    /// SHA3-512.
    Sha3_512,
    /// SHA-512/224.
    Sha512_224,
    /// SHA-512/256.
    Sha512_256,
}

impl HashAlgorithm {
    /// Every hash SPIRE's protocol can name.
    pub const ALL: [HashAlgorithm; 10] = [
        Self::Sha224,
        Self::Sha256,
        Self::Sha384,
        Self::Sha512,
        Self::Sha3_224,
        Self::Sha3_256,
        Self::Sha3_384,
        Self::Sha3_512,
        Self::Sha512_224,
        Self::Sha512_256,
    ];

    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            Self::Sha224 | Self::Sha3_224 | Self::Sha512_224 => 28,
            Self::Sha256 | Self::Sha3_256 | Self::Sha512_256 => 32,
            Self::Sha384 | Self::Sha3_384 => 48,
            Self::Sha512 | Self::Sha3_512 => 64,
        }
    }

    /// Display name, e.g. `SHA-256`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha224 => "SHA-224",
            Self::Sha256 => "SHA-256",
            Self::Sha384 => "SHA-384",
            Self::Sha512 => "SHA-512",
            Self::Sha3_224 => "SHA3-224",
            Self::Sha3_256 => "SHA3-256",
            Self::Sha3_384 => "SHA3-384",
            Self::Sha3_512 => "SHA3-512",
            Self::Sha512_224 => "SHA-512/224",
            Self::Sha512_256 => "SHA-512/256",
        }
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// RSA-PSS salt length, with Go's `rsa.PSSOptions` meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PssSaltLength {
    /// `-1`: the salt is as long as the hash.
    EqualsHash,
    /// `0`: the largest salt the modulus allows.
    Maximum,
    /// `n > 0`: exactly `n` bytes (Go has no way to ask for an empty salt).
    Exact(std::num::NonZeroU16),
}

impl PssSaltLength {
    /// Exactly `n` bytes; `None` for 0 (which Go spells [`PssSaltLength::Maximum`]).
    pub fn exact(n: u16) -> Option<Self> {
        std::num::NonZeroU16::new(n).map(Self::Exact)
    }

    /// The salt length in bytes for a modulus of `modulus_bits` and hash `hash`, or an error
    /// when the requested salt does not fit (RFC 8017 §9.1.1: emLen >= hLen + sLen + 2).
    pub fn bytes(self, modulus_bits: usize, hash: HashAlgorithm) -> Result<usize, SchemeError> {
        let em_len = (modulus_bits - 1).div_ceil(8);
        let max = em_len.saturating_sub(hash.output_len() + 2);
        let wanted = match self {
            Self::EqualsHash => hash.output_len(),
            Self::Maximum => max,
            Self::Exact(n) => usize::from(n.get()),
        };
        if wanted > max {
            return Err(SchemeError::PssSaltTooLong {
                salt: wanted,
                max,
                hash,
                modulus_bits,
            });
        }
        Ok(wanted)
    }
}

/// The signer options exactly as SPIRE sent them, before they are matched to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignerOpts {
    /// A bare hash: ECDSA for EC keys, PKCS#1 v1.5 for RSA keys.
    Hash(HashAlgorithm),
    /// RSA-PSS options.
    Pss {
        /// Message and MGF1 hash.
        hash: HashAlgorithm,
        /// Requested salt length.
        salt: PssSaltLength,
    },
}

impl SignerOpts {
    /// The hash the digest was computed with.
    pub fn hash(self) -> HashAlgorithm {
        match self {
            Self::Hash(hash) | Self::Pss { hash, .. } => hash,
        }
    }
}

/// One explicit signature scheme for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureScheme {
    /// ECDSA; the signature is returned as ASN.1 DER.
    Ecdsa(HashAlgorithm),
    /// RSASSA-PKCS1-v1_5 with the DigestInfo of the hash.
    RsaPkcs1v15(HashAlgorithm),
    /// RSASSA-PSS with MGF1 over the same hash; `salt_len` is resolved to bytes.
    RsaPss {
        /// Message and MGF1 hash.
        hash: HashAlgorithm,
        /// The salt as requested.
        salt: PssSaltLength,
        /// The salt length in bytes for this key.
        salt_len: usize,
    },
}

impl SignatureScheme {
    /// Matches SPIRE's signer options to a key type.
    pub fn resolve(key_type: KeyType, opts: SignerOpts) -> Result<Self, SchemeError> {
        match (key_type.rsa_bits(), opts) {
            (None, SignerOpts::Hash(hash)) => Ok(Self::Ecdsa(hash)),
            (None, SignerOpts::Pss { .. }) => Err(SchemeError::PssOnEcKey(key_type)),
            (Some(_), SignerOpts::Hash(hash)) => Ok(Self::RsaPkcs1v15(hash)),
            (Some(bits), SignerOpts::Pss { hash, salt }) => Ok(Self::RsaPss {
                hash,
                salt,
                salt_len: salt.bytes(bits, hash)?,
            }),
        }
    }

    /// The hash the digest was computed with.
    pub fn hash(self) -> HashAlgorithm {
        match self {
            Self::Ecdsa(hash) | Self::RsaPkcs1v15(hash) | Self::RsaPss { hash, .. } => hash,
        }
    }

    /// The scheme family with its hash, for messages: `ECDSA/SHA-256`, `RSA-PSS/SHA-384`.
    pub fn describe(self) -> String {
        match self {
            Self::Ecdsa(hash) => format!("ECDSA/{hash}"),
            Self::RsaPkcs1v15(hash) => format!("RSA-PKCS1v1.5/{hash}"),
            Self::RsaPss { hash, .. } => format!("RSA-PSS/{hash}"),
        }
    }
}

/// A digest whose length matches its hash algorithm.
#[derive(Clone, PartialEq, Eq)]
pub struct Digest {
    hash: HashAlgorithm,
    bytes: Vec<u8>,
}

impl Digest {
    /// Wraps an already computed digest; the length must match the hash.
    pub fn new(hash: HashAlgorithm, bytes: Vec<u8>) -> Result<Self, SchemeError> {
        if bytes.len() != hash.output_len() {
            return Err(SchemeError::DigestLength {
                hash,
                expected: hash.output_len(),
                actual: bytes.len(),
            });
        }
        Ok(Self { hash, bytes })
    }

    /// The hash algorithm.
    pub fn hash(&self) -> HashAlgorithm {
        self.hash
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The DER `DigestInfo` of RSASSA-PKCS1-v1_5 (RFC 8017 §9.2): what a raw RSA
    /// mechanism (PKCS#11 `CKM_RSA_PKCS`) must be given to sign this digest.
    pub fn pkcs1_digest_info(&self) -> Vec<u8> {
        // SEQUENCE { SEQUENCE { OID 2.16.840.1.101.3.4.2.<n>, NULL }, OCTET STRING digest }:
        // every hash here is in NIST's hashAlgs arc, so only the last OID byte differs.
        let arc = match self.hash {
            HashAlgorithm::Sha256 => 1,
            HashAlgorithm::Sha384 => 2,
            HashAlgorithm::Sha512 => 3,
            HashAlgorithm::Sha224 => 4,
            HashAlgorithm::Sha512_224 => 5,
            HashAlgorithm::Sha512_256 => 6,
            HashAlgorithm::Sha3_224 => 7,
            HashAlgorithm::Sha3_256 => 8,
            HashAlgorithm::Sha3_384 => 9,
            HashAlgorithm::Sha3_512 => 10,
        };
        let len = self.bytes.len() as u8;
        let mut out = vec![
            0x30,
            0x11 + len,
            0x30,
            0x0d,
            0x06,
            0x09,
            0x60,
            0x86,
            0x48,
            0x01,
            0x65,
            0x03,
            0x04,
            0x02,
            arc,
            0x05,
            0x00,
            0x04,
            len,
        ];
        out.extend_from_slice(&self.bytes);
        out
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}, {} bytes)", self.hash, self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_infos_match_rfc_8017() {
        // RFC 8017 §9.2, note 1: the DER prefixes for SHA-256, SHA-384, SHA-512 and SHA-224.
        let cases: [(HashAlgorithm, &str); 4] = [
            (
                HashAlgorithm::Sha256,
                "3031300d060960864801650304020105000420",
            ),
            (
                HashAlgorithm::Sha384,
                "3041300d060960864801650304020205000430",
            ),
            (
                HashAlgorithm::Sha512,
                "3051300d060960864801650304020305000440",
            ),
            (
                HashAlgorithm::Sha224,
                "302d300d06096086480165030402040500041c",
            ),
        ];
        for (hash, prefix) in cases {
            let digest = Digest::new(hash, vec![0xab; hash.output_len()]).expect("digest");
            let info = digest.pkcs1_digest_info();
            assert_eq!(hex::encode(&info[..19]), prefix, "{hash}");
            assert_eq!(&info[19..], digest.as_bytes());
        }
        // Every hash's DigestInfo is one well-formed DER SEQUENCE around its digest.
        for hash in HashAlgorithm::ALL {
            let digest = Digest::new(hash, vec![1; hash.output_len()]).expect("digest");
            let info = digest.pkcs1_digest_info();
            assert_eq!(usize::from(info[1]) + 2, info.len(), "{hash}");
        }
    }

    #[test]
    fn pss_salt_follows_go_semantics() {
        let h = HashAlgorithm::Sha256;
        assert_eq!(PssSaltLength::EqualsHash.bytes(2048, h).unwrap(), 32);
        // ceil(2047/8) - 32 - 2 = 222
        assert_eq!(PssSaltLength::Maximum.bytes(2048, h).unwrap(), 222);
        assert_eq!(
            PssSaltLength::exact(20).unwrap().bytes(2048, h).unwrap(),
            20
        );
        assert_eq!(
            PssSaltLength::exact(223)
                .unwrap()
                .bytes(2048, h)
                .unwrap_err(),
            SchemeError::PssSaltTooLong {
                salt: 223,
                max: 222,
                hash: h,
                modulus_bits: 2048
            }
        );
    }

    #[test]
    fn schemes_resolve_by_key_family() {
        let hash = HashAlgorithm::Sha384;
        assert_eq!(
            SignatureScheme::resolve(KeyType::EcP256, SignerOpts::Hash(hash)).unwrap(),
            SignatureScheme::Ecdsa(hash)
        );
        assert_eq!(
            SignatureScheme::resolve(KeyType::Rsa2048, SignerOpts::Hash(hash)).unwrap(),
            SignatureScheme::RsaPkcs1v15(hash)
        );
        let pss = SignerOpts::Pss {
            hash,
            salt: PssSaltLength::EqualsHash,
        };
        assert!(matches!(
            SignatureScheme::resolve(KeyType::EcP384, pss),
            Err(SchemeError::PssOnEcKey(KeyType::EcP384))
        ));
        assert_eq!(
            SignatureScheme::resolve(KeyType::Rsa4096, pss).unwrap(),
            SignatureScheme::RsaPss {
                hash,
                salt: PssSaltLength::EqualsHash,
                salt_len: 48
            }
        );
    }

    #[test]
    fn digest_length_must_match_hash() {
        assert!(Digest::new(HashAlgorithm::Sha256, vec![0; 32]).is_ok());
        let err = Digest::new(HashAlgorithm::Sha256, vec![0; 48]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "digest is 48 bytes but SHA-256 digests are 32 bytes"
        );
    }
}
