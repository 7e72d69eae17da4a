//! The entries of a directory node: namespace directories from the namespace, store trees
//! decoded from their `Directory` (and cached), merged views as the union of their layers.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroUsize;
use std::sync::Arc;

use foldhash::fast::RandomState;
use lru::LruCache;

use super::namespace::CONTENT_DIR;
use super::{lock, DigestFs, FsError, FsResult, Node};
use crate::cas::ReadError;
use crate::store::{Digest, EntryKind};

/// Directories with fewer entries are searched by bisection, not indexed.
const INDEX_FROM: usize = 16;

/// A directory's entries in name order (byte order, names distinct), and for a large one a hash
/// index of the names, built once when the directory is decoded: a LOOKUP in a directory of
/// 1,420 jars hashes the name and compares it once instead of a dozen times (docs/profile.md).
/// The names sit back to back in one allocation: a name of its own (an `Arc<str>`) cost 48
/// bytes an entry, a third of a walked tree's memory (README, the RSS benchmark).
#[derive(Default)]
pub struct Children {
    names: Box<str>,
    /// Where each entry's name ends in `names`.
    ends: Box<[usize]>,
    nodes: Box<[Node]>,
    /// Open addressing with linear probing: each slot holds an entry's index plus one, 0 is
    /// empty; a power of two at least twice the entries, or nothing below [`INDEX_FROM`].
    index: Box<[u32]>,
    hasher: RandomState,
}

impl Children {
    /// `entries` must be sorted by name (byte order), names distinct.
    pub fn new<S: AsRef<str>>(entries: Vec<(S, Node)>) -> Children {
        let mut names = String::with_capacity(entries.iter().map(|(n, _)| n.as_ref().len()).sum());
        let mut ends = Vec::with_capacity(entries.len());
        let mut nodes = Vec::with_capacity(entries.len());
        for (name, node) in entries {
            names.push_str(name.as_ref());
            ends.push(names.len());
            nodes.push(node);
        }
        let mut c = Children {
            names: names.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            nodes: nodes.into_boxed_slice(),
            index: Box::default(),
            hasher: RandomState::default(),
        };
        let n = c.len();
        if n >= INDEX_FROM && n < (u32::MAX / 4) as usize {
            let mut table = vec![0u32; (n * 2).next_power_of_two()];
            let mask = table.len() - 1;
            for i in 0..n {
                let mut at = hash_name(&c.hasher, c.name(i).as_bytes()) as usize & mask;
                while table[at] != 0 {
                    at = (at + 1) & mask;
                }
                table[at] = i as u32 + 1;
            }
            c.index = table.into_boxed_slice();
        }
        c
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The name of entry `i` (which must exist).
    fn name(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.names[start..self.ends[i]]
    }

    /// Entry `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<(&str, &Node)> {
        (i < self.len()).then(|| (self.name(i), &self.nodes[i]))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Node)> + '_ {
        (0..self.len()).map(|i| (self.name(i), &self.nodes[i]))
    }

    /// The index of the entry named `name` (as bytes: a name that is not UTF-8 matches none).
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        if self.index.is_empty() {
            let (mut lo, mut hi) = (0, self.len());
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match self.name(mid).as_bytes().cmp(name) {
                    std::cmp::Ordering::Less => lo = mid + 1,
                    std::cmp::Ordering::Greater => hi = mid,
                    std::cmp::Ordering::Equal => return Some(mid),
                }
            }
            return None;
        }
        let mask = self.index.len() - 1;
        let mut at = hash_name(&self.hasher, name) as usize & mask;
        loop {
            let i = self.index[at].checked_sub(1)? as usize;
            if self.name(i).as_bytes() == name {
                return Some(i);
            }
            at = (at + 1) & mask;
        }
    }

    /// The entry named `name`.
    pub fn named(&self, name: &[u8]) -> Option<(&str, &Node)> {
        self.find(name).and_then(|i| self.get(i))
    }
}

fn hash_name(hasher: &RandomState, name: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    h.write(name);
    h.finish()
}

/// Decoded directories, bounded by their total number of entries.
pub(super) struct DirCache {
    lru: LruCache<Node, Arc<Children>>,
    entries: usize,
    max_entries: usize,
}

impl DirCache {
    pub(super) fn new(max_entries: usize) -> DirCache {
        DirCache {
            lru: LruCache::new(NonZeroUsize::new(65536).expect("non-zero")),
            entries: 0,
            max_entries: max_entries.max(1),
        }
    }

