//! The filesystem core: namespace, views, inodes, attributes and reads, as plain functions over
//! plain types. The front ends (`fuse`, `nfs`) translate; tests call these directly.
//!
//! Rooms: [`namespace`] (what is bound where), [`inode`] (identity and kernel references),
//! `children` (decoded directories and merged layers), `attr` (attributes and the mtime policy),
//! `read` (opening and reading blobs), `bind` (changing views).

mod attr;
mod bind;
mod children;
pub mod inode;
pub mod namespace;
mod read;
pub use read::ReadSource;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

pub use self::attr::{Attr, FileKind, BLKSIZE, MTIME_EPOCH};
pub use self::bind::{BindError, Change, Invalidator};
pub use self::children::Children;
use self::children::DirCache;
pub use self::inode::{InodeTable, Node, SlotRecord, BLOBS_INO, CONTENT_INO, ROOT_INO, TREES_INO};
pub use self::namespace::{
    parse_path, Namespace, NamespaceError, PathError, View, CONTENT_DIR, DEFAULT_LAYER,
};
use crate::cas::{Cas, ReadError};
use crate::store::Digest;

pub const XATTR_DIGEST: &str = "user.pants.digest";
pub const XATTR_SHA256: &str = "user.checksum.sha256";
/// The handle of reads on a file that was opened without a message to the daemon.
pub const NO_HANDLE: u64 = 0;

#[derive(Clone, Debug)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    /// Answer the digest xattrs; off, getxattr answers ENOSYS so the kernel stops asking.
    pub xattrs: bool,
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
            cache_entries: 1 << 20,
            verify: false,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    NotDir,
    IsDir,
    /// The operation does not apply to this kind of node (`readlink` of a file).
    Invalid,
    ReadOnly,
    NotSupported,
    NoData,
    BadHandle,
    /// The blob is no longer in the store (nor in the remote CAS, if there is one); already
    /// logged. Content is named by digest, so NFS answers this NFS3ERR_STALE: the handle names
    /// content that is gone. FUSE answers EIO, as for any file it cannot serve.
    Gone,
    /// The store failed us (corrupt blob, I/O error, an unreachable remote); already logged.
    Io,
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::Invalid => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotSupported => libc::ENOSYS,
            FsError::NoData => libc::ENODATA,
            FsError::BadHandle => libc::EBADF,
            FsError::Gone | FsError::Io => libc::EIO,
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

/// Counters of the requests that reached the core, for `digestfs status`.
#[derive(Default)]
pub struct Stats {
    /// Every request that reached the core (a round trip from the kernel or an NFS client).
    pub requests: AtomicU64,
    pub lookups: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    /// `read_bytes` by where they came from: LMDB, a large blob's file, the remote CAS.
    pub read_bytes_by_source: [AtomicU64; 3],
    pub opens: AtomicU64,
    pub errors: AtomicU64,
    /// `Directory`s checked by binds, for the client's progress display.
    pub verified_dirs: AtomicU64,
}

/// What sees every namespace a bind or unbind installs.
pub type NamespaceHook = Box<dyn Fn(&Namespace) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct DigestFs {
    cas: Arc<Cas>,
    config: FsConfig,
    inodes: Mutex<InodeTable>,
    cache: Mutex<DirCache>,
    namespace: RwLock<Arc<Namespace>>,
    /// Serialises binds, so each one checks conflicts against the namespace it replaces.
    bind_lock: Mutex<()>,
    /// Set during a takeover: binds are refused.
    binds_closed: std::sync::atomic::AtomicBool,
    read: read::OpenBlobs,
    logged: Mutex<HashSet<Digest>>,
    invalidator: OnceLock<Box<dyn Invalidator>>,
    /// Told of each newly bound tree (the lease keeper, the prefetcher).
    bind_watchers: Mutex<Vec<crossbeam_channel::Sender<Digest>>>,
    /// Told of every namespace a bind or unbind installs (the state file).
    on_change: OnceLock<NamespaceHook>,
    pub stats: Stats,
}

