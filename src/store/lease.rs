//! Pants' leases: how long GC must keep a blob. The `leases-versioned` value for blobs in LMDB,
//! the mtime for large files.

use std::fs::File;
use std::io;
use std::path::Path;

use super::{BlobKind, Digest, Store, StoreError};

/// How long a lease Pants gives a freshly written blob lasts.
pub const LEASE_SECS: u64 = 2 * 60 * 60;

/// What one lease renewal found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseReport {
    pub renewed: usize,
    pub missing: usize,
    /// The longest any one LMDB write transaction of the renewal held its environment's write
    /// lock, in microseconds: what another writer (pantsd) may have waited.
    pub longest_txn_us: u64,
}

impl Store {
    /// Extends the leases of these blobs to two hours from now, as Pants would. Blobs no longer
    /// present are counted, not recreated.
    pub fn renew_leases(
        &self,
        files: &[Digest],
        dirs: &[Digest],
    ) -> Result<LeaseReport, StoreError> {
        let until = lease_until();
        let mut report = LeaseReport::default();
        let shards = self.shard_count().get();
        let mut small: Vec<Vec<Digest>> = vec![Vec::new(); shards];
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
                small[self.shard_of(d)].push(*d);
            }
        }
        let mut dir_shards: Vec<Vec<Digest>> = vec![Vec::new(); shards];
        for d in dirs.iter().filter(|d| **d != Digest::EMPTY) {
            dir_shards[self.shard_of(d)].push(*d);
        }
        // In key order, a batch's keys share their B-tree pages: 100,000 renewals in random order
        // dirtied a page per key, each copied, written back, and then kept by LMDB for reuse
        // (7.5 MiB of the daemon's memory for the environment's life, the bench's RSS figure).
        for v in small.iter_mut().chain(dir_shards.iter_mut()) {
            v.sort_unstable();
        }
        for (shard, (fs, ds)) in small.iter().zip(&dir_shards).enumerate() {
            for (shards, digests) in [(&self.files, fs), (&self.directories, ds)] {
                let r = shards.renew_leases(shard, digests, until)?;
                report.renewed += r.present;
                report.missing += digests.len() - r.present;
                report.longest_txn_us = report.longest_txn_us.max(r.longest_txn_us);
            }
        }
        Ok(report)
    }

    /// The lease end of a blob, in seconds since the epoch: the LMDB lease, or a large file's
    /// mtime. `None` if it has none.
    pub fn lease(&self, digest: &Digest, kind: BlobKind) -> Result<Option<u64>, StoreError> {
        match kind {
            BlobKind::Directory => self.directories.lease(digest),
            BlobKind::File if !digest.is_large() => self.files.lease(digest),
            BlobKind::File => Ok(std::fs::metadata(self.large_blob_path(digest))
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())),
        }
    }
}

/// A large blob's lease is its mtime, set to when the lease ends.
pub fn set_lease_mtime(path: &Path, until: u64) -> io::Result<()> {
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(until);
    File::open(path)?.set_modified(when)
}

/// When a lease taken now ends.
pub fn lease_until() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + LEASE_SECS
}
