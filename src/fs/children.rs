//! The entries of a directory node: namespace directories from the namespace, store trees
//! decoded from their `Directory` (and cached), merged views as the union of their layers.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use super::namespace::CONTENT_DIR;
use super::{lock, DigestFs, FsError, FsResult, Node};
use crate::cas::ReadError;
use crate::store::{Digest, EntryKind};

pub type Children = Vec<(String, Node)>;

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

    fn build_children(&self, node: &Node) -> Result<Children, ReadError> {
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
            .binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes()))
            .map(|i| children[i].1.clone())
            .map_err(|_| FsError::NotFound)
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
