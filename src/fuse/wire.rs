//! The FUSE messages, as bytes (the kernel's `fuse.h`, ABI 7.42, native byte order), for both
//! transports. fuser keeps its own decoding (`ll`) private and its loop cannot stop between
//! requests, so digestfs reads and writes the few structures a read-only view needs itself;
//! everything here is plain safe code over byte slices.

use std::time::{Duration, SystemTime};

use crate::fs::{Attr, FileKind};

pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_READLINK: u32 = 5;
pub const FUSE_SYMLINK: u32 = 6;
pub const FUSE_MKNOD: u32 = 8;
pub const FUSE_MKDIR: u32 = 9;
pub const FUSE_UNLINK: u32 = 10;
pub const FUSE_RMDIR: u32 = 11;
pub const FUSE_RENAME: u32 = 12;
pub const FUSE_LINK: u32 = 13;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_SETXATTR: u32 = 21;
pub const FUSE_GETXATTR: u32 = 22;
pub const FUSE_LISTXATTR: u32 = 23;
pub const FUSE_REMOVEXATTR: u32 = 24;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_OPENDIR: u32 = 27;
pub const FUSE_READDIR: u32 = 28;
pub const FUSE_RELEASEDIR: u32 = 29;
pub const FUSE_CREATE: u32 = 35;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_NOTIFY_REPLY: u32 = 41;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const FUSE_READDIRPLUS: u32 = 44;
pub const FUSE_RENAME2: u32 = 45;

pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// An opcode's name, as the metrics label it.
pub fn opcode_name(opcode: u32) -> &'static str {
    match opcode {
        FUSE_LOOKUP => "lookup",
        FUSE_FORGET => "forget",
        FUSE_GETATTR => "getattr",
        FUSE_READLINK => "readlink",
        FUSE_OPEN => "open",
        FUSE_READ => "read",
        FUSE_STATFS => "statfs",
        FUSE_RELEASE => "release",
        FUSE_GETXATTR => "getxattr",
        FUSE_LISTXATTR => "listxattr",
        FUSE_FLUSH => "flush",
        FUSE_OPENDIR => "opendir",
        FUSE_READDIR => "readdir",
        FUSE_RELEASEDIR => "releasedir",
        FUSE_READDIRPLUS => "readdirplus",
        FUSE_DESTROY => "destroy",
        _ => "other",
    }
}

/// The length of an opcode's fixed arguments over /dev/fuse, where they come after the
/// `fuse_in_header` and before any name (the ring carries them apart, as its `op_in`).
/// Opcodes a read-only view refuses whatever their arguments: 0.
pub fn op_in_len(opcode: u32) -> usize {
    match opcode {
        FUSE_FORGET | FUSE_OPEN | FUSE_OPENDIR | FUSE_GETXATTR | FUSE_LISTXATTR => 8,
        FUSE_GETATTR => 16,
        FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FLUSH => 24,
        FUSE_READ | FUSE_READDIR | FUSE_READDIRPLUS => 40,
        _ => 0,
    }
}

/// `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
const DIRENT_LEN: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < IN_HEADER_LEN {
            return None;
        }
        Some(InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
            uid: u32_at(b, 24)?,
            gid: u32_at(b, 28)?,
            pid: u32_at(b, 32)?,
        })
    }

    /// What the kernel writes; for tests.
    #[cfg(test)]
    pub fn write(&self, b: &mut [u8]) {
        let mut w = Writer::new(&mut b[..IN_HEADER_LEN]);
        w.u32(self.len);
        w.u32(self.opcode);
        w.u64(self.unique);
        w.u64(self.nodeid);
        w.u32(self.uid);
        w.u32(self.gid);
        w.u32(self.pid);
        w.u32(0);
    }
}

/// `struct fuse_out_header`: `error` is 0 or a negative errno.
pub fn write_out_header(b: &mut [u8], len: u32, error: i32, unique: u64) {
    let mut w = Writer::new(&mut b[..OUT_HEADER_LEN]);
    w.u32(len);
    w.u32(error as u32);
    w.u64(unique);
}

/// A name argument: the bytes before its NUL.
pub fn name_arg(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(end) => &b[..end],
        None => b,
    }
}