impl DigestFs {
    pub fn new(cas: Arc<Cas>, config: FsConfig) -> DigestFs {
        DigestFs {
            cas,
            inodes: Mutex::new(InodeTable::new()),
            cache: Mutex::new(DirCache::new(config.cache_entries)),
            namespace: RwLock::new(Arc::new(Namespace::default())),
            bind_lock: Mutex::new(()),
            binds_closed: std::sync::atomic::AtomicBool::new(false),
            read: read::OpenBlobs::default(),
            logged: Mutex::new(HashSet::new()),
            invalidator: OnceLock::new(),
            bind_watchers: Mutex::default(),
            on_change: OnceLock::new(),
            config,
            stats: Stats::default(),
        }
    }

    /// The nodes the kernel holds, for a takeover ([`InodeTable::export`]).
    pub fn export_inodes(&self) -> Vec<SlotRecord> {
        lock(&self.inodes).export()
    }

    /// Takes the nodes another daemon's kernel connection holds ([`InodeTable::import`]).
    pub fn import_inodes(&self, records: Vec<SlotRecord>) {
        lock(&self.inodes).import(records)
    }

    /// Refuses binds and unbinds from now on ([`BindError::Closed`]), or takes them again: a
    /// takeover hands over the views as they are. Closing waits for a bind under way.
    pub fn close_binds(&self, closed: bool) {
        let _guard = lock(&self.bind_lock);
        self.binds_closed.store(closed, Ordering::SeqCst);
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

    /// `f` sees every namespace a bind or unbind installs, in order (binds are serialised).
    pub fn on_namespace_change(&self, f: NamespaceHook) {
        let _ = self.on_change.set(f);
    }

    pub fn cas(&self) -> &Arc<Cas> {
        &self.cas
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

    pub fn cached_entries(&self) -> usize {
        lock(&self.cache).entries()
    }

    /// Logs a store failure once per digest, naming the path where the kernel found the node
    /// (`ino`, if the front end has one), and maps it to [`FsError::Gone`] (the blob is not
    /// there) or [`FsError::Io`] (anything else). This is the one place a front end learns that
    /// content is gone: nothing checks for presence ahead of the read that needs the blob.
    fn store_failure(&self, ino: Option<u64>, err: ReadError) -> FsError {
        let kind = if err.is_missing() {
            FsError::Gone
        } else {
            FsError::Io
        };
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
            match ino {
                Some(ino) => log::error!("{}: {err}", self.path_of(ino)),
                None => log::error!("{err}"),
            }
        }
        kind
    }

    /// The path where the kernel last found `ino`, for messages. Inodes keep no names, so each
    /// is found again in its parent's listing ([`DigestFs::name_in`]).
    fn path_of(&self, ino: u64) -> String {
        let lineage = lock(&self.inodes).lineage(ino);
        let mut parts = Vec::new();
        if lineage.first().is_some_and(|n| n.is_none()) {
            parts.push("?".to_string());
        }
        for pair in lineage.windows(2) {
            // A namespace directory carries its whole path.
            if let Some(Node::Namespace(path)) = &pair[0] {
                parts.push(path.to_string());
                break;
            }
            let (Some(child), Some(parent)) = (&pair[0], &pair[1]) else {
                parts.push("?".to_string());
                break;
            };
            parts.push(self.name_in(parent, child).unwrap_or_else(|| "?".into()));
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        lock(&self.inodes)
            .node(ino)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    // ---- the inode-based operations (FUSE) ---------------------------------------------

    /// Looks `name` up in `parent` and counts one kernel reference to the result.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let parent_node = self.node(parent)?;
        let bytes = name.as_encoded_bytes();
        // The common case, a name in a store directory: compared as bytes with the decoded
        // entries (which are UTF-8, so a name that is not cannot match), and the entry's own
        // name is the one recorded. `child` does the same search after checking the name.
        if matches!(parent_node, Node::Tree(_) | Node::Merged(_)) && bytes != b"." && bytes != b".."
        {
            let children = self.children(Some(parent), &parent_node)?;
            let (_, node) = children.named(bytes).ok_or(FsError::NotFound)?;
            return self.acquire_found(parent, node);
        }
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let node = match name {
            "." => parent_node,
            ".." => {
                let up = lock(&self.inodes).parent(parent);
                self.node(up)?
            }
            _ => self.child(Some(parent), &parent_node, name)?,
        };
        self.acquire_found(parent, &node)
    }

    /// The attributes of `node`, found in `parent`, after counting one kernel reference to it
    /// (none if its attributes cannot be had).
    fn acquire_found(&self, parent: u64, node: &Node) -> FsResult<Attr> {
        if !node.is_dir() {
            // A file's or symlink's attributes cannot fail and need no lock: the reference is
            // counted first, which derives the fingerprint the attributes need too.
            let (ino, fingerprint) = lock(&self.inodes).acquire(node, parent);
            if let Some(attr) = self.leaf_attr(ino, node, fingerprint) {
                return Ok(attr);
            }
        }
        // A directory's number names it in the log if its listing cannot be read.
        let ino = lock(&self.inodes).ino_of(node);
        let attr = self.attr(Some(ino), node)?;
        let (acquired, _) = lock(&self.inodes).acquire(node, parent);
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
        let node = {
            let inodes = lock(&self.inodes);
            match inodes.node_and_fingerprint(ino) {
                // A file's or symlink's attributes take no lock and no I/O: computed in place,
                // without cloning the node, from the fingerprint its slot keeps.
                Some((n, fingerprint)) => match self.leaf_attr(ino, n, fingerprint) {
                    Some(attr) => return Ok(attr),
                    None => n.clone(),
                },
                None => return Err(FsError::NotFound),
            }
        };
        self.attr(Some(ino), &node)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        readlink_of(&self.node(ino)?)
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
        let children = self.children(Some(ino), &node)?;
        let parent_ino = lock(&self.inodes).parent(ino);
        let total = children.len() as u64 + 2;
        for i in offset..total {
            let dot = i < 2;
            let (name, entry_node, entry_ino) = match i {
                0 => (None, &node, ino),
                1 => (None, &node, parent_ino),
                _ => {
                    let (name, n) = children.get((i - 2) as usize).ok_or(FsError::NotFound)?;
                    (Some(name), n, lock(&self.inodes).ino_of(n))
                }
            };
            let attr = match (plus, dot) {
                (false, _) => None,
                (true, true) => Some(self.getattr(entry_ino)?),
                (true, false) => Some(self.attr(Some(entry_ino), entry_node)?),
            };
            let entry_ino = match name {
                Some(_) if plus => lock(&self.inodes).acquire(entry_node, ino).0,
                _ => entry_ino,
            };
            let out = DirEntryOut {
                ino: entry_ino,
                next_offset: i + 1,
                kind: FileKind::of(entry_node),
                name: match (i, name) {
                    (_, Some(name)) => name,
                    (0, None) => ".",
                    _ => "..",
                },
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

    // ---- the node-based operations (NFS, `which`), which take no kernel references -------

    /// The child `name` of the directory `parent`.
    pub fn child_of(&self, parent: &Node, name: &str) -> FsResult<Node> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        self.child(None, parent, name)
    }

    /// The attributes of `node`, its number derived from what it is (as FUSE's would be).
    pub fn attr_of(&self, node: &Node) -> FsResult<Attr> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.attr(None, node)
    }

    /// The entries of the directory `node`, in name order.
    pub fn children_of(&self, node: &Node) -> FsResult<Arc<Children>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.children(None, node)
    }

    /// Resolves a path under the mount root.
    pub fn resolve(&self, path: &str) -> Result<Node, PathError> {
        let mut node = Node::Root;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            let fail = |reason: &str| PathError {
                what: "path",
                path: path.to_string(),
                reason: reason.to_string(),
            };
            if part == ".." {
                return Err(fail("paths with '..' are not resolved"));
            }
            node = self.child(None, &node, part).map_err(|e| match e {
                FsError::NotFound => fail("no such file or directory"),
                FsError::NotDir => fail("not a directory"),
                _ => fail("could not be read (see the daemon's log)"),
            })?;
        }
        Ok(node)
    }

    /// The number of entries a directory node shows, if it can be read.
    pub fn entry_count(&self, node: &Node) -> Option<u64> {
        self.children(None, node).ok().map(|c| c.len() as u64)
    }
}

/// The target of a symlink node; anything else is not a symlink (EINVAL, as readlink(2) says).
pub fn readlink_of(node: &Node) -> FsResult<Vec<u8>> {
    match node {
        Node::Symlink(t) => Ok(t.as_bytes().to_vec()),
        _ => Err(FsError::Invalid),
    }
}

#[cfg(test)]
mod tests;
