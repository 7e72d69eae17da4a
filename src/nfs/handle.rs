//! NFS file handles that resolve without state. NFS has no FORGET, so a handle may come back at
//! any time, from any client, long after we issued it: it carries the node's identity itself,
//! in at most [`MAX_LEN`] bytes (the 64 of NFSv3 less the server crate's 8-byte generation).
//!
//! - Store content (files, trees) is named by its digest: it never changes, so such a handle
//!   can never show other content, and resolves while the store has the blob.
//! - Directories above the views are named by a hash of their path, and a view's root by that
//!   and a generation (a hash of its layers): after a rebind or unbind the old handle answers
//!   NFS3ERR_STALE, and the client looks the name up again.
//! - A directory merged from several layers is named by its view and the hash of its set of
//!   digests; a symlink by the `Directory` that lists it and a hash of its name.
//!
//! The memo below only saves searches; losing any of it changes no answer, except `..` of a
//! store directory (known only from where the directory was last found) and a merged directory
//! more than a bounded search below its view's root (STALE: the client looks it up again).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use nfs3_server::nfs3_types::nfs3::nfsstat3;
use sha2::{Digest as _, Sha256};

use crate::fs::{Children, DigestFs, FsError, Namespace, Node, View, CONTENT_DIR};
use crate::store::Digest;

/// The bytes of a handle that are ours.
pub const MAX_LEN: usize = 56;

type H16 = [u8; 16];

/// What a handle says, decoded; [`Key::to_bytes`] and [`Key::from_bytes`] are exact inverses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Root,
    Content,
    Blobs,
    Trees,
    File {
        digest: Digest,
        executable: bool,
    },
    Tree(Digest),
    /// A directory above the views: a hash of its path.
    Namespace {
        path: H16,
    },
    /// A view's root: a hash of its path, and of its layers when the handle was made.
    View {
        path: H16,
        generation: H16,
    },
    /// A merged directory below a view's root: the view, and a hash of its set of digests.
    Merged {
        path: H16,
        generation: H16,
        set: H16,
    },
    /// A symlink: the `Directory` that lists it and a hash of its name.
    Symlink {
        dir: Digest,
        name: [u8; 15],
    },
}

const T_ROOT: u8 = 1;
const T_CONTENT: u8 = 2;
const T_BLOBS: u8 = 3;
const T_TREES: u8 = 4;
const T_FILE: u8 = 0x10;
const T_EXEC: u8 = 0x11;
const T_TREE: u8 = 0x12;
const T_NAMESPACE: u8 = 0x20;
const T_VIEW: u8 = 0x21;
const T_MERGED: u8 = 0x22;
const T_SYMLINK: u8 = 0x30;

fn digest_bytes(out: &mut Vec<u8>, d: &Digest) {
    out.extend_from_slice(&d.hash);
    out.extend_from_slice(&d.size.to_be_bytes());
}

fn digest_from(b: &[u8]) -> Digest {
    Digest {
        hash: b[..32].try_into().expect("32 bytes"),
        size: u64::from_be_bytes(b[32..40].try_into().expect("8 bytes")),
    }
}

fn h16(b: &[u8]) -> H16 {
    b[..16].try_into().expect("16 bytes")
}

impl Key {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_LEN);
        match self {
            Key::Root => out.push(T_ROOT),
            Key::Content => out.push(T_CONTENT),
            Key::Blobs => out.push(T_BLOBS),
            Key::Trees => out.push(T_TREES),
            Key::File { digest, executable } => {
                out.push(if *executable { T_EXEC } else { T_FILE });
                digest_bytes(&mut out, digest);
            }
            Key::Tree(d) => {
                out.push(T_TREE);
                digest_bytes(&mut out, d);
            }
            Key::Namespace { path } => {
                out.push(T_NAMESPACE);
                out.extend_from_slice(path);
            }
            Key::View { path, generation } => {
                out.push(T_VIEW);
                out.extend_from_slice(path);
                out.extend_from_slice(generation);
            }
            Key::Merged {
                path,
                generation,
                set,
            } => {
                out.push(T_MERGED);
                out.extend_from_slice(path);
                out.extend_from_slice(generation);
                out.extend_from_slice(set);
            }
            Key::Symlink { dir, name } => {
                out.push(T_SYMLINK);
                digest_bytes(&mut out, dir);
                out.extend_from_slice(name);
            }
        }
        debug_assert!(out.len() <= MAX_LEN);
        out
    }

    /// Decodes a handle; anything but the exact form [`Key::to_bytes`] makes is refused.
    pub fn from_bytes(b: &[u8]) -> Option<Key> {
        let (&tag, rest) = b.split_first()?;
        let key = match (tag, rest.len()) {
            (T_ROOT, 0) => Key::Root,
            (T_CONTENT, 0) => Key::Content,
            (T_BLOBS, 0) => Key::Blobs,
            (T_TREES, 0) => Key::Trees,
            (T_FILE | T_EXEC, 40) => Key::File {
                digest: digest_from(rest),
                executable: tag == T_EXEC,
            },
            (T_TREE, 40) => Key::Tree(digest_from(rest)),
            (T_NAMESPACE, 16) => Key::Namespace { path: h16(rest) },
            (T_VIEW, 32) => Key::View {
                path: h16(rest),
                generation: h16(&rest[16..]),
            },
            (T_MERGED, 48) => Key::Merged {
                path: h16(rest),
                generation: h16(&rest[16..]),
                set: h16(&rest[32..]),
            },
            (T_SYMLINK, 55) => Key::Symlink {
                dir: digest_from(rest),
                name: rest[40..].try_into().expect("15 bytes"),
            },
            _ => return None,
        };
        Some(key)
    }
}

