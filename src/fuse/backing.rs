//! FUSE passthrough opens: the kernel reads a large blob's file itself once an OPEN reply
//! carries a backing id made for that file. The kernel's rules shape what is kept here:
//! - one backing id per inode: a second id for an inode with open passthrough files fails the
//!   open (EBUSY), so every open of an inode reuses its id;
//! - one mode per inode while any of its files is open: an open without passthrough while others
//!   have it, or the reverse, fails with EIO. A blob still being fetched from a remote has no
//!   file yet and opens without passthrough; it keeps that mode until its last handle goes;
//! - an id may be closed while files use it (they keep reading), but a new open must not carry
//!   a closed one.
//!
//! So a blob's id is made at its first open and kept until the kernel forgets the inode: every
//! later open, warm or not, is one reply with no ioctl. Both transports share one [`Backings`]
//! (forgets always come over /dev/fuse, opens over whichever serves them), and the inodes are
//! spread over shards so that opens of different blobs do not wait on one lock.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::TransportInfo;
use crate::fs::{DigestFs, FsResult};

const SHARDS: usize = 64;

/// The mode of one inode: `id` once it was opened with passthrough (kept until it is
/// forgotten), else the handles open without it.
struct Slot<Id> {
    id: Option<Arc<Id>>,
    handles: usize,
}

struct Shard<Id> {
    by_ino: HashMap<u64, Slot<Id>>,
    /// Handles open on each inode's id or mode, by handle.
    ino_of_handle: HashMap<u64, u64>,
}

/// Backing ids (`Id`: [`Backing`] in the daemon, anything in tests) and modes by inode.
pub struct BackingCache<Id> {
    shards: Vec<Mutex<Shard<Id>>>,
}

impl<Id> Default for BackingCache<Id> {
    fn default() -> Self {
        BackingCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        by_ino: HashMap::new(),
                        ino_of_handle: HashMap::new(),
                    })
                })
                .collect(),
        }
    }
}

impl<Id> BackingCache<Id> {
    fn shard(&self, ino: u64) -> std::sync::MutexGuard<'_, Shard<Id>> {
        self.shards[(ino as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Opens handle `fh` of `ino` if the inode has an id: the hot path of a warm open.
    pub fn open_held(&self, ino: u64, fh: u64) -> Option<Arc<Id>> {
        let mut shard = self.shard(ino);
        let slot = shard.by_ino.get_mut(&ino)?;
        let id = slot.id.clone()?;
        slot.handles += 1;
        shard.ino_of_handle.insert(fh, ino);
        Some(id)
    }

    /// Opens handle `fh` of `ino`: with the inode's id if it has one; else, unless handles
    /// without passthrough are open, with a new one from `make` (None: no file, or no new ids
    /// wanted), then `made()`. No id means no passthrough for this handle; a failure of `make`
    /// is returned and the handle is recorded without passthrough all the same.
    pub fn open<E>(
        &self,
        ino: u64,
        fh: u64,
        make: Option<impl FnOnce() -> Result<Id, E>>,
        made: impl FnOnce(),
    ) -> (Option<Arc<Id>>, Option<E>) {
        let mut shard = self.shard(ino);
        shard.ino_of_handle.insert(fh, ino);
        let slot = shard.by_ino.entry(ino).or_insert(Slot {
            id: None,
            handles: 0,
        });
        slot.handles += 1;
        if let Some(id) = &slot.id {
            return (Some(id.clone()), None);
        }
        if slot.handles > 1 {
            return (None, None); // Others are open without passthrough: so is this one.
        }
        match make.map(|make| make()) {
            Some(Ok(id)) => {
                made();
                let id = Arc::new(id);
                slot.id = Some(id.clone());
                (Some(id), None)
            }
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        }
    }

    /// Ends handle `fh`. An inode without an id is forgotten with its last handle; an id stays
    /// until [`forget`](Self::forget). Unknown handles are ignored: false.
    pub fn release(&self, ino: u64, fh: u64) -> bool {
        let mut shard = self.shard(ino);
        let Some(ino) = shard.ino_of_handle.remove(&fh) else {
            return false;
        };
        if let Some(slot) = shard.by_ino.get_mut(&ino) {
            slot.handles = slot.handles.saturating_sub(1);
            if slot.handles == 0 && slot.id.is_none() {
                shard.by_ino.remove(&ino);
            }
        }
        true
    }

    /// The kernel forgot `ino`: its id goes (closed once dropped) unless handles still use it.
    /// (An open whose reply never reached the kernel, on an aborted connection, is never
    /// released: its inode keeps its id until the connection, and this cache, end.)
    pub fn forget(&self, ino: u64) {
        let mut shard = self.shard(ino);
        if shard.by_ino.get(&ino).is_some_and(|s| s.handles == 0) {
            shard.by_ino.remove(&ino);
        }
    }

    /// Inodes with an id or open handles.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().by_ino.len())
            .sum()
    }
}

/// `FUSE_DEV_IOC_BACKING_OPEN`: `_IOW(229, 1, struct fuse_backing_map)`.
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = (1 << 30) | (16 << 16) | (229 << 8) | 1;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

/// `struct fuse_backing_map`.
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

/// A backing id of the connection `fuse`, made for one file. Closed on drop: the kernel keeps
/// its own reference to the file for files already open.
pub struct Backing {
    fuse: Arc<OwnedFd>,
    id: u32,
}

impl Backing {
    pub fn open(fuse: &Arc<OwnedFd>, file: &std::fs::File) -> io::Result<Backing> {
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: the ioctl reads one `fuse_backing_map` that outlives the call.
        let id = unsafe { libc::ioctl(fuse.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN as _, &map) };
        if id <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Backing {
            fuse: fuse.clone(),
            id: id as u32,
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32 that outlives the call; a closed or foreign id is
        // refused by the kernel with an error, which changes nothing.
        let rc = unsafe {
            libc::ioctl(
                self.fuse.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE as _,
                &self.id as *const u32,
            )
        };
        if rc != 0 {
            log::debug!(
                "closing backing id {}: {}",
                self.id,
                io::Error::last_os_error()
            );
        }
    }
}

/// The passthrough opens of one connection, for both transports.
pub struct Backings {
    /// Set at INIT when the kernel agreed to passthrough: opens are then answered one by one
    /// (never zero-message, which would leave no way to hand the kernel an id).
    agreed: AtomicBool,
    /// Whether new ids are made: a refusal turns it off for the rest of the mount, and opens
    /// go on, with the ids already made or without passthrough.
    making: AtomicBool,
    /// The connection's fd, once the session exists.
    fuse: OnceLock<Arc<OwnedFd>>,
    cache: BackingCache<Backing>,
    /// Handles of opens, never [`crate::fs::NO_HANDLE`].
    next_fh: AtomicU64,
    stats: Arc<TransportInfo>,
}

impl Backings {
    pub fn new(stats: Arc<TransportInfo>) -> Backings {
        Backings {
            agreed: AtomicBool::new(false),
            making: AtomicBool::new(true),
            fuse: OnceLock::new(),
            cache: BackingCache::default(),
            next_fh: AtomicU64::new(crate::fs::NO_HANDLE + 1),
            stats,
        }
    }

