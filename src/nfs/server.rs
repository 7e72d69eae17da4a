//! The NFS server: our own accept loop and, per connection, a guard between the socket and the
//! `nfs3_server` crate; readiness, the OS mount, signals and unmounting.
//!
//! Why not the crate's `NFSTcpListener::handle_forever`: in 0.11.1 its accept loop panics on
//! `peer_addr().expect(..)` when a client resets before we ask, and returns (ending the server)
//! on any accept error such as EMFILE; and its record reader resizes the record buffer to the
//! length a fragment header claims before any data arrives, so a 4-byte header makes it zero
//! 2 GiB, and fragments accumulate without bound. We may not patch the crate, so we run the
//! loop ourselves and feed the crate only records that passed `record` and `check`, through an
//! in-memory pipe, with its `process_socket`. That function is public only through the crate's
//! `__test_reexports` feature (with `RPCContext::test_ctx`), which is why the version is pinned
//! exactly: an upgrade must be re-read against this file.
//!
//! One base context serves the whole life of the server, so every connection shares one handle
//! generation (a restarted server's handles are stale, never confused with ours). Each
//! connection gets its own transaction tracker: the crate's tracker drops a retransmitted xid
//! without replying (`NoReply`), and keeps a client's entry forever without its cleaner task, so
//! sharing one would leak and could leave a reconnecting client unanswered. The crate never sees
//! the client's xids at all: each call it gets carries ours, increasing per connection, mapped
//! back on the reply, so no call of ours goes unanswered and holds its permits forever.
//! Retransmissions of a client's xid are dropped here instead, while the original is in flight
//! or just answered. The two mutating procedures the crate does not answer with NFS3ERR_ROFS
//! (MKNOD, LINK) are answered here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nfs3_server::test_reexports::{process_socket, RPCContext, TransactionTracker};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;

use super::record::{frame, read_record, Limits, RecordError};
use super::{answer, check, probe, NfsFront};
use crate::fs::DigestFs;
use crate::os::{self, SignalSet};

/// Connections served at once; more are accepted and closed at once.
const MAX_CONNECTIONS: usize = 128;
/// Calls being answered at once, over all connections, and per connection (a client that
/// stops reading its replies holds at most this many).
const MAX_IN_FLIGHT: usize = 256;
const CONN_IN_FLIGHT: usize = 64;
/// A call record: 2 MiB is twice the largest WRITE a client would send (and we refuse writes).
const CALLS: Limits = Limits {
    max_record: 2 << 20,
    max_fragments: 256,
};
/// Replies come from the crate (READ and READDIR clamped to 1 MiB by `check`), in one fragment.
const REPLIES: Limits = Limits {
    max_record: 4 << 20,
    max_fragments: 1,
};
/// A connection with no call for this long is closed (the client reconnects when it needs to).
const IDLE: Duration = Duration::from_secs(600);
/// Once a record has begun, all of it must arrive within this time.
const RECORD_TIME: Duration = Duration::from_secs(60);
/// A reply the client does not take within this time ends the connection.
const WRITE_TIME: Duration = Duration::from_secs(60);
/// Retransmitted xids answered already that are still recognised, per connection.
const RECENT_XIDS: usize = 1024;
/// How long a call may wait for a place among the calls in flight before the connection is
/// closed (its client holds on to replies, or the server is saturated).
const PLACE_TIME: Duration = Duration::from_secs(60);
const PIPE_BYTES: usize = 1 << 20;
/// How long the calls in flight when a client stops sending may take to be answered.
const DRAIN_TIME: Duration = Duration::from_secs(60);

