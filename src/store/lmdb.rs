//! The sharded LMDB environments Pants keeps per kind of blob (`files/`, `directories/`): as
//! many as the store's shard count (16 by default; see [`super::ShardCount`]).
//!
//! Environments are opened lazily, never created by a reader, and opened without a write
//! transaction, so a reader never takes the environment's write lock. Read transactions live only
//! as long as one copy out of the map. If another process grows the map, LMDB reports
//! `MDB_MAP_RESIZED` on the next transaction; we then adopt the new size and retry.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lmdb::{Database, DatabaseFlags, Environment, EnvironmentFlags, Transaction, WriteFlags};

use super::{Digest, ShardCount, StoreError};

pub const CONTENT_DB: &str = "content-versioned";
pub const LEASES_DB: &str = "leases-versioned";

/// Keys renewed per write transaction: the write lock is held for one batch, and pantsd's own
/// writes wait that long. 1000 held it 7.7 ms at most; 250 keeps it near 2 ms (README, "At
/// scale": another writer's p99 while leases renew back to back).
const LEASE_BATCH: usize = 250;

/// Bytes read out of any LMDB map since their pages were last handed back.
static TOUCHED: AtomicUsize = AtomicUsize::new(0);
/// Hand the maps' pages back after this many bytes: they are the kernel's page cache (shared,
/// reclaimable), but while mapped they count in the daemon's resident size, and a daemon that
/// has read every blob of 120,000 bound files would otherwise show hundreds of MiB.
const RELEASE_AFTER: usize = 16 << 20;

/// What renewing the leases of one shard found.
pub struct Renewed {
    /// How many of the blobs were present (absent ones get no lease).
    pub present: usize,
    /// The longest a write transaction held the environment's write lock, in microseconds.
    pub longest_txn_us: u64,
}

struct Shard {
    env: Environment,
    content: Database,
    leases: Database,
    /// Readers hold it shared; adopting a new map size holds it exclusively, since LMDB forbids
    /// `mdb_env_set_mapsize` while this process has transactions open.
    resize: RwLock<()>,
}

pub struct Shards {
    dir: PathBuf,
    /// Map size for environments this process creates (Pants' own sizes).
    create_map_size: usize,
    count: ShardCount,
    shards: Vec<Mutex<Option<Arc<Shard>>>>,
}

fn lmdb_err(context: String) -> impl FnOnce(lmdb::Error) -> StoreError {
    move |source| StoreError::Lmdb { context, source }
}

