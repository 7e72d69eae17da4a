//! Inode identity. A node's number is derived from what it is (a digest and its kind, a namespace
//! path), so the same `(digest, executable)` gets the same number everywhere and for the life of
//! the mount, even after the kernel forgets it and looks it up again. The table holds only the
//! nodes the kernel currently holds (lookup counts, FORGET honoured) plus the fixed ones.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use foldhash::fast::RandomState;

use sha2::{Digest as _, Sha256};

use crate::store::Digest;

pub const ROOT_INO: u64 = 1;
pub const CONTENT_INO: u64 = 2;
pub const BLOBS_INO: u64 = 3;
pub const TREES_INO: u64 = 4;
/// Derived numbers have the top bit set, so they never meet the fixed ones.
const DERIVED_BIT: u64 = 1 << 63;

#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub enum Node {
    Root,
    /// `.digestfs`, reachable by name but not listed.
    Content,
    /// `.digestfs/blobs/<digest>`: any file blob by name.
    Blobs,
    /// `.digestfs/trees/<digest>/…`: any tree by name.
    Trees,
    /// A directory on the way to a bound view, by its path under the mount root.
    Namespace(Arc<str>),
    /// A `Directory` from the store.
    Tree(Digest),
    /// The union of several `Directory`s (sorted, distinct): a view with several layers.
    Merged(Arc<[Digest]>),
    File {
        digest: Digest,
        executable: bool,
    },
    Symlink(Arc<str>),
}

/// Hashes a digest by its first 8 bytes and its size: the bytes are SHA-256 output, so they
/// spread as well as all 32 do (equal digests still hash equal), at a quarter of the work. The
/// directory cache hashes its key on every LOOKUP (docs/profile.md).
fn hash_digest<H: Hasher>(d: &Digest, state: &mut H) {
    state.write_u64(u64::from_le_bytes(d.hash[..8].try_into().expect("8 bytes")));
    state.write_u64(d.size);
}

impl Hash for Node {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Node::Root | Node::Content | Node::Blobs | Node::Trees => {}
            Node::Namespace(s) | Node::Symlink(s) => s.hash(state),
            Node::Tree(d) => hash_digest(d, state),
            Node::Merged(ds) => {
                state.write_usize(ds.len());
                for d in ds.iter() {
                    hash_digest(d, state);
                }
            }
            Node::File { digest, executable } => {
                hash_digest(digest, state);
                state.write_u8(*executable as u8);
            }
        }
    }
}

impl Node {
    /// The union of these trees: one distinct digest is that tree itself (sharing its inode
    /// with every other place it appears); several are a merged directory.
    pub fn merged(mut ds: Vec<Digest>) -> Node {
        ds.sort();
        ds.dedup();
        match ds.as_slice() {
            [one] => Node::Tree(*one),
            _ => Node::Merged(ds.into()),
        }
    }

    pub fn is_dir(&self) -> bool {
        !matches!(self, Node::File { .. } | Node::Symlink(_))
    }

    fn fixed_ino(&self) -> Option<u64> {
        match self {
            Node::Root => Some(ROOT_INO),
            Node::Content => Some(CONTENT_INO),
            Node::Blobs => Some(BLOBS_INO),
            Node::Trees => Some(TREES_INO),
            _ => None,
        }
    }

