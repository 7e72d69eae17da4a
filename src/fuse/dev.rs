//! The /dev/fuse transport: threads that read requests from the connection's fd and answer them
//! with [`answer`], the code that answers over the ring. fuser mounts and performs INIT
//! (`init.rs`); everything after INIT is read here, over either transport (over io-uring one
//! thread reads the forgets and interrupts the kernel still sends here).
//!
//! Our own loop rather than fuser's `Session::run`, because this one can stop between requests
//! ([`DevLoop::stop`]) and leave the connection, with nothing read and left unanswered, to the
//! process that takes it over; fuser's ends only with the connection.
//!
//! Every thread reads the connection's own fd, not a clone of it (`FUSE_DEV_IOC_CLONE`): the
//! requests read from a clone end with the process that holds it. A blocking read wakes one
//! reader per request, which polling the shared fd would not; a stop interrupts the reads with
//! a signal ([`STOP_SIGNAL`]) until every thread has seen it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::answer::answer;
use super::backing::Backings;
use super::wire::{self, InHeader};
use super::TransportInfo;
use crate::fs::DigestFs;

/// Interrupts a blocked read so that its thread sees a stop. Its handler does nothing, and is
/// installed without `SA_RESTART`, so the read fails with EINTR.
pub const STOP_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Errors in a row, other than the ones that mean "try again", after which a thread gives up.
const MAX_ERRORS: u32 = 100;

/// What the threads answer with.
pub struct Responder {
    pub core: Arc<DigestFs>,
    pub ttl: Duration,
    /// Passthrough opens, releases and forgets of backing ids.
    pub opens: Arc<Backings>,
    pub stats: Arc<TransportInfo>,
    /// The largest reply payload (the connection's max read).
    pub max_payload: usize,
}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The connection is gone: unmounted, or aborted.
    Disconnected,
    /// [`DevLoop::stop`]: each thread answered what it had read, and read nothing more.
    Stopped,
}

/// The threads serving one connection.
pub struct DevLoop {
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<io::Result<Ended>>>,
}

impl DevLoop {
    /// Starts `threads` readers of `fuse` (which stays open as long as they run). Each calls
    /// `on_end` as it ends.
    pub fn start(
        fuse: BorrowedFd<'_>,
        threads: usize,
        responder: Arc<Responder>,
        on_end: Arc<dyn Fn() + Send + Sync>,
    ) -> io::Result<DevLoop> {
        install_stop_handler()?;
        let fd = Arc::new(fuse.try_clone_to_owned()?);
        let mut dev = DevLoop {
            stopping: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let (fd, stopping, r) = (fd.clone(), dev.stopping.clone(), responder.clone());
            let on_end = on_end.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || {
                    // Told however the thread ends, a panic included.
                    let _ended = OnDrop(on_end);
                    serve(&fd, &stopping, &r)
                });
            match spawned {
                Ok(t) => dev.threads.push(t),
                Err(e) => {
                    dev.stop_within(Duration::from_secs(5));
                    return Err(e);
                }
            }
        }
        Ok(dev)
    }

    /// Stops every thread after the request it is answering, and waits for them (at most
    /// `limit`; true if they all stopped). The connection's requests wait in the kernel for
    /// whoever reads next.
    pub fn stop_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        self.stop();
        loop {
            let running: Vec<_> = self.threads.iter().filter(|t| !t.is_finished()).collect();
            if running.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // Again and again: a signal that lands just before a thread enters its read is
            // lost, and the next one interrupts the read.
            for t in running {
                unsafe { libc::pthread_kill(t.as_pthread_t(), STOP_SIGNAL) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Waits for every thread: [`Ended::Disconnected`] once the connection is gone, else
    /// [`Ended::Stopped`] after [`DevLoop::stop_within`]; the first thread's error if one
    /// failed.
    pub fn join(self) -> io::Result<Ended> {
        let mut out = Ok(Ended::Stopped);
        for t in self.threads {
            let res = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a /dev/fuse thread panicked")));
            match (&out, res) {
                (Err(_), _) => {}
                (_, Err(e)) => out = Err(e),
                (_, Ok(Ended::Disconnected)) => out = Ok(Ended::Disconnected),
                (_, Ok(Ended::Stopped)) => {}
            }
        }
        out
    }
}

/// Runs its function when dropped.
struct OnDrop(Arc<dyn Fn() + Send + Sync>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        (self.0)()
    }
}

extern "C" fn on_stop_signal(_: libc::c_int) {}

/// Installs the stop signal's handler once; every later call reports how that went (without
/// it, the signal would end the process).
fn install_stop_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Option<i32>> = OnceLock::new();
    let failed = INSTALLED.get_or_init(|| unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        // No SA_RESTART: the blocked read must return EINTR.
        sa.sa_flags = 0;
        (libc::sigaction(STOP_SIGNAL, &sa, std::ptr::null_mut()) != 0).then(|| {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        })
    });
    match failed {
        Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
        None => Ok(()),
    }
}