fn sha(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The hash naming a namespace directory or a view by its path under the mount root.
pub fn path_hash(path: &str) -> H16 {
    h16(&sha(&[b"path", path.as_bytes()]))
}

/// A view's generation: a hash of its (layer, digest) pairs.
pub fn generation(view: &View) -> H16 {
    let mut h = Sha256::new();
    h.update(b"layers");
    for (layer, d) in &view.layers {
        h.update((layer.len() as u64).to_be_bytes());
        h.update(layer.as_bytes());
        h.update(d.hash);
        h.update(d.size.to_be_bytes());
    }
    h16(&h.finalize())
}

/// The hash of a merged directory's (sorted) set of digests.
pub fn set_hash(ds: &[Digest]) -> H16 {
    let mut h = Sha256::new();
    h.update(b"set");
    for d in ds {
        h.update(d.hash);
        h.update(d.size.to_be_bytes());
    }
    h16(&h.finalize())
}

fn name_hash(name: &str) -> [u8; 15] {
    sha(&[b"name", name.as_bytes()])[..15]
        .try_into()
        .expect("15 bytes")
}

/// A resolved handle: what it names now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub key: Key,
    pub node: Node,
    /// The path under the mount root of a namespace directory or a view's root ("" for the
    /// root); `None` for everything else.
    pub path: Option<Arc<str>>,
}

impl Object {
    pub fn root() -> Object {
        Object {
            key: Key::Root,
            node: Node::Root,
            path: Some(Arc::from("")),
        }
    }

    fn plain(key: Key, node: Node) -> Object {
        Object {
            key,
            node,
            path: None,
        }
    }

    /// The view this object lies in, for a view's root and the merged directories below it.
    fn view(&self) -> Option<(H16, H16)> {
        match self.key {
            Key::View { path, generation }
            | Key::Merged {
                path, generation, ..
            } => Some((path, generation)),
            _ => None,
        }
    }
}

/// A merged directory's set, as remembered: (its view's generation, the set's hash).
type SetKey = (H16, H16);

/// What the handle functions remember to avoid searches; bounded, and never needed for a right
/// answer except `..` of store directories.
pub struct Memo {
    /// Namespace directory and view paths by their hash.
    paths: Mutex<LruCache<H16, Arc<str>>>,
    /// Merged directories' digest sets, by the generation of the view they were found in and
    /// their own hash: a handle never resolves to a directory of another view.
    sets: Mutex<LruCache<SetKey, Arc<[Digest]>>>,
    /// Where a store or merged directory was last found: its parent's key, for `..`.
    parents: Mutex<LruCache<Key, Key>>,
}

const MEMO_ENTRIES: usize = 16384;
/// How many merged directories a search for a handle's set may visit before giving up: a
/// forged handle must stay cheap. (A directory appears merged only where layers disagree about
/// it, so real views have few; one deeper than this reads STALE to a client whose handle fell
/// out of the memo, and the client looks the name up again.)
const MAX_SEARCH: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Memo {
    fn default() -> Memo {
        let n = NonZeroUsize::new(MEMO_ENTRIES).expect("non-zero");
        Memo {
            paths: Mutex::new(LruCache::new(n)),
            sets: Mutex::new(LruCache::new(n)),
            parents: Mutex::new(LruCache::new(n)),
        }
    }
}

