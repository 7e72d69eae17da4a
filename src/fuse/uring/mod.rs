//! FUSE over io_uring (Linux 6.14+, `enable_uring`): after INIT over `/dev/fuse`, one queue per
//! possible CPU, served by threads pinned to that CPU, answers requests with COMMIT_AND_FETCH:
//! the reply and the wait for the next request are one submission, and a request is served on
//! the CPU that made it. Each thread has its own io_uring and lends the kernel one entry: the
//! kernel gives a request only to an idle thread, so a slow one (a cold disk read, a remote
//! fetch) holds up nothing else, as with `--threads` readers of /dev/fuse. (libfuse serves a
//! queue of 8 entries from one thread, which queues every request behind the slowest.)
//! `/dev/fuse` is still served by fuser's session for what the kernel sends there: forgets and
//! interrupts. Once INIT has agreed to the ring, the kernel holds every request until each
//! queue has an entry, so the rings are built before INIT ([`Ring::prepare`]) and a queue that
//! cannot go on aborts the connection rather than leave its CPU's readers waiting.
//!
//! Why our own decoding rather than fuser's: fuser 0.18 has no ring transport and its request
//! parsing and reply senders are private, so the ring cannot hand it a request. A read-only
//! view answers a dozen opcodes; [`answer`] maps them onto the same core calls as the fuser
//! adapter, [`wire`] reads and writes their structures, and [`sys`] holds all the `unsafe`.

mod answer;
mod sys;
mod wire;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::fs::DigestFs;

/// Entries per thread; each lends the kernel a payload of `max_payload`.
const DEPTH: usize = 1;
/// Times in a row the kernel may end an entry with an unexpected error before its queue gives
/// up (and aborts the connection).
const RETRIES: u32 = 3;

pub use answer::answer;

/// What a queue calls when it cannot go on: ends the connection, so that no reader waits on a
/// CPU whose queue is gone.
pub type OnFatal = Arc<dyn Fn() + Send + Sync>;

/// Queues built and waiting for the FUSE connection ([`Prepared::start`]).
pub struct Prepared {
    queues: usize,
    threads: Vec<(std::thread::JoinHandle<()>, mpsc::Sender<OwnedFd>)>,
    reports: mpsc::Receiver<io::Result<()>>,
}

/// The running queues.
pub struct Ring {
    queues: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What the kernel counts as its queues: one per possible CPU (`num_possible_cpus()`).
pub fn possible_cpus() -> usize {
    let counted = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?)
                })
                .sum::<Option<usize>>()
        });
    counted
        .filter(|&n| n > 0)
        .unwrap_or_else(sys::configured_cpus)
}

fn wait_reports(rx: &mpsc::Receiver<io::Result<()>>, n: usize, what: &str) -> io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for _ in 0..n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::other(format!(
                    "the ring queues did not {what} within 10 s"
                )))
            }
        }
    }
    Ok(())
}

impl Ring {
    /// Builds a queue per possible CPU, `threads` threads in all (at least one per queue), each
    /// with its ring and buffers; before INIT, so that the mount asks the kernel for the ring
    /// only once it is sure to have one. `max_payload` is at least the connection's largest
    /// request or reply (the max_write and max_pages INIT will agree to).
    pub fn prepare(
        core: Arc<DigestFs>,
        ttl: Duration,
        max_payload: usize,
        threads: usize,
        stats: Arc<super::TransportInfo>,
        on_fatal: OnFatal,
    ) -> io::Result<Prepared> {
        let queues = possible_cpus();
        let per_queue = threads.div_ceil(queues).max(1);
        let (tx, reports) = mpsc::channel::<io::Result<()>>();
        let mut handles = Vec::with_capacity(queues * per_queue);
        for qid in 0..queues {
            for k in 0..per_queue {
                let (fd_tx, fd_rx) = mpsc::channel();
                let (core, tx, stats) = (core.clone(), tx.clone(), stats.clone());
                let on_fatal = on_fatal.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("fuse-ring-{qid}.{k}"))
                    .spawn(move || {
                        let server = QueueThread {
                            qid,
                            core,
                            ttl,
                            stats,
                            on_fatal,
                        };
                        server.run(max_payload, tx, fd_rx)
                    })?;
                handles.push((thread, fd_tx));
            }
        }
        drop(tx);
        wait_reports(&reports, handles.len(), "build their rings")?;
        Ok(Prepared {
            queues,
            threads: handles,
            reports,
        })
    }

    pub fn queues(&self) -> usize {
        self.queues
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
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
    pub fn start(self, fuse: BorrowedFd<'_>) -> io::Result<Ring> {
        for (_, fd_tx) in &self.threads {
            fd_tx
                .send(fuse.try_clone_to_owned()?)
                .map_err(|_| io::Error::other("a ring queue ended before it started"))?;
        }
        wait_reports(&self.reports, self.threads.len(), "register")?;
        Ok(Ring {
            queues: self.queues,
            threads: self.threads.into_iter().map(|(t, _)| t).collect(),
        })
    }
}

