//! How Pants spreads its LMDB blobs over environments: `--local-store-shard-count` N, any
//! power of two from 1 to 128 (16 by default), the same N for `files/` and `directories/`.
//!
//! As Pants' `sharded_lmdb` does it: the shard of a blob is the top log2(N) bits of the first
//! byte of its sha256 (`fingerprint[0] & mask`, the mask being those top bits), and its folder
//! is the shard's number in lowercase hex without padding (`files/0` … `files/3` for 4 shards,
//! `files/0` … `files/7f` for 128). Pants creates every folder of its count when it opens a
//! store, so the highest folder present says how many shards the store has.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::error::io_err;
use super::{Digest, StoreError};

/// The two folders of LMDB environments, one per kind of blob.
pub const KIND_DIRS: [&str; 2] = ["files", "directories"];

/// A valid shard count: a power of two from 1 to 128.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardCount(u8);

/// Why a shard count was refused; the message says what is accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a valid shard count: it must be a power of two from 1 to 128 (1, 2, 4, 8, 16, 32, 64 or 128), as Pants' --local-store-shard-count")]
pub struct ShardCountError {
    pub input: String,
}

impl ShardCount {
    /// Pants' default.
    pub const DEFAULT: ShardCount = ShardCount(16);
    /// The most Pants allows (its count is a `u8` power of two).
    pub const MAX: ShardCount = ShardCount(128);

    pub fn new(n: u32) -> Result<ShardCount, ShardCountError> {
        if n.is_power_of_two() && n <= Self::MAX.0 as u32 {
            Ok(ShardCount(n as u8))
        } else {
            Err(ShardCountError {
                input: n.to_string(),
            })
        }
    }

    /// The fewest shards whose folders include shard `index` (at most [`ShardCount::MAX`]).
    fn covering(index: usize) -> Option<ShardCount> {
        let n = (index + 1).next_power_of_two();
        ShardCount::new(u32::try_from(n).ok()?).ok()
    }

    pub fn get(self) -> usize {
        self.0 as usize
    }

    /// The shard of a blob: the top log2(N) bits of its hash's first byte.
    pub fn shard_of(self, digest: &Digest) -> usize {
        let shift = 8 - self.0.trailing_zeros();
        // In u32: with one shard the shift is 8, which a u8 cannot take.
        (u32::from(digest.hash[0]) >> shift) as usize
    }

    /// The folder name of shard `index`: lowercase hex, no padding.
    pub fn folder(index: usize) -> String {
        format!("{index:x}")
    }

    /// The shard number a folder name stands for, if it is one (exactly as Pants names them:
    /// lowercase hex without leading zeros).
    pub fn parse_folder(name: &str) -> Option<usize> {
        let canonical = !name.is_empty()
            && name.len() <= 2
            && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && (name == "0" || !name.starts_with('0'));
        canonical
            .then(|| usize::from_str_radix(name, 16).ok())
            .flatten()
    }

    /// The shard count of the store at `root`: `asked` (the option) if given, else what its
    /// folders say, else [`ShardCount::DEFAULT`] for an empty or absent store. A folder the
    /// asked count does not have is an error naming it.
    pub fn resolve(root: &Path, asked: Option<ShardCount>) -> Result<ShardCount, StoreError> {
        let found = highest_folder(root)?;
        let Some((index, path)) = found else {
            return Ok(asked.unwrap_or(ShardCount::DEFAULT));
        };
        let covering = ShardCount::covering(index).ok_or_else(|| StoreError::Shards {
            path: path.clone(),
            reason: format!(
                "a shard folder beyond the last of the most shards Pants allows ({} is \
                 {index}; 128 shards end at 7f)",
                ShardCount::folder(index)
            ),
        })?;
        match asked {
            None => Ok(covering),
            Some(n) if index >= n.get() => Err(StoreError::Shards {
                path,
                reason: format!(
                    "a store of {n} shards (--local-store-shard-count {n}) has no shard {}: \
                     its folders end at {}. This store was written with at least {covering} \
                     shards: pass --local-store-shard-count {covering}, or leave the option out \
                     to follow the store",
                    ShardCount::folder(index),
                    ShardCount::folder(n.get() - 1),
                ),
            }),
            Some(n) => {
                if covering < n {
                    log::warn!(
                        "{}: the shard folders present end at {} (as in a store of {covering} \
                         shards); reading it as {n} shards, as --local-store-shard-count says",
                        root.display(),
                        ShardCount::folder(index)
                    );
                }
                Ok(n)
            }
        }
    }
}

/// The highest-numbered shard folder under `files/` and `directories/`, with its path; `None`
/// if there is none (or no store). Names that are not shard numbers are left alone.
fn highest_folder(root: &Path) -> Result<Option<(usize, PathBuf)>, StoreError> {
    let mut best: Option<(usize, PathBuf)> = None;
    for kind in KIND_DIRS {
        let dir = root.join(kind);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(format!("listing {}", dir.display()))(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing {}", dir.display())))?;
            let Some(index) = entry
                .file_name()
                .to_str()
                .and_then(ShardCount::parse_folder)
            else {
                continue;
            };
            if !entry.path().is_dir() {
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| index > *b) {
                best = Some((index, entry.path()));
            }
        }
    }
    Ok(best)
}

