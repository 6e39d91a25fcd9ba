//! Hash algorithms, signer options and the signature schemes they resolve to.
//!
//! SPIRE sends signer options in Go's `crypto.SignerOpts` shape: a bare hash (meaning ECDSA
//! for an EC key and PKCS#1 v1.5 for an RSA key) or PSS options. [`SignatureScheme::resolve`]
//! turns that into one explicit scheme for a given key, or a precise error.

use std::fmt;

use crate::error::EngineError;
use crate::key::KeyType;

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
    /// Every hash the protocol can name.
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

    /// Decodes the raw protocol value. SPIRE casts Go's `crypto.Hash` straight through, so
    /// values outside the enum (3 = SHA-1 from TLS 1.2) arrive and must be refused cleanly.
    pub fn from_wire(value: i32) -> Result<Self, EngineError> {
        match value {
            0 => Err(EngineError::HashAlgorithmRequired),
            4 => Ok(Self::Sha224),
            5 => Ok(Self::Sha256),
            6 => Ok(Self::Sha384),
            7 => Ok(Self::Sha512),
            10 => Ok(Self::Sha3_224),
            11 => Ok(Self::Sha3_256),
            12 => Ok(Self::Sha3_384),
            13 => Ok(Self::Sha3_512),
            14 => Ok(Self::Sha512_224),
            15 => Ok(Self::Sha512_256),
            other => Err(EngineError::UnknownHashAlgorithm(other)),
        }
    }

    /// The protocol enum value.
    pub fn to_wire(self) -> i32 {
        match self {
            Self::Sha224 => 4,
            Self::Sha256 => 5,
            Self::Sha384 => 6,
            Self::Sha512 => 7,
            Self::Sha3_224 => 10,
            Self::Sha3_256 => 11,
            Self::Sha3_384 => 12,
            Self::Sha3_512 => 13,
            Self::Sha512_224 => 14,
            Self::Sha512_256 => 15,
        }
    }

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
    /// `n > 0`: exactly `n` bytes.
    Exact(u16),
}

impl PssSaltLength {
    /// Decodes the protocol's `salt_length`.
    pub fn from_wire(value: i32) -> Result<Self, EngineError> {
        match value {
            -1 => Ok(Self::EqualsHash),
            0 => Ok(Self::Maximum),
            n if n > 0 => u16::try_from(n)
                .map(Self::Exact)
                .map_err(|_| EngineError::InvalidPssSaltLength(value)),
            _ => Err(EngineError::InvalidPssSaltLength(value)),
        }
    }

    /// The salt length in bytes for a modulus of `modulus_bits` and hash `hash`, or an error
    /// when the requested salt does not fit (RFC 8017 §9.1.1: emLen >= hLen + sLen + 2).
    pub fn bytes(self, modulus_bits: usize, hash: HashAlgorithm) -> Result<usize, EngineError> {
        let em_len = (modulus_bits - 1).div_ceil(8);
        let max = em_len.saturating_sub(hash.output_len() + 2);
        let wanted = match self {
            Self::EqualsHash => hash.output_len(),
            Self::Maximum => max,
            Self::Exact(n) => usize::from(n),
        };
        if wanted > max {
            return Err(EngineError::PssSaltTooLong {
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
    pub fn resolve(key_type: KeyType, opts: SignerOpts) -> Result<Self, EngineError> {
        match (key_type.rsa_bits(), opts) {
            (None, SignerOpts::Hash(hash)) => Ok(Self::Ecdsa(hash)),
            (None, SignerOpts::Pss { .. }) => Err(EngineError::PssOnEcKey(key_type)),
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
    pub fn new(hash: HashAlgorithm, bytes: Vec<u8>) -> Result<Self, EngineError> {
        if bytes.len() != hash.output_len() {
            return Err(EngineError::DigestLength {
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
    fn hash_wire_values_round_trip_and_out_of_enum_values_are_refused() {
        for h in HashAlgorithm::ALL {
            assert_eq!(HashAlgorithm::from_wire(h.to_wire()).unwrap(), h);
        }
        assert!(matches!(
            HashAlgorithm::from_wire(0),
            Err(EngineError::HashAlgorithmRequired)
        ));
        // 3 is Go's crypto.SHA1, sent by TLS 1.2 ACME signing.
        let err = HashAlgorithm::from_wire(3).unwrap_err();
        assert!(
            err.to_string().contains("unsupported hash algorithm 3"),
            "{err}"
        );
        assert!(HashAlgorithm::from_wire(-7).is_err());
        assert!(HashAlgorithm::from_wire(16).is_err());
    }

    #[test]
    fn pss_salt_follows_go_semantics() {
        let h = HashAlgorithm::Sha256;
        assert_eq!(
            PssSaltLength::from_wire(-1)
                .unwrap()
                .bytes(2048, h)
                .unwrap(),
            32
        );
        // ceil(2047/8) - 32 - 2 = 222
        assert_eq!(
            PssSaltLength::from_wire(0).unwrap().bytes(2048, h).unwrap(),
            222
        );
        assert_eq!(
            PssSaltLength::from_wire(20)
                .unwrap()
                .bytes(2048, h)
                .unwrap(),
            20
        );
        assert!(
            PssSaltLength::from_wire(223)
                .unwrap()
                .bytes(2048, h)
                .is_err()
        );
        assert!(PssSaltLength::from_wire(-2).is_err());
        assert!(PssSaltLength::from_wire(i32::MIN).is_err());
        assert!(PssSaltLength::from_wire(i32::MAX).is_err());
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
            Err(EngineError::PssOnEcKey(KeyType::EcP384))
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
