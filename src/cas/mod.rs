//! What the filesystem core and the commands read: the local store and, behind it, optionally a
//! remote CAS. A blob the local store lacks is fetched (verified, then written into the store in
//! Pants' format) and read locally; with ranged reads, a large blob is served by ranges from the
//! remote while it is fetched. The store below knows nothing of this.

use std::sync::{Arc, OnceLock};

use crate::remote::{FetchError, Remote};
use crate::store::{
    self, walk, BlobKind, Digest, EntryKind, Listing, Store, StoreError, TreeBlobs,
};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("fetching {kind} {digest} from the remote CAS: {source}")]
    Fetch {
        digest: Digest,
        kind: BlobKind,
        #[source]
        source: FetchError,
    },
}

impl ReadError {
    /// The blob is in neither the local store nor the remote.
    pub fn is_missing(&self) -> bool {
        matches!(self, ReadError::Store(e) if e.is_missing())
    }

    /// The remote could not be reached or did not answer in time: worth retrying later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ReadError::Fetch { source, .. } if source.is_unavailable())
    }

    /// The blob the error concerns, if one.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            ReadError::Store(e) => e.digest(),
            ReadError::Fetch { digest, .. } => Some(*digest),
        }
    }
}

pub type Result<T, E = ReadError> = std::result::Result<T, E>;

/// An open file blob: in the local store, or still being fetched from the remote.
#[derive(Clone, Debug)]
pub enum Blob {
    Local(store::Blob),
    Fetching(Arc<Fetching>),
}

/// A large blob read by ranges from the remote until the fetch has put it in the local store.
#[derive(Debug)]
pub struct Fetching {
    digest: Digest,
    local: OnceLock<store::Blob>,
}

impl Blob {
    pub fn digest(&self) -> Digest {
        match self {
            Blob::Local(b) => b.digest(),
            Blob::Fetching(f) => f.digest,
        }
    }

    /// The backing file of a large local blob, for FUSE passthrough.
    pub fn file(&self) -> Option<&Arc<std::fs::File>> {
        match self {
            Blob::Local(b) => b.file(),
            Blob::Fetching(_) => None,
        }
    }
}

pub struct Cas {
    store: Store,
    remote: Option<Arc<Remote>>,
}

impl Cas {
    pub fn new(store: Store, remote: Option<Arc<Remote>>) -> Cas {
        Cas { store, remote }
    }

