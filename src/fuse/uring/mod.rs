//! FUSE over io_uring (Linux 6.14+, `enable_uring`): after INIT over `/dev/fuse`, one queue per
//! possible CPU answers that CPU's requests with COMMIT_AND_FETCH: the reply and the wait for
//! the next request are one submission, and a request is served on the CPU that made it.
//!
//! What it does:
//! - **Several entries per queue** (`--queue-depth`, as libfuse's `io_uring_q_depth`). Each
//!   entry is served by a thread of its own, pinned to the queue's CPU, with its own ring. The
//!   kernel hands a request to any idle entry of the caller's CPU's queue, and never to another
//!   queue, so a request that waits on the disk or the network holds only its own entry: up to
//!   depth - 1 such requests from one CPU leave the others served. (libfuse serves its 8
//!   entries from one thread, which queues each behind the slowest.)
//! - The fuse fd is a fixed file of each ring, as libfuse registers it.
//! - The rings are built before INIT ([`Ring::prepare`]): once INIT agrees to the ring, the
//!   kernel holds every request until each queue has an entry.
//! - Every end of the connection ends the queues: an unmount or abort ends each entry with
//!   ENOTCONN, ECONNABORTED or ECANCELED, and the queue's thread returns. A queue that cannot
//!   go on (a command the kernel refuses, a panic in its thread) aborts its own connection
//!   (named by the mount's device, not its path) through fusectl, or detaches the mount and
//!   exits if that fails, so that no reader waits on a CPU whose queue is gone and no dead
//!   mount is left behind; the daemon then exits 1. A daemon killed outright (`kill -9`) is
//!   detached by its watcher process (`digestfs watch-mount`), on either transport.
//! - Passthrough opens (`--passthrough`): a backing id is made by an ioctl on the connection's
//!   fd, once per inode and kept until the kernel forgets it ([`RingOpens`], shared with the
//!   /dev/fuse loop); the OPEN reply that carries it is committed over the ring like any
//!   other.
//!
//! What it does not do:
//! - Leave `/dev/fuse` unread: one thread of `../dev.rs` reads it, for the forgets and
//!   interrupts the kernel sends there whatever the transport. (Requests made before the ring
//!   is ready are not among them: the kernel holds those until every queue has an entry.)
//! - Overlap the requests of one entry: reads are synchronous within an entry, so a depth of E
//!   overlaps at most E of one CPU's requests, and E slow ones (readahead of a cold blob, say)
//!   hold up the rest of that CPU's requests until one ends.
//! - Scale its threads down: there are possible CPUs x depth of them, each with a ring and a
//!   payload buffer of the connection's largest request (1 MiB), mapped, not taken from the heap.
//!
//! Requests are answered by `../answer`, as over /dev/fuse; [`sys`] holds all the `unsafe`.

mod sys;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::answer::answer;
use super::wire;
use crate::fs::DigestFs;

/// Times in a row the kernel may ask for a command again (EINTR, EAGAIN) before the queue gives
/// up (and aborts the connection).
const RETRIES: u32 = 3;

/// Opens over the ring with passthrough: the connection's backing ids, shared with the
/// /dev/fuse loop (which hears the forgets; INIT says whether passthrough is on).
pub type RingOpens = super::backing::Backings;

/// What a queue calls when it cannot go on: ends the connection, so that no reader waits on a
/// CPU whose queue is gone.
pub type OnFatal = Arc<dyn Fn() + Send + Sync>;

/// Queues built and waiting for the FUSE connection ([`Prepared::start`]).
pub struct Prepared {
    queues: usize,
    depth: usize,
    threads: Vec<(std::thread::JoinHandle<()>, mpsc::Sender<Connection>)>,
    reports: mpsc::Receiver<io::Result<()>>,
}

/// What a queue serves: the initialised FUSE connection, and its passthrough opens if any.
type Connection = (OwnedFd, Option<Arc<RingOpens>>);

