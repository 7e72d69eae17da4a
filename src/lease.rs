//! Keeping bound trees alive in the store. Pants garbage-collects blobs whose lease has run out
//! once the store is over its target size, and pantsd renews only what its own memory holds. So
//! while a tree is bound, the daemon renews the lease of every blob in it: all bound trees on an
//! interval, and each tree again as it is bound. Unbinding stops it, since each round renews what
//! is bound then.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::fs::DigestFs;
use crate::store::Digest;

/// Every blob of every bound tree: (file blobs, `Directory` blobs), each once.
pub fn bound_blobs(core: &DigestFs) -> (Vec<Digest>, Vec<Digest>) {
    let roots = core
        .namespace()
        .views()
        .into_iter()
        .flat_map(|(_, v)| v.layers.values().copied().collect::<Vec<_>>())
        .collect();
    tree_blobs(core, roots)
}

/// Every blob of the trees `roots`: (file blobs, `Directory` blobs), each once. What cannot be
/// read is logged and skipped: the rest still needs renewing.
fn tree_blobs(core: &DigestFs, roots: Vec<Digest>) -> (Vec<Digest>, Vec<Digest>) {
    core.store()
        .tree_digests(&roots, &mut |e| {
            log::warn!("lease renewal: {e}");
            Ok(())
        })
        .unwrap_or_default()
}

/// One round: renews everything bound now and records it in the core's statistics.
pub fn renew_once(core: &DigestFs) {
    let (files, dirs) = bound_blobs(core);
    renew(core, &files, &dirs);
}

fn renew(core: &DigestFs, files: &[Digest], dirs: &[Digest]) {
    match core.store().renew_leases(files, dirs) {
        Ok(report) => {
            let s = &core.stats;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            s.lease_rounds.fetch_add(1, Ordering::Relaxed);
            s.lease_last_unix.store(now, Ordering::Relaxed);
            s.lease_last_renewed
                .store(report.renewed as u64, Ordering::Relaxed);
            s.lease_last_missing
                .store(report.missing as u64, Ordering::Relaxed);
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
}

/// Renews everything bound every `interval`, and each tree that `bound` announces (at bind
/// time), until `bound` closes.
pub fn spawn(
    core: Arc<DigestFs>,
    interval: Duration,
    bound: Receiver<Digest>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("leases".into())
        .spawn(move || {
            let mut next = Instant::now();
            loop {
                if Instant::now() >= next {
                    renew_once(&core);
                    next = Instant::now() + interval;
                }
                match bound.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Ok(tree) => {
                        let (files, dirs) = tree_blobs(&core, vec![tree]);
                        renew(&core, &files, &dirs);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                release_freed_memory();
            }
        })?;
    Ok(())
}

/// A round over a large tree allocates its digest sets and frees them at once; hand that memory
/// back to the system rather than keep it for a round an interval away.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{FsConfig, DEFAULT_LAYER};
    use crate::store::{Importer, Store, LEASE_SECS};

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
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
        let core = DigestFs::new(Arc::new(store), FsConfig::default());
        let store = core.store().clone();
        let (files, dirs) = {
            core.bind("v", DEFAULT_LAYER, tree, true).unwrap();
            bound_blobs(&core)
        };
        assert_eq!((files.len(), dirs.len()), (2, 2));
        let age = |until: u64| {
            for d in &files {
                let path = store.large_blob_path(d);
                if d.is_large() {
                    crate::store::set_lease_mtime(&path, until).unwrap();
                } else {
                    store
                        .files_for_tests()
                        .renew_leases(d.shard(), &[*d], until)
                        .unwrap();
                }
            }
            for d in &dirs {
                store
                    .directories_for_tests()
                    .renew_leases(d.shard(), &[*d], until)
                    .unwrap();
            }
        };
        let leases = || -> Vec<u64> {
            files
                .iter()
                .map(|d| store.lease(d, false).unwrap().unwrap())
                .chain(dirs.iter().map(|d| store.lease(d, true).unwrap().unwrap()))
                .collect()
        };
        age(5);
        assert!(leases().iter().all(|&l| l == 5));
        renew_once(&core);
        let floor = now() + LEASE_SECS - 60;
        assert!(leases().iter().all(|&l| l >= floor), "{:?}", leases());
        assert_eq!(core.stats.lease_last_renewed.load(Ordering::Relaxed), 4);
        assert_eq!(core.stats.lease_last_missing.load(Ordering::Relaxed), 0);

        // Unbound, nothing is renewed any more.
        core.unbind("v", None).unwrap();
        age(5);
        renew_once(&core);
        assert!(leases().iter().all(|&l| l == 5));
        assert_eq!(core.stats.lease_last_renewed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn missing_blobs_are_counted_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("big.jar"), vec![1u8; 600 * 1024]).unwrap();
        let tree = Importer::new(&store).import_path(src.path()).unwrap();
        let big = Digest::of_bytes(&vec![1u8; 600 * 1024]);
        let core = DigestFs::new(Arc::new(store), FsConfig::default());
        core.bind("v", DEFAULT_LAYER, tree, true).unwrap();
        std::fs::remove_file(core.store().large_blob_path(&big)).unwrap();
        renew_once(&core);
        assert_eq!(core.stats.lease_last_missing.load(Ordering::Relaxed), 1);
        assert!(!core.store().large_blob_path(&big).exists());
    }
}