    /// INIT's answer: whether opens are answered one by one, with passthrough.
    pub fn set_agreed(&self, agreed: bool) {
        self.agreed.store(agreed, Ordering::SeqCst);
    }

    pub fn agreed(&self) -> bool {
        self.agreed.load(Ordering::Relaxed)
    }

    /// The connection to make ids on (a dup of the session's fd).
    pub fn set_connection(&self, fuse: OwnedFd) {
        let _ = self.fuse.set(Arc::new(fuse));
    }

    /// Opens `ino` with `flags` for the kernel, on either transport: our handle for it, and the
    /// backing id to answer with, if any. An inode that has an id is answered with it, the core
    /// asked only whether the open is allowed; else the core opens the blob (no handle there:
    /// reads of opens without an id come by inode), whose store file gets an id (LMDB blobs and
    /// blobs still being fetched have none, and open with the page cache kept instead). The
    /// handle is only this cache's count of the inode's opens.
    pub fn open(&self, core: &DigestFs, ino: u64, flags: i32) -> FsResult<(u64, Option<u32>)> {
        core.check_open(ino, flags)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = self.cache.open_held(ino, fh) {
            self.stats.open_files.fetch_add(1, Ordering::Relaxed);
            self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            return Ok((fh, Some(id.id())));
        }
        let file = core.open_blob(ino)?.file().cloned();
        self.stats.open_files.fetch_add(1, Ordering::Relaxed);
        let fuse = self.fuse.get();
        let make = match (&file, fuse) {
            (Some(file), Some(fuse)) if self.making.load(Ordering::Relaxed) => {
                Some(move || Backing::open(fuse, file))
            }
            _ => None,
        };
        let made = || {
            self.stats.backing_ids.fetch_add(1, Ordering::Relaxed);
        };
        let (id, refused) = self.cache.open(ino, fh, make, made);
        if let Some(e) = refused {
            if self.making.swap(false, Ordering::Relaxed) {
                log::warn!(
                    "FUSE passthrough refused ({e}); serving reads of newly opened blobs through the daemon"
                );
            }
        }
        let Some(id) = id else {
            return Ok((fh, None));
        };
        self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        Ok((fh, Some(id.id())))
    }

