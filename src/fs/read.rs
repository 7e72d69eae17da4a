//! The read path: opening blobs (checked, and with `verify` hashed once), reads through a
//! handle or through the cache of open blobs that zero-message opens use.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;

use super::{lock, DigestFs, FsError, FsResult, Node, NO_HANDLE};
use crate::cas::{Blob, ReadError};
use crate::store::{Digest, StoreError};

/// What the read path keeps open.
pub(super) struct OpenBlobs {
    /// Blobs behind open handles.
    handles: Mutex<HashMap<u64, Blob>>,
    next_fh: AtomicU64,
    /// Open blobs for reads that come without a handle.
    by_digest: Mutex<LruCache<Digest, Blob>>,
    /// Blobs whose content was hashed and found right (with `verify`).
    verified: Mutex<HashSet<Digest>>,
}

impl Default for OpenBlobs {
    fn default() -> OpenBlobs {
        OpenBlobs {
            handles: Mutex::default(),
            next_fh: AtomicU64::new(NO_HANDLE + 1),
            by_digest: Mutex::new(LruCache::new(NonZeroUsize::new(256).expect("non-zero"))),
            verified: Mutex::default(),
        }
    }
}

impl DigestFs {
    /// Opens a file for reading; anything that could write is EROFS. The store is checked now,
    /// so a missing or wrong-sized blob fails here with EIO rather than on some later read.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<(u64, Blob)> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let digest = self.readable_file(&self.node(ino)?, flags)?;
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        let blob = self
            .open_checked(&digest)
            .map_err(|e| self.store_failure(Some(ino), e))?;
        let fh = self.read.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.read.handles).insert(fh, blob.clone());
        Ok((fh, blob))
    }

    /// Checks that `ino` may be opened with `flags` (a readable file), without opening it.
    pub fn check_open(&self, ino: u64, flags: i32) -> FsResult<()> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.readable_file(&self.node(ino)?, flags).map(|_| ())
    }

    /// The open blob of file `ino`, checked when first opened, from the cache of open blobs
    /// that reads without a handle use: for an open that keeps no handle of its own.
    pub fn open_blob(&self, ino: u64) -> FsResult<Blob> {
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        let node = self.node(ino)?;
        let blob = self.blob_of(Some(ino), &node)?;
        if !matches!(blob, Blob::Fetching(_)) {
            return Ok(blob);
        }
        // Cached while it was being fetched: it may have its store file by now, which is what
        // an open with passthrough needs.
        let digest = self.readable_file(&node, libc::O_RDONLY)?;
        let fresh = self
            .open_checked(&digest)
            .map_err(|e| self.store_failure(Some(ino), e))?;
        lock(&self.read.by_digest).put(digest, fresh.clone());
        Ok(fresh)
    }

    /// The digest of `node` if it is a file that `flags` open for reading only; anything that
    /// could write is EROFS.
    fn readable_file(&self, node: &Node, flags: i32) -> FsResult<Digest> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY
            || flags & (libc::O_TRUNC | libc::O_APPEND) != 0
        {
            return Err(FsError::ReadOnly);
        }
        match node {
            Node::File { digest, .. } => Ok(*digest),
            Node::Symlink(_) => Err(FsError::NotFound),
            _ => Err(FsError::IsDir),
        }
    }

    /// Reads through handle `fh`, or with [`NO_HANDLE`] (zero-message opens) through a cache of
    /// open blobs keyed by digest.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let blob = self.blob_for_read(ino, fh)?;
        self.read_blob(Some(ino), &blob, offset, size)
    }

    /// The blob behind handle `fh`, or with [`NO_HANDLE`] the cached blob of `ino`'s digest.
    fn blob_for_read(&self, ino: u64, fh: u64) -> FsResult<Blob> {
        if fh == NO_HANDLE {
            return self.blob_of(Some(ino), &self.node(ino)?);
        }
        lock(&self.read.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// [`DigestFs::read`] into `buf` (up to its length), for a front end that has its reply
    /// buffer already: how many bytes.
    pub fn read_into(&self, ino: u64, fh: u64, offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let blob = self.blob_for_read(ino, fh)?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let n = self
            .cas
            .read_blob_into(&blob, offset, buf)
            .map_err(|e| self.store_failure(Some(ino), e))?;
        self.count_read(&blob, n);
        Ok(n)
    }

    fn count_read(&self, blob: &Blob, n: usize) {
        self.stats.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.read_bytes_by_source[ReadSource::of(blob) as usize]
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Reads a file node without a handle (NFS has none).
    pub fn read_node(&self, node: &Node, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let blob = self.blob_of(None, node)?;
        self.read_blob(None, &blob, offset, size)
    }

    fn read_blob(
        &self,
        ino: Option<u64>,
        blob: &Blob,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let data = self
            .cas
            .read_blob(blob, offset, size as usize)
            .map_err(|e| self.store_failure(ino, e))?;
        self.count_read(blob, data.len());
        Ok(data)
    }

    /// Opens a blob, hashing it first (once per digest) when `verify` is on.
    fn open_checked(&self, digest: &Digest) -> Result<Blob, ReadError> {
        let blob = self.cas.open_blob(digest)?;
        if !self.config.verify || lock(&self.read.verified).contains(digest) {
            return Ok(blob);
        }
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        self.cas.for_each_chunk(&blob, |chunk| {
            sha2::Digest::update(&mut hasher, chunk);
            Ok::<_, ReadError>(())
        })?;
        let hash: [u8; 32] = sha2::Digest::finalize(hasher).into();
        if hash != digest.hash {
            return Err(StoreError::HashMismatch { digest: *digest }.into());
        }
        let mut verified = lock(&self.read.verified);
        if verified.len() >= 1 << 20 {
            verified.clear();
        }
        verified.insert(*digest);
        Ok(blob)
    }

    fn blob_of(&self, ino: Option<u64>, node: &Node) -> FsResult<Blob> {
        let digest = self.readable_file(node, libc::O_RDONLY)?;
        if let Some(b) = lock(&self.read.by_digest).get(&digest) {
            return Ok(b.clone());
        }
        let blob = self
            .open_checked(&digest)
            .map_err(|e| self.store_failure(ino, e))?;
        lock(&self.read.by_digest).put(digest, blob.clone());
        Ok(blob)
    }

    pub fn release(&self, fh: u64) {
        lock(&self.read.handles).remove(&fh);
    }

    pub fn open_handles(&self) -> usize {
        lock(&self.read.handles).len()
    }
}

/// Where a read's bytes came from, for [`super::Stats::read_bytes_by_source`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    Lmdb = 0,
    File = 1,
    Remote = 2,
}

impl ReadSource {
    pub const ALL: [ReadSource; 3] = [ReadSource::Lmdb, ReadSource::File, ReadSource::Remote];

    fn of(blob: &Blob) -> ReadSource {
        match blob {
            Blob::Local(crate::store::Blob::Large(..)) => ReadSource::File,
            Blob::Local(_) => ReadSource::Lmdb,
            Blob::Fetching(_) => ReadSource::Remote,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ReadSource::Lmdb => "lmdb",
            ReadSource::File => "file",
            ReadSource::Remote => "remote",
        }
    }
}
