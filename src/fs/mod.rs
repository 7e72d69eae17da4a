//! The filesystem core: namespace, views, inodes, attributes and reads, as plain functions over
//! plain types. The `fuse` adapter translates; tests call these directly without a mount.

pub mod inode;
pub mod namespace;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lru::LruCache;

pub use self::inode::{InodeTable, Node, BLOBS_INO, CONTENT_INO, ROOT_INO, TREES_INO};
pub use self::namespace::{parse_path, Namespace, View, CONTENT_DIR, DEFAULT_LAYER};
use crate::store::{Blob, Digest, EntryKind, Store, StoreError};

pub const XATTR_DIGEST: &str = "user.pants.digest";
pub const XATTR_SHA256: &str = "user.checksum.sha256";
pub const BLKSIZE: u32 = 4096;
/// The handle of reads on a file that was opened without a message to the daemon.
pub const NO_HANDLE: u64 = 0;

#[derive(Clone, Debug)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    /// Answer the digest xattrs; off, getxattr answers ENOSYS so the kernel stops asking.
    pub xattrs: bool,
    /// Every timestamp is this second (see SEMANTICS.md for the nanoseconds).
    pub mount_time: SystemTime,
    /// Directory entries kept decoded in memory, across all cached directories.
    pub cache_entries: usize,
    /// Hash every blob once, on first use, before serving any of its bytes.
    pub verify: bool,
}

impl Default for FsConfig {
    fn default() -> FsConfig {
        FsConfig {
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            xattrs: false,
            mount_time: SystemTime::now(),
            cache_entries: 1 << 20,
            verify: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub blksize: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    NotDir,
    IsDir,
    ReadOnly,
    NotSupported,
    NoData,
    BadHandle,
    /// The store failed us (missing or corrupt blob, I/O error); already logged.
    Io,
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotSupported => libc::ENOSYS,
            FsError::NoData => libc::ENODATA,
            FsError::BadHandle => libc::EBADF,
            FsError::Io => libc::EIO,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// One entry handed to a readdir callback.
pub struct DirEntryOut<'a> {
    pub ino: u64,
    /// The offset of the entry after this one.
    pub next_offset: u64,
    pub kind: FileKind,
    pub name: &'a str,
    /// Present for readdirplus; the entry then counts as a lookup unless it is `.` or `..`.
    pub attr: Option<Attr>,
}

type Children = Vec<(String, Node)>;

/// Decoded directories, bounded by their total number of entries.
struct DirCache {
    lru: LruCache<Node, Arc<Children>>,
    entries: usize,
    max_entries: usize,
}

impl DirCache {
    fn get(&mut self, node: &Node) -> Option<Arc<Children>> {
        self.lru.get(node).cloned()
    }

    fn insert(&mut self, node: Node, children: Arc<Children>) {
        self.entries += children.len();
        if let Some(old) = self.lru.put(node, children) {
            self.entries -= old.len();
        }
        while self.entries > self.max_entries && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, old)) => self.entries -= old.len(),
                None => break,
            }
        }
    }
}

#[derive(Default)]
pub struct Stats {
    /// Every request that reached the core (a round trip from the kernel).
    pub requests: AtomicU64,
    pub lookups: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub opens: AtomicU64,
    pub errors: AtomicU64,
    /// `Directory`s checked by binds, for the client's progress display.
    pub verified_dirs: AtomicU64,
    pub lease_rounds: AtomicU64,
    pub lease_last_unix: AtomicU64,
    pub lease_last_renewed: AtomicU64,
    pub lease_last_missing: AtomicU64,
}

/// What a bind or unbind changed, so the adapter can tell the kernel to forget exactly that.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Whether the namespace changed at all (a layer can change without changing content).
    pub changed: bool,
    /// `(parent inode, name)` of each directory entry that now means something else.
    pub entries: Vec<(u64, String)>,
}

