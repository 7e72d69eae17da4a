//! The Pants local store (`~/.cache/pants/lmdb_store`), read and written in Pants' own format.
//! Nothing here knows about FUSE, NFS or a remote CAS: this is the format and nothing else.
//!
//! Layout: `files/<shard>` and `directories/<shard>` are LMDB environments holding blobs below
//! 512 KiB, as many of each as the store's shard count ([`ShardCount`]); larger file blobs are
//! plain read-only files at `immutable/files/<2 hex>/<64 hex>`.

mod advice;
mod digest;
mod error;
mod import;
mod lease;
mod lmdb;
pub mod proto;
mod shard;
mod tree;
pub mod walk;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use self::digest::{Digest, DigestParseError, LARGE_BLOB_THRESHOLD};
use self::error::io_err;
pub use self::error::StoreError;
pub use self::import::{Importer, LargeBlobWriter};
pub use self::lease::{lease_until, set_lease_mtime, LeaseReport, LEASE_SECS};
pub use self::lmdb::release_mapped_pages;
pub use self::shard::{ShardCount, ShardCountError};
pub use self::tree::{check_name, Entry, EntryKind, Listing, NAME_MAX};
pub use self::walk::{TreeBlobs, PATH_MAX};

const GIB: usize = 1 << 30;
/// Map sizes of one shard in a store of Pants' default 16 shards; used only when this process
/// creates an environment.
const FILES_MAP_SIZE: usize = 4 * GIB;
const DIRECTORIES_MAP_SIZE: usize = GIB / 2;

/// The map size of one of `count` shards: Pants splits one budget per kind of blob between the
/// shards (`max_size / shard_count`), so fewer shards get larger maps.
fn map_size_per_shard(size_of_16: usize, count: ShardCount) -> usize {
    size_of_16 * ShardCount::DEFAULT.get() / count.get()
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The two kinds of blob Pants stores, in separate LMDB environments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlobKind {
    File,
    Directory,
}

impl fmt::Display for BlobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlobKind::File => "file",
            BlobKind::Directory => "directory",
        })
    }
}

/// Pants' default store location: `$PANTS_LOCAL_STORE_DIR`, else `$XDG_CACHE_HOME/pants/lmdb_store`,
/// else `~/.cache/pants/lmdb_store`.
pub fn default_store_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PANTS_LOCAL_STORE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".cache")
        });
    cache.join("pants").join("lmdb_store")
}

/// A handle on one store; clones share its LMDB environments (LMDB forbids opening one
/// environment twice in a process).
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    shard_count: ShardCount,
    files: Arc<lmdb::Shards>,
    directories: Arc<lmdb::Shards>,
}

/// An open file blob. Small blobs are re-read from LMDB per call (a short transaction each);
/// large blobs keep their file open so a read is one `pread`.
#[derive(Clone, Debug)]
pub enum Blob {
    Empty,
    Lmdb(Digest),
    Large(Digest, Arc<File>),
}

impl Blob {
    pub fn digest(&self) -> Digest {
        match self {
            Blob::Empty => Digest::EMPTY,
            Blob::Lmdb(d) | Blob::Large(d, _) => *d,
        }
    }

    /// The backing file of a large blob, for FUSE passthrough.
    pub fn file(&self) -> Option<&Arc<File>> {
        match self {
            Blob::Large(_, f) => Some(f),
            _ => None,
        }
    }
}