/// The running queues.
pub struct Ring {
    queues: usize,
    depth: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Whether the kernel offers the ring: the fuse module's `enable_uring` is `Y`. `None` when the
/// kernel has no such parameter (no FUSE over io_uring at all).
pub fn offered() -> Option<bool> {
    let v = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").ok()?;
    Some(v.trim() == "Y")
}

/// What the kernel counts as its queues: one per possible CPU (`num_possible_cpus()`), from
/// `/sys/devices/system/cpu/possible`. No guess when that cannot be read: a count below the
/// kernel's would leave a queue without entries, and the kernel would hold every request.
pub fn possible_cpus() -> io::Result<usize> {
    let path = "/sys/devices/system/cpu/possible";
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))?;
    parse_cpu_list(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} is not a CPU list: {:?}", text.trim()),
        )
    })
}

/// The number of CPUs in a list such as `0-3,8,10-11`.
fn parse_cpu_list(text: &str) -> Option<usize> {
    text.trim()
        .split(',')
        .map(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
            (b + 1).checked_sub(a).filter(|&n| n > 0)
        })
        .sum::<Option<usize>>()
        .filter(|&n| n > 0)
}

fn wait_reports(rx: &mpsc::Receiver<io::Result<()>>, n: usize, what: &str) -> io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for _ in 0..n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other(format!(
                    "a ring queue ended before it could {what}"
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(io::Error::other(format!(
                    "the ring queues did not {what} within 10 s"
                )))
            }
        }
    }
    Ok(())
}

impl Ring {
    /// Builds a queue per possible CPU with `depth` entries each (a thread, a ring and buffers
    /// per entry); before INIT, so that the mount asks the kernel for the ring only once it is
    /// sure to have one. `max_payload` is at least the connection's largest request or reply
    /// (the max_write and max_pages INIT will agree to).
    pub fn prepare(
        core: Arc<DigestFs>,
        ttl: Duration,
        max_payload: usize,
        depth: usize,
        stats: Arc<super::TransportInfo>,
        on_fatal: OnFatal,
    ) -> io::Result<Prepared> {
        let queues = possible_cpus()?;
        let depth = depth.max(1);
        let (tx, reports) = mpsc::channel::<io::Result<()>>();
        let mut handles = Vec::with_capacity(queues * depth);
        for qid in 0..queues {
            for k in 0..depth {
                let (fd_tx, fd_rx) = mpsc::channel();
                let server = QueueThread {
                    qid,
                    core: core.clone(),
                    ttl,
                    stats: stats.clone(),
                    on_fatal: on_fatal.clone(),
                };
                let tx = tx.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("fuse-ring-{qid}.{k}"))
                    .spawn(move || server.run_guarded(max_payload, tx, fd_rx))?;
                handles.push((thread, fd_tx));
            }
        }
        drop(tx);
        wait_reports(&reports, handles.len(), "build its ring")?;
        Ok(Prepared {
            queues,
            depth,
            threads: handles,
            reports,
        })
    }

    pub fn queues(&self) -> usize {
        self.queues
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Waits (up to `limit`) for the queues to end, which they do once the connection is gone.
    pub fn join(self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        for t in self.threads {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("a FUSE ring queue did not end with its connection");
            }
        }
    }
}

impl Prepared {
    /// Lends every queue's entries to the initialised connection `fuse` (whose INIT agreed to
    /// the ring); returns once all are lent, or why one was refused (the caller must then end
    /// the connection: the kernel holds its requests until every queue has an entry).
    pub fn start(self, fuse: BorrowedFd<'_>, opens: Option<Arc<RingOpens>>) -> io::Result<Ring> {
        for (_, fd_tx) in &self.threads {
            fd_tx
                .send((fuse.try_clone_to_owned()?, opens.clone()))
                .map_err(|_| io::Error::other("a ring queue ended before it started"))?;
        }
        wait_reports(&self.reports, self.threads.len(), "register")?;
        Ok(Ring {
            queues: self.queues,
            depth: self.depth,
            threads: self.threads.into_iter().map(|(t, _)| t).collect(),
        })
    }
}