/// Tells the kernel to drop a cached directory entry; the FUSE adapter provides it.
pub trait Invalidator: Send + Sync {
    /// Forget `name` in `parent`, and `parent`'s cached listing and attributes.
    fn invalidate_entry(&self, parent: u64, name: &str);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct DigestFs {
    store: Arc<Store>,
    config: FsConfig,
    inodes: Mutex<InodeTable>,
    cache: Mutex<DirCache>,
    namespace: RwLock<Arc<Namespace>>,
    /// Serialises binds, so each one checks conflicts against the namespace it replaces.
    bind_lock: Mutex<()>,
    files: Mutex<HashMap<u64, Blob>>,
    /// Open blobs for reads that come without a handle.
    blobs: Mutex<LruCache<Digest, Blob>>,
    next_fh: AtomicU64,
    logged: Mutex<HashSet<Digest>>,
    /// Blobs whose content was hashed and found right (with `verify`).
    verified: Mutex<HashSet<Digest>>,
    invalidator: OnceLock<Box<dyn Invalidator>>,
    /// Told of each newly bound tree (the lease keeper, the prefetcher).
    bind_watchers: Mutex<Vec<crossbeam_channel::Sender<Digest>>>,
    pub stats: Stats,
}

impl DigestFs {
    pub fn new(store: Arc<Store>, config: FsConfig) -> DigestFs {
        let max_entries = config.cache_entries.max(1);
        DigestFs {
            store,
            inodes: Mutex::new(InodeTable::new()),
            cache: Mutex::new(DirCache {
                lru: LruCache::new(NonZeroUsize::new(65536).expect("non-zero")),
                entries: 0,
                max_entries,
            }),
            namespace: RwLock::new(Arc::new(Namespace::default())),
            bind_lock: Mutex::new(()),
            files: Mutex::new(HashMap::new()),
            blobs: Mutex::new(LruCache::new(NonZeroUsize::new(256).expect("non-zero"))),
            next_fh: AtomicU64::new(1),
            logged: Mutex::new(HashSet::new()),
            verified: Mutex::new(HashSet::new()),
            invalidator: OnceLock::new(),
            bind_watchers: Mutex::default(),
            config,
            stats: Stats::default(),
        }
    }

    /// Where binds send the names they change, once the mount exists.
    pub fn set_invalidator(&self, inv: Box<dyn Invalidator>) {
        let _ = self.invalidator.set(inv);
    }

