//! Content digests: a sha256 plus the blob's length, as REAPI and Pants use them.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use super::ShardCount;

/// Blobs at or above this size live as plain files under `immutable/files/`; smaller ones in LMDB.
pub const LARGE_BLOB_THRESHOLD: u64 = 512 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub hash: [u8; 32],
    pub size: u64,
}

/// Why a digest string was rejected; the message names the offending text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed digest {input:?}: {reason} (expected <64 hex>-<size> or <64 hex>/<size>)")]
pub struct DigestParseError {
    pub input: String,
    pub reason: &'static str,
}

impl Digest {
    /// The digest of zero bytes: both the empty file and the empty `Directory`.
    pub const EMPTY: Digest = Digest {
        hash: [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ],
        size: 0,
    };

    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest {
            hash: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
        }
    }

    /// Builds a digest from the two REAPI fields, as found inside a `Directory` proto.
    pub fn from_parts(hash_hex: &str, size: i64) -> Result<Digest, DigestParseError> {
        let err = |reason| DigestParseError {
            input: format!("{hash_hex}/{size}"),
            reason,
        };
        let size = u64::try_from(size).map_err(|_| err("negative size"))?;
        Ok(Digest {
            hash: parse_hash(hash_hex).map_err(err)?,
            size,
        })
    }

    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn is_large(&self) -> bool {
        self.size >= LARGE_BLOB_THRESHOLD
    }

    /// The LMDB key Pants uses: the raw hash followed by the schema version byte.
    pub fn lmdb_key(&self) -> [u8; 33] {
        let mut key = [0u8; 33];
        key[..32].copy_from_slice(&self.hash);
        key[32] = 0x02;
        key
    }

    /// Index of the LMDB shard in a store of `count` shards: the top log2(count) bits of the
    /// hash's first byte (with Pants' default 16, its first hex digit).
    pub fn shard(&self, count: ShardCount) -> usize {
        count.shard_of(self)
    }
}

fn parse_hash(hex_str: &str) -> Result<[u8; 32], &'static str> {
    if hex_str.len() != 64 {
        return Err("the hash must be 64 hex digits");
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut hash).map_err(|_| "the hash has a non-hex character")?;
    Ok(hash)
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Digest, DigestParseError> {
        let err = |reason| DigestParseError {
            input: s.to_string(),
            reason,
        };
        let (hash, size) = s
            .split_once(['-', '/'])
            .ok_or_else(|| err("no '-' or '/' between hash and size"))?;
        let hash = parse_hash(hash).map_err(err)?;
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("the size must be a non-negative decimal number"));
        }
        let size = size.parse().map_err(|_| err("the size is too large"))?;
        Ok(Digest { hash, size })
    }
}

/// As text (`<64 hex>-<size>`), as everywhere else digestfs shows a digest.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "1d4ca0e3ee66921e8cb6521b62ecce32cc62abad391bf70b2fd14d40e7681f3a";

    #[test]
    fn parses_both_separators_and_prints_dash() {
        let a: Digest = format!("{HEX}-2920436").parse().unwrap();
        let b: Digest = format!("{HEX}/2920436").parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.size, 2920436);
        assert_eq!(a.to_string(), format!("{HEX}-2920436"));
        assert_eq!(a.shard(ShardCount::DEFAULT), 1);
    }

    #[test]
    fn uppercase_hex_is_normalised() {
        let d: Digest = format!("{}-1", HEX.to_uppercase()).parse().unwrap();
        assert_eq!(d.hex(), HEX);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "abc",
            HEX,
            &format!("{HEX}-"),
            &format!("{HEX}--1"),
            &format!("{HEX}-+1"),
            &format!("{HEX}-1x"),
            &format!("{HEX}-99999999999999999999999"),
            &format!("{}-1", &HEX[1..]),
            &format!("{}g-1", &HEX[1..]),
            &format!("{HEX}0-1"),
        ] {
            let e = bad.parse::<Digest>().unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("malformed digest"), "{e}");
        }
    }

    #[test]
    fn empty_digest_matches_sha256_of_nothing() {
        assert_eq!(Digest::of_bytes(b""), Digest::EMPTY);
    }
}