/// The server of one entry of a queue (the ring and entry it lends are its `sys::Queue`).
struct QueueThread {
    qid: usize,
    core: Arc<DigestFs>,
    ttl: Duration,
    stats: Arc<super::TransportInfo>,
    on_fatal: OnFatal,
}

/// How a queue's thread ended.
enum End {
    /// Before the connection was handed over (never started, or refused): reported to
    /// [`Prepared`], nothing lent.
    NotStarted,
    /// The connection is gone (unmounted, aborted): nothing waits on this queue.
    Closed,
}

impl QueueThread {
    /// [`QueueThread::run`], guarded by [`guarded`].
    fn run_guarded(
        &self,
        max_payload: usize,
        report: mpsc::Sender<io::Result<()>>,
        fuse: mpsc::Receiver<Connection>,
    ) {
        guarded(self.qid, &self.on_fatal, &report, |started| {
            self.run(max_payload, &report, fuse, started)
        })
    }

    fn run(
        &self,
        max_payload: usize,
        report: &mpsc::Sender<io::Result<()>>,
        fuse: mpsc::Receiver<Connection>,
        started: &std::cell::Cell<bool>,
    ) -> io::Result<End> {
        let qid = self.qid;
        if let Err(e) = sys::pin_to_cpu(qid) {
            log::debug!("ring queue {qid}: not pinned to CPU {qid}: {e}");
        }
        let built = u16::try_from(qid)
            .map_err(|_| io::Error::other("too many CPUs for the ring"))
            .and_then(|q| sys::Queue::new(q, 1, max_payload));
        let mut q = match built {
            Ok(q) => q,
            Err(e) => {
                let _ = report.send(Err(e));
                return Ok(End::NotStarted);
            }
        };
        let _ = report.send(Ok(()));
        // Never started (the kernel did not agree to the ring): nothing was lent.
        let Ok((fd, opens)) = fuse.recv() else {
            return Ok(End::NotStarted);
        };
        let registered = q.attach(fd).and_then(|()| register_all(&mut q, qid));
        let mut done = match registered {
            Ok(done) => done,
            Err(e) => {
                let _ = report.send(Err(e));
                return Ok(End::NotStarted);
            }
        };
        started.set(true);
        let _ = report.send(Ok(()));
        self.serve(&mut q, &mut done, opens.as_deref())
    }

    fn serve(
        &self,
        q: &mut sys::Queue,
        done: &mut Vec<(usize, i32)>,
        opens: Option<&RingOpens>,
    ) -> io::Result<End> {
        // The commit id each entry last sent (0: a REGISTER), to resend a command the kernel
        // asks us to retry; and how many times in a row it asked.
        let mut last = vec![0u64; q.depth()];
        let mut retried = vec![0u32; q.depth()];
        loop {
            for &(i, res) in done.iter() {
                match res {
                    0 => {
                        retried[i] = 0;
                        self.stats.ring_requests.fetch_add(1, Ordering::Relaxed);
                        let latency = &self.stats.latency;
                        serve_one(q, i, &self.core, self.ttl, opens, latency, &mut last[i])?;
                    }
                    r if is_connection_end(-r) => {}
                    r if (r == -libc::EINTR || r == -libc::EAGAIN) && retried[i] < RETRIES => {
                        retried[i] += 1;
                        match last[i] {
                            0 => q.register(i)?,
                            id => q.commit_and_fetch(i, id)?,
                        }
                    }
                    // Registering the entry again would leave a second kernel entry over the
                    // same buffers (the refused one stays the kernel's): end it all instead.
                    r => {
                        let what = if last[i] == 0 {
                            "REGISTER"
                        } else {
                            "COMMIT_AND_FETCH"
                        };
                        return Err(io::Error::other(format!(
                            "the kernel refused {what}: {}",
                            io::Error::from_raw_os_error(-r)
                        )));
                    }
                }
            }
            if q.lent() == 0 {
                log::debug!(
                    "FUSE ring queue {}: the connection ended; the queue ends",
                    self.qid
                );
                return Ok(End::Closed);
            }
            q.wait(done)?;
        }
    }
}