    /// Every successful bind sends its tree's digest here (the lease keeper, the prefetcher).
    /// A full channel drops the message: watchers must not hold up binds.
    pub fn watch_binds(&self, watcher: crossbeam_channel::Sender<Digest>) {
        lock(&self.bind_watchers).push(watcher);
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn namespace(&self) -> Arc<Namespace> {
        self.namespace
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Nodes the kernel holds, plus the fixed ones.
    pub fn inode_count(&self) -> usize {
        lock(&self.inodes).len()
    }

    pub fn open_handles(&self) -> usize {
        lock(&self.files).len()
    }

    pub fn cached_entries(&self) -> usize {
        lock(&self.cache).entries
    }

    /// Logs a store failure once per digest, naming the path, and maps it to EIO.
    fn store_failure(&self, ino: u64, err: StoreError) -> FsError {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let first = match err.digest() {
            Some(d) => {
                let mut logged = lock(&self.logged);
                if logged.len() > 65536 {
                    logged.clear();
                }
                logged.insert(d)
            }
            None => true,
        };
        if first {
            let path = lock(&self.inodes).path_of(ino);
            log::error!("{path}: {err}");
        }
        FsError::Io
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        lock(&self.inodes)
            .node(ino)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    // ---- directories -------------------------------------------------------------------

    fn children(&self, ino: u64, node: &Node) -> FsResult<Arc<Children>> {
        match node {
            Node::Root => Ok(Arc::new(self.namespace().children("").unwrap_or_default())),
            Node::Namespace(path) => self
                .namespace()
                .children(path)
                .map(Arc::new)
                .ok_or(FsError::NotFound),
            Node::Content => Ok(Arc::new(vec![
                ("blobs".to_string(), Node::Blobs),
                ("trees".to_string(), Node::Trees),
            ])),
            Node::Blobs | Node::Trees => Ok(Arc::new(Vec::new())),
            Node::Tree(_) | Node::Merged(_) => {
                if let Some(c) = lock(&self.cache).get(node) {
                    return Ok(c);
                }
                // Built without holding the cache lock: this is store I/O.
                let built = Arc::new(
                    self.build_children(node)
                        .map_err(|e| self.store_failure(ino, e))?,
                );
                lock(&self.cache).insert(node.clone(), built.clone());
                Ok(built)
            }
            Node::File { .. } | Node::Symlink(_) => Err(FsError::NotDir),
        }
    }

    fn build_children(&self, node: &Node) -> Result<Children, StoreError> {
        match node {
            Node::Tree(d) => Ok(self
                .store
                .load_directory(d)?
                .entries
                .into_iter()
                .map(|e| {
                    let node = match e.kind {
                        EntryKind::File { digest, executable } => Node::File { digest, executable },
                        EntryKind::Dir(d) => Node::Tree(d),
                        EntryKind::Symlink(t) => Node::Symlink(t.into()),
                    };
                    (e.name, node)
                })
                .collect()),
            Node::Merged(ds) => {
                let mut merged: BTreeMap<String, Vec<Node>> = BTreeMap::new();
                for d in ds.iter() {
                    for (name, node) in self.build_children(&Node::Tree(*d))? {
                        let slot = merged.entry(name).or_default();
                        if !slot.contains(&node) {
                            slot.push(node);
                        }
                    }
                }
                Ok(merged
                    .into_iter()
                    .map(|(name, nodes)| {
                        let node = merge_nodes(&name, nodes);
                        (name, node)
                    })
                    .collect())
            }
            _ => Ok(Vec::new()),
        }
    }

    fn child(&self, parent_ino: u64, parent: &Node, name: &str) -> FsResult<Node> {
        match (parent, name) {
            (Node::Root, CONTENT_DIR) => return Ok(Node::Content),
            (Node::Blobs, _) => {
                let digest: Digest = name.parse().map_err(|_| FsError::NotFound)?;
                return match self.store.has_file(&digest) {
                    Ok(true) => Ok(Node::File {
                        digest,
                        executable: false,
                    }),
                    Ok(false) => Err(FsError::NotFound),
                    Err(e) => Err(self.store_failure(parent_ino, e)),
                };
            }
            (Node::Trees, _) => {
                let digest: Digest = name.parse().map_err(|_| FsError::NotFound)?;
                return match self.children(parent_ino, &Node::Tree(digest)) {
                    Ok(_) => Ok(Node::Tree(digest)),
                    Err(_) => Err(FsError::NotFound),
                };
            }
            _ => {}
        }
        let children = self.children(parent_ino, parent)?;
        children
            .binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes()))
            .map(|i| children[i].1.clone())
            .map_err(|_| FsError::NotFound)
    }

    // ---- attributes --------------------------------------------------------------------

    fn attr(&self, ino: u64, node: &Node) -> FsResult<Attr> {
        let (kind, size, perm, nlink) = match node {
            Node::File { digest, executable } => (
                FileKind::File,
                digest.size,
                if *executable { 0o555 } else { 0o444 },
                1,
            ),
            Node::Symlink(target) => (FileKind::Symlink, target.len() as u64, 0o777, 1),
            _ => {
                let children = self.children(ino, node)?;
                let subdirs = children.iter().filter(|(_, n)| n.is_dir()).count() as u32;
                (FileKind::Dir, children.len() as u64, 0o555, 2 + subdirs)
            }
        };
        Ok(Attr {
            ino,
            size,
            blocks: size.div_ceil(512),
            kind,
            perm,
            nlink,
            uid: self.config.uid,
            gid: self.config.gid,
            mtime: self.mtime(node),
            blksize: BLKSIZE,
        })
    }

    /// The second before the mount started (so never in the future, which `make` and `ls` treat
    /// specially), with nanoseconds taken from the content's digest: stable for an unchanged
    /// entry, and different when a rebind puts other content of the same size there.
    fn mtime(&self, node: &Node) -> SystemTime {
        let secs = self
            .config
            .mount_time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(1))
            .unwrap_or(0);
        let nanos = match node {
            Node::Root | Node::Content | Node::Blobs | Node::Trees | Node::Namespace(_) => 0,
            _ => (node.fingerprint() % 1_000_000_000) as u32,
        };
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    // ---- the operations ----------------------------------------------------------------

    /// Looks `name` up in `parent` and counts one kernel reference to the result.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let parent_node = self.node(parent)?;
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let node = match name {
            "." => parent_node,
            ".." => {
                let up = lock(&self.inodes).parent(parent);
                self.node(up)?
            }
            _ => self.child(parent, &parent_node, name)?,
        };
        let ino = lock(&self.inodes).ino_of(&node);
        let attr = self.attr(ino, &node)?;
        let acquired = lock(&self.inodes).acquire(&node, parent, name);
        Ok(Attr {
            ino: acquired,
            ..attr
        })
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        lock(&self.inodes).forget(ino, nlookup);
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let node = self.node(ino)?;
        self.attr(ino, &node)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        match self.node(ino)? {
            Node::Symlink(t) => Ok(t.as_bytes().to_vec()),
            _ => Err(FsError::NotFound),
        }
    }