    /// 64 bits that identify the node's content; also the source of its mtime nanoseconds.
    pub fn fingerprint(&self) -> u64 {
        let from_digest = |tag: u8, d: &Digest| {
            let mut h = [0u8; 8];
            h.copy_from_slice(&d.hash[..8]);
            u64::from_le_bytes(h)
                ^ d.size.rotate_left(32)
                ^ (tag as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        };
        let from_bytes = |tag: u8, parts: &[&[u8]]| {
            let mut hasher = Sha256::new();
            hasher.update([tag]);
            for p in parts {
                hasher.update((p.len() as u64).to_le_bytes());
                hasher.update(p);
            }
            let out = hasher.finalize();
            u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
        };
        match self {
            Node::Root | Node::Content | Node::Blobs | Node::Trees => self.fixed_ino().unwrap_or(0),
            Node::File {
                digest,
                executable: false,
            } => from_digest(1, digest),
            Node::File {
                digest,
                executable: true,
            } => from_digest(2, digest),
            Node::Tree(d) => from_digest(3, d),
            Node::Namespace(path) => from_bytes(4, &[path.as_bytes()]),
            Node::Symlink(target) => from_bytes(5, &[target.as_bytes()]),
            Node::Merged(ds) => {
                let parts: Vec<Vec<u8>> = ds.iter().map(|d| d.to_string().into_bytes()).collect();
                let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
                from_bytes(6, &refs)
            }
        }
    }

    /// The number this node has unless a collision moved it (see [`InodeTable::acquire`]).
    pub fn derived_ino(&self) -> u64 {
        self.derived_ino_from(self.fingerprint())
    }

    /// [`Node::derived_ino`], given the node's [`Node::fingerprint`].
    pub fn derived_ino_from(&self, fingerprint: u64) -> u64 {
        self.fixed_ino().unwrap_or(fingerprint | DERIVED_BIT)
    }
}

/// 64 bytes a node: a tree walked by a reader holds one for every entry (readdirplus counts each
/// as a lookup), so its name and fingerprint are not kept but found again when needed: the name
/// in the parent's listing ([`super::DigestFs::path_of`], for messages only), the fingerprint
/// from the node.
struct Slot {
    node: Node,
    lookups: u64,
    /// Where the kernel last found it: for `..` and for naming the path in logs.
    parent: u64,
}

/// One node the kernel holds, as a takeover hands it to the next daemon: inode numbers are one-way
/// hashes (or relocated), so the numbers travel with their nodes.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlotRecord {
    pub ino: u64,
    pub node: Node,
    pub lookups: u64,
    pub parent: u64,
}

/// Both maps hash with foldhash rather than std's SipHash: every LOOKUP and GETATTR hashes an
/// inode number two to four times, and SipHash was a third of a lookup's instructions
/// (docs/profile.md). foldhash is still seeded per process, so colliding keys cannot be chosen
/// ahead of time.
#[derive(Default)]
pub struct InodeTable {
    slots: HashMap<u64, Slot, RandomState>,
    /// Nodes whose derived number was taken by another live node (a 64-bit collision).
    relocated: HashMap<Node, u64, RandomState>,
}

impl InodeTable {
    pub fn new() -> InodeTable {
        let mut t = InodeTable::default();
        for node in [Node::Root, Node::Content, Node::Blobs, Node::Trees] {
            let ino = node.derived_ino();
            t.slots.insert(
                ino,
                Slot {
                    node,
                    lookups: u64::MAX,
                    parent: ROOT_INO,
                },
            );
        }
        t
    }

    /// The number `node` has, or would have if looked up now.
    pub fn ino_of(&self, node: &Node) -> u64 {
        let ino = node.derived_ino();
        match self.slots.get(&ino) {
            Some(s) if s.node != *node => self.relocated.get(node).copied().unwrap_or(ino),
            _ => ino,
        }
    }

    /// Records one kernel lookup of `node`, found in `parent`; returns its number and its
    /// fingerprint.
    pub fn acquire(&mut self, node: &Node, parent: u64) -> (u64, u64) {
        let fingerprint = node.fingerprint();
        let derived = node.derived_ino_from(fingerprint);
        let mut ino = derived;
        if let Some(&moved) = self.relocated.get(node) {
            ino = moved;
        }
        loop {
            match self.slots.entry(ino) {
                Entry::Occupied(mut e) if e.get().node == *node => {
                    let slot = e.get_mut();
                    slot.lookups = slot.lookups.saturating_add(1);
                    slot.parent = parent;
                    return (ino, fingerprint);
                }
                Entry::Occupied(_) => {
                    log::warn!("inode number {ino:#x} collides; relocating {node:?}");
                    ino = ino.wrapping_add(1) | DERIVED_BIT;
                }
                Entry::Vacant(e) => {
                    e.insert(Slot {
                        node: node.clone(),
                        lookups: 1,
                        parent,
                    });
                    if ino != derived {
                        self.relocated.insert(node.clone(), ino);
                    }
                    return (ino, fingerprint);
                }
            }
        }
    }

