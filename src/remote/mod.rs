//! Blobs the local store lacks, fetched from a remote REAPI CAS (Buildbarn, BuildGrid,
//! bazel-remote, ...). Every fetched blob is checked against its digest before it is written into
//! the local store in Pants' format, and only then served; concurrent requests for one blob share
//! one fetch. The store knows nothing of this: the `cas` layer above it calls here on a local
//! miss.

pub mod client;
pub mod proto;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::client::{Client, RemoteConfig, RemoteError};
use crate::store::{BlobKind, Digest, Store, StoreError};

/// Why a blob could not be fetched. Clone, because every reader waiting on one fetch gets its
/// result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("the remote CAS sent bytes that do not match the digest; refused")]
    Corrupt,
    #[error("no progress within {secs:.1} s")]
    Stalled { secs: f64 },
    #[error("the fetch was abandoned")]
    Abandoned,
    #[error("the server's answer left it out")]
    LeftOut,
    #[error("asked for {want} bytes at {offset}, got {got}")]
    ShortRange {
        offset: u64,
        want: usize,
        got: usize,
    },
    #[error("writing it into the local store: {0}")]
    Store(#[source] Arc<StoreError>),
}

impl FetchError {
    /// Whether the remote could not be reached or did not answer in time: worth retrying later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            FetchError::Remote(e) => e.is_unavailable(),
            FetchError::Stalled { .. } | FetchError::Abandoned => true,
            _ => false,
        }
    }
}

impl From<StoreError> for FetchError {
    fn from(e: StoreError) -> FetchError {
        FetchError::Store(Arc::new(e))
    }
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a server takes in one batch call when it does not say (REAPI's usual 4 MiB, less room
/// for the message around the data).
const DEFAULT_MAX_BATCH: u64 = 4 * 1024 * 1024 - 64 * 1024;
/// The room one blob takes in a batch call besides its bytes (digest and framing), generously.
const BATCH_ENTRY_OVERHEAD: u64 = 1024;
/// FindMissingBlobs asks about this many digests per call.
const FIND_MISSING_CHUNK: usize = 1000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One fetch that any number of readers wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<bool, FetchError>>>,
    /// Bytes received so far: waiters give up only when this stops moving.
    progress: AtomicU64,
    done: Condvar,
}

impl Flight {
    fn finish(&self, res: Result<bool, FetchError>) {
        *lock(&self.result) = Some(res);
        self.done.notify_all();
    }

    /// The fetch's result, or `None` once it has made no progress for `idle`.
    fn wait(&self, idle: Duration) -> Option<Result<bool, FetchError>> {
        let mut guard = lock(&self.result);
        let mut seen = self.progress.load(Ordering::Relaxed);
        loop {
            if let Some(r) = guard.as_ref() {
                return Some(r.clone());
            }
            let (g, timeout) = self
                .done
                .wait_timeout(guard, idle)
                .unwrap_or_else(|p| p.into_inner());
            guard = g;
            if timeout.timed_out() && guard.is_none() {
                let now = self.progress.load(Ordering::Relaxed);
                if now == seen {
                    return None;
                }
                seen = now;
            }
        }
    }
}

/// Ends a fetch however its task ends: with its result, or an error if the task was dropped
/// before it had one (a panic, the runtime shutting down), so no waiter hangs on it and the next
/// request starts afresh.
struct Landing<'a> {
    shared: &'a Shared,
    key: (Digest, BlobKind),
    flight: &'a Flight,
    result: Option<Result<bool, FetchError>>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let (digest, kind) = self.key;
        let res = self.result.take().unwrap_or(Err(FetchError::Abandoned));
        if let Err(e) = &res {
            self.shared
                .counters
                .fetch_failures
                .fetch_add(1, Ordering::Relaxed);
            // Callers report it, naming the path where there is one.
            log::debug!("fetching {kind} {digest}: {e}");
        }
        lock(&self.shared.flights).remove(&self.key);
        self.flight.finish(res);
    }
}

#[derive(Default)]
struct Counters {
    blobs_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    refused_corrupt: AtomicU64,
    fetch_failures: AtomicU64,
    joined: AtomicU64,
    ranged_reads: AtomicU64,
    ranged_bytes: AtomicU64,
    prefetch_running: AtomicU64,
    prefetch_trees: AtomicU64,
    prefetch_blobs_total: AtomicU64,
    prefetch_blobs_done: AtomicU64,
    prefetch_blobs_failed: AtomicU64,
    prefetch_bytes_total: AtomicU64,
    prefetch_bytes_done: AtomicU64,
}