/// How the core's failures read in NFS.
pub fn status(e: FsError) -> nfsstat3 {
    match e {
        FsError::NotFound | FsError::NoData => nfsstat3::NFS3ERR_NOENT,
        FsError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        FsError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        FsError::Invalid => nfsstat3::NFS3ERR_INVAL,
        FsError::ReadOnly => nfsstat3::NFS3ERR_ROFS,
        FsError::NotSupported => nfsstat3::NFS3ERR_NOTSUPP,
        FsError::BadHandle => nfsstat3::NFS3ERR_BADHANDLE,
        // A handle names content by digest: content that is gone makes the handle stale.
        FsError::Gone => nfsstat3::NFS3ERR_STALE,
        FsError::Io => nfsstat3::NFS3ERR_IO,
    }
}

/// A directory read behind a handle: anything but a failure to read means what the handle
/// named is gone (STALE).
fn stale_or_io(e: FsError) -> nfsstat3 {
    match e {
        FsError::Io => nfsstat3::NFS3ERR_IO,
        _ => nfsstat3::NFS3ERR_STALE,
    }
}

/// The entries of the store tree `d`, read now (the store is asked only here, where the
/// `Directory` is needed): STALE if it is gone from the store, IO if it cannot be read.
fn load_tree(core: &DigestFs, d: &Digest) -> Result<Arc<Children>, nfsstat3> {
    core.children_of(&Node::Tree(*d)).map_err(stale_or_io)
}

fn namespace_object(memo: &Memo, path: &str) -> Object {
    if path.is_empty() {
        return Object::root();
    }
    let hash = path_hash(path);
    let path: Arc<str> = Arc::from(path);
    lock(&memo.paths).put(hash, path.clone());
    Object {
        key: Key::Namespace { path: hash },
        node: Node::Namespace(path.clone()),
        path: Some(path),
    }
}

fn view_object(memo: &Memo, path: &str, view: &View) -> Object {
    let hash = path_hash(path);
    let path: Arc<str> = Arc::from(path);
    lock(&memo.paths).put(hash, path.clone());
    Object {
        key: Key::View {
            path: hash,
            generation: generation(view),
        },
        node: view.node(),
        path: Some(path),
    }
}

fn split(path: &str) -> Vec<String> {
    path.split('/').map(String::from).collect()
}

/// The path of the namespace directory with this hash, if one is there now.
fn find_namespace(ns: &Namespace, memo: &Memo, hash: &H16) -> Option<Arc<str>> {
    if let Some(p) = lock(&memo.paths).get(hash).cloned() {
        if ns.children(&p).is_some() && !p.is_empty() {
            return Some(p);
        }
    }
    for (vpath, _) in ns.views() {
        let mut prefix = vpath.as_str();
        while let Some((up, _)) = prefix.rsplit_once('/') {
            if path_hash(up) == *hash {
                let p: Arc<str> = Arc::from(up);
                lock(&memo.paths).put(*hash, p.clone());
                return Some(p);
            }
            prefix = up;
        }
    }
    None
}

/// The path and view bound under this path hash, if one is bound now.
fn find_view<'a>(ns: &'a Namespace, memo: &Memo, hash: &H16) -> Option<(Arc<str>, &'a View)> {
    if let Some(p) = lock(&memo.paths).get(hash).cloned() {
        if let Some(v) = ns.view(&split(&p)) {
            return Some((p, v));
        }
    }
    ns.views()
        .into_iter()
        .find(|(p, _)| path_hash(p) == *hash)
        .map(|(p, v)| {
            let p: Arc<str> = Arc::from(p);
            lock(&memo.paths).put(*hash, p.clone());
            (p, v)
        })
}

/// The merged directory with this set hash below the view's root `top`: from the memo, else
/// searched breadth-first through the merged directories only.
fn find_set(
    core: &DigestFs,
    memo: &Memo,
    top: &Node,
    generation: &H16,
    set: &H16,
) -> Result<Node, nfsstat3> {
    if let Some(ds) = lock(&memo.sets).get(&(*generation, *set)).cloned() {
        return Ok(Node::Merged(ds));
    }
    let mut queue = std::collections::VecDeque::new();
    if let Node::Merged(_) = top {
        queue.push_back(top.clone());
    }
    let mut visited = 0;
    while let Some(dir) = queue.pop_front() {
        visited += 1;
        if visited > MAX_SEARCH {
            break;
        }
        for (_, child) in core.children_of(&dir).map_err(stale_or_io)?.iter() {
            if let Node::Merged(ds) = child {
                let h = set_hash(ds);
                lock(&memo.sets).put((*generation, h), ds.clone());
                if h == *set {
                    return Ok(child.clone());
                }
                queue.push_back(child.clone());
            }
        }
    }
    Err(nfsstat3::NFS3ERR_STALE)
}