impl Shards {
    pub fn new(dir: PathBuf, create_map_size: usize, count: ShardCount) -> Shards {
        Shards {
            dir,
            create_map_size,
            count,
            shards: (0..count.get()).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn shard_dir(&self, shard: usize) -> PathBuf {
        self.dir.join(ShardCount::folder(shard))
    }

    /// The shard of `digest` in this store.
    fn index(&self, digest: &Digest) -> usize {
        digest.shard(self.count)
    }

    /// The environment of shard `shard`, or `None` if Pants has not created it yet.
    fn shard(&self, shard: usize, create: bool) -> Result<Option<Arc<Shard>>, StoreError> {
        let Some(slot) = self.shards.get(shard) else {
            return Err(StoreError::Shards {
                path: self.shard_dir(shard),
                reason: format!("no such shard in a store of {}", self.count),
            });
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref() {
            return Ok(Some(s.clone()));
        }
        let dir = self.shard_dir(shard);
        if !create && !dir.join("data.mdb").exists() {
            return Ok(None);
        }
        if create {
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
                context: format!("creating {}", dir.display()),
                source,
            })?;
        }
        let opened = open_env(&dir, create.then_some(self.create_map_size))?;
        let Some(opened) = opened else {
            return Ok(None);
        };
        map_random(&dir);
        let s = Arc::new(opened);
        *slot = Some(s.clone());
        Ok(Some(s))
    }

    /// Opens every shard that exists now. LMDB holds an exclusive lock on `lock.mdb` while the
    /// first process opens an environment, so any other opener (Pants, `digestfs materialize`)
    /// waits on it; a long-lived reader opens up front, where a stop (SIGSTOP, a debugger)
    /// cannot catch it mid-open while it serves. Returns how many were opened; every shard is
    /// tried, and the first that failed is the error.
    pub fn open_existing(&self) -> Result<usize, StoreError> {
        let mut opened = 0;
        let mut failed = None;
        for shard in 0..self.shards.len() {
            match self.shard(shard, false) {
                Ok(s) => opened += usize::from(s.is_some()),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        failed.map_or(Ok(opened), Err)
    }

    /// Copies up to `out.len()` bytes at `offset` of the blob out of the map: how many, or
    /// `Ok(None)` if absent.
    pub fn read_at(
        &self,
        digest: &Digest,
        offset: u64,
        out: &mut [u8],
    ) -> Result<Option<usize>, StoreError> {
        self.with_range(digest, offset, out.len(), |range| {
            out[..range.len()].copy_from_slice(range);
            range.len()
        })
    }

    /// [`Shards::read_at`] appended to `out` (never zeroed first): how many bytes.
    pub fn append_at(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<usize>, StoreError> {
        self.with_range(digest, offset, len, |range| {
            out.extend_from_slice(range);
            range.len()
        })
    }

    fn with_range<T>(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, StoreError> {
        self.with_value(digest, |value| {
            let start = (offset as usize).min(value.len());
            let end = start.saturating_add(len).min(value.len());
            will_need(&value[start..end]);
            let out = f(&value[start..end]);
            touched(end - start);
            out
        })
    }

    pub fn contains(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.with_value(digest, |_| ())?.is_some())
    }

    /// Runs `f` on the stored value inside one short read transaction, after checking that its
    /// length matches the digest.
    pub fn with_value<T>(
        &self,
        digest: &Digest,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, StoreError> {
        let Some(shard) = self.shard(self.index(digest), false)? else {
            return Ok(None);
        };
        let mut f = Some(f);
        for _ in 0..8 {
            let guard = shard.resize.read().unwrap_or_else(|p| p.into_inner());
            let txn = match shard.env.begin_ro_txn() {
                Ok(txn) => txn,
                Err(lmdb::Error::MapResized) => {
                    drop(guard);
                    let _excl = shard.resize.write().unwrap_or_else(|p| p.into_inner());
                    log::info!(
                        "{}: adopting a map grown by another process",
                        self.dir.display()
                    );
                    shard
                        .env
                        .set_map_size(0)
                        .map_err(lmdb_err(format!("resizing {}", self.dir.display())))?;
                    map_random(&self.shard_dir(self.index(digest)));
                    continue;
                }
                Err(e) => return Err(lmdb_err(format!("reading {}", self.dir.display()))(e)),
            };
            return match txn.get(shard.content, &digest.lmdb_key()) {
                Ok(value) if value.len() as u64 != digest.size => Err(StoreError::SizeMismatch {
                    digest: *digest,
                    actual: value.len() as u64,
                }),
                Ok(value) => Ok(Some((f.take().expect("called once"))(value))),
                Err(lmdb::Error::NotFound) => Ok(None),
                Err(e) => Err(lmdb_err(format!("reading {digest}"))(e)),
            };
        }
        Err(StoreError::Lmdb {
            context: format!(
                "{}: the map kept growing while reading {digest}",
                self.dir.display()
            ),
            source: lmdb::Error::MapResized,
        })
    }

    /// Sets the lease of each present blob of `digests` (all of shard `shard`) to `until`, in
    /// transactions of at most `LEASE_BATCH` keys so the write lock is never held for long.
    /// Absent blobs are skipped, never given a lease. Sorted digests (key order) dirty the
    /// fewest pages.
    pub fn renew_leases(
        &self,
        shard: usize,
        digests: &[Digest],
        until: u64,
    ) -> Result<Renewed, StoreError> {
        let mut out = Renewed {
            present: 0,
            longest_txn_us: 0,
        };
        if digests.is_empty() {
            return Ok(out);
        }
        let Some(s) = self.shard(shard, false)? else {
            return Ok(out);
        };
        let ctx = || format!("renewing leases in {}", self.shard_dir(shard).display());
        let lease = until.to_le_bytes();
        for batch in digests.chunks(LEASE_BATCH) {
            let _guard = s.resize.read().unwrap_or_else(|p| p.into_inner());
            // Walk the keys' pages in a read transaction first: a page not in memory is read
            // from disk here, not while the write lock is held and pantsd waits for it.
            {
                let txn = s.env.begin_ro_txn().map_err(lmdb_err(ctx()))?;
                for d in batch {
                    let key = d.lmdb_key();
                    let _ = txn.get(s.content, &key);
                    let _ = txn.get(s.leases, &key);
                }
            }
            let mut txn = s.env.begin_rw_txn().map_err(lmdb_err(ctx()))?;
            // Timed from when this transaction holds the write lock.
            let held = std::time::Instant::now();
            for d in batch {
                let key = d.lmdb_key();
                match txn.get(s.content, &key) {
                    Ok(_) => {}
                    Err(lmdb::Error::NotFound) => continue,
                    Err(e) => return Err(lmdb_err(ctx())(e)),
                }
                txn.put(s.leases, &key, &lease, WriteFlags::empty())
                    .map_err(lmdb_err(ctx()))?;
                out.present += 1;
            }
            txn.commit().map_err(lmdb_err(ctx()))?;
            out.longest_txn_us = out.longest_txn_us.max(held.elapsed().as_micros() as u64);
        }
        Ok(out)
    }

    /// Checks the first keys of every present shard against Pants' key schema, and that each
    /// belongs in the shard that holds it (which a wrong shard count would break).
    pub fn schema_check(&self) -> Result<usize, StoreError> {
        use lmdb::Cursor;
        let mut checked = 0;
        for shard in 0..self.count.get() {
            let Some(s) = self.shard(shard, false)? else {
                continue;
            };
            let txn = s
                .env
                .begin_ro_txn()
                .map_err(lmdb_err(format!("reading {}", self.dir.display())))?;
            let mut cursor = txn
                .open_ro_cursor(s.content)
                .map_err(lmdb_err(format!("reading {}", self.dir.display())))?;
            for (key, _) in cursor.iter().take(4).flatten() {
                if key.len() != 33 || key[32] != 0x02 {
                    return Err(StoreError::Schema {
                        shard: self.shard_dir(shard).display().to_string(),
                        len: key.len(),
                        last: key.last().copied().unwrap_or(0),
                    });
                }
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&key[..32]);
                let belongs = Digest { hash, size: 0 }.shard(self.count);
                if belongs != shard {
                    return Err(StoreError::Shards {
                        path: self.shard_dir(shard),
                        reason: format!(
                            "holds the key {}…, which a store of {} keeps in shard {}: the \
                             store was written with another shard count (Pants' \
                             --local-store-shard-count; pass the same to digestfs)",
                            hex::encode(&key[..4]),
                            self.count,
                            ShardCount::folder(belongs)
                        ),
                    });
                }
                checked += 1;
            }
        }
        Ok(checked)
    }

    /// The lease end recorded for a blob, if any.
    pub fn lease(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let Some(s) = self.shard(self.index(digest), false)? else {
            return Ok(None);
        };
        let txn = s
            .env
            .begin_ro_txn()
            .map_err(lmdb_err("reading a lease".into()))?;
        match txn.get(s.leases, &digest.lmdb_key()) {
            Ok(v) if v.len() == 8 => Ok(Some(u64::from_le_bytes(v.try_into().expect("8 bytes")))),
            Ok(_) | Err(lmdb::Error::NotFound) => Ok(None),
            Err(e) => Err(lmdb_err(format!("reading the lease of {digest}"))(e)),
        }
    }

    /// Writes blobs (all of which must belong to one shard) and their leases in one transaction.
    pub fn put_batch(
        &self,
        shard: usize,
        blobs: &[(Digest, &[u8])],
        lease_until: u64,
    ) -> Result<(), StoreError> {
        if let Some((d, _)) = blobs.iter().find(|(d, _)| self.index(d) != shard) {
            return Err(StoreError::Shards {
                path: self.shard_dir(shard),
                reason: format!("{d} belongs in shard {}", ShardCount::folder(self.index(d))),
            });
        }
        let s = self.shard(shard, true)?.expect("created");
        let _guard = s.resize.read().unwrap_or_else(|p| p.into_inner());
        let ctx = || format!("writing to {}", self.shard_dir(shard).display());
        let mut txn = s.env.begin_rw_txn().map_err(lmdb_err(ctx()))?;
        let lease = lease_until.to_le_bytes();
        for (digest, bytes) in blobs {
            let key = digest.lmdb_key();
            match txn.put(s.content, &key, bytes, WriteFlags::NO_OVERWRITE) {
                Ok(()) | Err(lmdb::Error::KeyExist) => {}
                Err(e) => return Err(lmdb_err(ctx())(e)),
            }
            txn.put(s.leases, &key, &lease, WriteFlags::empty())
                .map_err(lmdb_err(ctx()))?;
        }
        txn.commit().map_err(lmdb_err(ctx()))
    }
}

/// Counts bytes copied out of the maps (values read, `Directory`s decoded), handing their
/// pages back now and then.
pub(super) fn touched(n: usize) {
    if TOUCHED.fetch_add(n, Ordering::Relaxed) + n >= RELEASE_AFTER {
        TOUCHED.store(0, Ordering::Relaxed);
        release_mapped_pages();
    }
}

/// Drops this process's page-table entries for every LMDB data file it maps
/// (`madvise(MADV_DONTNEED)`). The maps are read-only views of files (no `MDB_WRITEMAP`), so
/// the pages stay in the page cache and the next access simply maps them again; readers inside
/// a transaction see the same bytes.
pub fn release_mapped_pages() {
    for range in crate::os::file_mappings(|p| p.ends_with("/data.mdb")) {
        crate::os::advise_range(range, libc::MADV_DONTNEED);
    }
}

/// Turns off read-around on the map of the environment in `dir`: a fault would otherwise read
/// the device's whole readahead window around it (8 MiB on some disks) for a value of a few
/// KiB. Reads ask for exactly their value's pages instead ([`will_need`]).
fn map_random(dir: &Path) {
    let Ok(file) = dir.join("data.mdb").canonicalize() else {
        return;
    };
    let file = file.to_string_lossy();
    for range in crate::os::file_mappings(|p| p == file) {
        crate::os::advise_range(range, libc::MADV_RANDOM);
    }
}

/// Asks the kernel to read the pages behind `bytes` (a slice of the map) in one go: copying out
/// of a cold map (read-around being off, see [`map_random`]) would otherwise fault page by page.
fn will_need(bytes: &[u8]) {
    if bytes.len() <= 4096 {
        return;
    }
    let page = 4096usize;
    let start = bytes.as_ptr() as usize & !(page - 1);
    let end = bytes.as_ptr() as usize + bytes.len();
    // Advice only: failure changes nothing.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_WILLNEED) };
}

fn open_env(dir: &Path, create_map_size: Option<usize>) -> Result<Option<Shard>, StoreError> {
    let ctx = || format!("opening LMDB environment {}", dir.display());
    let mut builder = Environment::new();
    builder
        .set_flags(EnvironmentFlags::NO_SYNC | EnvironmentFlags::NO_TLS)
        .set_max_dbs(2)
        .set_max_readers(512);
    if let Some(size) = create_map_size {
        builder.set_map_size(size);
    }
    let env = builder.open(dir).map_err(lmdb_err(ctx()))?;
    let (content, leases) = if create_map_size.is_some() {
        (
            env.create_db(Some(CONTENT_DB), DatabaseFlags::empty()),
            env.create_db(Some(LEASES_DB), DatabaseFlags::empty()),
        )
    } else {
        (env.open_db(Some(CONTENT_DB)), env.open_db(Some(LEASES_DB)))
    };
    match (content, leases) {
        (Ok(content), Ok(leases)) => Ok(Some(Shard {
            env,
            content,
            leases,
            resize: RwLock::new(()),
        })),
        (Err(lmdb::Error::NotFound), _) | (_, Err(lmdb::Error::NotFound)) => Ok(None),
        (Err(e), _) | (_, Err(e)) => Err(lmdb_err(ctx())(e)),
    }
}