/// Appends fixed-size fields to a reply buffer. Callers check the room first ([`Writer::room`]);
/// writing past the end is a bug and panics.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn room(&self) -> usize {
        self.buf.len() - self.len
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_ne_bytes())
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_ne_bytes())
    }

    fn pad_to_8(&mut self) {
        let pad = (8 - self.len % 8) % 8;
        self.bytes(&[0u8; 8][..pad]);
    }

    /// `struct fuse_attr`.
    pub fn attr(&mut self, a: &Attr) {
        let (secs, nsecs) = since_epoch(a.mtime);
        self.u64(a.ino);
        self.u64(a.size);
        self.u64(a.blocks);
        for _ in 0..3 {
            self.u64(secs); // atime, mtime, ctime
        }
        for _ in 0..3 {
            self.u32(nsecs);
        }
        self.u32(mode(a.kind, a.perm));
        self.u32(a.nlink);
        self.u32(a.uid);
        self.u32(a.gid);
        self.u32(0); // rdev
        self.u32(a.blksize);
        self.u32(0); // flags
    }

    /// `struct fuse_entry_out`, generation 0 (inode numbers are never reused for other content).
    pub fn entry_out(&mut self, a: &Attr, ttl: Duration) {
        self.u64(a.ino);
        self.u64(0);
        self.u64(ttl.as_secs());
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(ttl.subsec_nanos());
        self.attr(a);
    }

    /// `struct fuse_attr_out`.
    pub fn attr_out(&mut self, a: &Attr, ttl: Duration) {
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(0);
        self.attr(a);
    }

    /// One `struct fuse_dirent` and its name, padded to 8; false (and nothing written) if it
    /// does not fit.
    pub fn dirent(&mut self, ino: u64, next: u64, kind: FileKind, name: &str) -> bool {
        if self.room() < padded(DIRENT_LEN + name.len()) {
            return false;
        }
        self.dirent_unchecked(ino, next, kind, name);
        true
    }

    /// One `struct fuse_direntplus`: the entry's attributes, or without them a zeroed
    /// `fuse_entry_out` (node id 0, which the kernel links to nothing); false (and nothing
    /// written) if it does not fit.
    pub fn direntplus(
        &mut self,
        attr: Option<&Attr>,
        ino: u64,
        next: u64,
        kind: FileKind,
        name: &str,
        ttl: Duration,
    ) -> bool {
        if self.room() < ENTRY_OUT_LEN + padded(DIRENT_LEN + name.len()) {
            return false;
        }
        match attr {
            Some(a) => self.entry_out(a, ttl),
            None => self.bytes(&[0u8; ENTRY_OUT_LEN]),
        }
        self.dirent_unchecked(ino, next, kind, name);
        true
    }

    fn dirent_unchecked(&mut self, ino: u64, next: u64, kind: FileKind, name: &str) {
        self.u64(ino);
        self.u64(next);
        self.u32(name.len() as u32);
        self.u32(mode(kind, 0) >> 12);
        self.bytes(name.as_bytes());
        self.pad_to_8();
    }

    /// `struct fuse_open_out`: the handle, and with a backing id `FOPEN_PASSTHROUGH` (the
    /// kernel reads the backing file itself), else `FOPEN_KEEP_CACHE`.
    pub fn open_out(&mut self, fh: u64, backing_id: Option<u32>) {
        self.u64(fh);
        match backing_id {
            Some(id) => {
                self.u32(FOPEN_PASSTHROUGH);
                self.u32(id);
            }
            None => {
                self.u32(FOPEN_KEEP_CACHE);
                self.u32(0);
            }
        }
    }

    /// `struct fuse_kstatfs` of a view: no free space, the block size and name length.
    pub fn statfs(&mut self, bsize: u32, namelen: u32) {
        for _ in 0..5 {
            self.u64(0); // blocks, bfree, bavail, files, ffree
        }
        self.u32(bsize);
        self.u32(namelen);
        self.u32(bsize); // frsize
        self.u32(0);
        for _ in 0..6 {
            self.u32(0);
        }
    }
}

fn padded(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn since_epoch(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn mode(kind: FileKind, perm: u16) -> u32 {
    let kind = match kind {
        FileKind::Dir => libc::S_IFDIR,
        FileKind::File => libc::S_IFREG,
        FileKind::Symlink => libc::S_IFLNK,
    };
    kind | u32::from(perm)
}
