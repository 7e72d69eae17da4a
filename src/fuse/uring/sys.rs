//! The one module of the ring transport with `unsafe`: a queue's io_uring, the memory its
//! entries lend the kernel, and the two FUSE commands (design.md §9). The kernel owns an
//! entry's buffers from the moment its REGISTER or COMMIT_AND_FETCH is submitted until that
//! command's completion arrives; [`Queue`] tracks that ownership per entry and only hands out
//! an entry's bytes while we own it, so the safe code above never races the kernel's writes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use io_uring::{cqueue, opcode, squeue::Entry128, types, IoUring};

/// `FUSE_IO_URING_CMD_REGISTER` and `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: 128 bytes of in/out header, 128 of per-op header, then
/// `struct fuse_uring_ent_in_out` (32).
pub const HEADER_LEN: usize = 288;
pub const OP_AT: usize = 128;
pub const ENT_AT: usize = 256;
/// Each entry's header gets a page of its own, as libfuse does.
const HEADER_STRIDE: usize = 4096;
const PAGE: usize = 4096;

/// Zeroed, page-aligned memory that the kernel may write into: mapped anonymous memory, not the
/// allocator's. Buffers of a MiB from malloc are mmapped by glibc, and freeing one raises its
/// dynamic mmap threshold to that size for the rest of the process: every later allocation
/// below a MiB (/dev/fuse read replies, among them) then comes from the thread arenas, which
/// keep what they grew. That is what made `auto` hold 5-9x the heap of `dev` after it built
/// and dropped the rings. Mapped memory also costs nothing until the kernel or a reply
/// touches it.
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        let len = len.max(PAGE).div_ceil(PAGE) * PAGE;
        // SAFETY: an anonymous private mapping at no fixed address touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
        })
    }

    /// An empty region whose drop frees nothing (stands in for a leaked one).
    fn dangling() -> Region {
        Region {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        // SAFETY: mapped in `Region::new` with this length; `Queue::drop` leaks the region
        // instead of dropping it while the kernel may still write into it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One entry's bytes, lent to us by the kernel until the entry is committed again.
pub struct EntryBufs<'a> {
    pub header: &'a mut [u8],
    pub payload: &'a mut [u8],
}

/// One FUSE queue: its own io_uring (128-byte SQEs, as the command needs 24 bytes of command
/// data) and `depth` entries of a header and a payload buffer each.
pub struct Queue {
    ring: IoUring<Entry128, cqueue::Entry>,
    /// The FUSE connection, once it is initialised (the ring is built before INIT).
    fuse: Option<OwnedFd>,
    qid: u16,
    headers: Region,
    payloads: Region,
    payload_len: usize,
    /// The iovecs REGISTER points at (the kernel reads them while it runs the command).
    iovecs: Box<[[libc::iovec; 2]]>,
    /// Whether the kernel owns entry `i` (a command for it is submitted or queued).
    in_kernel: Vec<bool>,
}

impl Queue {
    pub fn new(qid: u16, depth: usize, payload_len: usize) -> io::Result<Queue> {
        let payload_len = payload_len.div_ceil(PAGE) * PAGE;
        let ring = IoUring::<Entry128, cqueue::Entry>::builder()
            .setup_cqsize(2 * depth as u32)
            .build(depth as u32)?;
        let headers = Region::new(depth * HEADER_STRIDE)?;
        let payloads = Region::new(depth * payload_len)?;
        let iovecs = (0..depth)
            .map(|i| {
                [
                    libc::iovec {
                        // SAFETY: in bounds of `headers` (depth strides).
                        iov_base: unsafe { headers.ptr.add(i * HEADER_STRIDE) }.cast(),
                        iov_len: HEADER_LEN,
                    },
                    libc::iovec {
                        // SAFETY: in bounds of `payloads` (depth payloads).
                        iov_base: unsafe { payloads.ptr.add(i * payload_len) }.cast(),
                        iov_len: payload_len,
                    },
                ]
            })
            .collect();
        Ok(Queue {
            ring,
            fuse: None,
            qid,
            headers,
            payloads,
            payload_len,
            iovecs,
            in_kernel: vec![false; depth],
        })
    }

    pub fn depth(&self) -> usize {
        self.in_kernel.len()
    }

    /// The initialised FUSE connection the entries are for, registered with the ring as its
    /// fixed file 0 (so no command looks the descriptor up, as libfuse does).
    pub fn attach(&mut self, fuse: OwnedFd) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files(&[fuse.as_raw_fd()])
            .map_err(|e| io::Error::new(e.kind(), format!("registering the fuse fd: {e}")))?;
        self.fuse = Some(fuse);
        Ok(())
    }

    fn command(&self, i: usize, cmd_op: u32, commit_id: u64) -> io::Result<Entry128> {
        if self.fuse.is_none() {
            return Err(io::Error::other("the queue has no FUSE connection yet"));
        }
        // `struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 pad[6]; }`.
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut op = opcode::UringCmd80::new(types::Fixed(0), cmd_op).cmd(cmd);
        if cmd_op == CMD_REGISTER {
            op = op.addr(Some(self.iovecs[i].as_ptr() as u64));
        }
        let mut sqe = op.build().user_data(i as u64);
        if cmd_op == CMD_REGISTER {
            // The crate's UringCmd80 has no `len`; REGISTER needs 2 there (the iovec count).
            // SAFETY: Entry128 is `repr(C)` over `struct io_uring_sqe` and 64 more bytes, all
            // plain integers; bytes 24..28 are the SQE's `len` (include/uapi/linux/io_uring.h).
            let bytes = unsafe { &mut *(&mut sqe as *mut Entry128).cast::<[u8; 128]>() };
            bytes[24..28].copy_from_slice(&2u32.to_ne_bytes());
        }
        Ok(sqe)
    }

    fn push(&mut self, i: usize, sqe: Entry128) -> io::Result<()> {
        assert!(!self.in_kernel[i], "entry {i} is already the kernel's");
        // SAFETY: the SQE points at this queue's iovecs and buffers, which live as long as the
        // queue and are not freed while any entry is the kernel's (see `Drop`).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("the ring's submission queue is full"))?;
        self.in_kernel[i] = true;
        Ok(())
    }

    /// Lends entry `i` to the kernel to fetch a request (submitted by the next [`Queue::wait`]).
    pub fn register(&mut self, i: usize) -> io::Result<()> {
        let sqe = self.command(i, CMD_REGISTER, 0)?;
        self.push(i, sqe)
    }

    /// Sends the reply in entry `i` for request `commit_id` and lends the entry back for the
    /// next request.
    pub fn commit_and_fetch(&mut self, i: usize, commit_id: u64) -> io::Result<()> {
        let sqe = self.command(i, CMD_COMMIT_AND_FETCH, commit_id)?;
        self.push(i, sqe)
    }

    /// Submits what is queued without waiting, and takes the completions already there (a
    /// command the kernel refuses completes at once, with the error).
    pub fn submit(&mut self, done: &mut Vec<(usize, i32)>) -> io::Result<()> {
        self.ring.submit()?;
        self.take_completions(done);
        Ok(())
    }

    fn take_completions(&mut self, done: &mut Vec<(usize, i32)>) {
        done.clear();
        for cqe in self.ring.completion() {
            let i = cqe.user_data() as usize;
            if let Some(owned) = self.in_kernel.get_mut(i) {
                *owned = false;
                done.push((i, cqe.result()));
            }
        }
    }

    /// Submits what is queued and waits for at least one completion: `(entry, result)` pairs,
    /// each entry then ours again.
    pub fn wait(&mut self, done: &mut Vec<(usize, i32)>) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                // EAGAIN, EBUSY: the kernel is short of memory or completions are pending;
                // taking them (below) and asking again is all there is to do.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => break,
                Err(e) => return Err(e),
            }
        }
        self.take_completions(done);
        Ok(())
    }

    /// Entry `i`'s header and payload; only while it is ours (its command completed).
    pub fn entry(&mut self, i: usize) -> EntryBufs<'_> {
        assert!(!self.in_kernel[i], "entry {i} is the kernel's");
        // SAFETY: in bounds (i < depth); the kernel does not touch an entry between its
        // completion and its next submission, and `&mut self` keeps us to one borrow.
        unsafe {
            EntryBufs {
                header: std::slice::from_raw_parts_mut(
                    self.headers.ptr.add(i * HEADER_STRIDE),
                    HEADER_LEN,
                ),
                payload: std::slice::from_raw_parts_mut(
                    self.payloads.ptr.add(i * self.payload_len),
                    self.payload_len,
                ),
            }
        }
    }

    /// Whether the kernel still holds any entry.
    pub fn lent(&self) -> usize {
        self.in_kernel.iter().filter(|&&k| k).count()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // The ring's fd closes when `ring` drops, which cancels its commands, but the kernel
        // may finish them asynchronously: memory it still holds is leaked, never freed under it.
        if self.lent() > 0 {
            log::debug!(
                "ring queue {}: {} entries still lent to the kernel at exit; leaking their buffers",
                self.qid,
                self.lent()
            );
            std::mem::forget(std::mem::replace(&mut self.headers, Region::dangling()));
            std::mem::forget(std::mem::replace(&mut self.payloads, Region::dangling()));
            // A REGISTER the kernel deferred reads its iovecs when it runs.
            std::mem::forget(std::mem::take(&mut self.iovecs));
        }
    }
}

/// Pins the calling thread to `cpu`, so a queue serves the CPU its requests come from.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it for
    // cpu < CPU_SETSIZE, checked first.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
