//! The Pants local store (`~/.cache/pants/lmdb_store`), read and written in Pants' own format.
//! Nothing here knows about FUSE.
//!
//! Layout: `files/<shard>` and `directories/<shard>` are LMDB environments holding blobs below
//! 512 KiB; larger file blobs are plain read-only files at `immutable/files/<2 hex>/<64 hex>`.

mod digest;
mod import;
mod lmdb;
mod materialize;
pub mod proto;
mod tree;

#[cfg(test)]
mod backfill_tests;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use self::digest::{Digest, DigestParseError, LARGE_BLOB_THRESHOLD};
pub use self::import::{Importer, LargeBlobWriter};
pub use self::lmdb::LEASE_SECS;
pub use self::materialize::{materialize, materialize_with_progress};
pub use self::tree::{check_name, Entry, EntryKind, Listing, NAME_MAX};

const GIB: usize = 1 << 30;
/// Map sizes Pants gives each shard; used only when this process creates an environment.
const FILES_MAP_SIZE: usize = 4 * GIB;
const DIRECTORIES_MAP_SIZE: usize = GIB / 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    BadDigest(#[from] DigestParseError),
    #[error("{kind} {digest} is not in the store")]
    Missing { digest: Digest, kind: &'static str },
    #[error("blob {digest} is corrupt: the store holds {actual} bytes, the digest says {}", digest.size)]
    SizeMismatch { digest: Digest, actual: u64 },
    #[error("blob {digest} is corrupt: its content does not hash to its digest")]
    HashMismatch { digest: Digest },
    #[error("directory {digest} is corrupt: {reason}")]
    CorruptDirectory { digest: Digest, reason: String },
    #[error("directory {digest} holds the entry {name:?}, which cannot be served: {reason}")]
    BadName {
        digest: Digest,
        name: String,
        reason: &'static str,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{context}: {source}")]
    Lmdb {
        context: String,
        #[source]
        source: ::lmdb::Error,
    },
    #[error("fetching {kind} {digest} from the remote CAS: {reason}")]
    Remote {
        digest: Digest,
        kind: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    /// True when the blob simply is not there (as opposed to being unreadable or corrupt).
    pub fn is_missing(&self) -> bool {
        matches!(self, StoreError::Missing { .. })
    }

    /// The blob an error concerns, if it concerns one: the digest to name in logs.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            StoreError::Missing { digest, .. }
            | StoreError::SizeMismatch { digest, .. }
            | StoreError::HashMismatch { digest }
            | StoreError::CorruptDirectory { digest, .. }
            | StoreError::BadName { digest, .. }
            | StoreError::Remote { digest, .. } => Some(*digest),
            _ => None,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

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
    files: Arc<lmdb::Shards>,
    directories: Arc<lmdb::Shards>,
    backfill: Option<Arc<dyn Backfill>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlobKind {
    File,
    Directory,
}

impl BlobKind {
    pub fn name(self) -> &'static str {
        match self {
            BlobKind::File => "file",
            BlobKind::Directory => "directory",
        }
    }
}

/// Where blobs missing from the local store come from (a remote CAS). `fetch` writes the blob
/// into `store`, verified, before it returns `Ok(true)`; `Ok(false)` means the source lacks it too.
pub trait Backfill: Send + Sync {
    fn fetch(&self, store: &Store, digest: &Digest, kind: BlobKind) -> Result<bool>;
    /// Whether the source has a file blob, without fetching it.
    fn contains(&self, digest: &Digest) -> Result<bool>;
    /// Whether reads of a large blob may be answered by ranges from the source while the whole
    /// blob is fetched (and only then verified) in the background.
    fn serves_ranges(&self) -> bool {
        false
    }
    /// Starts fetching a blob into `store` without waiting for it.
    fn start_fetch(&self, _store: &Store, _digest: &Digest) {}
    /// Exactly `len` bytes of the blob at `offset` (fewer only at its end), straight from the
    /// source.
    fn read_range(&self, digest: &Digest, _offset: u64, _len: usize) -> Result<Vec<u8>> {
        Err(StoreError::Missing {
            digest: *digest,
            kind: "file",
        })
    }
}

/// An open file blob. Small blobs are re-read from LMDB per call (a short transaction each);
/// large blobs keep their file open so a read is one `pread`.
#[derive(Clone, Debug)]
pub enum Blob {
    Empty,
    Lmdb(Digest),
    Large(Digest, Arc<File>),
    /// A large blob still being fetched: read by ranges from the backfill until it is local.
    Fetching(Arc<FetchingBlob>),
}

#[derive(Debug)]
pub struct FetchingBlob {
    digest: Digest,
    /// The local file, once the fetch has put it in place.
    local: std::sync::OnceLock<Arc<File>>,
}

impl Blob {
    pub fn digest(&self) -> Digest {
        match self {
            Blob::Empty => Digest::EMPTY,
            Blob::Lmdb(d) | Blob::Large(d, _) => *d,
            Blob::Fetching(f) => f.digest,
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
    /// Opens the store at `root`, which must exist. Shards are opened on first use, so a store
    /// that Pants has only partly populated is fine.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        let meta = std::fs::metadata(&root).map_err(|source| StoreError::Io {
            context: format!("opening the store {}", root.display()),
            source,
        })?;
        if !meta.is_dir() {
            return Err(StoreError::Other(format!(
                "the store {} is not a directory",
                root.display()
            )));
        }
        Ok(Store::new_unchecked(root))
    }

    /// Opens or creates the store at `root` (for writing into a fresh store).
    pub fn create(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|source| StoreError::Io {
            context: format!("creating the store {}", root.display()),
            source,
        })?;
        Ok(Store::new_unchecked(root))
    }

    fn new_unchecked(root: PathBuf) -> Store {
        Store {
            files: Arc::new(lmdb::Shards::new(root.join("files"), FILES_MAP_SIZE)),
            directories: Arc::new(lmdb::Shards::new(
                root.join("directories"),
                DIRECTORIES_MAP_SIZE,
            )),
            root,
            backfill: None,
        }
    }

    /// Reads of blobs this store lacks will ask `backfill` for them first.
    pub fn with_backfill(mut self, backfill: Arc<dyn Backfill>) -> Store {
        self.backfill = Some(backfill);
        self
    }

    /// The same store, reading only what is local (for the backfill's own writes and checks).
    pub fn local_only(&self) -> Store {
        Store {
            backfill: None,
            ..self.clone()
        }
    }

    /// After a local miss: fetches the blob if a backfill is set; true when it is now local.
    fn backfill(&self, digest: &Digest, kind: BlobKind) -> Result<bool> {
        match &self.backfill {
            Some(b) => b.fetch(&self.local_only(), digest, kind),
            None => Ok(false),
        }
    }

    /// Runs a local read, and once more after fetching the blob if it was missing.
    fn local_or_fetched<T>(
        &self,
        digest: &Digest,
        kind: BlobKind,
        read: impl Fn() -> Result<T>,
    ) -> Result<T> {
        match read() {
            Err(e) if e.is_missing() && self.backfill(digest, kind)? => read(),
            other => other,
        }
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

    /// Loads, hash-checks and validates the `Directory` with this digest.
    pub fn load_directory(&self, digest: &Digest) -> Result<Listing> {
        if *digest == Digest::EMPTY {
            return Ok(Listing::default());
        }
        self.local_or_fetched(digest, BlobKind::Directory, || {
            self.load_local_directory(digest)
        })
    }

    fn load_local_directory(&self, digest: &Digest) -> Result<Listing> {
        let decoded = self.directories.with_value(digest, |bytes| {
            if Digest::of_bytes(bytes) != *digest {
                return Err(StoreError::HashMismatch { digest: *digest });
            }
            Listing::decode(digest, bytes)
        })?;
        decoded.unwrap_or(Err(StoreError::Missing {
            digest: *digest,
            kind: "directory",
        }))
    }

    /// The raw proto bytes of a `Directory`.
    pub fn directory_bytes(&self, digest: &Digest) -> Result<Vec<u8>> {
        if *digest == Digest::EMPTY {
            return Ok(Vec::new());
        }
        self.local_or_fetched(digest, BlobKind::Directory, || {
            self.directories
                .with_value(digest, |b| b.to_vec())?
                .ok_or(StoreError::Missing {
                    digest: *digest,
                    kind: "directory",
                })
        })
    }

    /// Opens a file blob after checking that it is present and of the right length. A missing
    /// blob is fetched first, or, for large blobs from a backfill that serves ranges, opened
    /// for ranged reads while it is fetched.
    pub fn open_blob(&self, digest: &Digest) -> Result<Blob> {
        if let Some(b) = self
            .backfill
            .as_ref()
            .filter(|b| digest.is_large() && b.serves_ranges())
        {
            return match self.open_local_blob(digest) {
                Err(e) if e.is_missing() => {
                    b.start_fetch(&self.local_only(), digest);
                    Ok(Blob::Fetching(Arc::new(FetchingBlob {
                        digest: *digest,
                        local: std::sync::OnceLock::new(),
                    })))
                }
                other => other,
            };
        }
        self.local_or_fetched(digest, BlobKind::File, || self.open_local_blob(digest))
    }

    fn open_local_blob(&self, digest: &Digest) -> Result<Blob> {
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
        let missing = || StoreError::Missing {
            digest: *digest,
            kind: "file",
        };
        if !digest.is_large() {
            return if self.files.contains(digest)? {
                Ok(Blob::Lmdb(*digest))
            } else {
                Err(missing())
            };
        }
        let path = self.large_blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(source) => {
                return Err(StoreError::Io {
                    context: format!("opening {}", path.display()),
                    source,
                })
            }
        };
        let actual = file
            .metadata()
            .map_err(|source| StoreError::Io {
                context: format!("reading the size of {}", path.display()),
                source,
            })?
            .len();
        if actual != digest.size {
            return Err(StoreError::SizeMismatch {
                digest: *digest,
                actual,
            });
        }
        // Jars are mostly read front to back: a larger readahead window on the store file.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::POSIX_FADV_SEQUENTIAL,
            )
        };
        Ok(Blob::Large(*digest, Arc::new(file)))
    }

    /// Reads up to `len` bytes at `offset`, fewer only at the end of the blob. A blob that turns
    /// out shorter than its digest (truncated under us) is an error, never a short read.
    pub fn read_blob(&self, blob: &Blob, offset: u64, len: usize) -> Result<Vec<u8>> {
        let digest = blob.digest();
        let want = (digest.size.saturating_sub(offset)).min(len as u64) as usize;
        let mut out = Vec::with_capacity(want);
        if want == 0 {
            return Ok(out);
        }
        match blob {
            Blob::Empty => {}
            Blob::Lmdb(d) => {
                if !self.files.read_at(d, offset, want, &mut out)? {
                    return Err(StoreError::Missing {
                        digest: *d,
                        kind: "file",
                    });
                }
            }
            Blob::Large(d, file) => pread_exact(d, file, offset, want, &mut out)?,
            Blob::Fetching(f) => {
                if f.local.get().is_none() {
                    match self.open_local_blob(&f.digest) {
                        Ok(Blob::Large(_, file)) => {
                            let _ = f.local.set(file);
                        }
                        Err(e) if !e.is_missing() => return Err(e),
                        _ => {}
                    }
                }
                if let (None, Some(b)) = (f.local.get(), &self.backfill) {
                    // Restarts a fetch that failed; joins the one under way otherwise.
                    b.start_fetch(&self.local_only(), &f.digest);
                }
                match (f.local.get(), &self.backfill) {
                    (Some(file), _) => pread_exact(&f.digest, file, offset, want, &mut out)?,
                    (None, Some(b)) => {
                        out = b.read_range(&f.digest, offset, want)?;
                        if out.len() != want {
                            return Err(StoreError::Remote {
                                digest: f.digest,
                                kind: "file",
                                reason: format!(
                                    "asked for {want} bytes at {offset}, got {}",
                                    out.len()
                                ),
                            });
                        }
                    }
                    (None, None) => {
                        return Err(StoreError::Missing {
                            digest: f.digest,
                            kind: "file",
                        })
                    }
                }
            }
        }
        Ok(out)
    }

    /// Calls `f` on the blob's bytes in order, 1 MiB at a time, never holding the whole blob.
    pub fn for_each_chunk<E: From<StoreError>>(
        &self,
        blob: &Blob,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let size = blob.digest().size;
        let mut offset = 0;
        while offset < size {
            let chunk = self.read_blob(blob, offset, 1 << 20)?;
            f(&chunk)?;
            offset += chunk.len() as u64;
        }
        Ok(())
    }

    /// A whole small blob, or any blob via the file path; for the CLI and tests.
    pub fn read_all(&self, digest: &Digest) -> Result<Vec<u8>> {
        let blob = self.open_blob(digest)?;
        self.read_blob(&blob, 0, digest.size as usize)
    }

    /// Whether a file blob is present (or, with a backfill, can be fetched), without reading it.
    pub fn has_file(&self, digest: &Digest) -> Result<bool> {
        match self.open_local_blob(digest) {
            Ok(_) => Ok(true),
            Err(e) if e.is_missing() => match &self.backfill {
                Some(b) => b.contains(digest),
                None => Ok(false),
            },
            Err(e) => Err(e),
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
            BlobKind::Directory => self.put_directories(digest.shard(), &[(*digest, bytes)]),
            BlobKind::File if digest.is_large() => match self.large_blob_writer(digest)? {
                Some(mut w) => {
                    w.write(bytes)?;
                    w.commit()
                }
                None => Ok(()),
            },
            BlobKind::File => self.put_small_files(digest.shard(), &[(*digest, bytes)]),
        }
    }

    /// A writer for a large file blob, or `None` if the blob is already stored (its lease is
    /// renewed then). Nothing is visible under the blob's name until `commit` has checked the
    /// bytes against the digest.
    pub fn large_blob_writer(&self, digest: &Digest) -> Result<Option<LargeBlobWriter>> {
        LargeBlobWriter::new(self.large_blob_path(digest), *digest)
    }

    pub(crate) fn put_small_files(&self, shard: usize, blobs: &[(Digest, &[u8])]) -> Result<()> {
        self.files.put_batch(shard, blobs, lease_until())
    }

    pub(crate) fn put_directories(&self, shard: usize, blobs: &[(Digest, &[u8])]) -> Result<()> {
        self.directories.put_batch(shard, blobs, lease_until())
    }

    /// Walks the tree under `root` depth-first, calling `f` with each entry's path (relative,
    /// '/'-separated) and kind. Directories are visited before their contents.
    pub fn walk(
        &self,
        root: &Digest,
        f: &mut dyn FnMut(&str, &EntryKind) -> Result<()>,
    ) -> Result<()> {
        fn go(
            store: &Store,
            dir: &Digest,
            prefix: &str,
            f: &mut dyn FnMut(&str, &EntryKind) -> Result<()>,
        ) -> Result<()> {
            let listing = store.load_directory(dir)?;
            for e in &listing.entries {
                let path = if prefix.is_empty() {
                    e.name.clone()
                } else {
                    format!("{prefix}/{}", e.name)
                };
                f(&path, &e.kind)?;
                if let EntryKind::Dir(d) = &e.kind {
                    go(store, d, &path, f)?;
                }
            }
            Ok(())
        }
        go(self, root, "", f)
    }
}