    /// Honours FORGET: drops the node once the kernel holds no reference.
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(slot) = self.slots.get_mut(&ino) else {
            return;
        };
        if slot.lookups == u64::MAX {
            return;
        }
        slot.lookups = slot.lookups.saturating_sub(n);
        if slot.lookups == 0 {
            let slot = self.slots.remove(&ino).expect("present");
            if ino != slot.node.derived_ino() {
                self.relocated.remove(&slot.node);
            }
        }
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.slots.get(&ino).map(|s| &s.node)
    }

    /// The node numbered `ino` and its fingerprint.
    pub fn node_and_fingerprint(&self, ino: u64) -> Option<(&Node, u64)> {
        self.slots
            .get(&ino)
            .map(|s| (&s.node, s.node.fingerprint()))
    }

    pub fn parent(&self, ino: u64) -> u64 {
        self.slots.get(&ino).map_or(ROOT_INO, |s| s.parent)
    }

    pub fn lookups(&self, ino: u64) -> u64 {
        self.slots.get(&ino).map_or(0, |s| s.lookups)
    }

    /// Number of nodes held, the fixed ones included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every node the kernel holds (the fixed ones left out: every table has them).
    pub fn export(&self) -> Vec<SlotRecord> {
        self.slots
            .iter()
            .filter(|(_, s)| s.lookups != u64::MAX)
            .map(|(&ino, s)| SlotRecord {
                ino,
                node: s.node.clone(),
                lookups: s.lookups,
                parent: s.parent,
            })
            .collect()
    }

    /// Takes `records` ([`InodeTable::export`] of another daemon) as the nodes the kernel
    /// holds, under the same numbers. A record that would replace a fixed node is skipped.
    pub fn import(&mut self, records: Vec<SlotRecord>) {
        for r in records {
            if self
                .slots
                .get(&r.ino)
                .is_some_and(|s| s.lookups == u64::MAX)
                || r.lookups == 0
            {
                log::warn!("takeover: skipped inode {:#x} ({:?})", r.ino, r.node);
                continue;
            }
            if r.ino != r.node.derived_ino() {
                self.relocated.insert(r.node.clone(), r.ino);
            }
            self.slots.insert(
                r.ino,
                Slot {
                    node: r.node,
                    lookups: r.lookups,
                    parent: r.parent,
                },
            );
        }
    }

    /// The nodes from `ino` up to the root, where the kernel last found each (at most 256):
    /// the root last, or `None` last if a node on the way is no longer held.
    pub fn lineage(&self, mut ino: u64) -> Vec<Option<Node>> {
        let mut nodes = Vec::new();
        for _ in 0..256 {
            let Some(slot) = self.slots.get(&ino) else {
                nodes.push(None);
                break;
            };
            nodes.push(Some(slot.node.clone()));
            if ino == ROOT_INO {
                break;
            }
            ino = slot.parent;
        }
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(b: &[u8], executable: bool) -> Node {
        Node::File {
            digest: Digest::of_bytes(b),
            executable,
        }
    }

    #[test]
    fn same_content_same_number_executable_differs() {
        let mut t = InodeTable::new();
        let a = t.acquire(&file(b"jar", false), ROOT_INO).0;
        let b = t.acquire(&file(b"jar", false), 99).0;
        let x = t.acquire(&file(b"jar", true), ROOT_INO).0;
        assert_eq!(a, b);
        assert_ne!(a, x);
        assert_eq!(t.lookups(a), 2);
        // The empty digest is both a file and a directory: two different inodes.
        assert_ne!(
            t.ino_of(&Node::Tree(Digest::EMPTY)),
            t.ino_of(&file(b"", false))
        );
    }

    #[test]
    fn forget_drops_and_number_is_stable_after() {
        let mut t = InodeTable::new();
        let before = t.len();
        let n = file(b"x", false);
        let ino = t.acquire(&n, ROOT_INO).0;
        t.acquire(&n, ROOT_INO);
        t.forget(ino, 1);
        assert_eq!(t.node(ino), Some(&n));
        t.forget(ino, 1);
        assert_eq!(t.node(ino), None);
        assert_eq!(t.len(), before);
        assert_eq!(t.acquire(&n, ROOT_INO).0, ino);
        // The fixed nodes are never forgotten.
        t.forget(ROOT_INO, 1000);
        assert_eq!(t.node(ROOT_INO), Some(&Node::Root));
    }

    #[test]
    fn collisions_are_relocated_not_merged() {
        let mut t = InodeTable::new();
        let a = file(b"a", false);
        let b = file(b"b", false);
        let ino = t.acquire(&a, ROOT_INO).0;
        // Force b's derived slot to be occupied by planting a at b's number.
        let b_ino = b.derived_ino();
        t.slots.insert(
            b_ino,
            Slot {
                node: a.clone(),
                lookups: 1,
                parent: ROOT_INO,
            },
        );
        let got = t.acquire(&b, ROOT_INO).0;
        assert_ne!(got, b_ino);
        assert_ne!(got, ino);
        assert_eq!(t.ino_of(&b), got);
        assert_eq!(t.node(got), Some(&b));
        t.forget(got, 1);
        assert!(!t.relocated.contains_key(&b));
    }

    #[test]
    fn an_exported_table_imports_with_the_same_numbers_counts_and_parents() {
        let mut t = InodeTable::new();
        let lib = Node::Namespace("lib".into());
        let dir = t.acquire(&lib, ROOT_INO).0;
        let jar = file(b"j", true);
        let f = t.acquire(&jar, dir).0;
        t.acquire(&jar, dir);
        let merged = Node::merged(vec![Digest::of_bytes(b"a"), Digest::of_bytes(b"b")]);
        let m = t.acquire(&merged, dir).0;
        // A relocated number travels too.
        let moved = file(b"moved", false);
        t.slots.insert(
            moved.derived_ino(),
            Slot {
                node: jar.clone(),
                lookups: 1,
                parent: dir,
            },
        );
        let r = t.acquire(&moved, dir).0;
        assert_ne!(r, moved.derived_ino());
        let json = serde_json::to_string(&t.export()).unwrap();
        let mut u = InodeTable::new();
        u.import(serde_json::from_str(&json).unwrap());
        for ino in [dir, f, m, r] {
            assert_eq!(u.node(ino), t.node(ino));
            assert_eq!(u.lookups(ino), t.lookups(ino));
            assert_eq!(u.parent(ino), t.parent(ino));
        }
        assert_eq!(u.lookups(f), 2);
        assert_eq!(u.ino_of(&moved), r);
        assert_eq!(u.len(), t.len());
        // The fixed nodes are every table's own.
        u.import(vec![SlotRecord {
            ino: ROOT_INO,
            node: jar,
            lookups: 1,
            parent: 0,
        }]);
        assert_eq!(u.node(ROOT_INO), Some(&Node::Root));
    }

    #[test]
    fn lineage_follows_last_parents() {
        let mut t = InodeTable::new();
        let lib = Node::Namespace("lib".into());
        let jar = file(b"j", false);
        let dir = t.acquire(&lib, ROOT_INO).0;
        let f = t.acquire(&jar, dir).0;
        assert_eq!(t.lineage(f), [Some(jar), Some(lib), Some(Node::Root)]);
        t.forget(dir, 1);
        assert_eq!(t.lineage(f), [Some(file(b"j", false)), None]);
    }
}