    /// Opens a file for reading; anything that could write is EROFS. The store is checked now,
    /// so a missing or wrong-sized blob fails here with EIO rather than on some later read.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<(u64, Blob)> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let digest = self.readable_file(ino, flags)?;
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        let blob = self
            .open_checked(&digest)
            .map_err(|e| self.store_failure(ino, e))?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, blob.clone());
        Ok((fh, blob))
    }

    /// Checks that `ino` may be opened with `flags` (a readable file), without opening it.
    pub fn check_open(&self, ino: u64, flags: i32) -> FsResult<()> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.readable_file(ino, flags).map(|_| ())
    }

    /// The digest of `ino` if it is a file that `flags` open for reading only; anything that
    /// could write is EROFS.
    fn readable_file(&self, ino: u64, flags: i32) -> FsResult<Digest> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY
            || flags & (libc::O_TRUNC | libc::O_APPEND) != 0
        {
            return Err(FsError::ReadOnly);
        }
        match self.node(ino)? {
            Node::File { digest, .. } => Ok(digest),
            Node::Symlink(_) => Err(FsError::NotFound),
            _ => Err(FsError::IsDir),
        }
    }

    /// Reads through handle `fh`, or with [`NO_HANDLE`] (zero-message opens) through a cache of
    /// open blobs keyed by digest.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let blob = if fh == NO_HANDLE {
            self.blob_of(ino)?
        } else {
            lock(&self.files)
                .get(&fh)
                .cloned()
                .ok_or(FsError::BadHandle)?
        };
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let data = self
            .store
            .read_blob(&blob, offset, size as usize)
            .map_err(|e| self.store_failure(ino, e))?;
        self.stats
            .read_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Opens a blob, hashing it first (once per digest) when `verify` is on.
    fn open_checked(&self, digest: &Digest) -> Result<Blob, StoreError> {
        let blob = self.store.open_blob(digest)?;
        if !self.config.verify || lock(&self.verified).contains(digest) {
            return Ok(blob);
        }
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        self.store.for_each_chunk(&blob, |chunk| {
            sha2::Digest::update(&mut hasher, chunk);
            Ok::<_, StoreError>(())
        })?;
        let hash: [u8; 32] = sha2::Digest::finalize(hasher).into();
        if hash != digest.hash {
            return Err(StoreError::HashMismatch { digest: *digest });
        }
        let mut verified = lock(&self.verified);
        if verified.len() >= 1 << 20 {
            verified.clear();
        }
        verified.insert(*digest);
        Ok(blob)
    }

    fn blob_of(&self, ino: u64) -> FsResult<Blob> {
        let digest = match self.node(ino)? {
            Node::File { digest, .. } => digest,
            _ => return Err(FsError::IsDir),
        };
        if let Some(b) = lock(&self.blobs).get(&digest) {
            return Ok(b.clone());
        }
        let blob = self
            .open_checked(&digest)
            .map_err(|e| self.store_failure(ino, e))?;
        lock(&self.blobs).put(digest, blob.clone());
        Ok(blob)
    }

    pub fn release(&self, fh: u64) {
        lock(&self.files).remove(&fh);
    }

    /// Lists entries from `offset` until `add` says the reply is full. With `plus`, each entry
    /// carries attributes and counts as a kernel lookup, taken back if it did not fit.
    /// Directories are opened without a message (the kernel caches their listings), so there is
    /// no handle: a namespace directory that a bind changes between two calls lists its new
    /// entries from the same offset.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(&DirEntryOut) -> bool,
    ) -> FsResult<()> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let node = self.node(ino)?;
        let children = self.children(ino, &node)?;
        let parent_ino = lock(&self.inodes).parent(ino);
        let total = children.len() as u64 + 2;
        for i in offset..total {
            let (name, entry_node, entry_ino) = match i {
                0 => (".", &node, ino),
                1 => ("..", &node, parent_ino),
                _ => {
                    let (name, n) = &children[(i - 2) as usize];
                    (name.as_str(), n, lock(&self.inodes).ino_of(n))
                }
            };
            let dot = i < 2;
            let attr = if plus {
                let a = if dot {
                    self.getattr(entry_ino)?
                } else {
                    self.attr(entry_ino, entry_node)?
                };
                Some(a)
            } else {
                None
            };
            let entry_ino = if plus && !dot {
                lock(&self.inodes).acquire(entry_node, ino, name)
            } else {
                entry_ino
            };
            let kind = if entry_node.is_dir() {
                FileKind::Dir
            } else if let Node::Symlink(_) = entry_node {
                FileKind::Symlink
            } else {
                FileKind::File
            };
            let out = DirEntryOut {
                ino: entry_ino,
                next_offset: i + 1,
                kind,
                name,
                attr: attr.map(|a| Attr {
                    ino: entry_ino,
                    ..a
                }),
            };
            if add(&out) {
                if plus && !dot {
                    self.forget(entry_ino, 1);
                }
                break;
            }
        }
        Ok(())
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if !self.config.xattrs {
            return Err(FsError::NotSupported);
        }
        let digest = match self.node(ino)? {
            Node::File { digest, .. } | Node::Tree(digest) => digest,
            _ => return Err(FsError::NoData),
        };
        match name.to_str() {
            Some(XATTR_DIGEST) => Ok(digest.to_string().into_bytes()),
            Some(XATTR_SHA256) => Ok(digest.hex().into_bytes()),
            _ => Err(FsError::NoData),
        }
    }

    /// The xattr names, each NUL-terminated, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if !self.config.xattrs {
            return Err(FsError::NotSupported);
        }
        match self.node(ino)? {
            Node::File { .. } | Node::Tree(_) => {
                Ok(format!("{XATTR_DIGEST}\0{XATTR_SHA256}\0").into_bytes())
            }
            _ => Ok(Vec::new()),
        }
    }

    // ---- binding views -----------------------------------------------------------------

    /// Sets `layer` of the view at `path` to the tree `digest`. With `verify`, every `Directory`
    /// of the tree must be in the store first. Layers that disagree about a name are refused and
    /// nothing changes; binding what is already bound changes nothing.
    pub fn bind(
        &self,
        path: &str,
        layer: &str,
        digest: Digest,
        verify: bool,
    ) -> Result<Change, String> {
        let parts = parse_path(path)?;
        crate::store::check_name(layer).map_err(|r| format!("layer name {layer:?}: {r}"))?;
        if verify {
            self.verify_tree(&digest)?;
        }
        let _guard = lock(&self.bind_lock);
        let current = self.namespace();
        let mut view = current.view(&parts).cloned().unwrap_or_default();
        if view.layers.get(layer) == Some(&digest) {
            return Ok(Change::default());
        }
        view.layers.insert(layer.to_string(), digest);
        let distinct: Vec<Digest> = {
            let mut ds: Vec<Digest> = view.layers.values().copied().collect();
            ds.sort();
            ds.dedup();
            ds
        };
        if distinct.len() > 1 {
            self.check_merge(&distinct, &parts.join("/"))?;
        }
        let next = current.with_view(&parts, Some(view))?;
        let change = self.swap(&current, next, &parts);
        for watcher in lock(&self.bind_watchers).iter() {
            let _ = watcher.try_send(digest);
        }
        Ok(change)
    }

    /// Removes one layer (or, with `None`, the whole view) at `path`.
    pub fn unbind(&self, path: &str, layer: Option<&str>) -> Result<Change, String> {
        let parts = parse_path(path)?;
        let _guard = lock(&self.bind_lock);
        let current = self.namespace();
        let mut view = current
            .view(&parts)
            .cloned()
            .ok_or_else(|| format!("nothing is bound at {}", parts.join("/")))?;
        match layer {
            Some(l) => {
                if view.layers.remove(l).is_none() {
                    return Err(format!("{} has no layer {l:?}", parts.join("/")));
                }
            }
            None => view.layers.clear(),
        }
        let next = current.with_view(&parts, (!view.layers.is_empty()).then_some(view))?;
        Ok(self.swap(&current, next, &parts))
    }

    /// Installs `next` and works out which directory entries the kernel must forget: the
    /// highest component of `parts` whose meaning changed.
    fn swap(&self, current: &Namespace, next: Namespace, parts: &[String]) -> Change {
        let mut change = Change {
            changed: true,
            entries: Vec::new(),
        };
        let mut parent_path = String::new();
        let mut parent_ino = ROOT_INO;
        for (depth, name) in parts.iter().enumerate() {
            let old = current
                .children(&parent_path)
                .and_then(|c| c.into_iter().find(|(n, _)| n == name));
            let new = next
                .children(&parent_path)
                .and_then(|c| c.into_iter().find(|(n, _)| n == name));
            if old != new || depth + 1 == parts.len() {
                if old != new {
                    change.entries.push((parent_ino, name.clone()));
                }
                break;
            }
            parent_path = parts[..=depth].join("/");
            parent_ino = lock(&self.inodes).ino_of(&Node::Namespace(parent_path.as_str().into()));
        }
        *self.namespace.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        if let Some(inv) = self.invalidator.get() {
            for (parent, name) in &change.entries {
                inv.invalidate_entry(*parent, name);
            }
        }
        change
    }

    /// Resolves a path under the mount root without taking kernel references (for `which`).
    pub fn resolve(&self, path: &str) -> Result<Node, String> {
        let mut node = Node::Root;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                return Err("paths with '..' are not resolved".into());
            }
            node = self.child(ROOT_INO, &node, part).map_err(|e| match e {
                FsError::NotFound => "no such file or directory".to_string(),
                FsError::NotDir => "not a directory".to_string(),
                _ => "could not be read (see the daemon's log)".to_string(),
            })?;
        }
        Ok(node)
    }

    /// The number of entries a directory node shows, if it can be read.
    pub fn entry_count(&self, node: &Node) -> Option<u64> {
        self.children(ROOT_INO, node).ok().map(|c| c.len() as u64)
    }

    /// Checks that every `Directory` of the tree is present and valid.
    pub fn verify_tree(&self, root: &Digest) -> Result<(), String> {
        self.store
            .walk_directories(
                &[*root],
                &mut |_, _| {
                    self.stats.verified_dirs.fetch_add(1, Ordering::Relaxed);
                },
                &mut Err,
            )
            .map_err(|e| e.to_string())
    }

    /// Refuses layers that give one name different content, naming the path and both digests.
    fn check_merge(&self, digests: &[Digest], path: &str) -> Result<(), String> {
        let mut seen: BTreeMap<String, (Digest, EntryKind)> = BTreeMap::new();
        let mut subdirs: BTreeMap<String, Vec<Digest>> = BTreeMap::new();
        for layer in digests {
            let listing = self
                .store
                .load_directory(layer)
                .map_err(|e| e.to_string())?;
            for e in listing.entries {
                let here = format!("{path}/{}", e.name);
                match seen.get(&e.name) {
                    None => {
                        if let EntryKind::Dir(d) = e.kind {
                            subdirs.entry(e.name.clone()).or_default().push(d);
                        }
                        seen.insert(e.name, (*layer, e.kind));
                    }
                    Some((_, kind)) if *kind == e.kind => {}
                    Some((_, EntryKind::Dir(_))) if matches!(e.kind, EntryKind::Dir(_)) => {
                        if let EntryKind::Dir(d) = e.kind {
                            subdirs.entry(e.name).or_default().push(d);
                        }
                    }
                    Some((other_layer, kind)) => {
                        return Err(format!(
                            "conflict at {here}: tree {other_layer} has {} but tree {layer} has {}",
                            describe(kind),
                            describe(&e.kind)
                        ));
                    }
                }
            }
        }
        for (name, mut ds) in subdirs {
            ds.sort();
            ds.dedup();
            if ds.len() > 1 {
                self.check_merge(&ds, &format!("{path}/{name}"))?;
            }
        }
        Ok(())
    }
}