struct Shared {
    client: Client,
    counters: Counters,
    flights: Mutex<HashMap<(Digest, BlobKind), Arc<Flight>>>,
    get_tree_unsupported: AtomicBool,
    max_batch: AtomicU64,
    /// Blobs the remote sent corrupt; ranged reads of them are refused from then on.
    refused: Mutex<HashSet<Digest>>,
}

/// The remote CAS as the daemon and the CLI use it: blocking calls over a small runtime of its own.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    cfg: RemoteConfig,
}

/// The remote's part of `digestfs status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteStatus {
    pub address: String,
    pub instance_name: String,
    /// "ok" (the last call got an answer), "failing" (the last call failed), or "unknown".
    pub health: String,
    pub last_error: Option<String>,
    pub last_ok_unix: u64,
    pub last_failure_unix: u64,
    pub calls: u64,
    pub call_failures: u64,
    pub retries: u64,
    pub find_missing_calls: u64,
    pub batch_reads: u64,
    pub bytestream_reads: u64,
    pub get_tree_calls: u64,
    pub bytes_received: u64,
    /// Blobs fetched, verified and written into the local store.
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Blobs whose bytes did not match their digest; never stored or served.
    pub refused_corrupt: u64,
    pub fetch_failures: u64,
    /// Requests that waited for a fetch another request had started.
    pub joined_fetches: u64,
    /// Reads answered by a ranged `ByteStream.Read` before the whole blob was local
    /// (`--remote-ranged-reads`), and their bytes.
    pub ranged_reads: u64,
    pub ranged_bytes: u64,
    pub prefetch: PrefetchStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchStatus {
    pub running: u64,
    pub trees: u64,
    pub blobs_total: u64,
    pub blobs_done: u64,
    pub blobs_failed: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// What `push` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushReport {
    pub blobs: usize,
    pub missing: usize,
    pub bytes_sent: u64,
}