/// What `key` names now: NFS3ERR_STALE when that is gone (a view rebound or unbound, a blob the
/// store no longer has), never something else.
pub fn resolve(core: &DigestFs, memo: &Memo, key: &Key) -> Result<Object, nfsstat3> {
    let plain = |node| Ok(Object::plain(key.clone(), node));
    match key {
        Key::Root => Ok(Object::root()),
        Key::Content => plain(Node::Content),
        Key::Blobs => plain(Node::Blobs),
        Key::Trees => plain(Node::Trees),
        // Content is not looked for in the store here: a blob that is gone answers STALE
        // where it is read (READ, or the listing behind GETATTR and LOOKUP of a tree).
        Key::File { digest, executable } => plain(Node::File {
            digest: *digest,
            executable: *executable,
        }),
        Key::Tree(d) => plain(Node::Tree(*d)),
        Key::Namespace { path } => {
            let ns = core.namespace();
            let p = find_namespace(&ns, memo, path).ok_or(nfsstat3::NFS3ERR_STALE)?;
            Ok(Object {
                key: key.clone(),
                node: Node::Namespace(p.clone()),
                path: Some(p),
            })
        }
        Key::View {
            path,
            generation: g,
        } => {
            let ns = core.namespace();
            match find_view(&ns, memo, path) {
                Some((p, v)) if generation(v) == *g => Ok(Object {
                    key: key.clone(),
                    node: v.node(),
                    path: Some(p),
                }),
                _ => Err(nfsstat3::NFS3ERR_STALE),
            }
        }
        Key::Merged {
            path,
            generation: g,
            set,
        } => {
            let ns = core.namespace();
            let top = match find_view(&ns, memo, path) {
                Some((_, v)) if generation(v) == *g => v.node(),
                _ => return Err(nfsstat3::NFS3ERR_STALE),
            };
            plain(find_set(core, memo, &top, g, set)?)
        }
        Key::Symlink { dir, name } => load_tree(core, dir)?
            .iter()
            .find(|(n, node)| matches!(node, Node::Symlink(_)) && name_hash(n) == *name)
            .map(|(_, node)| Object::plain(key.clone(), node.clone()))
            .ok_or(nfsstat3::NFS3ERR_STALE),
    }
}

/// The object for `node`, found as `name` in the store or merged directory `parent`.
fn content_child(
    core: &DigestFs,
    memo: &Memo,
    parent: &Object,
    name: &str,
    node: Node,
) -> Result<Object, nfsstat3> {
    let key = match &node {
        Node::File { digest, executable } => Key::File {
            digest: *digest,
            executable: *executable,
        },
        Node::Tree(d) => Key::Tree(*d),
        Node::Merged(ds) => {
            let (path, generation) = parent.view().ok_or(nfsstat3::NFS3ERR_IO)?;
            let set = set_hash(ds);
            lock(&memo.sets).put((generation, set), ds.clone());
            Key::Merged {
                path,
                generation,
                set,
            }
        }
        Node::Symlink(_) => {
            let dir = match &parent.node {
                Node::Tree(d) => *d,
                // The layer whose own listing has this very symlink under this name.
                Node::Merged(ds) => *ds
                    .iter()
                    .find(|d| {
                        core.children_of(&Node::Tree(**d)).is_ok_and(|c| {
                            c.named(name.as_bytes()).is_some_and(|(_, n)| *n == node)
                        })
                    })
                    .ok_or(nfsstat3::NFS3ERR_IO)?,
                _ => return Err(nfsstat3::NFS3ERR_IO),
            };
            Key::Symlink {
                dir,
                name: name_hash(name),
            }
        }
        Node::Blobs => Key::Blobs,
        Node::Trees => Key::Trees,
        Node::Content => Key::Content,
        Node::Root | Node::Namespace(_) => return Err(nfsstat3::NFS3ERR_IO),
    };
    if matches!(key, Key::Tree(_) | Key::Merged { .. }) {
        lock(&memo.parents).put(key.clone(), parent.key.clone());
    }
    Ok(Object::plain(key, node))
}

/// The object for the entry `name` of the namespace `ns` at `dir` (a namespace path).
fn namespace_child(memo: &Memo, ns: &Namespace, dir: &str, name: &str, node: &Node) -> Object {
    let path = if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    };
    match node {
        Node::Namespace(_) => namespace_object(memo, &path),
        _ => match ns.view(&split(&path)) {
            Some(v) => view_object(memo, &path, v),
            // Not reachable: a namespace lists only directories and views.
            None => namespace_object(memo, &path),
        },
    }
}

