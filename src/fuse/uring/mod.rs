//! FUSE over io_uring (Linux 6.14+, `enable_uring`): after INIT over `/dev/fuse`, one queue per
//! possible CPU, served by threads pinned to that CPU, answers requests with COMMIT_AND_FETCH:
//! the reply and the wait for the next request are one submission, and a request is served on
//! the CPU that made it. Each thread has its own io_uring and lends the kernel one entry: the
//! kernel gives a request only to an idle thread, so a slow one (a cold disk read, a remote
//! fetch) holds up nothing else, as with `--threads` readers of /dev/fuse. (libfuse serves a
//! queue of 8 entries from one thread, which queues every request behind the slowest.) `/dev/fuse` is still served by fuser's session
//! for what the kernel sends there (forgets, interrupts, requests queued before every queue
//! had an entry).
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

pub use answer::answer;

/// The running queues.
pub struct Ring {
    queues: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What the kernel counts as its queues: one per possible CPU (`nr_cpu_ids`).
pub fn possible_cpus() -> usize {
    let parsed = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        });
    match parsed {
        Some(last) => last + 1,
        // SAFETY: sysconf has no preconditions.
        None => (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }).max(1) as usize,
    }
}

impl Ring {
    /// Starts a queue per possible CPU on the initialised FUSE connection `fuse`, `threads` in
    /// all (at least one per queue), and returns once every thread has lent the kernel its
    /// entry (or with why one could not).
    /// `max_payload` is at least the connection's largest request or reply (max_write, and
    /// max_pages of the negotiated INIT).
    pub fn start(
        fuse: BorrowedFd<'_>,
        core: Arc<DigestFs>,
        ttl: Duration,
        max_payload: usize,
        threads: usize,
        stats: Arc<super::TransportInfo>,
    ) -> io::Result<Ring> {
        let queues = possible_cpus();
        let per_queue = threads.div_ceil(queues).max(1);
        let (tx, rx) = mpsc::channel::<io::Result<()>>();
        let mut handles = Vec::with_capacity(queues * per_queue);
        for qid in 0..queues {
            for k in 0..per_queue {
                let fd: OwnedFd = fuse.try_clone_to_owned()?;
                let (core, tx, stats) = (core.clone(), tx.clone(), stats.clone());
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("fuse-ring-{qid}.{k}"))
                        .spawn(move || serve_queue(fd, qid, core, ttl, max_payload, stats, tx))?,
                );
            }
        }
        drop(tx);
        for _ in 0..handles.len() {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a ring queue did not start within 10 s")),
            }
        }
        Ok(Ring {
            queues,
            threads: handles,
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

fn serve_queue(
    fd: OwnedFd,
    qid: usize,
    core: Arc<DigestFs>,
    ttl: Duration,
    max_payload: usize,
    stats: Arc<super::TransportInfo>,
    started: mpsc::Sender<io::Result<()>>,
) {
    if let Err(e) = sys::pin_to_cpu(qid) {
        log::debug!("ring queue {qid}: not pinned to CPU {qid}: {e}");
    }
    let (mut q, mut done) = match start_queue(fd, qid, max_payload) {
        Ok(started) => started,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let _ = started.send(Ok(()));
    drop(started);
    // The commit id each entry last sent (0: a REGISTER), to resend a command the kernel asks
    // us to retry.
    let mut last = vec![0u64; q.depth()];
    loop {
        for &(i, res) in &done {
            let resent = match res {
                0 => {
                    stats.ring_requests.fetch_add(1, Ordering::Relaxed);
                    serve_one(&mut q, i, &core, ttl, &mut last[i])
                }
                r if r == -libc::EINTR || r == -libc::EAGAIN => match last[i] {
                    0 => q.register(i),
                    id => q.commit_and_fetch(i, id),
                },
                // The connection is gone (unmounted, aborted): the entry is ours for good.
                r if r == -libc::ENOTCONN => Ok(()),
                r => {
                    log::error!(
                        "FUSE ring queue {qid}: the kernel ended an entry with {}",
                        io::Error::from_raw_os_error(-r)
                    );
                    Ok(())
                }
            };
            if let Err(e) = resent {
                log::error!("FUSE ring queue {qid}: {e}; the queue stops");
                return;
            }
        }
        if q.lent() == 0 {
            log::debug!("FUSE ring queue {qid}: no entry left with the kernel; the queue ends");
            return;
        }
        if let Err(e) = q.wait(&mut done) {
            log::error!("FUSE ring queue {qid}: {e}; the queue stops");
            return;
        }
    }
}

/// A queue with every entry lent to the kernel, and the completions that came at once: a
/// REGISTER the kernel refuses completes with its error at once; accepted ones complete when a
/// request comes, which may already be the case.
fn start_queue(
    fd: OwnedFd,
    qid: usize,
    max_payload: usize,
) -> io::Result<(sys::Queue, Vec<(usize, i32)>)> {
    let qid16 = u16::try_from(qid).map_err(|_| io::Error::other("too many CPUs for the ring"))?;
    let mut q = sys::Queue::new(fd, qid16, DEPTH, max_payload)?;
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
    Ok((q, done))
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
    *last = commit_id;
    q.commit_and_fetch(i, commit_id)
}

#[cfg(test)]
mod tests;