/// One thread: reads and answers requests until the connection ends or the loop stops.
fn serve(fd: &OwnedFd, stopping: &AtomicBool, r: &Responder) -> io::Result<Ended> {
    // The kernel refuses a read into less than a WRITE of max_write could need.
    let mut request = vec![0u8; r.max_payload + 8192];
    let mut payload = vec![0u8; r.max_payload];
    let mut errors = 0;
    loop {
        if stopping.load(Ordering::SeqCst) {
            return Ok(Ended::Stopped);
        }
        let n = unsafe { libc::read(fd.as_raw_fd(), request.as_mut_ptr().cast(), request.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // A stop, a signal, or a request interrupted before it was read.
                Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                Some(libc::ENODEV) => return Ok(Ended::Disconnected),
                _ => {
                    errors += 1;
                    if errors >= MAX_ERRORS {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("reading /dev/fuse: {e} ({MAX_ERRORS} times in a row)"),
                        ));
                    }
                    log::warn!("reading /dev/fuse: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        errors = 0;
        handle(fd, &request[..n as usize], &mut payload, r);
    }
}

/// Answers one request read from /dev/fuse, unless it is one that gets no reply.
fn handle(fd: &OwnedFd, request: &[u8], payload: &mut [u8], r: &Responder) {
    let Some(h) = InHeader::parse(request) else {
        log::warn!("a /dev/fuse request of {} bytes: too short", request.len());
        return;
    };
    let body =
        &request[wire::IN_HEADER_LEN..request.len().min(h.len as usize).max(wire::IN_HEADER_LEN)];
    match h.opcode {
        wire::FUSE_FORGET => {
            forget(r, h.nodeid, wire::u64_at(body, 0).unwrap_or(0));
            return;
        }
        wire::FUSE_BATCH_FORGET => {
            let count = wire::u32_at(body, 0).unwrap_or(0) as usize;
            for i in 0..count {
                let at = 8 + 16 * i;
                match (wire::u64_at(body, at), wire::u64_at(body, at + 8)) {
                    (Some(ino), Some(n)) => forget(r, ino, n),
                    _ => break,
                }
            }
            return;
        }
        // Every request is answered as it comes, with nothing to cut short; a notification's
        // reply is never asked for.
        wire::FUSE_INTERRUPT | wire::FUSE_NOTIFY_REPLY => return,
        _ => {}
    }
    r.stats.dev_requests.fetch_add(1, Ordering::Relaxed);
    let _timed = crate::metrics::timed(&r.stats.latency, wire::opcode_name(h.opcode), "dev");
    let (op_in, args) = body.split_at(wire::op_in_len(h.opcode).min(body.len()));
    let args_len = args.len().min(payload.len());
    payload[..args_len].copy_from_slice(&args[..args_len]);
    // A panic in the core must not lose the request (its reader would wait forever).
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        answer(&r.core, r.ttl, Some(&r.opens), &h, op_in, payload, args_len)
    }))
    .unwrap_or(Err(libc::EIO));
    let (n, error) = match res {
        Ok(n) => (n, 0),
        Err(e) => (0, -e),
    };
    reply(fd, &h, error, &payload[..n]);
}

fn forget(r: &Responder, ino: u64, n: u64) {
    r.core.forget(ino, n);
    // The kernel forgets an inode it evicts: its backing id, if any, is no longer needed.
    r.opens.forget(ino);
}

/// Writes one reply: header and payload in one write, as the kernel requires.
fn reply(fd: &OwnedFd, h: &InHeader, error: i32, payload: &[u8]) {
    let mut header = [0u8; wire::OUT_HEADER_LEN];
    wire::write_out_header(
        &mut header,
        (wire::OUT_HEADER_LEN + payload.len()) as u32,
        error,
        h.unique,
    );
    let iov = [
        libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    loop {
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n >= 0 {
            return;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // The request was interrupted and is no longer waited for, or the connection ended.
            Some(libc::ENOENT | libc::ENODEV) => return,
            _ => {
                log::warn!(
                    "answering {} (opcode {}) on /dev/fuse: {e}",
                    h.unique,
                    h.opcode
                );
                return;
            }
        }
    }
}
