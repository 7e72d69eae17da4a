//! Bookkeeping for FUSE passthrough: the kernel wants one backing id per inode, shared by all
//! of the inode's open handles, and kept alive until the last of them is released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Backing ids (`Id`: fuser's `BackingId` in the daemon, anything in tests) by inode, counted
/// by the handles that use them.
pub struct BackingCache<Id> {
    inner: Mutex<Inner<Id>>,
}

struct Inner<Id> {
    by_ino: HashMap<u64, (Arc<Id>, usize)>,
    ino_of_handle: HashMap<u64, u64>,
}

impl<Id> Default for BackingCache<Id> {
    fn default() -> Self {
        BackingCache {
            inner: Mutex::new(Inner {
                by_ino: HashMap::new(),
                ino_of_handle: HashMap::new(),
            }),
        }
    }
}

impl<Id> BackingCache<Id> {
    /// The backing id of `ino` for the new handle `fh`: the inode's existing one, or a new one
    /// from `open` (whose failure is returned and records nothing).
    pub fn acquire<E>(
        &self,
        ino: u64,
        fh: u64,
        open: impl FnOnce() -> Result<Id, E>,
    ) -> Result<Arc<Id>, E> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let id = match inner.by_ino.get_mut(&ino) {
            Some((id, users)) => {
                *users += 1;
                id.clone()
            }
            None => {
                let id = Arc::new(open()?);
                inner.by_ino.insert(ino, (id.clone(), 1));
                id
            }
        };
        inner.ino_of_handle.insert(fh, ino);
        Ok(id)
    }

    /// Ends handle `fh`; the inode's backing id goes once no handle uses it. Handles that were
    /// never backed are ignored.
    pub fn release(&self, fh: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ino) = inner.ino_of_handle.remove(&fh) else {
            return;
        };
        if let Some((_, users)) = inner.by_ino.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                inner.by_ino.remove(&ino);
            }
        }
    }

    /// Inodes with a live backing id.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_ino
            .len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts live ids, as the kernel counts backing files.
    struct Id(#[allow(dead_code)] Arc<()>);

    #[test]
    fn one_id_per_inode_kept_until_its_last_handle_goes() {
        let live = Arc::new(());
        let cache = BackingCache::default();
        let mut opened = 0;
        let mut open = || -> Result<Id, ()> {
            opened += 1;
            Ok(Id(live.clone()))
        };
        let a1 = cache.acquire(7, 100, &mut open).unwrap();
        let a2 = cache.acquire(7, 101, &mut open).unwrap();
        assert!(Arc::ptr_eq(&a1, &a2));
        cache.acquire(8, 102, &mut open).unwrap();
        assert_eq!((opened, cache.len()), (2, 2));
        drop((a1, a2));
        cache.release(100);
        assert_eq!(cache.len(), 2, "101 still uses inode 7's id");
        cache.release(101);
        cache.release(102);
        cache.release(999); // never backed: ignored
        assert!(cache.is_empty());
        assert_eq!(Arc::strong_count(&live), 1, "every id dropped");
    }

    #[test]
    fn a_failed_open_records_nothing() {
        let cache: BackingCache<Id> = BackingCache::default();
        assert_eq!(
            cache.acquire(7, 1, || Err("refused")).err(),
            Some("refused")
        );
        assert!(cache.is_empty());
        cache.release(1);
    }
}