fn describe(kind: &EntryKind) -> String {
    match kind {
        EntryKind::File {
            digest,
            executable: true,
        } => format!("executable file {digest}"),
        EntryKind::File { digest, .. } => format!("file {digest}"),
        EntryKind::Dir(d) => format!("directory {d}"),
        EntryKind::Symlink(t) => format!("symlink to {t:?}"),
    }
}

/// Several layers' entries for one name: identical ones were folded already, directories merge;
/// anything else was refused at bind time, so the first layer wins defensively.
fn merge_nodes(name: &str, nodes: Vec<Node>) -> Node {
    if nodes.len() == 1 {
        return nodes.into_iter().next().expect("one");
    }
    let dirs: Option<Vec<Digest>> = nodes
        .iter()
        .map(|n| match n {
            Node::Tree(d) => Some(vec![*d]),
            Node::Merged(ds) => Some(ds.to_vec()),
            _ => None,
        })
        .try_fold(Vec::new(), |mut acc, d| {
            acc.extend(d?);
            Some(acc)
        });
    match dirs {
        Some(mut ds) => {
            ds.sort();
            ds.dedup();
            Node::Merged(ds.into())
        }
        None => {
            log::warn!("layers disagree about {name:?}; serving the first layer's entry");
            nodes.into_iter().next().expect("non-empty")
        }
    }
}

#[cfg(test)]
mod tests;