/// The listening socket, bound before anything is served so its port can be reported.
pub struct Listener {
    inner: std::net::TcpListener,
    addr: SocketAddr,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let inner = std::net::TcpListener::bind(addr)?;
        inner.set_nonblocking(true)?;
        let addr = inner.local_addr()?;
        Ok(Listener { inner, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

pub struct Options {
    /// Where to mount the export with the OS's NFS client; `None` serves only.
    pub mountpoint: Option<PathBuf>,
    /// The uid that may call besides root; `None`: anyone (`--allow-other`).
    pub owner: Option<u32>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct MountFlags {
    mounted: bool,
    stopping: bool,
}

/// Serves `core` until a signal (which unmounts), or until the OS mount goes away. `ready` is
/// called once: when the server answers NULL and MOUNT (and the mount, if any, answers too;
/// then with what identifies it, the server's port), or with the reason it could not. Errors are text: each is the one line the daemon
/// reports to `mount --daemon`'s parent through the readiness pipe, and prints.
pub fn serve(
    core: Arc<DigestFs>,
    listener: Listener,
    opts: Options,
    signals: SignalSet,
    ready: impl FnOnce(Result<Option<os::MountId>, String>) + Send + 'static,
) -> Result<(), String> {
    keep_large_buffers_out_of_the_heap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .thread_name("nfs")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the NFS server: {e}"))?;
    let addr = listener.addr;
    let tcp = {
        let _enter = rt.enter();
        TcpListener::from_std(listener.inner).map_err(|e| format!("serving NFS on {addr}: {e}"))?
    };
    let mut base = RPCContext::test_ctx("/", Arc::new(NfsFront::new(core, opts.owner)));
    base.local_port = addr.port();
    rt.spawn(accept_loop(tcp, base));
    log::info!("NFS server on {addr}");
    if !addr.ip().is_loopback() {
        log::warn!(
            "serving NFS on {addr}, beyond this machine: AUTH_UNIX trusts what clients claim"
        );
    }

    let (stop, stopped) = mpsc::channel::<Result<(), String>>();
    let flags = Arc::new(Mutex::new(MountFlags::default()));
    let mountpoint = opts.mountpoint.clone();
    {
        let (stop, flags, mp) = (stop.clone(), flags.clone(), mountpoint.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = os::wait_for_signal(&signals);
                let mut f = lock(&flags);
                f.stopping = true;
                match (&mp, f.mounted) {
                    (Some(mp), true) => {
                        log::info!("signal {sig}: unmounting {}", mp.display());
                        if let Err(e) = os::unmount_or_detach(mp) {
                            log::error!("unmounting {} failed: {e}", mp.display());
                        }
                    }
                    _ => log::info!("signal {sig}: stopping the NFS server on {addr}"),
                }
                let _ = stop.send(Ok(()));
            })
            .map_err(|e| e.to_string())?;
    }
    std::thread::Builder::new()
        .name("ready".into())
        .spawn(move || {
            let res = become_ready(addr, mountpoint.as_deref(), &flags);
            match res {
                Ok(()) => {
                    let id = mountpoint
                        .as_ref()
                        .map(|_| os::MountId::NfsPort(addr.port()));
                    ready(Ok(id));
                    if let Some(mp) = mountpoint {
                        watch_mount(&mp, &flags);
                        let _ = stop.send(Ok(()));
                    }
                }
                Err(msg) => {
                    ready(Err(msg.clone()));
                    let _ = stop.send(Err(msg));
                }
            }
        })
        .map_err(|e| e.to_string())?;

    let res = stopped.recv().unwrap_or(Ok(()));
    rt.shutdown_timeout(Duration::from_secs(2));
    log::info!("NFS server on {addr} stopped");
    res
}

/// Every READ allocates its reply (up to 1 MiB) several times over on its way out, and every
/// connection its buffers (the crate's 128 KiB read buffer, our 64 KiB reader, the pipes'),
/// and frees them again. glibc serves blocks this large from mmap only until the first is
/// freed: then it raises its mmap threshold past them and keeps them in its heaps (one per
/// thread of the blocking pool), where what many connections at once left behind stays
/// resident, fragmented, after they are gone (a storm of 50 connections at a time left 16 MiB
/// behind). A fixed threshold of 64 KiB (which also turns that adjustment off) sends every
/// block from that size up straight back to the system when it is freed, so the server's
/// memory follows what it is doing now (`mount-tests/nfs/load.rs` checks RssAnon).
fn keep_large_buffers_out_of_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Waits until the server answers, then mounts (unless serving only) and waits until the
/// mount answers too; the error is a line for the readiness pipe.
fn become_ready(
    addr: SocketAddr,
    mountpoint: Option<&Path>,
    flags: &Mutex<MountFlags>,
) -> Result<(), String> {
    probe::wait_until_answering(addr, Duration::from_secs(20))?;
    let Some(mp) = mountpoint else {
        return Ok(());
    };
    {
        let mut f = lock(flags);
        if f.stopping {
            return Err("stopped before the mount was made".into());
        }
        os::nfs_mount(addr, mp).map_err(|e| format!("mounting {}: {e}", mp.display()))?;
        f.mounted = true;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match std::fs::metadata(mp) {
            Ok(m) if std::os::unix::fs::MetadataExt::ino(&m) == crate::fs::ROOT_INO => {
                log::info!("mounted {} over NFS (port {})", mp.display(), addr.port());
                return Ok(());
            }
            _ if Instant::now() > deadline => {
                let _ = os::unmount_or_detach(mp);
                lock(flags).mounted = false;
                return Err(format!("{} did not answer within 20 s", mp.display()));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Returns once the mount at `mp` is gone (an external `umount`, `digestfs unmount`) or the
/// server is stopping. NFS tells the server nothing when a client unmounts, so we look.
fn watch_mount(mp: &Path, flags: &Mutex<MountFlags>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if lock(flags).stopping {
            return;
        }
        match os::mounts() {
            Ok(list) if !list.iter().any(|m| m.mountpoint == mp) => {
                log::info!("{} was unmounted", mp.display());
                lock(flags).mounted = false;
                return;
            }
            _ => {}
        }
    }
}

/// Logs at most one warning every ten seconds per kind (an accept loop can fail in a storm).
struct Quiet(Mutex<Option<Instant>>);

impl Quiet {
    fn warn(&self, msg: impl FnOnce() -> String) {
        let mut last = lock(&self.0);
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *last = Some(Instant::now());
            log::warn!("{}", msg());
        }
    }
}

async fn accept_loop(tcp: TcpListener, base: RPCContext<NfsFront>) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (full, failing) = (Quiet(Mutex::new(None)), Quiet(Mutex::new(None)));
    loop {
        match tcp.accept().await {
            Ok((sock, peer)) => match connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    let mut ctx = base.clone();
                    ctx.client_addr = peer.to_string();
                    ctx.transaction_tracker =
                        Arc::new(TransactionTracker::new(Duration::ZERO, 256, 1024));
                    let in_flight = in_flight.clone();
                    tokio::spawn(async move {
                        connection(sock, peer, ctx, in_flight).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    full.warn(|| {
                        format!("{MAX_CONNECTIONS} NFS connections are open; refusing more")
                    });
                    drop(sock);
                }
            },
            // EMFILE and the like: wait a little and go on; the server never stops accepting.
            Err(e) => {
                failing.warn(|| format!("accepting an NFS connection: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The calls of one connection: in flight (by our xid, with the client's and the permits the
/// call holds) and recently answered (by the client's xid).
#[derive(Default)]
struct Xids {
    next: u32,
    in_flight: HashMap<u32, (u32, OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    theirs_in_flight: HashSet<u32>,
    recent: VecDeque<u32>,
    recent_set: HashSet<u32>,
}

type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

impl Xids {
    /// Whether the client's `xid` is in flight or was answered lately (a retransmission).
    fn seen(&self, xid: u32) -> bool {
        self.theirs_in_flight.contains(&xid) || self.recent_set.contains(&xid)
    }

    /// Records a call of the client's `xid`; the xid the crate gets instead.
    fn start(&mut self, theirs: u32, (mine, all): Permits) -> u32 {
        self.next = self.next.wrapping_add(1);
        self.in_flight.insert(self.next, (theirs, mine, all));
        self.theirs_in_flight.insert(theirs);
        self.next
    }

    /// The reply to our xid `ours` arrived: the client's xid, its permits released.
    fn answered(&mut self, ours: u32) -> Option<u32> {
        let (theirs, _, _) = self.in_flight.remove(&ours)?;
        self.theirs_in_flight.remove(&theirs);
        if self.recent_set.insert(theirs) {
            self.recent.push_back(theirs);
        }
        while self.recent.len() > RECENT_XIDS {
            if let Some(old) = self.recent.pop_front() {
                self.recent_set.remove(&old);
            }
        }
        Some(theirs)
    }
}

/// The first 8 bytes of every handle the crate makes for this server (its generation).
fn generation_of(ctx: &RPCContext<NfsFront>) -> [u8; 8] {
    let root = ctx.root_dir();
    let mut g = [0u8; 8];
    g.copy_from_slice(&root.data[..8]);
    g
}

async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    ctx: RPCContext<NfsFront>,
    in_flight: Arc<Semaphore>,
) {
    let _ = sock.set_nodelay(true);
    let front = ctx.vfs.clone();
    let generation = generation_of(&ctx);
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    let server = tokio::spawn(async move {
        if let Err(e) = process_socket(theirs, ctx).await {
            log::debug!("NFS connection handler: {e}");
        }
    });
    let (tcp_r, tcp_w) = sock.into_split();
    let (pipe_r, mut pipe_w) = tokio::io::split(ours);
    let xids = Mutex::new(Xids::default());
    let per_conn = Arc::new(Semaphore::new(CONN_IN_FLIGHT));
    let (local_tx, local_rx) = tokio::sync::mpsc::unbounded_channel();
    let calls = calls(
        tcp_r,
        &mut pipe_w,
        local_tx,
        &xids,
        &per_conn,
        &in_flight,
        (&front, &generation),
    );
    // The crate's replies are read whole by a task of their own: `replies` waits on them and on
    // its own answers at once, and a read of a record must never be cancelled halfway.
    let (crate_tx, crate_rx) = tokio::sync::mpsc::channel(2);
    let reader = tokio::spawn(read_replies(pipe_r, crate_tx));
    let replies = replies(crate_rx, local_rx, tcp_w, &xids);
    tokio::pin!(calls, replies);
    let why = tokio::select! {
        why = &mut calls => match why {
            // The client sent its last call (it closed or half-closed its side): every call
            // received is still answered before the connection closes. The pipe to the crate
            // stays open meanwhile, since the crate drops the replies in flight at its end.
            End::Closed => match timeout(DRAIN_TIME, &mut replies).await {
                Ok(why) => why,
                Err(_) => End::Refused("replies that were not taken in time".into()),
            },
            refused => refused,
        },
        why = &mut replies => why,
    };
    match why {
        End::Closed => log::debug!("NFS client {peer} disconnected"),
        End::Refused(why) => log::warn!("NFS client {peer}: {why}; closing the connection"),
    }
    server.abort();
    reader.abort();
}

/// Reads the crate's replies from the pipe and hands each on whole, until the pipe ends or a
/// reply is malformed (handed on as the error).
async fn read_replies(
    mut pipe: tokio::io::ReadHalf<tokio::io::DuplexStream>,
    out: tokio::sync::mpsc::Sender<Result<Vec<u8>, RecordError>>,
) {
    loop {
        let mut record = Vec::new();
        let got = match read_record(&mut pipe, &REPLIES, &mut record).await {
            Ok(true) => Ok(record),
            Ok(false) => return,
            Err(e) => Err(e),
        };
        let failed = got.is_err();
        if out.send(got).await.is_err() || failed {
            return;
        }
    }
}

enum End {
    Closed,
    Refused(String),
}

/// Reads calls from the client, checks each, and passes the good ones to the crate (or answers
/// them itself, through `local`).
async fn calls(
    tcp: tokio::net::tcp::OwnedReadHalf,
    pipe: &mut tokio::io::WriteHalf<tokio::io::DuplexStream>,
    // Dropped when this returns, which tells `replies` that no call will follow.
    local: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    xids: &Mutex<Xids>,
    per_conn: &Arc<Semaphore>,
    in_flight: &Arc<Semaphore>,
    (front, generation): (&Arc<NfsFront>, &[u8; 8]),
) -> End {
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, tcp);
    let mut record = Vec::new();
    loop {
        // Wait for the next record to begin, then give it a bounded time to arrive whole.
        match timeout(IDLE, r.fill_buf()).await {
            Err(_) => return End::Closed,
            Ok(Ok([])) | Ok(Err(_)) => return End::Closed,
            Ok(Ok(_)) => {}
        }
        match timeout(RECORD_TIME, read_record(&mut r, &CALLS, &mut record)).await {
            Err(_) => return End::Refused("a record that did not arrive in time".into()),
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return End::Closed,
            Ok(Err(e)) => return End::Refused(format!("{e}")),
        }
        let call = match check::check_call(&mut record) {
            Ok(c) => c,
            Err(m) => return End::Refused(format!("{m}")),
        };
        if lock(xids).seen(call.xid) {
            log::debug!("dropping a retransmission of xid {}", call.xid);
            continue;
        }
        if let Some(reply) = check::rofs_reply(&call) {
            if local.send(reply).is_err() {
                return End::Closed;
            }
            continue;
        }
        let permits = timeout(PLACE_TIME, async {
            let mine = per_conn.clone().acquire_owned().await;
            let all = in_flight.clone().acquire_owned().await;
            (mine, all)
        })
        .await;
        let (Ok(mine), Ok(all)) = (match permits {
            Ok(p) => p,
            Err(_) => {
                return End::Refused("a call that found no place among those in flight".into())
            }
        }) else {
            return End::Closed;
        };
        if let Some(asked) = answer::intercept(front, &call, &record, generation) {
            let (tx, front, xid) = (local.clone(), front.clone(), call.xid);
            tokio::spawn(async move {
                let reply = answer::answer(front, xid, asked).await;
                let _ = tx.send(reply);
                drop((mine, all));
            });
            continue;
        }
        let ours = lock(xids).start(call.xid, (mine, all));
        check::set_xid(&mut record, ours);
        if pipe.write_all(&frame(&record)).await.is_err() {
            return End::Closed;
        }
    }
}

/// Copies the crate's replies to the client under the client's xids, releasing each call's
/// permits, and sends the replies `calls` made itself. Once `calls` has ended (its sender of
/// `local` is gone), returns when the last call in flight is answered.
async fn replies(
    mut from_crate: tokio::sync::mpsc::Receiver<Result<Vec<u8>, RecordError>>,
    mut local: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    mut tcp: tokio::net::tcp::OwnedWriteHalf,
    xids: &Mutex<Xids>,
) -> End {
    let mut last_call_read = false;
    loop {
        if last_call_read && lock(xids).in_flight.is_empty() {
            let _ = tcp.shutdown().await;
            return End::Closed;
        }
        let (mut record, from_crate) = tokio::select! {
            read = from_crate.recv() => match read {
                Some(Ok(r)) => (r, true),
                None => return End::Closed,
                Some(Err(e)) => return End::Refused(format!("a reply of the server: {e}")),
            },
            // Made under the client's xid already; `None`: no call will follow.
            made = local.recv(), if !last_call_read => match made {
                Some(r) => (r, false),
                None => {
                    last_call_read = true;
                    continue;
                }
            },
        };
        if from_crate {
            let theirs = check::xid(&record).and_then(|ours| lock(xids).answered(ours));
            match theirs {
                Some(theirs) => check::set_xid(&mut record, theirs),
                // Not an answer to any call we passed on: nothing the client asked for.
                None => continue,
            }
        }
        match timeout(WRITE_TIME, tcp.write_all(&frame(&record))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return End::Closed,
            Err(_) => return End::Refused("a client that does not read its replies".into()),
        }
    }
}