    pub(super) fn entries(&self) -> usize {
        self.entries
    }

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

impl DigestFs {
    /// The entries of `node` (`ino` names it in logs, when the front end has one).
    pub(super) fn children(&self, ino: Option<u64>, node: &Node) -> FsResult<Arc<Children>> {
        match node {
            Node::Root => Ok(Arc::new(Children::new(
                self.namespace().children("").unwrap_or_default(),
            ))),
            Node::Namespace(path) => self
                .namespace()
                .children(path)
                .map(|c| Arc::new(Children::new(c)))
                .ok_or(FsError::NotFound),
            Node::Content => Ok(Arc::new(Children::new(vec![
                ("blobs", Node::Blobs),
                ("trees", Node::Trees),
            ]))),
            Node::Blobs | Node::Trees => Ok(Arc::new(Children::default())),
            Node::Tree(_) | Node::Merged(_) => {
                if let Some(c) = lock(&self.cache).get(node) {
                    return Ok(c);
                }
                // Built without holding the cache lock: this is store I/O.
                let built = Arc::new(Children::new(
                    self.build_children(node)
                        .map_err(|e| self.store_failure(ino, e))?,
                ));
                lock(&self.cache).insert(node.clone(), built.clone());
                Ok(built)
            }
            Node::File { .. } | Node::Symlink(_) => Err(FsError::NotDir),
        }
    }

    /// The name under which `parent` lists `child`, for messages: by content, so of two names
    /// with the same content, the first. From the cache, else decoded without filling it.
    pub(super) fn name_in(&self, parent: &Node, child: &Node) -> Option<String> {
        let first = |c: &Children| {
            c.iter()
                .find(|(_, n)| *n == child)
                .map(|(n, _)| n.to_string())
        };
        match parent {
            Node::Root if *child == Node::Content => Some(CONTENT_DIR.to_string()),
            Node::Blobs | Node::Trees => match child {
                Node::File { digest, .. } | Node::Tree(digest) => Some(digest.to_string()),
                _ => None,
            },
            Node::Tree(_) | Node::Merged(_) => {
                let cached = lock(&self.cache).get(parent);
                match cached {
                    Some(c) => first(&c),
                    None => first(&Children::new(self.build_children(parent).ok()?)),
                }
            }
            _ => first(&*self.children(None, parent).ok()?),
        }
    }

    /// The entries of a store or merged directory, in name order.
    fn build_children(&self, node: &Node) -> Result<Vec<(String, Node)>, ReadError> {
        match node {
            Node::Tree(d) => Ok(self
                .cas
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

    /// The child `name` of `parent`; `.digestfs/blobs/<digest>` and `.digestfs/trees/<digest>`
    /// resolve any digest in the store, though neither lists anything.
    pub(super) fn child(&self, ino: Option<u64>, parent: &Node, name: &str) -> FsResult<Node> {
        match (parent, name) {
            (Node::Root, CONTENT_DIR) => return Ok(Node::Content),
            (Node::Blobs, _) => {
                let digest: Digest = name.parse().map_err(|_| FsError::NotFound)?;
                return match self.cas.has_file(&digest) {
                    Ok(true) => Ok(Node::File {
                        digest,
                        executable: false,
                    }),
                    Ok(false) => Err(FsError::NotFound),
                    Err(e) => Err(self.store_failure(ino, e)),
                };
            }
            (Node::Trees, _) => {
                let digest: Digest = name.parse().map_err(|_| FsError::NotFound)?;
                return match self.children(ino, &Node::Tree(digest)) {
                    Ok(_) => Ok(Node::Tree(digest)),
                    Err(_) => Err(FsError::NotFound),
                };
            }
            _ => {}
        }
        let children = self.children(ino, parent)?;
        children
            .named(name.as_bytes())
            .map(|(_, node)| node.clone())
            .ok_or(FsError::NotFound)
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
        Some(ds) => Node::merged(ds),
        None => {
            log::warn!("layers disagree about {name:?}; serving the first layer's entry");
            nodes.into_iter().next().expect("non-empty")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(n: usize) -> Children {
        let mut names: Vec<String> = (0..n).map(|i| format!("dep-{i:04}.jar")).collect();
        names.sort();
        Children::new(
            names
                .into_iter()
                .map(|name| (name, Node::Tree(Digest::EMPTY)))
                .collect(),
        )
    }

    #[test]
    fn finds_every_name_and_no_other_indexed_or_not() {
        for n in [0, 1, INDEX_FROM - 1, INDEX_FROM, 1420] {
            let c = dir(n);
            assert_eq!(c.index.is_empty(), n < INDEX_FROM);
            for (i, (name, _)) in c.iter().enumerate() {
                assert_eq!(c.find(name.as_bytes()), Some(i));
            }
            for missing in [
                &b""[..],
                b"dep-",
                b"dep-0000.ja",
                b"dep-9999.jar",
                b"\xff\xfe",
            ] {
                assert_eq!(c.find(missing), None, "{n} entries");
            }
            assert_eq!(c.named(b"dep-9999.jar"), None);
        }
    }
}