/// The parent of the directory `dir`: derived for the namespace and the content area, else
/// where the directory was last found (NFS3ERR_NOENT if that is not known, or gone).
pub fn parent(core: &DigestFs, memo: &Memo, dir: &Object) -> Result<Object, nfsstat3> {
    match &dir.key {
        Key::Root | Key::Content => Ok(Object::root()),
        Key::Blobs | Key::Trees => Ok(Object::plain(Key::Content, Node::Content)),
        Key::Namespace { .. } | Key::View { .. } => {
            let path = dir.path.as_deref().unwrap_or("");
            Ok(match path.rsplit_once('/') {
                Some((up, _)) => namespace_object(memo, up),
                None => Object::root(),
            })
        }
        Key::Tree(_) | Key::Merged { .. } => {
            let up = lock(&memo.parents)
                .get(&dir.key)
                .cloned()
                .ok_or(nfsstat3::NFS3ERR_NOENT)?;
            resolve(core, memo, &up).map_err(|_| nfsstat3::NFS3ERR_NOENT)
        }
        Key::File { .. } | Key::Symlink { .. } => Err(nfsstat3::NFS3ERR_NOTDIR),
    }
}

/// Looks `name` up in the directory `dir`; `.` and `..` included.
pub fn child(core: &DigestFs, memo: &Memo, dir: &Object, name: &str) -> Result<Object, nfsstat3> {
    if !dir.node.is_dir() {
        return Err(nfsstat3::NFS3ERR_NOTDIR);
    }
    match name {
        "." => return Ok(dir.clone()),
        ".." => return parent(core, memo, dir),
        _ => {}
    }
    match &dir.node {
        Node::Root if name == CONTENT_DIR => Ok(Object::plain(Key::Content, Node::Content)),
        Node::Root | Node::Namespace(_) => {
            // One snapshot of the namespace for both the entry and its view's generation.
            core.stats
                .lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ns = core.namespace();
            let path = dir.path.as_deref().unwrap_or("");
            let entries = ns.children(path).ok_or(nfsstat3::NFS3ERR_STALE)?;
            let (_, node) = entries
                .iter()
                .find(|(n, _)| n == name)
                .ok_or(nfsstat3::NFS3ERR_NOENT)?;
            Ok(namespace_child(memo, &ns, path, name, node))
        }
        _ => {
            let node = core.child_of(&dir.node, name).map_err(status)?;
            content_child(core, memo, dir, name, node)
        }
    }
}

/// A directory's entries, ready to be turned into objects one by one.
pub enum Listing {
    /// The root or a namespace directory: objects made from one namespace snapshot.
    Namespace(Vec<(String, Object)>),
    /// A store, merged or content-area directory.
    Content(Arc<Children>),
}

impl Listing {
    pub fn len(&self) -> usize {
        match self {
            Listing::Namespace(v) => v.len(),
            Listing::Content(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name and node of entry `i`, without making a handle.
    pub fn peek(&self, i: usize) -> Option<(&str, &Node)> {
        match self {
            Listing::Namespace(v) => v.get(i).map(|(n, o)| (n.as_str(), &o.node)),
            Listing::Content(v) => v.get(i),
        }
    }

    /// Entry `i` of `dir` as an object.
    pub fn object(
        &self,
        core: &DigestFs,
        memo: &Memo,
        dir: &Object,
        i: usize,
    ) -> Option<Result<(String, Object), nfsstat3>> {
        match self {
            Listing::Namespace(v) => v.get(i).cloned().map(Ok),
            Listing::Content(v) => v.get(i).map(|(name, node)| {
                content_child(core, memo, dir, name, node.clone()).map(|o| (name.to_string(), o))
            }),
        }
    }
}

/// The entries of the directory `dir`, in name order (`.` and `..` are the caller's).
pub fn list(core: &DigestFs, memo: &Memo, dir: &Object) -> Result<Listing, nfsstat3> {
    match &dir.node {
        Node::Root | Node::Namespace(_) => {
            core.stats
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ns = core.namespace();
            let path = dir.path.as_deref().unwrap_or("");
            let entries = ns.children(path).ok_or(nfsstat3::NFS3ERR_STALE)?;
            Ok(Listing::Namespace(
                entries
                    .iter()
                    .map(|(name, node)| {
                        (name.clone(), namespace_child(memo, &ns, path, name, node))
                    })
                    .collect(),
            ))
        }
        node if node.is_dir() => Ok(Listing::Content(core.children_of(node).map_err(status)?)),
        _ => Err(nfsstat3::NFS3ERR_NOTDIR),
    }
}

#[cfg(test)]
mod tests;