impl Store {
    /// Visits each distinct `Directory` of the trees at `roots` once. A `Directory` that cannot
    /// be loaded goes to `on_error`, which either skips it (`Ok`) or ends the walk.
    pub fn walk_directories(
        &self,
        roots: &[Digest],
        on_dir: &mut dyn FnMut(&Digest, &Listing),
        on_error: &mut dyn FnMut(StoreError) -> Result<()>,
    ) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        let mut todo = roots.to_vec();
        while let Some(d) = todo.pop() {
            if !seen.insert(d) {
                continue;
            }
            match self.load_directory(&d) {
                Ok(listing) => {
                    on_dir(&d, &listing);
                    todo.extend(listing.entries.iter().filter_map(|e| match e.kind {
                        EntryKind::Dir(sub) => Some(sub),
                        _ => None,
                    }));
                }
                Err(e) => on_error(e)?,
            }
        }
        Ok(())
    }

    /// The distinct file and `Directory` digests of the trees at `roots`, with `on_error` as in
    /// [`Store::walk_directories`].
    pub fn tree_digests(
        &self,
        roots: &[Digest],
        on_error: &mut dyn FnMut(StoreError) -> Result<()>,
    ) -> Result<(Vec<Digest>, Vec<Digest>)> {
        let mut dirs = Vec::new();
        let mut files = std::collections::HashSet::new();
        self.walk_directories(
            roots,
            &mut |d, listing| {
                dirs.push(*d);
                files.extend(listing.entries.iter().filter_map(|e| match e.kind {
                    EntryKind::File { digest, .. } => Some(digest),
                    _ => None,
                }));
            },
            on_error,
        )?;
        Ok((files.into_iter().collect(), dirs))
    }
}

