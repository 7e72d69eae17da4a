//! Telling the kernel what a bind changed: notifications written to the connection's fd, from
//! whichever process serves it now (a daemon that took the connection over has no fuser session
//! to send them through).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::wire;
use crate::fs::Invalidator;

const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;

/// Forwards the core's invalidations to the kernel.
pub struct KernelInvalidator(pub Arc<OwnedFd>);

impl KernelInvalidator {
    /// One notification: its code where a reply has its error, and no request to answer.
    fn send(&self, code: i32, parts: &[&[u8]]) -> io::Result<()> {
        let len = wire::OUT_HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut header = [0u8; wire::OUT_HEADER_LEN];
        wire::write_out_header(&mut header, len as u32, code, 0);
        let mut iov = vec![libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        }];
        for p in parts {
            iov.push(libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            });
        }
        let n = unsafe { libc::writev(self.0.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Invalidator for KernelInvalidator {
    fn invalidate_entry(&self, parent: u64, name: &str) {
        // `struct fuse_notify_inval_entry_out`, then the name and its NUL.
        let mut entry = Vec::with_capacity(16);
        entry.extend_from_slice(&parent.to_ne_bytes());
        entry.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        entry.extend_from_slice(&0u32.to_ne_bytes());
        if let Err(e) = self.send(FUSE_NOTIFY_INVAL_ENTRY, &[&entry, name.as_bytes(), b"\0"]) {
            log::debug!("invalidating {name:?} in {parent:#x}: {e}");
        }
        // The entry is only dropped if the kernel has a dentry for it (a name that was absent
        // and never looked up has none), but a listing of `parent` may be cached all the same
        // (opendir is never asked, so the kernel caches listings): drop it, and the attributes.
        // `struct fuse_notify_inval_inode_out`: the whole inode (offset 0, length 0).
        let mut inode = Vec::with_capacity(24);
        inode.extend_from_slice(&parent.to_ne_bytes());
        inode.extend_from_slice(&0i64.to_ne_bytes());
        inode.extend_from_slice(&0i64.to_ne_bytes());
        if let Err(e) = self.send(FUSE_NOTIFY_INVAL_INODE, &[&inode]) {
            log::debug!("invalidating the listing of {parent:#x}: {e}");
        }
    }
}