/// Runs a queue's thread. Once it has lent its entries (`started`), any way it fails (an
/// error, a panic anywhere in it) ends the connection: otherwise this CPU's requests would
/// wait. Before that nothing was lent: the failure is reported, and the ring is refused.
fn guarded(
    qid: usize,
    on_fatal: &OnFatal,
    report: &mpsc::Sender<io::Result<()>>,
    run: impl FnOnce(&std::cell::Cell<bool>) -> io::Result<End>,
) {
    let started = std::cell::Cell::new(false);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&started)));
    let why = match res {
        Ok(Ok(End::NotStarted | End::Closed)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "its thread panicked".to_string(),
    };
    if started.get() {
        log::error!("FUSE ring queue {qid}: {why}; ending the connection so that no reader waits");
        on_fatal();
    } else {
        let _ = report.send(Err(io::Error::other(format!("ring queue {qid}: {why}"))));
    }
}

/// What the kernel ends an entry with when its connection goes: ENOTCONN (unmounted, or the
/// queue stopped), ECONNABORTED (aborted), ECANCELED (the ring's commands cancelled on exit),
/// ENODEV (gone before the command ran).
fn is_connection_end(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV
    )
}

/// Lends every entry of `q` to the kernel, and takes the completions that came at once: a
/// REGISTER the kernel refuses completes with its error at once; accepted ones complete when a
/// request comes, which may already be the case.
fn register_all(q: &mut sys::Queue, qid: usize) -> io::Result<Vec<(usize, i32)>> {
    for i in 0..q.depth() {
        q.register(i)?;
    }
    let mut done = Vec::new();
    q.submit(&mut done)?;
    if let Some(&(_, res)) = done.iter().find(|&&(_, res)| res < 0) {
        return Err(io::Error::other(format!(
            "the kernel refused ring queue {qid}: {}",
            io::Error::from_raw_os_error(-res)
        )));
    }
    Ok(done)
}

/// Answers the request in entry `i` and lends the entry back for the next one.
fn serve_one(
    q: &mut sys::Queue,
    i: usize,
    core: &DigestFs,
    ttl: Duration,
    opens: Option<&RingOpens>,
    latency: &std::sync::OnceLock<crate::metrics::Latency>,
    last: &mut u64,
) -> io::Result<()> {
    let bufs = q.entry(i);
    let header = bufs.header;
    let commit_id = wire::u64_at(header, sys::ENT_AT + 8).unwrap_or(0);
    let payload_len = wire::u32_at(header, sys::ENT_AT + 16).unwrap_or(0) as usize;
    let (n, error, unique) = match wire::InHeader::parse(header) {
        Some(h) => {
            let op_in = &header[sys::OP_AT..sys::ENT_AT];
            // A panic in the core must not lose the request (its reader would wait forever).
            let _timed = crate::metrics::timed(latency, wire::opcode_name(h.opcode), "io-uring");
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                answer(core, ttl, opens, &h, op_in, bufs.payload, payload_len)
            }))
            .unwrap_or(Err(libc::EIO));
            match res {
                Ok(n) => (n, 0, h.unique),
                Err(e) => (0, -e, h.unique),
            }
        }
        None => (0, -libc::EIO, commit_id),
    };
    wire::write_out_header(header, (wire::OUT_HEADER_LEN + n) as u32, error, unique);
    header[sys::ENT_AT + 16..sys::ENT_AT + 20].copy_from_slice(&(n as u32).to_ne_bytes());
    // The padding and the reserved field after payload_sz: zero, as later ABIs give them meaning.
    header[sys::ENT_AT + 20..sys::HEADER_LEN].fill(0);
    *last = commit_id;
    q.commit_and_fetch(i, commit_id)
}

#[cfg(test)]
mod tests;