/// What one lease renewal found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseReport {
    pub renewed: usize,
    pub missing: usize,
}

impl Store {
    /// Extends the leases of these blobs to two hours from now, as Pants would: the
    /// `leases-versioned` value for blobs in LMDB (file and `Directory` blobs), the mtime for
    /// large files. Blobs no longer present are counted, not recreated.
    pub fn renew_leases(&self, files: &[Digest], dirs: &[Digest]) -> Result<LeaseReport> {
        let until = lease_until();
        let mut report = LeaseReport::default();
        let mut small: Vec<Vec<Digest>> = vec![Vec::new(); 16];
        for d in files.iter().filter(|d| !d.is_empty()) {
            if d.is_large() {
                match set_lease_mtime(&self.large_blob_path(d), until) {
                    Ok(()) => report.renewed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => report.missing += 1,
                    Err(source) => {
                        return Err(StoreError::Io {
                            context: format!("renewing the lease of {d}"),
                            source,
                        })
                    }
                }
            } else {
                small[d.shard()].push(*d);
            }
        }
        let mut dir_shards: Vec<Vec<Digest>> = vec![Vec::new(); 16];
        for d in dirs.iter().filter(|d| **d != Digest::EMPTY) {
            dir_shards[d.shard()].push(*d);
        }
        for (shard, (fs, ds)) in small.iter().zip(&dir_shards).enumerate() {
            let renewed = self.files.renew_leases(shard, fs, until)?
                + self.directories.renew_leases(shard, ds, until)?;
            report.renewed += renewed;
            report.missing += fs.len() + ds.len() - renewed;
        }
        Ok(report)
    }

