//! The thin `fuser` adapter: it translates kernel requests into calls on the filesystem core and
//! the core's answers into replies. Anything with logic belongs in `crate::fs`.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::backing::Backings;
use super::{Passthrough, Transport, TransportInfo};
use crate::fs::{Attr, DigestFs, FileKind, FsError, NO_HANDLE};

/// Largest read request the kernel may send (256 pages).
pub const MAX_READ: u32 = 1 << 20;

pub struct FuseAdapter {
    core: Arc<DigestFs>,
    ttl: Duration,
    passthrough: Passthrough,
    /// Told at INIT whether passthrough is on; shared with the ring's queues, which answer the
    /// opens over io-uring, while forgets come here.
    backings: Arc<Backings>,
    transport: Transport,
    /// Set at INIT when the kernel agreed to FUSE over io_uring.
    ring_granted: Arc<AtomicBool>,
    stats: Arc<TransportInfo>,
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Dir => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
    }
}

impl FuseAdapter {
    /// `transport` is what to ask the kernel for at INIT; `ring_granted` says whether it
    /// agreed, `backings` whether passthrough is on.
    pub fn new(
        core: Arc<DigestFs>,
        ttl: Duration,
        passthrough: Passthrough,
        backings: Arc<Backings>,
        transport: Transport,
        ring_granted: Arc<AtomicBool>,
        stats: Arc<TransportInfo>,
    ) -> FuseAdapter {
        FuseAdapter {
            core,
            ttl,
            passthrough,
            backings,
            transport,
            ring_granted,
            stats,
        }
    }

    /// Counts a request that came over /dev/fuse (`status`), and times it until the guard
    /// drops (metrics).
    fn counted(&self, op: &'static str) -> crate::metrics::Timed<'_> {
        self.stats.dev_requests.fetch_add(1, Ordering::Relaxed);
        crate::metrics::timed(&self.stats.latency, op, "dev")
    }
}

fn rofs<R>(reply: R, f: impl FnOnce(R, Errno)) {
    f(reply, Errno::EROFS)
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Readdirplus for every chunk of a listing: with FUSE_READDIRPLUS_AUTO the kernel asks
        // for attributes in the first chunk only, and a `stat` of each later entry is a lookup
        // (a cold `find -exec stat` of 20,000 files: 3.1–4.7× native, against 0.8–0.9× without).
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
        ] {
            if config.add_capabilities(cap).is_err() {
                log::debug!("kernel lacks {cap:?}");
            }
        }
        if self.transport != Transport::Dev {
            let granted = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            if !granted && self.transport == Transport::IoUring {
                return Err(std::io::Error::other(
                    "--transport io-uring: the kernel does not offer FUSE over io_uring (Linux 6.14+, with /sys/module/fuse/parameters/enable_uring set to Y by root)",
                ));
            }
            self.ring_granted.store(granted, Ordering::SeqCst);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        if let Err(nearest) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_write(MAX_READ);
        if self.passthrough != Passthrough::Off {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
                && unsafe { libc::geteuid() } == 0;
            if !ok && self.passthrough == Passthrough::On {
                return Err(std::io::Error::other(
                    "--passthrough on: the kernel does not offer FUSE passthrough (Linux 6.9+) or the daemon lacks CAP_SYS_ADMIN",
                ));
            }
            self.backings.set_agreed(ok);
            log::info!(
                "FUSE passthrough for large blobs: {}",
                if ok { "on" } else { "off" }
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timed = self.counted("lookup");
        match self.core.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
        // The kernel forgets an inode it evicts: its backing id, if any, is no longer needed.
        self.backings.forget(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timed = self.counted("getattr");
        match self.core.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timed = self.counted("readlink");
        match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timed = self.counted("open");
        if !self.backings.agreed() {
            // Zero-message opens: answering ENOSYS once makes the kernel open files without
            // asking us (keeping their page cache) and read with no handle. Saves a round trip
            // per open; passthrough needs per-open replies, so only without it.
            return match self.core.check_open(ino.0, flags.0) {
                Ok(()) => reply.error(Errno::ENOSYS),
                Err(e) => reply.error(errno(e)),
            };
        }
        // One reply per open, with no handle in the core (reads of blobs without an id come by
        // inode): an inode that has a backing id is answered with it and nothing else.
        let opened = self.backings.open(&self.core, ino.0, flags.0);
        match opened {
            Ok((fh, Some(id))) => {
                // SAFETY: `id` is a live backing id of this connection, owned by `backings`:
                // wrapped only to be sent, then unwrapped so that it is not closed here.
                let id = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                let _ = id.into_raw();
            }
            Ok((fh, None)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timed = self.counted("read");
        // Opens keep no handle in the core (zero-message, or `backings`' own): reads by inode.
        match self.core.read(ino.0, NO_HANDLE, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backings.release(ino.0, fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush; ENOSYS once stops the kernel sending FLUSH on every close.
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timed = self.counted("opendir");
        // Zero-message opendir: the kernel then caches every listing (FOPEN_CACHE_DIR) and
        // reads them with no handle; binds invalidate the namespace directories they change.
        match self.core.getattr(ino.0) {
            Ok(a) if a.kind == FileKind::Dir => reply.error(Errno::ENOSYS),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timed = self.counted("readdir");
        let res = self.core.readdir(ino.0, offset, false, |e| {
            reply.add(INodeNo(e.ino), e.next_offset, file_type(e.kind), e.name)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timed = self.counted("readdirplus");
        let ttl = self.ttl;
        let (mut unlisted, mut added) = (None, 0);
        let res = self.core.readdir(ino.0, offset, true, |e| {
            // fuser writes the entry's node id from its attributes: without them there is no
            // record to send. The reply ends before it (the kernel asks again from there), and
            // fails if it would be the first, rather than name the wrong inode.
            let Some(attr) = &e.attr else {
                unlisted = Some(e.name.to_string());
                return true;
            };
            added += 1;
            let attr = file_attr(attr);
            reply.add(
                INodeNo(e.ino),
                e.next_offset,
                e.name,
                &ttl,
                &attr,
                Generation(0),
            )
        });
        match (res, unlisted) {
            (Ok(()), None) => reply.ok(),
            (Ok(()), Some(_)) if added > 0 => reply.ok(),
            (Ok(()), Some(name)) => {
                log::error!("readdirplus of {:#x}: {name:?} has no attributes", ino.0);
                reply.error(Errno::EIO)
            }
            (Err(e), _) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timed = self.counted("statfs");
        reply.statfs(
            0,
            0,
            0,
            0,
            0,
            crate::fs::BLKSIZE,
            crate::store::NAME_MAX as u32,
            crate::fs::BLKSIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(self.core.getxattr(ino.0, name), size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.core.listxattr(ino.0), size, reply)
    }

    // Everything that would change the tree is refused; the kernel's read-only mount flag
    // usually answers first, but the daemon does not rely on it.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        rofs(reply, ReplyAttr::error)
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        rofs(reply, ReplyEntry::error)
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        rofs(reply, ReplyEntry::error)
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        rofs(reply, ReplyEmpty::error)
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        rofs(reply, ReplyEmpty::error)
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        rofs(reply, ReplyEntry::error)
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        rofs(reply, ReplyEmpty::error)
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        rofs(reply, ReplyEntry::error)
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        rofs(reply, ReplyWrite::error)
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        rofs(reply, ReplyCreate::error)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        rofs(reply, ReplyEmpty::error)
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        rofs(reply, ReplyEmpty::error)
    }
}

fn xattr_reply(value: Result<Vec<u8>, FsError>, size: u32, reply: ReplyXattr) {
    match value {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}
