//! Attributes, derived from what a node is and nothing else: the same content has the same
//! attributes in every view, across remounts, and on every machine that has the digest.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::{Children, DigestFs, FsResult, Node};

pub const BLKSIZE: u32 = 4096;

/// Every timestamp lies in the 2^25 seconds (about 388 days) after 2020-01-01T00:00:00Z: far
/// enough in the past never to be in the future, which `make` and `ls` treat specially.
pub const MTIME_EPOCH: u64 = 1_577_836_800;
const MTIME_SPAN_BITS: u32 = 25;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
}

impl FileKind {
    pub fn of(node: &Node) -> FileKind {
        match node {
            Node::File { .. } => FileKind::File,
            Node::Symlink(_) => FileKind::Symlink,
            _ => FileKind::Dir,
        }
    }
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
    /// Also the ctime and atime.
    pub mtime: SystemTime,
    pub blksize: u32,
}

/// The mtime of content with this fingerprint: a fixed epoch plus seconds and nanoseconds taken
/// from it. Different content at a path (even of the same size) gets another mtime.
pub fn mtime_of(fingerprint: u64) -> SystemTime {
    let secs = MTIME_EPOCH + (fingerprint & ((1 << MTIME_SPAN_BITS) - 1));
    let nanos = ((fingerprint >> 32) % 1_000_000_000) as u32;
    UNIX_EPOCH + Duration::new(secs, nanos)
}

impl DigestFs {
    /// The attributes of `node`; `ino` is its number where the front end keeps an inode table,
    /// else the number derived from the node.
    pub(super) fn attr(&self, ino: Option<u64>, node: &Node) -> FsResult<Attr> {
        if !node.is_dir() {
            let fingerprint = node.fingerprint();
            let ino = ino.unwrap_or_else(|| node.derived_ino_from(fingerprint));
            if let Some(attr) = self.leaf_attr(ino, node, fingerprint) {
                return Ok(attr);
            }
        }
        let children = self.children(ino, node)?;
        let subdirs = children.iter().filter(|(_, n)| n.is_dir()).count() as u32;
        // Namespace directories change as views are bound: their times follow what they list,
        // so NFS clients (which revalidate by attributes) see a rebind.
        let fingerprint = match node {
            Node::Root | Node::Namespace(_) => listing_fingerprint(&children),
            _ => node.fingerprint(),
        };
        let ino = ino.unwrap_or_else(|| node.derived_ino());
        Ok(self.make_attr(
            ino,
            FileKind::Dir,
            children.len() as u64,
            0o555,
            2 + subdirs,
            fingerprint,
        ))
    }

    /// The attributes of a file or symlink, which need no I/O and cannot fail, given its
    /// number and [`Node::fingerprint`]; `None` for a directory (see [`DigestFs::attr`]).
    pub(super) fn leaf_attr(&self, ino: u64, node: &Node, fingerprint: u64) -> Option<Attr> {
        let (kind, size, perm) = match node {
            Node::File { digest, executable } => (
                FileKind::File,
                digest.size,
                if *executable { 0o555 } else { 0o444 },
            ),
            Node::Symlink(target) => (FileKind::Symlink, target.len() as u64, 0o777),
            _ => return None,
        };
        Some(self.make_attr(ino, kind, size, perm, 1, fingerprint))
    }

    fn make_attr(
        &self,
        ino: u64,
        kind: FileKind,
        size: u64,
        perm: u16,
        nlink: u32,
        fingerprint: u64,
    ) -> Attr {
        Attr {
            ino,
            size,
            blocks: size.div_ceil(512),
            kind,
            perm,
            nlink,
            uid: self.config.uid,
            gid: self.config.gid,
            mtime: mtime_of(fingerprint),
            blksize: BLKSIZE,
        }
    }
}

/// 64 bits that change whenever a namespace directory lists other names or other content.
fn listing_fingerprint(children: &Children) -> u64 {
    let mut h = Sha256::new();
    for (name, node) in children.iter() {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(node.fingerprint().to_le_bytes());
    }
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtimes_are_past_stable_and_follow_content() {
        let now = SystemTime::now();
        for fp in [0, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            let t = mtime_of(fp);
            assert!(t < now);
            assert!(t >= UNIX_EPOCH + Duration::from_secs(MTIME_EPOCH));
            assert_eq!(t, mtime_of(fp));
        }
        assert_ne!(mtime_of(1), mtime_of(2));
        assert_ne!(mtime_of(1 << 32), mtime_of(2 << 32));
    }
}