    pub fn local(store: Store) -> Cas {
        Cas::new(store, None)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// After a local miss: fetches the blob if there is a remote; true when it is now local.
    fn fetch(&self, digest: &Digest, kind: BlobKind) -> Result<bool> {
        match &self.remote {
            Some(r) => r
                .fetch(&self.store, digest, kind)
                .map_err(|source| ReadError::Fetch {
                    digest: *digest,
                    kind,
                    source,
                }),
            None => Ok(false),
        }
    }

    /// Runs a local read, and once more after fetching the blob if it was missing.
    fn local_or_fetched<T>(
        &self,
        digest: &Digest,
        kind: BlobKind,
        read: impl Fn() -> Result<T, StoreError>,
    ) -> Result<T> {
        match read() {
            Err(e) if e.is_missing() && self.fetch(digest, kind)? => Ok(read()?),
            other => Ok(other?),
        }
    }

    /// Loads, hash-checks and validates the `Directory` with this digest.
    pub fn load_directory(&self, digest: &Digest) -> Result<Listing> {
        self.local_or_fetched(digest, BlobKind::Directory, || {
            self.store.load_directory(digest)
        })
    }

    /// The raw proto bytes of a `Directory`.
    pub fn directory_bytes(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.local_or_fetched(digest, BlobKind::Directory, || {
            self.store.directory_bytes(digest)
        })
    }

    /// Opens a file blob after checking that it is present and of the right length. A missing
    /// blob is fetched first, or, for large blobs when the remote serves ranges, opened for
    /// ranged reads while it is fetched.
    pub fn open_blob(&self, digest: &Digest) -> Result<Blob> {
        if let Some(r) = self
            .remote
            .as_ref()
            .filter(|r| digest.is_large() && r.serves_ranges())
        {
            return match self.store.open_blob(digest) {
                Err(e) if e.is_missing() => {
                    r.start_fetch(&self.store, digest);
                    Ok(Blob::Fetching(Arc::new(Fetching {
                        digest: *digest,
                        local: OnceLock::new(),
                    })))
                }
                other => Ok(Blob::Local(other?)),
            };
        }
        self.local_or_fetched(digest, BlobKind::File, || self.store.open_blob(digest))
            .map(Blob::Local)
    }

    /// Reads up to `len` bytes at `offset`, fewer only at the end of the blob.
    /// [`Cas::read_blob`] into `buf` (up to its length); a local blob is read straight into it.
    pub fn read_blob_into(&self, blob: &Blob, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let local = match blob {
            Blob::Local(b) => Some(b),
            Blob::Fetching(f) => f.local.get(),
        };
        if let Some(b) = local {
            return Ok(self.store.read_blob_into(b, offset, buf)?);
        }
        let data = self.read_blob(blob, offset, buf.len())?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }

    pub fn read_blob(&self, blob: &Blob, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = match blob {
            Blob::Local(b) => return Ok(self.store.read_blob(b, offset, len)?),
            Blob::Fetching(f) => f,
        };
        if f.local.get().is_none() {
            match self.store.open_blob(&f.digest) {
                Ok(b) => {
                    let _ = f.local.set(b);
                }
                Err(e) if !e.is_missing() => return Err(e.into()),
                Err(_) => {}
            }
        }
        if let Some(b) = f.local.get() {
            return Ok(self.store.read_blob(b, offset, len)?);
        }
        let missing = || StoreError::Missing {
            digest: f.digest,
            kind: BlobKind::File,
        };
        let remote = self.remote.as_ref().ok_or_else(missing)?;
        // Restarts a fetch that failed; joins the one under way otherwise.
        remote.start_fetch(&self.store, &f.digest);
        match remote.read_range(&f.digest, offset, len) {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(missing().into()),
            Err(source) => Err(ReadError::Fetch {
                digest: f.digest,
                kind: BlobKind::File,
                source,
            }),
        }
    }

    /// Calls `f` on the blob's bytes in order, 1 MiB at a time, never holding the whole blob.
    pub fn for_each_chunk<E: From<ReadError>>(
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

    /// A whole blob; for the CLI and tests.
    pub fn read_all(&self, digest: &Digest) -> Result<Vec<u8>> {
        let blob = self.open_blob(digest)?;
        self.read_blob(&blob, 0, digest.size as usize)
    }

    /// Whether a file blob is local or, with a remote, on the remote (asked, not fetched).
    pub fn has_file(&self, digest: &Digest) -> Result<bool> {
        if self.store.has_file(digest)? {
            return Ok(true);
        }
        match &self.remote {
            Some(r) => r.contains(digest).map_err(|source| ReadError::Fetch {
                digest: *digest,
                kind: BlobKind::File,
                source,
            }),
            None => Ok(false),
        }
    }

    /// Visits each distinct `Directory` of the trees at `roots` once, fetching what is missing;
    /// returns what could not be read (see [`walk::walk_directories`]).
    pub fn walk_directories(
        &self,
        roots: &[Digest],
        on_dir: &mut dyn FnMut(&Digest, &Listing),
    ) -> Vec<ReadError> {
        walk::walk_directories(roots, &mut |d| self.load_directory(d), on_dir)
    }

    /// Every distinct blob of the trees at `roots`, and what could not be read.
    pub fn tree_blobs(&self, roots: &[Digest]) -> TreeBlobs<ReadError> {
        walk::tree_blobs(roots, &mut |d| self.load_directory(d))
    }

    /// Every entry of the tree at `root` with its path, depth-first (see [`walk::walk_paths`]).
    pub fn walk_paths<E: From<ReadError> + From<StoreError>>(
        &self,
        root: &Digest,
        f: &mut dyn FnMut(&str, &EntryKind) -> Result<(), E>,
    ) -> Result<(), E> {
        walk::walk_paths(root, &mut |d| Ok(self.load_directory(d)?), f)
    }

    /// Fetches every file of the tree at `root` that the local store lacks (the `Directory`s
    /// are fetched by the walk itself). Without a remote there is nothing to do.
    pub fn prefetch(&self, root: &Digest) -> Result<()> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let tree = self.tree_blobs(&[*root]);
        if let Some(e) = tree.errors.into_iter().next() {
            return Err(e);
        }
        remote
            .prefetch(&self.store, tree.files)
            .map_err(|source| ReadError::Fetch {
                digest: *root,
                kind: BlobKind::Directory,
                source,
            })
    }
}

#[cfg(test)]
mod tests;