/// One thread of a queue (the ring and entries it lends are its `sys::Queue`).
struct QueueThread {
    qid: usize,
    core: Arc<DigestFs>,
    ttl: Duration,
    stats: Arc<super::TransportInfo>,
    on_fatal: OnFatal,
}

impl QueueThread {
    fn run(
        &self,
        max_payload: usize,
        report: mpsc::Sender<io::Result<()>>,
        fuse: mpsc::Receiver<OwnedFd>,
    ) {
        let qid = self.qid;
        if let Err(e) = sys::pin_to_cpu(qid) {
            log::debug!("ring queue {qid}: not pinned to CPU {qid}: {e}");
        }
        let built = u16::try_from(qid)
            .map_err(|_| io::Error::other("too many CPUs for the ring"))
            .and_then(|q| sys::Queue::new(q, DEPTH, max_payload));
        let mut q = match built {
            Ok(q) => q,
            Err(e) => {
                let _ = report.send(Err(e));
                return;
            }
        };
        let _ = report.send(Ok(()));
        // Never started (the kernel did not agree to the ring): nothing was lent.
        let Ok(fd) = fuse.recv() else {
            return;
        };
        q.attach(fd);
        let mut done = match register_all(&mut q, qid) {
            Ok(done) => done,
            Err(e) => {
                let _ = report.send(Err(e));
                return;
            }
        };
        let _ = report.send(Ok(()));
        drop(report);
        if let Err(e) = self.serve(&mut q, &mut done) {
            log::error!(
                "FUSE ring queue {qid}: {e}; ending the connection so that no reader waits"
            );
            (self.on_fatal)();
        }
    }

    fn serve(&self, q: &mut sys::Queue, done: &mut Vec<(usize, i32)>) -> io::Result<()> {
        let qid = self.qid;
        // The commit id each entry last sent (0: a REGISTER), to resend a command the kernel
        // asks us to retry; and how many times in a row the kernel refused it.
        let mut last = vec![0u64; q.depth()];
        let mut refused = vec![0u32; q.depth()];
        loop {
            for &(i, res) in done.iter() {
                match res {
                    0 => {
                        refused[i] = 0;
                        self.stats.ring_requests.fetch_add(1, Ordering::Relaxed);
                        serve_one(q, i, &self.core, self.ttl, &mut last[i])?;
                    }
                    r if r == -libc::EINTR || r == -libc::EAGAIN => match last[i] {
                        0 => q.register(i)?,
                        id => q.commit_and_fetch(i, id)?,
                    },
                    // The connection is gone (unmounted, aborted): the entry is ours for good.
                    r if r == -libc::ENOTCONN => {}
                    r => {
                        refused[i] += 1;
                        let e = io::Error::from_raw_os_error(-r);
                        if refused[i] > RETRIES {
                            return Err(io::Error::other(format!(
                                "the kernel keeps ending its entry: {e}"
                            )));
                        }
                        // Lent again, so this CPU's requests keep a server; a reply the kernel
                        // refused is lost to it either way (its request ends with an error).
                        log::warn!("FUSE ring queue {qid}: the kernel ended an entry with {e}; registering it again");
                        last[i] = 0;
                        q.register(i)?;
                    }
                }
            }
            if q.lent() == 0 {
                log::debug!("FUSE ring queue {qid}: no entry left with the kernel; the queue ends");
                return Ok(());
            }
            q.wait(done)?;
        }
    }
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
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                answer(core, ttl, &h, op_in, bufs.payload, payload_len)
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
