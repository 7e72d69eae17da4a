//! What can go wrong reading or writing the local store. Every variant that concerns one blob
//! names it, so messages and the control protocol can point at the digest at fault.

use std::io;
use std::path::PathBuf;

use super::{BlobKind, Digest, DigestParseError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    BadDigest(#[from] DigestParseError),
    #[error("{kind} {digest} is not in the store")]
    Missing { digest: Digest, kind: BlobKind },
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
    #[error("the tree is too deep: its path at depth {depth} is longer than {max} bytes, more than any OS path can hold")]
    TooDeep { depth: usize, max: usize },
    #[error("the store {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error(
        "{shard}: a key of {len} bytes ending in {last:#04x}; this is not Pants' schema version 2"
    )]
    Schema { shard: String, len: usize, last: u8 },
    #[error("{}: {reason}", path.display())]
    Unimportable { path: PathBuf, reason: String },
    /// The store's shard folders, or the keys in them, do not fit its shard count.
    #[error("{}: {reason}", path.display())]
    Shards { path: PathBuf, reason: String },
    #[error("the content changed while it was imported (expected {digest})")]
    ChangedWhileImported { digest: Digest },
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
}

impl StoreError {
    /// True when the blob simply is not there (as opposed to being unreadable or corrupt).
    pub fn is_missing(&self) -> bool {
        matches!(self, StoreError::Missing { .. })
    }

    /// True when the stored bytes are not what their digest says.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            StoreError::SizeMismatch { .. }
                | StoreError::HashMismatch { .. }
                | StoreError::CorruptDirectory { .. }
                | StoreError::BadName { .. }
        )
    }

    /// The blob an error concerns, if it concerns one: the digest to name in logs.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            StoreError::Missing { digest, .. }
            | StoreError::SizeMismatch { digest, .. }
            | StoreError::HashMismatch { digest }
            | StoreError::CorruptDirectory { digest, .. }
            | StoreError::BadName { digest, .. }
            | StoreError::ChangedWhileImported { digest } => Some(*digest),
            _ => None,
        }
    }

    /// Whether this is a write to a closed pipe (a reader such as `head` went away).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

pub(super) fn io_err(context: String) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { context, source }
}
