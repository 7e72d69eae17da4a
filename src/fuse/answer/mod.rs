//! Requests answered from the filesystem core, whichever transport brought them (/dev/fuse,
//! `../dev.rs`, or the ring, `../uring`): TTLs, ENOSYS to open (unless passthrough is on),
//! opendir and flush (zero-message opens: the kernel then keeps page cache and listings and
//! sends no handle), EROFS for anything that would write, ENOSYS for the rest. Plain functions
//! over byte slices: the tests call them without a mount.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use super::backing::Backings;
use super::wire::{self, InHeader, Writer};
use crate::fs::{DigestFs, DirEntryOut, FileKind, FsError, NO_HANDLE};

/// A reply's payload length, or the errno to answer.
pub type Answer = Result<usize, i32>;

fn errno(e: FsError) -> i32 {
    e.errno()
}

/// Answers one request. `op_in` is its per-op header; `payload[..payload_len]` holds its other
/// arguments (a name), and the reply is written over `payload`, which holds at least the
/// connection's max payload (a ring entry's payload buffer, or the /dev/fuse loop's).
pub fn answer(
    core: &DigestFs,
    ttl: Duration,
    opens: Option<&Backings>,
    h: &InHeader,
    op_in: &[u8],
    payload: &mut [u8],
    payload_len: usize,
) -> Answer {
    let args = &payload[..payload_len.min(payload.len())];
    match h.opcode {
        wire::FUSE_LOOKUP => {
            let name = wire::name_arg(args).to_vec();
            let a = core
                .lookup(h.nodeid, OsStr::from_bytes(&name))
                .map_err(errno)?;
            let mut w = Writer::new(payload);
            w.entry_out(&a, ttl);
            Ok(w.len())
        }
        wire::FUSE_GETATTR => {
            let a = core.getattr(h.nodeid).map_err(errno)?;
            let mut w = Writer::new(payload);
            w.attr_out(&a, ttl);
            Ok(w.len())
        }
        wire::FUSE_READLINK => {
            let target = core.readlink(h.nodeid).map_err(errno)?;
            copy_into(payload, &target)
        }
        wire::FUSE_OPEN => {
            let flags = wire::u32_at(op_in, 0).ok_or(libc::EINVAL)? as i32;
            let Some(opens) = opens.filter(|o| o.agreed()) else {
                core.check_open(h.nodeid, flags).map_err(errno)?;
                return Err(libc::ENOSYS);
            };
            // With passthrough: large blobs backed by their file, LMDB blobs kept in the page
            // cache across opens, no handle in the core.
            let (fh, backing) = opens.open(core, h.nodeid, flags).map_err(errno)?;
            let mut w = Writer::new(payload);
            w.open_out(fh, backing);
            Ok(w.len())
        }
        wire::FUSE_READ => {
            let offset = wire::u64_at(op_in, 8).ok_or(libc::EINVAL)?;
            let size = wire::u32_at(op_in, 16).ok_or(libc::EINVAL)? as usize;
            // Straight into the entry's payload: no reply buffer to zero, no copy.
            let buf = payload.get_mut(..size).ok_or(libc::EINVAL)?;
            // Opens keep no handle in the core (zero-message, or `opens`' own): reads by inode.
            core.read_into(h.nodeid, NO_HANDLE, offset, buf)
                .map_err(errno)
        }
        wire::FUSE_RELEASE => {
            let fh = wire::u64_at(op_in, 0).ok_or(libc::EINVAL)?;
            if let Some(opens) = opens {
                opens.release(h.nodeid, fh);
            }
            Ok(0)
        }
        wire::FUSE_FLUSH => Err(libc::ENOSYS),
        wire::FUSE_OPENDIR => match core.getattr(h.nodeid) {
            Ok(a) if a.kind == FileKind::Dir => Err(libc::ENOSYS),
            Ok(_) => Err(libc::ENOTDIR),
            Err(e) => Err(errno(e)),
        },
        wire::FUSE_READDIR | wire::FUSE_READDIRPLUS => {
            let offset = wire::u64_at(op_in, 8).ok_or(libc::EINVAL)?;
            let size = wire::u32_at(op_in, 16).ok_or(libc::EINVAL)? as usize;
            let plus = h.opcode == wire::FUSE_READDIRPLUS;
            let limit = size.min(payload.len());
            let mut w = Writer::new(&mut payload[..limit]);
            // The core's callback answers "full", as fuser's `ReplyDirectory::add` does.
            core.readdir(h.nodeid, offset, plus, |e| {
                !dir_record(&mut w, plus, e, ttl)
            })
            .map_err(errno)?;
            Ok(w.len())
        }
        wire::FUSE_RELEASEDIR | wire::FUSE_DESTROY => Ok(0),
        wire::FUSE_STATFS => {
            let mut w = Writer::new(payload);
            w.statfs(crate::fs::BLKSIZE, crate::store::NAME_MAX as u32);
            Ok(w.len())
        }
        wire::FUSE_GETXATTR => {
            let size = wire::u32_at(op_in, 0).ok_or(libc::EINVAL)?;
            let name = wire::name_arg(args).to_vec();
            xattr(
                core.getxattr(h.nodeid, OsStr::from_bytes(&name)),
                size,
                payload,
            )
        }
        wire::FUSE_LISTXATTR => {
            let size = wire::u32_at(op_in, 0).ok_or(libc::EINVAL)?;
            xattr(core.listxattr(h.nodeid), size, payload)
        }
        // Forgets come over /dev/fuse, whatever the transport, and get no reply there
        // (`../dev.rs`); one taken over the ring would not leak its lookups either.
        wire::FUSE_FORGET => {
            core.forget(h.nodeid, wire::u64_at(op_in, 0).unwrap_or(0));
            if let Some(opens) = opens {
                opens.forget(h.nodeid);
            }
            Ok(0)
        }
        wire::FUSE_SETATTR
        | wire::FUSE_SYMLINK
        | wire::FUSE_MKNOD
        | wire::FUSE_MKDIR
        | wire::FUSE_UNLINK
        | wire::FUSE_RMDIR
        | wire::FUSE_RENAME
        | wire::FUSE_RENAME2
        | wire::FUSE_LINK
        | wire::FUSE_WRITE
        | wire::FUSE_CREATE
        | wire::FUSE_SETXATTR
        | wire::FUSE_REMOVEXATTR => Err(libc::EROFS),
        _ => Err(libc::ENOSYS),
    }
}