impl Remote {
    /// Sets up the client; connects on first use.
    pub fn new(cfg: RemoteConfig) -> Result<Arc<Remote>, RemoteError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("digestfs-remote")
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Config(format!("starting the remote client: {e}")))?;
        let client = {
            let _guard = rt.enter();
            Client::new(&cfg)?
        };
        let remote = Arc::new(Remote {
            rt,
            shared: Arc::new(Shared {
                client,
                counters: Counters::default(),
                flights: Mutex::default(),
                get_tree_unsupported: AtomicBool::new(false),
                max_batch: AtomicU64::new(DEFAULT_MAX_BATCH),
                refused: Mutex::default(),
            }),
            cfg,
        });
        Ok(remote)
    }

    /// Asks for the server's capabilities in the background (its batch size, SHA256), so that a
    /// daemon's `status` shows the remote's health from the start.
    pub fn probe_in_background(&self) {
        let shared = self.shared.clone();
        let address = self.cfg.address.clone();
        self.rt.spawn(async move {
            match shared.client.capabilities().await {
                Ok(caps) => shared.adopt(&caps, &address),
                Err(e) => log::warn!("remote CAS {address}: {e}"),
            }
        });
    }

    /// Asks the server for its capabilities now: a one-line summary, or why it failed. Both are
    /// lines for `digestfs doctor` to print, so both are text.
    pub fn check(&self) -> Result<String, String> {
        let caps = self
            .within_timeout(self.shared.client.capabilities())
            .map_err(|e| e.to_string())?;
        let cache = caps
            .cache_capabilities
            .ok_or("it answers, but offers no CAS (no cache capabilities)")?;
        if !cache.digest_functions.is_empty() && !cache.digest_functions.contains(&proto::SHA256) {
            return Err("it does not offer SHA256, the digest function Pants uses".into());
        }
        Ok(match cache.max_batch_total_size_bytes {
            0 => "answers and offers SHA256".to_string(),
            n => format!("answers and offers SHA256, batches up to {n} bytes"),
        })
    }

    /// Fetches one blob into `store`, joining a fetch of it already under way. Gives up (an error,
    /// EIO to a reader) once the fetch has made no progress for the timeout.
    pub fn fetch(
        &self,
        store: &Store,
        digest: &Digest,
        kind: BlobKind,
    ) -> Result<bool, FetchError> {
        let flight = self.flight(store, digest, kind, true);
        flight
            .wait(self.cfg.timeout)
            .unwrap_or(Err(FetchError::Stalled {
                secs: self.cfg.timeout.as_secs_f64(),
            }))
    }

    /// Starts fetching a large file blob without waiting for it (for ranged reads), unless its
    /// bytes were already found corrupt.
    pub fn start_fetch(&self, store: &Store, digest: &Digest) {
        if !lock(&self.shared.refused).contains(digest) {
            self.flight(store, digest, BlobKind::File, false);
        }
    }

    /// Whether reads of a large blob may be answered by ranges while it is fetched.
    pub fn serves_ranges(&self) -> bool {
        self.cfg.ranged_reads
    }

    /// The fetch of a blob: the one under way, or a new one.
    fn flight(&self, store: &Store, digest: &Digest, kind: BlobKind, waiter: bool) -> Arc<Flight> {
        let key = (*digest, kind);
        let (flight, lead) = {
            let mut flights = lock(&self.shared.flights);
            match flights.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    flights.insert(key, f.clone());
                    (f, true)
                }
            }
        };
        if lead {
            let shared = self.shared.clone();
            let store = store.clone();
            let f = flight.clone();
            // The fetch runs on its own, so a reader that gives up does not cancel it for others.
            self.rt.spawn(async move {
                let mut landing = Landing {
                    shared: &shared,
                    key,
                    flight: &f,
                    result: None,
                };
                landing.result = Some(shared.fetch_into(&store, key.0, key.1, &f).await);
            });
        } else if waiter {
            self.shared.counters.joined.fetch_add(1, Ordering::Relaxed);
        }
        flight
    }

    /// Bytes of a large blob straight from the remote, unverified, for `--remote-ranged-reads`.
    /// Refused once the blob's full fetch has found it corrupt; `None` if the remote lacks it.
    /// Exactly `len` bytes, fewer only at the blob's end.
    pub fn read_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, FetchError> {
        if lock(&self.shared.refused).contains(digest) {
            return Err(FetchError::Corrupt);
        }
        let c = &self.shared.counters;
        c.ranged_reads.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(len);
        let mut sink = |data: &[u8]| {
            out.extend_from_slice(data);
            Ok(())
        };
        let read = self
            .shared
            .client
            .read_blob(digest, offset, len as u64, &mut sink);
        if !self.within_timeout(read)? {
            return Ok(None);
        }
        let want = (digest.size.saturating_sub(offset) as usize).min(len);
        if out.len() != want {
            return Err(FetchError::ShortRange {
                offset,
                want,
                got: out.len(),
            });
        }
        c.ranged_bytes
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(Some(out))
    }

    /// Runs a call for a waiting reader: it gets an answer within the timeout, retries or not.
    fn within_timeout<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        let secs = self.cfg.timeout.as_secs_f64();
        self.rt
            .block_on(async { tokio::time::timeout(self.cfg.timeout, call).await })
            .unwrap_or(Err(RemoteError::Timeout {
                op: "remote call",
                secs,
            }))
    }

    /// Whether the remote has a blob, by `FindMissingBlobs`.
    pub fn contains(&self, digest: &Digest) -> Result<bool, FetchError> {
        Ok(self
            .within_timeout(self.shared.client.find_missing(&[*digest]))?
            .is_empty())
    }

    /// Fetches those of `files` (a tree's, found by the caller's walk) that the local store
    /// lacks, a few at a time, counting progress for `status`.
    pub fn prefetch(&self, store: &Store, files: Vec<Digest>) -> Result<(), FetchError> {
        let c = &self.shared.counters;
        c.prefetch_running.fetch_add(1, Ordering::Relaxed);
        let res = self.prefetch_inner(store, files);
        c.prefetch_running.fetch_sub(1, Ordering::Relaxed);
        c.prefetch_trees.fetch_add(1, Ordering::Relaxed);
        res
    }

    fn prefetch_inner(&self, store: &Store, files: Vec<Digest>) -> Result<(), FetchError> {
        let c = &self.shared.counters;
        let mut todo = Vec::new();
        for d in files {
            if !store.has_file(&d)? {
                todo.push(d);
            }
        }
        c.prefetch_blobs_total
            .fetch_add(todo.len() as u64, Ordering::Relaxed);
        c.prefetch_bytes_total
            .fetch_add(todo.iter().map(|d| d.size).sum(), Ordering::Relaxed);
        // Large blobs one stream each; small ones many to a BatchReadBlobs call.
        let jobs = self.shared.batches(todo);
        let queue = Mutex::new(jobs.into_iter());
        let workers = self.cfg.concurrency.clamp(1, 8);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let Some(job) = lock(&queue).next() else {
                        break;
                    };
                    for (d, res) in self.prefetch_job(store, &job) {
                        match res {
                            Ok(true) => {
                                c.prefetch_blobs_done.fetch_add(1, Ordering::Relaxed);
                                c.prefetch_bytes_done.fetch_add(d.size, Ordering::Relaxed);
                            }
                            Ok(false) => {
                                log::warn!("prefetch: file {d} is not in the remote CAS");
                                c.prefetch_blobs_failed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                log::warn!("prefetch: file {d}: {e}");
                                c.prefetch_blobs_failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        Ok(())
    }

    /// Fetches one prefetch job: a single blob through the shared fetch (which a reader may
    /// join), or a batch of small ones in one call.
    fn prefetch_job(
        &self,
        store: &Store,
        job: &[Digest],
    ) -> Vec<(Digest, Result<bool, FetchError>)> {
        if let [d] = job {
            return vec![(*d, self.fetch(store, d, BlobKind::File))];
        }
        let got = match self.within_timeout(self.shared.client.batch_read(job)) {
            Ok(got) => got,
            Err(e) => {
                let e = FetchError::from(e);
                return job.iter().map(|d| (*d, Err(e.clone()))).collect();
            }
        };
        let mut got: HashMap<Digest, Option<Vec<u8>>> = got.into_iter().collect();
        job.iter()
            .map(|d| {
                let res = match got.remove(d) {
                    Some(Some(bytes)) => self
                        .shared
                        .store_verified(store, BlobKind::File, d, &bytes)
                        .map(|()| true),
                    Some(None) => Ok(false),
                    None => Err(FetchError::LeftOut),
                };
                (*d, res)
            })
            .collect()
    }

    /// Uploads every blob of the trees at `roots` that the remote lacks (`Directory`s and files),
    /// reading them from `store`.
    pub fn push(&self, store: &Store, roots: &[Digest]) -> Result<PushReport, PushError> {
        let tree = store.tree_blobs(roots);
        if let Some(e) = tree.errors.into_iter().next() {
            return Err(e.into());
        }
        let (files, dirs) = (tree.files, tree.dirs);
        let kinds: HashMap<Digest, BlobKind> = files
            .iter()
            .map(|d| (*d, BlobKind::File))
            .chain(dirs.iter().map(|d| (*d, BlobKind::Directory)))
            .filter(|(d, _)| !d.is_empty())
            .collect();
        let all: Vec<Digest> = kinds.keys().copied().collect();
        let client = &self.shared.client;
        // The batches below must fit the server's limit.
        let caps = self.within_timeout(client.capabilities())?;
        self.shared.adopt(&caps, &self.cfg.address);
        let mut missing = Vec::new();
        for chunk in all.chunks(FIND_MISSING_CHUNK) {
            missing.extend(self.rt.block_on(client.find_missing(chunk))?);
        }
        let mut report = PushReport {
            blobs: all.len(),
            missing: missing.len(),
            bytes_sent: 0,
        };
        for group in self.shared.batches(missing) {
            let read = |d: &Digest, offset: u64, len: usize| match kinds.get(d) {
                Some(BlobKind::Directory) => store.directory_bytes(d),
                _ => store
                    .open_blob(d)
                    .and_then(|b| store.read_blob(&b, offset, len)),
            };
            report.bytes_sent += group.iter().map(|d| d.size).sum::<u64>();
            let call = match group.as_slice() {
                [d] if !self.shared.fits_batch(d) => self
                    .rt
                    .block_on(client.write_blob(d, &|o, l| read(d, o, l))),
                _ => {
                    let blobs = group
                        .iter()
                        .map(|d| Ok((*d, read(d, 0, d.size as usize)?)))
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    self.rt.block_on(client.batch_update(blobs))
                }
            };
            call?;
        }
        Ok(report)
    }

    pub fn status(&self) -> RemoteStatus {
        let k = &self.shared.client.counters;
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (ok, failed) = (load(&k.last_ok_unix), load(&k.last_failure_unix));
        RemoteStatus {
            address: self.cfg.address.clone(),
            instance_name: self.cfg.instance_name.clone(),
            health: match (ok, failed) {
                (0, 0) => "unknown",
                (ok, failed) if failed > ok => "failing",
                _ => "ok",
            }
            .into(),
            last_error: lock(&k.last_error).clone(),
            last_ok_unix: ok,
            last_failure_unix: failed,
            calls: load(&k.calls),
            call_failures: load(&k.failures),
            retries: load(&k.retries),
            find_missing_calls: load(&k.find_missing),
            batch_reads: load(&k.batch_reads),
            bytestream_reads: load(&k.bytestream_reads),
            get_tree_calls: load(&k.get_trees),
            bytes_received: load(&k.bytes_received),
            blobs_fetched: load(&c.blobs_fetched),
            bytes_fetched: load(&c.bytes_fetched),
            refused_corrupt: load(&c.refused_corrupt),
            fetch_failures: load(&c.fetch_failures),
            joined_fetches: load(&c.joined),
            ranged_reads: load(&c.ranged_reads),
            ranged_bytes: load(&c.ranged_bytes),
            prefetch: PrefetchStatus {
                running: load(&c.prefetch_running),
                trees: load(&c.prefetch_trees),
                blobs_total: load(&c.prefetch_blobs_total),
                blobs_done: load(&c.prefetch_blobs_done),
                blobs_failed: load(&c.prefetch_blobs_failed),
                bytes_total: load(&c.prefetch_bytes_total),
                bytes_done: load(&c.prefetch_bytes_done),
            },
        }
    }
}

impl Shared {
    fn adopt(&self, caps: &proto::ServerCapabilities, address: &str) {
        let Some(cache) = &caps.cache_capabilities else {
            log::warn!("remote CAS {address} reports no cache capabilities");
            return;
        };
        if !cache.digest_functions.is_empty() && !cache.digest_functions.contains(&proto::SHA256) {
            log::error!(
                "remote CAS {address} does not offer SHA256, the digest function Pants uses"
            );
        }
        if cache.max_batch_total_size_bytes > 0 {
            let max = (cache.max_batch_total_size_bytes as u64).saturating_sub(64 * 1024);
            self.max_batch.store(max.max(1024), Ordering::Relaxed);
        }
        log::debug!(
            "remote CAS {address}: batch calls up to {} bytes",
            self.max_batch.load(Ordering::Relaxed)
        );
    }

    fn fits_batch(&self, digest: &Digest) -> bool {
        digest.size + BATCH_ENTRY_OVERHEAD <= self.max_batch.load(Ordering::Relaxed)
    }

    /// Groups blobs for calls: each too large for a batch call alone (for a stream), the rest
    /// many to a group of at most the server's batch size.
    fn batches(&self, digests: Vec<Digest>) -> Vec<Vec<Digest>> {
        let max = self.max_batch.load(Ordering::Relaxed);
        let (large, small): (Vec<Digest>, Vec<Digest>) =
            digests.into_iter().partition(|d| !self.fits_batch(d));
        let mut groups: Vec<Vec<Digest>> = large.into_iter().map(|d| vec![d]).collect();
        let mut group = Vec::new();
        let mut bytes = 0;
        for d in small {
            if bytes + d.size + BATCH_ENTRY_OVERHEAD > max {
                groups.push(std::mem::take(&mut group));
                bytes = 0;
            }
            bytes += d.size + BATCH_ENTRY_OVERHEAD;
            group.push(d);
        }
        if !group.is_empty() {
            groups.push(group);
        }
        groups
    }

    /// Checks a blob received whole and writes it into the store; refuses corrupt bytes.
    fn store_verified(
        &self,
        store: &Store,
        kind: BlobKind,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), FetchError> {
        match store.put_verified(kind, digest, bytes) {
            Ok(()) => {
                self.fetched(digest.size);
                Ok(())
            }
            Err(e @ (StoreError::HashMismatch { .. } | StoreError::SizeMismatch { .. })) => {
                Err(self.refused(digest, e))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn fetched(&self, bytes: u64) {
        self.counters.blobs_fetched.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_fetched
            .fetch_add(bytes, Ordering::Relaxed);
    }

    fn refused(&self, digest: &Digest, e: StoreError) -> FetchError {
        self.counters
            .refused_corrupt
            .fetch_add(1, Ordering::Relaxed);
        lock(&self.refused).insert(*digest);
        log::debug!("refused {digest}: {e}");
        FetchError::Corrupt
    }

    async fn fetch_into(
        &self,
        store: &Store,
        digest: Digest,
        kind: BlobKind,
        flight: &Flight,
    ) -> Result<bool, FetchError> {
        // Another request may have fetched it between our miss and now.
        if store.has(&digest, kind)? {
            return Ok(true);
        }
        match kind {
            BlobKind::Directory => self.fetch_directory(store, &digest, flight).await,
            BlobKind::File if digest.is_large() => self.fetch_large(store, &digest, flight).await,
            BlobKind::File => self.fetch_small(store, kind, &digest).await,
        }
    }

    async fn fetch_small(
        &self,
        store: &Store,
        kind: BlobKind,
        digest: &Digest,
    ) -> Result<bool, FetchError> {
        let bytes = if self.fits_batch(digest) {
            let got = self.client.batch_read(&[*digest]).await?;
            match got.into_iter().find(|(d, _)| d == digest) {
                Some((_, Some(bytes))) => bytes,
                _ => return Ok(false),
            }
        } else {
            let mut bytes = Vec::with_capacity(digest.size as usize);
            let found = self
                .client
                .read_blob(digest, 0, 0, &mut |data| {
                    bytes.extend_from_slice(data);
                    Ok(())
                })
                .await?;
            if !found {
                return Ok(false);
            }
            bytes
        };
        self.store_verified(store, kind, digest, &bytes)?;
        Ok(true)
    }

    /// Streams a large blob into a temporary file beside its final place, hashing as it goes;
    /// it takes its name only if the hash matches.
    async fn fetch_large(
        &self,
        store: &Store,
        digest: &Digest,
        flight: &Flight,
    ) -> Result<bool, FetchError> {
        let Some(mut writer) = store.large_blob_writer(digest)? else {
            return Ok(true);
        };
        let found = self
            .client
            .read_blob(digest, 0, 0, &mut |data| {
                flight
                    .progress
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                writer.write(data)
            })
            .await?;
        if !found {
            return Ok(false);
        }
        match writer.commit() {
            Ok(()) => {
                self.fetched(digest.size);
                Ok(true)
            }
            Err(e @ (StoreError::HashMismatch { .. } | StoreError::SizeMismatch { .. })) => {
                Err(self.refused(digest, e))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Fetches a `Directory`, and with `GetTree` every `Directory` below it in the same call.
    async fn fetch_directory(
        &self,
        store: &Store,
        digest: &Digest,
        flight: &Flight,
    ) -> Result<bool, FetchError> {
        if !self.get_tree_unsupported.load(Ordering::Relaxed) {
            match self.client.get_tree(digest, &flight.progress).await {
                Ok(Some(dirs)) => {
                    let mut found = false;
                    let mut by_shard: Vec<Vec<(Digest, &[u8])>> =
                        vec![Vec::new(); store.shard_count().get()];
                    for bytes in &dirs {
                        // Stored under the hash of what arrived, so nothing can be misfiled.
                        let d = Digest::of_bytes(bytes);
                        found |= d == *digest;
                        if !d.is_empty() {
                            by_shard[store.shard_of(&d)].push((d, bytes));
                        }
                    }
                    for (shard, batch) in by_shard.iter().enumerate() {
                        if !batch.is_empty() {
                            store.put_directories(shard, batch)?;
                            for (d, _) in batch {
                                self.fetched(d.size);
                            }
                        }
                    }
                    if found {
                        return Ok(true);
                    }
                    log::debug!("GetTree {digest} did not return the root itself; reading it");
                }
                Ok(None) => {
                    log::info!("the remote CAS has no GetTree; reading Directories one by one");
                    self.get_tree_unsupported.store(true, Ordering::Relaxed);
                }
                Err(e) if e.is_not_found() => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        self.fetch_small(store, BlobKind::Directory, digest).await
    }
}