    pub fn release(&self, ino: u64, fh: u64) {
        if self.cache.release(ino, fh) {
            self.stats.open_files.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn forget(&self, ino: u64) {
        self.cache.forget(ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts live ids, as the kernel counts backing files.
    struct Id(#[allow(dead_code)] Arc<()>);

    type Make<'a> = Option<Box<dyn FnOnce() -> Result<Id, &'static str> + 'a>>;

    #[test]
    fn one_id_per_inode_made_once_and_kept_until_forgotten() {
        let live = Arc::new(());
        let cache = BackingCache::default();
        let opened = std::cell::Cell::new(0);
        let make = || -> Make<'_> {
            Some(Box::new(|| {
                opened.set(opened.get() + 1);
                Ok(Id(live.clone()))
            }))
        };
        let (a1, _) = cache.open(7, 100, make(), || {});
        let (a2, _) = cache.open(7, 101, make(), || {});
        assert!(Arc::ptr_eq(a1.as_ref().unwrap(), a2.as_ref().unwrap()));
        cache.open(8, 102, make(), || {});
        assert_eq!((opened.get(), cache.len()), (2, 2));
        drop((a1, a2));
        for fh in [100, 101] {
            cache.release(7, fh);
        }
        cache.release(8, 102);
        cache.release(8, 999); // never opened: ignored

        // Closed, then opened again: the same id, no new one.
        assert!(cache.open(7, 103, make(), || {}).0.is_some());
        assert_eq!(opened.get(), 2);
        // Forgotten while a handle is open: kept; once released and forgotten, gone.
        cache.forget(7);
        assert_eq!(cache.len(), 2);
        cache.release(7, 103);
        cache.forget(7);
        cache.forget(8);
        assert_eq!(cache.len(), 0);
        assert_eq!(Arc::strong_count(&live), 1, "every id dropped");
    }

    #[test]
    fn an_inode_keeps_one_mode_while_its_files_are_open() {
        let live = Arc::new(());
        let cache = BackingCache::default();
        let make = || -> Make<'_> { Some(Box::new(|| Ok(Id(live.clone())))) };
        // Opened while its blob was being fetched (no file), then fetched: the next open finds
        // the first still open, and stays without passthrough too.
        assert!(cache.open(7, 1, None as Make, || {}).0.is_none());
        assert!(cache.open(7, 2, make(), || {}).0.is_none());
        cache.release(7, 1);
        cache.release(7, 2);
        assert_eq!(
            cache.len(),
            0,
            "a mode without an id goes with its last handle"
        );
        // Once none is open, passthrough.
        assert!(cache.open(7, 3, make(), || {}).0.is_some());
        // The reverse: an inode with an id keeps using it when its file is not at hand.
        assert!(cache.open(7, 4, None as Make, || {}).0.is_some());
    }

    #[test]
    fn a_refused_id_records_the_handle_without_passthrough() {
        let cache: BackingCache<Id> = BackingCache::default();
        let (id, e) = cache.open(7, 1, Some(|| Err("refused")), || {});
        assert!(id.is_none());
        assert_eq!(e, Some("refused"));
        // The handle is open without passthrough: so is the next, whatever it is offered.
        let (id, e) = cache.open(7, 2, Some(|| Ok::<_, &str>(Id(Arc::new(())))), || {});
        assert!(id.is_none() && e.is_none());
        cache.release(7, 1);
        cache.release(7, 2);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_held_id_answers_an_open_alone_and_counts_its_handle() {
        let live = Arc::new(());
        let cache = BackingCache::default();
        // No id yet, or an inode open without passthrough: the hot path has nothing.
        assert!(cache.open_held(7, 1).is_none());
        cache.open(8, 2, None as Option<fn() -> Result<Id, ()>>, || {});
        assert!(cache.open_held(8, 3).is_none());
        cache.release(8, 2);
        cache.open(7, 4, Some(|| Ok::<_, ()>(Id(live.clone()))), || {});
        let held = cache
            .open_held(7, 5)
            .expect("the id made by the first open");
        drop(held);
        cache.release(7, 4);
        // Its handle still holds the id through a forget.
        cache.forget(7);
        assert_eq!(Arc::strong_count(&live), 2);
        cache.release(7, 5);
        cache.forget(7);
        assert_eq!((cache.len(), Arc::strong_count(&live)), (0, 1));
    }
}