impl Store {
    /// Opens the store at `root`, which must exist, with the shard count its folders show
    /// (see [`Store::open_with`]).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        Store::open_with(root, None)
    }

    /// Opens the store at `root`, which must exist. Shards are opened on first use, so a store
    /// that Pants has only partly populated is fine. `shard_count` is Pants'
    /// `--local-store-shard-count`: without it the store's own folders say (16 if it has none);
    /// with it, a shard folder beyond that count is an error naming the folder.
    pub fn open_with(root: impl Into<PathBuf>, shard_count: Option<ShardCount>) -> Result<Store> {
        let root = root.into();
        let meta = std::fs::metadata(&root)
            .map_err(io_err(format!("opening the store {}", root.display())))?;
        if !meta.is_dir() {
            return Err(StoreError::NotADirectory(root));
        }
        let count = ShardCount::resolve(&root, shard_count)?;
        Ok(Store::new_unchecked(root, count))
    }

    /// Opens or creates the store at `root` (for writing into a fresh store), with the shard
    /// count its folders show, else 16.
    pub fn create(root: impl Into<PathBuf>) -> Result<Store> {
        Store::create_with(root, None)
    }

    /// Opens or creates the store at `root`, as [`Store::open_with`] does, and creates every
    /// shard folder of its count under `files/` and `directories/` as Pants does, so that any
    /// reader finds the count from the folders alone.
    pub fn create_with(root: impl Into<PathBuf>, shard_count: Option<ShardCount>) -> Result<Store> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(io_err(format!("creating the store {}", root.display())))?;
        let count = ShardCount::resolve(&root, shard_count)?;
        for kind in shard::KIND_DIRS {
            for i in 0..count.get() {
                let dir = root.join(kind).join(ShardCount::folder(i));
                std::fs::create_dir_all(&dir)
                    .map_err(io_err(format!("creating {}", dir.display())))?;
            }
        }
        Ok(Store::new_unchecked(root, count))
    }

    fn new_unchecked(root: PathBuf, count: ShardCount) -> Store {
        Store {
            files: Arc::new(lmdb::Shards::new(
                root.join("files"),
                map_size_per_shard(FILES_MAP_SIZE, count),
                count,
            )),
            directories: Arc::new(lmdb::Shards::new(
                root.join("directories"),
                map_size_per_shard(DIRECTORIES_MAP_SIZE, count),
                count,
            )),
            shard_count: count,
            root,
        }
    }

    /// Opens every LMDB environment the store has now (see [`lmdb::Shards::open_existing`]):
    /// for a daemon, before it serves. Returns how many.
    pub fn open_existing_shards(&self) -> Result<usize> {
        Ok(self.files.open_existing()? + self.directories.open_existing()?)
    }

    /// How many LMDB shards each kind of blob is spread over.
    pub fn shard_count(&self) -> ShardCount {
        self.shard_count
    }

    /// The LMDB shard of a blob in this store.
    pub fn shard_of(&self, digest: &Digest) -> usize {
        digest.shard(self.shard_count)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a large blob lives.
    pub fn large_blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("immutable")
            .join("files")
            .join(&hex[..2])
            .join(hex)
    }

    fn missing(digest: &Digest, kind: BlobKind) -> StoreError {
        StoreError::Missing {
            digest: *digest,
            kind,
        }
    }

    /// Loads, hash-checks and validates the `Directory` with this digest.
    pub fn load_directory(&self, digest: &Digest) -> Result<Listing> {
        if *digest == Digest::EMPTY {
            return Ok(Listing::default());
        }
        let decoded = self.directories.with_value(digest, |bytes| {
            lmdb::touched(bytes.len());
            if Digest::of_bytes(bytes) != *digest {
                return Err(StoreError::HashMismatch { digest: *digest });
            }
            Listing::decode(digest, bytes)
        })?;
        decoded.unwrap_or_else(|| Err(Store::missing(digest, BlobKind::Directory)))
    }

    /// The raw proto bytes of a `Directory`.
    pub fn directory_bytes(&self, digest: &Digest) -> Result<Vec<u8>> {
        if *digest == Digest::EMPTY {
            return Ok(Vec::new());
        }
        self.directories
            .with_value(digest, |b| b.to_vec())?
            .ok_or_else(|| Store::missing(digest, BlobKind::Directory))
    }

    /// Opens a file blob after checking that it is present and of the right length.
    pub fn open_blob(&self, digest: &Digest) -> Result<Blob> {
        if digest.is_empty() {
            return if *digest == Digest::EMPTY {
                Ok(Blob::Empty)
            } else {
                Err(StoreError::SizeMismatch {
                    digest: *digest,
                    actual: 0,
                })
            };
        }
        if !digest.is_large() {
            return if self.files.contains(digest)? {
                Ok(Blob::Lmdb(*digest))
            } else {
                Err(Store::missing(digest, BlobKind::File))
            };
        }
        let path = self.large_blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Store::missing(digest, BlobKind::File))
            }
            Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
        };
        let actual = file
            .metadata()
            .map_err(io_err(format!("reading the size of {}", path.display())))?
            .len();
        if actual != digest.size {
            return Err(StoreError::SizeMismatch {
                digest: *digest,
                actual,
            });
        }
        advice::on_open(&file);
        Ok(Blob::Large(*digest, Arc::new(file)))
    }

    /// Reads up to `len` bytes at `offset`, fewer only at the end of the blob. A blob that turns
    /// out shorter than its digest (truncated under us) is an error, never a short read.
    pub fn read_blob(&self, blob: &Blob, offset: u64, len: usize) -> Result<Vec<u8>> {
        let want = (blob.digest().size.saturating_sub(offset)).min(len as u64) as usize;
        if let (Blob::Lmdb(d), true) = (blob, want > 0) {
            // Copied out of the map into a buffer that is never zeroed first.
            let mut out = Vec::with_capacity(want);
            return match self.files.append_at(d, offset, want, &mut out)? {
                Some(n) if n == want => Ok(out),
                Some(n) => Err(StoreError::SizeMismatch {
                    digest: *d,
                    actual: offset + n as u64,
                }),
                None => Err(Store::missing(d, BlobKind::File)),
            };
        }
        let mut out = vec![0u8; want];
        self.read_blob_into(blob, offset, &mut out)?;
        Ok(out)
    }

    /// [`Store::read_blob`] into `buf` (up to its length): how many bytes, fewer only at the end
    /// of the blob. For a front end that has its reply buffer already (the io_uring transport).
    pub fn read_blob_into(&self, blob: &Blob, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let digest = blob.digest();
        let want = (digest.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let out = &mut buf[..want];
        if want == 0 {
            return Ok(0);
        }
        match blob {
            Blob::Empty => {}
            Blob::Lmdb(d) => match self.files.read_at(d, offset, out)? {
                Some(n) if n == want => {}
                Some(n) => {
                    return Err(StoreError::SizeMismatch {
                        digest: *d,
                        actual: offset + n as u64,
                    })
                }
                None => return Err(Store::missing(d, BlobKind::File)),
            },
            Blob::Large(d, file) => {
                pread_exact(d, file, offset, out)?;
                advice::after_read(file, offset, want, d.size);
            }
        }
        Ok(want)
    }

    /// A whole blob; for the CLI and tests.
    pub fn read_all(&self, digest: &Digest) -> Result<Vec<u8>> {
        let blob = self.open_blob(digest)?;
        self.read_blob(&blob, 0, digest.size as usize)
    }

    /// Whether a file blob is present, without reading it.
    pub fn has_file(&self, digest: &Digest) -> Result<bool> {
        match self.open_blob(digest) {
            Ok(_) => Ok(true),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether a blob of either kind is present.
    pub fn has(&self, digest: &Digest, kind: BlobKind) -> Result<bool> {
        match kind {
            BlobKind::File => self.has_file(digest),
            BlobKind::Directory => {
                Ok(*digest == Digest::EMPTY || self.directories.contains(digest)?)
            }
        }
    }

    /// Stores a blob that arrived from elsewhere, after checking it hashes to `digest`. Small
    /// blobs go to LMDB, large file blobs to `immutable/files`, as Pants would write them.
    pub fn put_verified(&self, kind: BlobKind, digest: &Digest, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != digest.size {
            return Err(StoreError::SizeMismatch {
                digest: *digest,
                actual: bytes.len() as u64,
            });
        }
        if Digest::of_bytes(bytes) != *digest {
            return Err(StoreError::HashMismatch { digest: *digest });
        }
        if digest.is_empty() {
            return Ok(());
        }
        match kind {
            BlobKind::Directory => self.put_directories(self.shard_of(digest), &[(*digest, bytes)]),
            BlobKind::File if digest.is_large() => match self.large_blob_writer(digest)? {
                Some(mut w) => {
                    w.write(bytes)?;
                    w.commit()
                }
                None => Ok(()),
            },
            BlobKind::File => self.put_small_files(self.shard_of(digest), &[(*digest, bytes)]),
        }
    }

    /// A writer for a large file blob, or `None` if the blob is already stored (its lease is
    /// renewed then). Nothing is visible under the blob's name until `commit` has checked the
    /// bytes against the digest.
    pub fn large_blob_writer(&self, digest: &Digest) -> Result<Option<LargeBlobWriter>> {
        LargeBlobWriter::new(self.large_blob_path(digest), *digest)
    }

    /// Writes small file blobs, all of shard `shard` ([`Store::shard_of`]), in one transaction.
    pub fn put_small_files(&self, shard: usize, blobs: &[(Digest, &[u8])]) -> Result<()> {
        self.files.put_batch(shard, blobs, lease_until())
    }

    /// Writes `Directory` blobs, all of shard `shard` ([`Store::shard_of`]), in one transaction.
    pub fn put_directories(&self, shard: usize, blobs: &[(Digest, &[u8])]) -> Result<()> {
        self.directories.put_batch(shard, blobs, lease_until())
    }

    /// Every distinct blob of the local trees at `roots`, with the `Directory`s that could not
    /// be read (see [`walk::walk_directories`]).
    pub fn tree_blobs(&self, roots: &[Digest]) -> TreeBlobs<StoreError> {
        walk::tree_blobs(roots, &mut |d| self.load_directory(d))
    }

    /// Checks that the keys of the store follow Pants' schema (33 bytes, version byte 2) and sit
    /// in the shard the store's shard count gives them, on up to a few keys per shard; returns
    /// how many were checked.
    pub fn schema_check(&self) -> Result<usize> {
        Ok(self.files.schema_check()? + self.directories.schema_check()?)
    }

    #[cfg(test)]
    pub(crate) fn set_lease_for_tests(&self, kind: BlobKind, d: &Digest, until: u64) {
        match kind {
            BlobKind::File if d.is_large() => {
                set_lease_mtime(&self.large_blob_path(d), until).expect("large blob present")
            }
            BlobKind::File => drop(self.files.renew_leases(self.shard_of(d), &[*d], until)),
            BlobKind::Directory => drop(self.directories.renew_leases(
                self.shard_of(d),
                &[*d],
                until,
            )),
        }
    }
}

/// Fills `out` with `want` bytes of a large blob's file at `offset`; a file that ends early
/// (truncated under us) is an error, never a short read.
fn pread_exact(d: &Digest, file: &File, offset: u64, out: &mut [u8]) -> Result<()> {
    let want = out.len();
    let mut done = 0;
    while done < want {
        match file.read_at(&mut out[done..], offset + done as u64) {
            Ok(0) => {
                return Err(StoreError::SizeMismatch {
                    digest: *d,
                    actual: offset + done as u64,
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(StoreError::Io {
                    context: format!("reading blob {d}"),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_split_one_budget_between_the_shards() {
        let n = |c| ShardCount::new(c).unwrap();
        assert_eq!(map_size_per_shard(FILES_MAP_SIZE, n(16)), 4 * GIB);
        assert_eq!(map_size_per_shard(FILES_MAP_SIZE, n(1)), 64 * GIB);
        assert_eq!(map_size_per_shard(FILES_MAP_SIZE, n(4)), 16 * GIB);
        assert_eq!(map_size_per_shard(FILES_MAP_SIZE, n(128)), GIB / 2);
        assert_eq!(map_size_per_shard(DIRECTORIES_MAP_SIZE, n(128)), GIB / 16);
    }
}
