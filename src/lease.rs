//! Keeping bound trees alive in the store. Pants garbage-collects blobs whose lease has run out
//! once the store is over its target size, and pantsd renews only what its own memory holds. So
//! while a tree is bound, the daemon renews the lease of every blob in it: all bound trees on an
//! interval, and each tree again as it is bound. Unbinding stops it, since each round renews what
//! is bound then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::fs::DigestFs;
use crate::store::Digest;

/// What the lease keeper has done, for `digestfs status`. `last_*` describe the last full
/// round (everything bound); the renewals of single trees at bind time are only counted.
#[derive(Default)]
pub struct LeaseStats {
    pub rounds: AtomicU64,
    /// Trees renewed on their own as they were bound.
    pub tree_renewals: AtomicU64,
    /// Seconds since the epoch of the last renewal (0: none yet).
    pub last_unix: AtomicU64,
    pub last_renewed: AtomicU64,
    pub last_missing: AtomicU64,
    /// How long the last renewal took, walk included, in milliseconds.
    pub last_duration_ms: AtomicU64,
    /// The longest any LMDB write transaction of the last renewal held its lock, in µs.
    pub last_longest_txn_us: AtomicU64,
}

/// The roots of every bound tree (each layer of each view).
fn bound_roots(core: &DigestFs) -> Vec<Digest> {
    core.namespace()
        .views()
        .into_iter()
        .flat_map(|(_, v)| v.layers.values().copied().collect::<Vec<_>>())
        .collect()
}

/// Renews every blob of the trees at `roots` (a full round when `full`). What cannot be read is
/// logged and skipped: the rest still needs renewing. Returns how many blobs it walked.
fn renew(core: &DigestFs, stats: &LeaseStats, roots: &[Digest], full: bool) -> usize {
    let started = Instant::now();
    let tree = core.cas().tree_blobs(roots);
    let walked = tree.files.len() + tree.dirs.len();
    for e in &tree.errors {
        log::warn!("lease renewal: {e}");
    }
    match core.cas().store().renew_leases(&tree.files, &tree.dirs) {
        Ok(report) if !full => {
            stats.tree_renewals.fetch_add(1, Ordering::Relaxed);
            if report.missing > 0 {
                log::warn!(
                    "lease renewal: {} blobs of a tree just bound are missing from the store",
                    report.missing
                );
            }
        }
        Ok(report) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            stats.rounds.fetch_add(1, Ordering::Relaxed);
            stats.last_unix.store(now, Ordering::Relaxed);
            stats
                .last_renewed
                .store(report.renewed as u64, Ordering::Relaxed);
            stats
                .last_missing
                .store(report.missing as u64, Ordering::Relaxed);
            stats
                .last_duration_ms
                .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            stats
                .last_longest_txn_us
                .store(report.longest_txn_us, Ordering::Relaxed);
            if report.missing > 0 {
                log::warn!(
                    "lease renewal: {} bound blobs are missing from the store",
                    report.missing
                );
            } else {
                log::debug!("renewed {} leases", report.renewed);
            }
        }
        Err(e) => {
            core.stats.errors.fetch_add(1, Ordering::Relaxed);
            log::error!("lease renewal failed: {e}");
        }
    }
    walked
}

/// One round over everything bound now.
pub fn renew_once(core: &DigestFs, stats: &LeaseStats) {
    renew(core, stats, &bound_roots(core), true);
}

/// Renews everything bound every `interval`, and each tree that `bound` announces (at bind
/// time), until `bound` closes.
pub fn spawn(
    core: Arc<DigestFs>,
    interval: Duration,
    bound: Receiver<Digest>,
) -> std::io::Result<Arc<LeaseStats>> {
    let stats = Arc::new(LeaseStats::default());
    let theirs = stats.clone();
    std::thread::Builder::new()
        .name("leases".into())
        .spawn(move || {
            let mut next = Instant::now();
            loop {
                if Instant::now() >= next {
                    renew_once(&core, &theirs);
                    next = Instant::now() + interval;
                    release_memory();
                }
                match bound.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Ok(tree) => {
                        // A large tree only: a BSP server binds many small layers in a row.
                        if renew(&core, &theirs, &[tree], false) >= RELEASE_FROM {
                            release_memory();
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
    Ok(stats)
}

/// Blobs in a tree renewed as it is bound from which its memory is handed back at once.
const RELEASE_FROM: usize = 10_000;

/// A renewal reads every Directory and lease of its trees, and allocates its digest sets and
/// frees them at once: hand both back rather than keep them until the next one. A tree renewed
/// as it is bound counts too: 100,000 entries held 30 MiB of mapped pages and 11 MiB of freed
/// heap until the next round, minutes away.
fn release_memory() {
    crate::os::release_freed_heap();
    crate::store::release_mapped_pages();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::Cas;
    use crate::fs::{FsConfig, DEFAULT_LAYER};
    use crate::store::{BlobKind, Importer, Store, LEASE_SECS};

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn core(store: Store) -> DigestFs {
        DigestFs::new(Arc::new(Cas::local(store)), FsConfig::default())
    }

    #[test]
    fn bound_blobs_are_renewed_and_unbound_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path().join("store")).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("small.jar"), b"small").unwrap();
        std::fs::write(src.join("sub/big.jar"), vec![3u8; 700 * 1024]).unwrap();
        let tree = Importer::new(&store).import_path(&src).unwrap();
        let core = core(store.clone());
        core.bind("v", DEFAULT_LAYER, tree, true).unwrap();
        let blobs = store.tree_blobs(&[tree]);
        let (files, dirs) = (blobs.files, blobs.dirs);
        assert_eq!((files.len(), dirs.len()), (2, 2));
        let age = |until: u64| {
            for d in &files {
                store.set_lease_for_tests(BlobKind::File, d, until);
            }
            for d in &dirs {
                store.set_lease_for_tests(BlobKind::Directory, d, until);
            }
        };
        let leases = || -> Vec<u64> {
            files
                .iter()
                .map(|d| store.lease(d, BlobKind::File).unwrap().unwrap())
                .chain(
                    dirs.iter()
                        .map(|d| store.lease(d, BlobKind::Directory).unwrap().unwrap()),
                )
                .collect()
        };
        let stats = LeaseStats::default();
        age(5);
        assert!(leases().iter().all(|&l| l == 5));
        renew_once(&core, &stats);
        let floor = now() + LEASE_SECS - 60;
        assert!(leases().iter().all(|&l| l >= floor), "{:?}", leases());
        assert_eq!(stats.last_renewed.load(Ordering::Relaxed), 4);
        assert_eq!(stats.last_missing.load(Ordering::Relaxed), 0);
        assert_eq!(stats.rounds.load(Ordering::Relaxed), 1);

        // Unbound, nothing is renewed any more.
        core.unbind("v", None).unwrap();
        age(5);
        renew_once(&core, &stats);
        assert!(leases().iter().all(|&l| l == 5));
        assert_eq!(stats.last_renewed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn missing_blobs_are_counted_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("big.jar"), vec![1u8; 600 * 1024]).unwrap();
        let tree = Importer::new(&store).import_path(src.path()).unwrap();
        let big = Digest::of_bytes(&vec![1u8; 600 * 1024]);
        let core = core(store.clone());
        core.bind("v", DEFAULT_LAYER, tree, true).unwrap();
        std::fs::remove_file(store.large_blob_path(&big)).unwrap();
        let stats = LeaseStats::default();
        renew_once(&core, &stats);
        assert_eq!(stats.last_missing.load(Ordering::Relaxed), 1);
        assert!(!store.large_blob_path(&big).exists());
    }
}