impl Default for ShardCount {
    fn default() -> ShardCount {
        ShardCount::DEFAULT
    }
}

impl FromStr for ShardCount {
    type Err = ShardCountError;

    fn from_str(s: &str) -> Result<ShardCount, ShardCountError> {
        let err = || ShardCountError {
            input: s.to_string(),
        };
        let n: u32 = s.trim().parse().map_err(|_| err())?;
        ShardCount::new(n).map_err(|_| err())
    }
}

impl fmt::Display for ShardCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for ShardCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} shards", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(first: u8) -> Digest {
        let mut hash = [0x5a; 32];
        hash[0] = first;
        Digest { hash, size: 1 }
    }

    fn n(count: u32) -> ShardCount {
        ShardCount::new(count).unwrap()
    }

    #[test]
    fn shard_is_the_top_bits_of_the_first_byte() {
        // (first byte, shard with 1, 2, 4, 16, 128 shards)
        for (first, want) in [
            (0x00u8, [0usize, 0, 0, 0, 0]),
            (0x01, [0, 0, 0, 0, 0]),
            (0x3f, [0, 0, 0, 3, 31]),
            (0x40, [0, 0, 1, 4, 32]),
            (0x7f, [0, 0, 1, 7, 63]),
            (0x80, [0, 1, 2, 8, 64]),
            (0xbf, [0, 1, 2, 0xb, 95]),
            (0xc0, [0, 1, 3, 0xc, 96]),
            (0xfe, [0, 1, 3, 0xf, 127]),
            (0xff, [0, 1, 3, 0xf, 127]),
        ] {
            for (count, want) in [1, 2, 4, 16, 128].into_iter().zip(want) {
                assert_eq!(
                    n(count).shard_of(&digest(first)),
                    want,
                    "{first:#04x} with {count}"
                );
            }
        }
    }

    #[test]
    fn known_digests() {
        // guava's jar, 1d4ca0e3…: first byte 0x1d = 0b0001_1101.
        let guava: Digest =
            "1d4ca0e3ee66921e8cb6521b62ecce32cc62abad391bf70b2fd14d40e7681f3a-2920436"
                .parse()
                .unwrap();
        let empty = Digest::EMPTY; // e3b0c442…: 0xe3 = 0b1110_0011.
        for (count, g, e) in [
            (1, 0, 0),
            (2, 0, 1),
            (4, 0, 3),
            (8, 0, 7),
            (16, 1, 0xe),
            (32, 3, 28),
            (64, 7, 56),
            (128, 14, 113),
        ] {
            assert_eq!(n(count).shard_of(&guava), g, "guava, {count}");
            assert_eq!(n(count).shard_of(&empty), e, "empty, {count}");
        }
    }

    /// Every shard of every count is reachable, and none beyond the count.
    #[test]
    fn shards_cover_exactly_their_count() {
        for count in [1, 2, 4, 8, 16, 32, 64, 128] {
            let mut seen = std::collections::BTreeSet::new();
            for b in 0..=255u8 {
                seen.insert(n(count).shard_of(&digest(b)));
            }
            assert_eq!(seen, (0..count as usize).collect(), "{count}");
        }
    }

    #[test]
    fn counts_are_validated() {
        for ok in ["1", "2", "4", "8", "16", "32", "64", "128"] {
            assert_eq!(ok.parse::<ShardCount>().unwrap().to_string(), ok);
        }
        for bad in ["0", "3", "12", "256", "-1", "", "x", "16.0", "4294967296"] {
            let e = bad.parse::<ShardCount>().unwrap_err();
            assert!(e.to_string().contains("power of two from 1 to 128"), "{e}");
        }
    }

    #[test]
    fn folder_names_are_pants_names() {
        assert_eq!(ShardCount::folder(0), "0");
        assert_eq!(ShardCount::folder(15), "f");
        assert_eq!(ShardCount::folder(127), "7f");
        for (name, want) in [
            ("0", Some(0)),
            ("f", Some(15)),
            ("10", Some(16)),
            ("7f", Some(127)),
            ("F", None),
            ("00", None),
            ("0f", None),
            ("100", None),
            ("", None),
            ("g", None),
            ("lock.mdb", None),
        ] {
            assert_eq!(ShardCount::parse_folder(name), want, "{name:?}");
        }
    }

    fn store_with(folders: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in folders {
            std::fs::create_dir_all(dir.path().join(f)).unwrap();
        }
        dir
    }

    #[test]
    fn detection_follows_the_highest_folder() {
        for (folders, want) in [
            (&[][..], 16),
            (&["files"][..], 16),
            (&["files/0"][..], 1),
            (&["files/0", "files/1"][..], 2),
            (&["files/0", "files/3", "directories/2"][..], 4),
            (&["files/0", "directories/5"][..], 8),
            (&["files/0", "files/f"][..], 16),
            (&["files/10"][..], 32),
            (&["files/7f", "directories/0"][..], 128),
            // Not shard folders: ignored.
            (&["files/0", "files/tmp", "files/F", "files/01"][..], 1),
        ] {
            let store = store_with(folders);
            assert_eq!(
                ShardCount::resolve(store.path(), None).unwrap(),
                n(want),
                "{folders:?}"
            );
        }
        // An absent store defaults too.
        let none = tempfile::tempdir().unwrap();
        assert_eq!(
            ShardCount::resolve(&none.path().join("absent"), None).unwrap(),
            ShardCount::DEFAULT
        );
        // A file named like a shard is not a folder.
        let store = store_with(&["files/0"]);
        std::fs::write(store.path().join("files/9"), b"").unwrap();
        assert_eq!(ShardCount::resolve(store.path(), None).unwrap(), n(1));
    }

    #[test]
    fn the_option_wins_unless_the_folders_contradict_it() {
        let store = store_with(&["files/0", "files/3", "directories/3"]);
        assert_eq!(ShardCount::resolve(store.path(), Some(n(4))).unwrap(), n(4));
        assert_eq!(
            ShardCount::resolve(store.path(), Some(n(16))).unwrap(),
            n(16)
        );
        let empty = store_with(&[]);
        assert_eq!(ShardCount::resolve(empty.path(), Some(n(2))).unwrap(), n(2));

        let store = store_with(&["files/0", "files/9"]);
        let err = ShardCount::resolve(store.path(), Some(n(4))).unwrap_err();
        let msg = err.to_string();
        let path = store.path().join("files/9");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(
            msg.contains("--local-store-shard-count 16") && msg.contains("4 shards"),
            "{msg}"
        );
    }

    #[test]
    fn a_folder_beyond_128_shards_is_an_error() {
        let store = store_with(&["directories/80"]);
        let msg = ShardCount::resolve(store.path(), None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("directories/80"), "{msg}");
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::store::{BlobKind, Importer, Store};

    /// Blobs of every shard of a 4-shard store: written, found in the folder Pants would put
    /// them in, read back byte for byte, their leases renewed, and checked by the schema check.
    #[test]
    fn a_store_of_4_shards_reads_back_and_renews_leases() {
        use lmdb::Transaction;
        let dir = tempfile::tempdir().unwrap();
        let four = ShardCount::new(4).unwrap();
        let blobs: Vec<Vec<u8>> = (0..64u32)
            .map(|i| format!("blob {i}").into_bytes())
            .collect();
        let digests: Vec<Digest> = {
            let store = Store::create_with(dir.path(), Some(four)).unwrap();
            let mut imp = Importer::new(&store);
            let digests = blobs.iter().map(|b| imp.put_bytes(b).unwrap()).collect();
            imp.finish().unwrap();
            digests
        };
        for kind in KIND_DIRS {
            let mut names: Vec<String> = std::fs::read_dir(dir.path().join(kind))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["0", "1", "2", "3"], "{kind}");
        }
        let shards: std::collections::BTreeSet<usize> =
            digests.iter().map(|d| d.shard(four)).collect();
        assert_eq!(shards.len(), 4, "the blobs cover every shard");
        // Each blob is in the environment of its shard's folder and no other (the writer's
        // environments are closed: a process must not open one twice).
        for i in 0..4 {
            let env = lmdb::Environment::new()
                .set_max_dbs(2)
                .open(&dir.path().join("files").join(ShardCount::folder(i)))
                .unwrap();
            let db = env.open_db(Some(crate::store::lmdb::CONTENT_DB)).unwrap();
            let txn = env.begin_ro_txn().unwrap();
            for d in &digests {
                let found = txn.get(db, &d.lmdb_key()).is_ok();
                assert_eq!(found, i == d.shard(four), "{d} in files/{i}");
            }
        }

        // A reader that is told nothing finds 4 shards, and every blob.
        let reader = Store::open(dir.path()).unwrap();
        assert_eq!(reader.shard_count(), four);
        for (d, b) in digests.iter().zip(&blobs) {
            assert_eq!(&reader.read_all(d).unwrap(), b, "{d}");
        }
        assert_eq!(reader.schema_check().unwrap(), 16);
        let report = reader.renew_leases(&digests, &[]).unwrap();
        assert_eq!((report.renewed, report.missing), (64, 0));
        assert!(reader.lease(&digests[0], BlobKind::File).unwrap().is_some());
        drop(reader);

        // Read as 2 shards: the folders 2 and 3 contradict it.
        let err = Store::open_with(dir.path(), Some(ShardCount::new(2).unwrap()))
            .err()
            .unwrap()
            .to_string();
        let three = dir.path().join("files").join("3");
        assert!(err.contains(three.to_str().unwrap()), "{err}");
        // Read as 16 shards: the keys sit in the wrong folders, which the schema check says.
        let wrong = Store::open_with(dir.path(), Some(ShardCount::DEFAULT)).unwrap();
        let err = wrong.schema_check().unwrap_err().to_string();
        assert!(err.contains("another shard count"), "{err}");
    }
}