    #[cfg(test)]
    pub(crate) fn files_for_tests(&self) -> &lmdb::Shards {
        &self.files
    }

    #[cfg(test)]
    pub(crate) fn directories_for_tests(&self) -> &lmdb::Shards {
        &self.directories
    }

    /// Checks that the keys of the store follow Pants' schema (33 bytes, version byte 2), on up
    /// to a few keys per shard; returns how many were checked.
    pub fn schema_check(&self) -> Result<usize> {
        Ok(self.files.schema_check()? + self.directories.schema_check()?)
    }

    /// The lease end of a blob, in seconds since the epoch: the LMDB lease, or a large file's
    /// mtime. `None` if it has none.
    pub fn lease(&self, digest: &Digest, directory: bool) -> Result<Option<u64>> {
        if directory {
            return self.directories.lease(digest);
        }
        if !digest.is_large() {
            return self.files.lease(digest);
        }
        Ok(std::fs::metadata(self.large_blob_path(digest))
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs()))
    }
}

/// Fills `out` with `want` bytes of a large blob's file at `offset`; a file that ends early
/// (truncated under us) is an error, never a short read.
fn pread_exact(d: &Digest, file: &File, offset: u64, want: usize, out: &mut Vec<u8>) -> Result<()> {
    out.resize(want, 0);
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

/// A large blob's lease is its mtime, set to when the lease ends.
pub fn set_lease_mtime(path: &Path, until: u64) -> io::Result<()> {
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(until);
    File::open(path)?.set_modified(when)
}

pub(crate) fn lease_until() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + LEASE_SECS
}