/// Appends one listing record, of the kind the opcode asks for: the kernel parses every record
/// of a READDIRPLUS reply as a `fuse_direntplus`, whether or not the entry has attributes (one
/// without gets a zero node id, which the kernel links to nothing). False if it does not fit.
pub(super) fn dir_record(w: &mut Writer, plus: bool, e: &DirEntryOut, ttl: Duration) -> bool {
    if plus {
        w.direntplus(e.attr.as_ref(), e.ino, e.next_offset, e.kind, e.name, ttl)
    } else {
        w.dirent(e.ino, e.next_offset, e.kind, e.name)
    }
}

fn copy_into(payload: &mut [u8], data: &[u8]) -> Answer {
    let dst = payload.get_mut(..data.len()).ok_or(libc::EIO)?;
    dst.copy_from_slice(data);
    Ok(data.len())
}

fn xattr(value: Result<Vec<u8>, FsError>, size: u32, payload: &mut [u8]) -> Answer {
    let v = value.map_err(errno)?;
    if size == 0 {
        // `struct fuse_getxattr_out`: the size the caller needs.
        let mut w = Writer::new(payload);
        w.u32(v.len() as u32);
        w.u32(0);
        return Ok(w.len());
    }
    if v.len() > size as usize {
        return Err(libc::ERANGE);
    }
    copy_into(payload, &v)
}

#[cfg(test)]
mod tests;
