//! The FUSE session: mounting, readiness, signals, unmounting. The caller has already claimed
//! the mountpoint (refused a live mount, cleared a stale one).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use super::backing::Backings;
use super::dev::{DevLoop, Ended, Responder};
use super::init::{Init, MAX_READ};
use super::notify::KernelInvalidator;
use super::restart;
use super::takeover::{self, Taken};
use super::uring::Ring;
use super::{Passthrough, Successor, TakeoverDoor, Transport};
use crate::fs::DigestFs;
use crate::os::{self, MountId, SignalSet};

pub struct MountConfig {
    /// Absolute, and claimed by the caller.
    pub mountpoint: PathBuf,
    /// The store served, absolute: a restart's next daemon checks it serves the same.
    pub store: PathBuf,
    /// Keep the connection in the systemd unit's fd store, and leave the mount there at a
    /// restart (`--fd-store`, [`restart`]).
    pub fd_store: bool,
    pub ttl: Duration,
    /// Readers of /dev/fuse (over io-uring one: only forgets and interrupts come there).
    pub threads: usize,
    /// Entries per ring queue, each with a thread of its own.
    pub queue_depth: usize,
    pub allow_other: bool,
    pub passthrough: Passthrough,
    /// Kernel readahead for the mount, in KiB (0 leaves the kernel's default).
    pub read_ahead_kb: u32,
    pub transport: Transport,
    /// Set once the session is up, for `status`.
    pub transport_used: Arc<super::TransportInfo>,
    /// Opened while the mount can be handed to another daemon.
    pub takeover: Arc<TakeoverDoor>,
}

/// Sets the mount's readahead window. The default (128 KiB) caps sequential reads at 128 KiB
/// requests; a larger window lets the kernel keep several 1 MiB requests in flight. Needs root.
fn set_read_ahead(mp: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mp) else {
        return;
    };
    let dev = meta.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => log::debug!("{path} = {kb}"),
        Err(e) => log::debug!("could not raise readahead ({path}): {e}"),
    }
}

/// Mounts `core` and serves until the mount goes away (unmount, `fusermount3 -u`, or one of
/// `signals`, which unmounts), or a takeover hands it to another daemon (then the process
/// exits). With `taken`, serves a connection taken over from another daemon instead of
/// mounting. `ready` is called once: when the mount answers (with what identifies the mount:
/// its device), or with the reason it could not be made. `on_exit` runs if a signal must end
/// the process without the session ending (its mount detached while files are held open).
/// Errors are text: each is the one line the daemon reports to `mount --daemon`'s parent
/// through the readiness pipe, and prints.
pub fn serve(
    core: Arc<DigestFs>,
    cfg: &MountConfig,
    taken: Option<Taken>,
    signals: SignalSet,
    ready: impl FnOnce(Result<MountId, String>) + Send + 'static,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    let mp = cfg.mountpoint.clone();
    let mounted = Arc::new(OnceLock::new());
    // A mount taken over is this daemon's from the start: watched at once (the daemon that
    // gave it stood its watcher down), and detached if this one fails before it serves.
    let taken_device = taken.as_ref().map(|t| t.handover.device);
    if let Some(dev) = taken_device {
        let _ = mounted.set(MountId::Device(dev));
        watch(&mp, dev);
    }
    let started = match taken {
        Some(taken) => Ok(adopt(taken, cfg)),
        None => start_session(core.clone(), cfg),
    };
    let started = match started {
        Ok(s) => s,
        Err(msg) => {
            ready(Err(msg.clone()));
            return Err(msg);
        }
    };
    core.set_invalidator(Box::new(KernelInvalidator(started.fuse.clone())));
    // Only a daemon that keeps its connection in the fd store can leave it there.
    let restart_door = cfg.fd_store.then(|| cfg.takeover.clone());
    spawn_signal_thread(mp.clone(), signals, mounted.clone(), restart_door, on_exit)
        .map_err(|e| e.to_string())?;

    // Readiness: the session is mounted and initialised; wait until the root answers a stat,
    // which needs the request loop below to be running.
    let ended = Arc::new(AtomicBool::new(false));
    let (probe_mp, probe_ended, ra_kb) = (mp.clone(), ended.clone(), cfg.read_ahead_kb);
    let probe_mounted = mounted.clone();
    let ready_thread = std::thread::Builder::new()
        .name("ready".into())
        .spawn(move || {
            let res = wait_until_answering(&probe_mp, &probe_ended);
            if res.is_ok() && ra_kb > 0 {
                set_read_ahead(&probe_mp, ra_kb);
            }
            if let (Ok(id), None) = (&res, taken_device) {
                let _ = probe_mounted.set(*id);
                if let MountId::Device(dev) = *id {
                    watch(&probe_mp, dev);
                }
            }
            ready(res);
        })
        .map_err(|e| e.to_string())?;

    log::info!("serving {}", mp.display());
    let Started {
        session,
        fuse,
        ring,
        backings,
        max_payload,
    } = started;
    let res = serve_connection(&core, cfg, &fuse, ring.is_some(), backings, max_payload);
    // The connection is gone: fuser's unmount (by path) of what may already be unmounted,
    // as at the end of its own loop.
    drop(session);
    if let Some(ring) = ring {
        ring.join(Duration::from_secs(5));
    }
    ended.store(true, Ordering::SeqCst);
    // A connection that ended while still mounted (aborted through fusectl, by a failing ring
    // queue or by root) leaves a dead mount answering ENOTCONN: ours, while it has our device
    // (which no other mount can take while ours exists). Detached, so none is left behind.
    if let Some(id @ MountId::Device(_)) = mounted.get().copied() {
        if os::is_attached(&mp, id).unwrap_or(false) {
            log::warn!(
                "the FUSE connection of {} ended while mounted; detaching the dead mount",
                mp.display()
            );
            if let Err(e) = os::unmount(&mp, true) {
                log::error!("detaching {}: {e}", mp.display());
            }
        }
    }
    // Unmounted, or detached: nothing of ours is left for the watcher to detach, and what is
    // at the mountpoint from now on (even with our old device number) is not ours.
    stand_down_watcher();
    let _ = ready_thread.join();
    log::info!("{} unmounted", mp.display());
    res.map_err(|e| format!("serving {}: {e}", mp.display()))?;
    if cfg.transport_used.ring_failed.load(Ordering::SeqCst) {
        // A supervisor must see this as the failure it is (`Restart=on-failure`).
        return Err(format!(
            "serving {}: a queue of the io_uring transport failed, and its connection was aborted (see the log above)",
            mp.display()
        ));
    }
    Ok(())
}

/// Starts the watcher of the mount with device `dev` ([`spawn_orphan_watcher`]).
fn watch(mp: &Path, dev: u64) {
    if let Err(e) = spawn_orphan_watcher(mp, dev) {
        log::warn!(
            "no watcher to detach {} if this daemon is killed: {e}",
            mp.display()
        );
    }
}

/// What reaches the serving loop.
enum Event {
    /// A reader of loop `n` returned.
    Ended(u64),
    Takeover(Successor),
}

/// Reads /dev/fuse until the connection ends, handing it over if asked (and then exiting).
fn serve_connection(
    core: &Arc<DigestFs>,
    cfg: &MountConfig,
    fuse: &Arc<OwnedFd>,
    ring: bool,
    backings: Arc<Backings>,
    max_payload: usize,
) -> std::io::Result<Ended> {
    let (events, incoming) = mpsc::channel();
    let why_not = if ring {
        Some("it is served over io_uring, whose queues cannot move to another process")
    } else if backings.agreed() {
        Some("passthrough is on, and backing ids are not handed over")
    } else {
        None
    };
    match why_not {
        Some(why) => cfg
            .takeover
            .close(format!("this mount cannot be handed over: {why}")),
        None => {
            let events = events.clone();
            cfg.takeover.open(move |request| {
                let _ = events.send(Event::Takeover(request));
            });
            if cfg.fd_store {
                restart::keep_connection(fuse.as_fd());
            }
        }
    }
    let responder = Arc::new(Responder {
        core: core.clone(),
        ttl: cfg.ttl,
        opens: backings,
        stats: cfg.transport_used.clone(),
        max_payload,
    });
    // Over the ring /dev/fuse carries only forgets, interrupts and what came before the ring
    // was ready: one reader.
    let threads = if ring { 1 } else { cfg.threads };
    let mut generation = 0;
    'serve: loop {
        generation += 1;
        let on_end = {
            let (events, n) = (events.clone(), generation);
            Arc::new(move || {
                let _ = events.send(Event::Ended(n));
            })
        };
        let dev = DevLoop::start(fuse.as_fd(), threads, responder.clone(), on_end)?;
        loop {
            match incoming.recv() {
                Ok(Event::Ended(n)) if n == generation => {
                    // One reader returned: the connection ended (and so do the others), or it
                    // failed, and the others stop too.
                    dev.stop_within(Duration::from_secs(5));
                    cfg.takeover.close("the mount is no longer served");
                    return dev.join();
                }
                Ok(Event::Ended(_)) => {}
                Ok(Event::Takeover(successor)) => {
                    let mp = &cfg.mountpoint;
                    let (res, reply, done) = match successor {
                        Successor::Daemon(request) => {
                            let res = takeover::hand_over(
                                &dev,
                                &request,
                                fuse.as_fd(),
                                core,
                                mp,
                                max_payload,
                            );
                            (res, None, "handed it over")
                        }
                        Successor::Restart(reply) => {
                            let serves = takeover::Serves {
                                mountpoint: mp.clone(),
                                store: cfg.store.clone(),
                            };
                            let res = restart::park(&dev, fuse.as_fd(), core, &serves, max_payload);
                            (
                                res,
                                Some(reply),
                                "left it in systemd's fd store for the restart",
                            )
                        }
                    };
                    let kept = match res {
                        Ok(()) => {
                            // The next daemon serves the mount, and keeps its views file and
                            // control socket: nothing of ours is torn down on the way out.
                            log::info!("{}: {done}; exiting", mp.display());
                            stand_down_watcher();
                            std::process::exit(0);
                        }
                        Err(kept) => kept,
                    };
                    let stopped = matches!(kept, takeover::Kept::Stopped(_));
                    let again = if stopped { "; serving again" } else { "" };
                    log::warn!("{}: not {done}: {}{again}", mp.display(), kept.why());
                    if let Some(reply) = reply {
                        let _ = reply.send(kept.why().to_string());
                    }
                    if stopped {
                        continue 'serve;
                    }
                }
                Err(mpsc::RecvError) => return dev.join(),
            }
        }
    }
}

/// A mounted connection after INIT, not yet served.
struct Started {
    /// Unmounts (by path) when dropped; none for a connection taken over.
    session: Option<fuser::Session<Init>>,
    /// The connection (a dup of the session's fd, or the one taken over).
    fuse: Arc<OwnedFd>,
    ring: Option<Ring>,
    backings: Arc<Backings>,
    /// The largest request payload INIT set the connection up for.
    max_payload: usize,
}

impl Started {
    fn new(
        session: fuser::Session<Init>,
        ring: Option<Ring>,
        backings: Arc<Backings>,
    ) -> Result<Started, String> {
        let fuse = session
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating the FUSE connection's fd: {e}"))?;
        Ok(Started {
            session: Some(session),
            fuse: Arc::new(fuse),
            ring,
            backings,
            max_payload: MAX_READ as usize,
        })
    }
}

/// A connection taken over ([`takeover::take`]): served over /dev/fuse, without passthrough,
/// as the daemon that gave it served it.
fn adopt(taken: Taken, cfg: &MountConfig) -> Started {
    let Taken { fuse, handover, .. } = taken;
    let _ = cfg.transport_used.name.set("dev");
    log::info!(
        "took {} over from digestfs {} (pid {}); FUSE transport: /dev/fuse",
        cfg.mountpoint.display(),
        handover.version,
        handover.pid
    );
    Started {
        session: None,
        fuse: Arc::new(fuse),
        ring: None,
        backings: Arc::new(Backings::new(cfg.transport_used.clone())),
        max_payload: handover.max_payload,
    }
}

/// Mounts, negotiates INIT, and starts the ring if the transport is io-uring: the session
/// (which serves /dev/fuse) and the ring's queues. `auto` takes /dev/fuse without building a
/// ring when `enable_uring` is not `Y`, and falls back to it (by mounting again) when INIT did
/// not agree to the ring or the ring could not be built or started: once INIT agreed to the
/// ring, the kernel holds every request until each queue has an entry.
fn start_session(core: Arc<DigestFs>, cfg: &MountConfig) -> Result<Started, String> {
    let mp = &cfg.mountpoint;
    if !mp.is_dir() {
        return Err(format!("mountpoint {} is not a directory", mp.display()));
    }
    let transport = cfg.transport;
    let why_dev = match (transport, super::uring::offered()) {
        (Transport::Dev, _) => "asked for",
        (Transport::IoUring, offered) if offered != Some(true) => {
            return Err(format!("--transport io-uring: {}", not_offered(offered)))
        }
        (_, offered) if offered != Some(true) => not_offered(offered),
        _ => match try_session(&core, cfg, transport) {
            Ok(Some(started)) => return Ok(started),
            Ok(None) => "INIT did not agree to io_uring",
            Err(e) if transport == Transport::IoUring => return Err(e),
            Err(e) => {
                log::warn!("{e}");
                "the ring did not start"
            }
        },
    };
    let backings = Arc::new(Backings::new(cfg.transport_used.clone()));
    let session = mount_session(cfg, Transport::Dev, None, backings.clone())?;
    log::info!("FUSE transport: /dev/fuse ({why_dev})");
    let _ = cfg.transport_used.name.set("dev");
    Started::new(session, None, backings)
}

/// Why the kernel does not offer the ring, from [`super::uring::offered`].
fn not_offered(offered: Option<bool>) -> &'static str {
    match offered {
        None => "this kernel has no FUSE over io_uring (Linux 6.14+)",
        _ => "the kernel does not offer io_uring (/sys/module/fuse/parameters/enable_uring is N; root may set it to Y)",
    }
}

/// One mount over the ring: its queues built first, then INIT asking for the ring, then the
/// queues started. Anything that fails after the mount unmounts it (the session drops). `None`
/// when INIT did not agree to the ring (`auto`): unmounted again, since a session meant for
/// the ring reads /dev/fuse with one thread only.
fn try_session(
    core: &Arc<DigestFs>,
    cfg: &MountConfig,
    transport: Transport,
) -> Result<Option<Started>, String> {
    let mp = &cfg.mountpoint;
    let failed = |e: std::io::Error| format!("FUSE over io_uring on {}: {e}", mp.display());
    // The connection is named by its device, taken once mounted: by the time a queue fails,
    // this mount may have been detached and another one mounted at the same path.
    let device = Arc::new(OnceLock::<u64>::new());
    let on_fatal: super::uring::OnFatal = {
        let (mp, device, info) = (mp.clone(), device.clone(), cfg.transport_used.clone());
        Arc::new(move || {
            // Only once the ring serves: a queue that fails while the ring starts fails the
            // start instead (and `auto` goes on over /dev/fuse).
            if info.name.get() == Some(&"io-uring") {
                info.ring_failed.store(true, Ordering::SeqCst);
            }
            if let Err(e) = abort_own(&mp, &device) {
                // The kernel ends the connection when its last descriptor closes, which exit
                // does; detached first (if it is still the mount there), so that no dead mount
                // is left at the mountpoint.
                log::error!(
                    "aborting the FUSE connection of {}: {e}; detaching the mount and exiting",
                    mp.display()
                );
                let ours = device
                    .get()
                    .is_none_or(|d| os::is_attached(&mp, MountId::Device(*d)).unwrap_or(false));
                if ours {
                    if let Err(e) = os::unmount(&mp, true) {
                        log::error!("detaching {}: {e}", mp.display());
                    }
                }
                stand_down_watcher();
                std::process::exit(1);
            }
        })
    };
    let prepared = Ring::prepare(
        core.clone(),
        cfg.ttl,
        MAX_READ as usize,
        cfg.queue_depth,
        cfg.transport_used.clone(),
        on_fatal,
    )
    .map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (io_uring is disabled: sysctl kernel.io_uring_disabled, or a seccomp filter)"
        } else {
            ""
        };
        failed(std::io::Error::new(
            e.kind(),
            format!("building its rings: {e}{hint}"),
        ))
    })?;
    let granted = Arc::new(AtomicBool::new(false));
    let backings = Arc::new(Backings::new(cfg.transport_used.clone()));
    let session = mount_session(cfg, transport, Some(granted.clone()), backings.clone())?;
    if !granted.load(Ordering::SeqCst) {
        // `auto` only (`io-uring` fails INIT instead); the queues end with `prepared`.
        drop(session);
        return Ok(None);
    }
    if let Ok(dev) = os::fuse_device_at(mp) {
        let _ = device.set(dev);
    }
    // The opens come over the ring, with the ids shared with /dev/fuse (where forgets come).
    let opens = (cfg.passthrough != Passthrough::Off).then(|| backings.clone());
    let ring = match prepared.start(session.as_fd(), opens) {
        Ok(ring) => ring,
        Err(e) => {
            // Aborted before the session drops: its unmount would otherwise wait on a DESTROY
            // that nobody reads, the queues that did register holding the connection open.
            if let Err(e) = abort_own(mp, &device) {
                log::warn!("aborting the FUSE connection of {}: {e}", mp.display());
            }
            return Err(failed(e));
        }
    };
    log::info!(
        "FUSE transport: io-uring ({} queues of {} entries)",
        ring.queues(),
        ring.depth()
    );
    let _ = cfg.transport_used.name.set("io-uring");
    let _ = cfg.transport_used.ring.set((ring.queues(), ring.depth()));
    Started::new(session, Some(ring), backings).map(Some)
}

/// Aborts this session's connection: by its device once known (the mount at `mp` may be
/// another one's by then), else the FUSE mount at `mp`.
fn abort_own(mp: &Path, device: &OnceLock<u64>) -> std::io::Result<()> {
    match device.get() {
        Some(dev) => os::abort_fuse_device(*dev),
        None => os::abort_fuse_connection(mp),
    }
}

/// Mounts and runs INIT, asking for the ring when `granted` is given (and set if INIT agreed).
fn mount_session(
    cfg: &MountConfig,
    transport: Transport,
    granted: Option<Arc<AtomicBool>>,
    backings: Arc<Backings>,
) -> Result<fuser::Session<Init>, String> {
    let mp = &cfg.mountpoint;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("digestfs".into()),
        MountOption::Subtype("digestfs".into()),
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let (transport, granted) = match granted {
        Some(g) => (transport, g),
        None => (Transport::Dev, Arc::new(AtomicBool::new(false))),
    };
    let init = Init::new(cfg.passthrough, backings.clone(), transport, granted);
    // Mounts and performs INIT; fuser's own loop never runs (`DevLoop` reads the connection).
    let session = fuser::Session::new(init, mp, &config)
        .map_err(|e| format!("mounting {} failed: {e}", mp.display()))?;
    if backings.agreed() {
        // Backing ids are made on the connection's fd, for opens over either transport.
        let fd = session
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating the FUSE connection's fd: {e}"))?;
        backings.set_connection(fd);
    }
    Ok(session)
}

/// Signals unmount, then give the session a moment to drain before giving up on it. A mount
/// that is no longer attached (lazily detached while files are open: the session lives on
/// until they close) is not unmounted, since whatever is at the mountpoint now is not ours:
/// the process just ends. A SIGTERM that is systemd restarting the unit leaves the mount to
/// the next daemon through `door` instead, where it can.
fn spawn_signal_thread(
    mp: PathBuf,
    signals: SignalSet,
    mounted: Arc<OnceLock<MountId>>,
    door: Option<Arc<TakeoverDoor>>,
    on_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = os::wait_for_signal(&signals);
            let detached = mounted
                .get()
                .is_some_and(|id| !os::is_attached(&mp, *id).unwrap_or(true));
            if detached {
                log::info!(
                    "signal {sig}: the mount at {} is already detached; exiting",
                    mp.display()
                );
                stand_down_watcher();
                on_exit();
                std::process::exit(0);
            }
            if let Some(door) = door.filter(|_| sig == libc::SIGTERM) {
                if crate::systemd::restart_pending(Duration::from_secs(5)) {
                    leave_to_restart(&mp, &door);
                }
            }
            log::info!("signal {sig}: unmounting {}", mp.display());
            if let Err(e) = os::unmount_or_detach(&mp) {
                log::error!("unmounting {} failed: {e}", mp.display());
            }
            std::thread::sleep(Duration::from_secs(5));
            log::warn!("the session did not end within 5 s of the unmount; exiting");
            stand_down_watcher();
            on_exit();
            std::process::exit(0);
        })?;
    Ok(())
}

/// systemd restarts the unit: the serving loop leaves the mount in its fd store and exits. It
/// returns only if that could not be done, and then the mount is unmounted as at a stop.
fn leave_to_restart(mp: &Path, door: &TakeoverDoor) {
    let (reply, why_not) = mpsc::channel();
    log::info!(
        "systemd restarts the unit: leaving {} to its next daemon",
        mp.display()
    );
    let why = match door.enter(Successor::Restart(reply)) {
        Ok(()) => why_not
            .recv_timeout(takeover::STOP_LIMIT + Duration::from_secs(10))
            .unwrap_or_else(|_| "the serving loop did not answer".into()),
        Err(why) => why,
    };
    log::warn!("{} is not kept across the restart: {why}", mp.display());
}

/// Until the mount answers (then its device), or why it will not (a line for the readiness
/// pipe).
fn wait_until_answering(mp: &Path, ended: &AtomicBool) -> Result<MountId, String> {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match std::fs::metadata(mp) {
            // statfs too, which the kernel never answers from its caches (after a takeover the
            // root's attributes may still be cached): the request loop runs.
            Ok(m) if m.ino() == crate::fs::ROOT_INO && os::statfs(mp).is_ok() => {
                return Ok(MountId::Device(m.dev()))
            }
            // Unmounted before it was seen to answer: the session has ended.
            _ if ended.load(Ordering::SeqCst) => {
                return Err(format!("{} was unmounted before it answered", mp.display()))
            }
            _ if Instant::now() > deadline => {
                return Err(format!("{} did not answer within 20 s", mp.display()))
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Holds the write end of the orphan watcher's pipe for the life of the process.
static WATCHER_PIPE: OnceLock<std::io::PipeWriter> = OnceLock::new();

/// Starts `digestfs watch-mount`, which lazily detaches this mount once this process is gone
/// without unmounting it (`kill -9`, the OOM killer): otherwise the mount stays behind,
/// answering ENOTCONN, until someone unmounts it. It waits for the end of a pipe whose one
/// writer is this process (close-on-exec, so no child of ours holds it), as fusermount3's
/// `auto_unmount` waits on its socket. Every deliberate end first writes a byte to that pipe
/// ([`stand_down_watcher`]): by then the device number of our unmounted mount may already be
/// another mount's at the same path. In a process group of its own and deaf to SIGINT, SIGTERM
/// and SIGHUP, so that what stops the daemon cleanly does not stop the watcher first.
fn spawn_orphan_watcher(mp: &Path, dev: u64) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let (reader, writer) = std::io::pipe()?;
    // /proc/self/exe: still this binary if its file was replaced (an upgrade) since it started.
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "digestfs".into());
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .arg("watch-mount")
        .arg("--device")
        .arg(dev.to_string())
        .arg(mp)
        .stdin(reader)
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    if let Err(writer) = WATCHER_PIPE.set(writer) {
        // One mount per process: never reached. Killed before its pipe ends, which it would
        // take for this daemon's death.
        let _ = child.kill();
        drop(writer);
    }
    // Reaped if it ends first (it never should while we live).
    std::thread::Builder::new()
        .name("watcher".into())
        .spawn(move || child.wait())?;
    Ok(())
}

/// Tells the watcher that this process ends on purpose, its mount unmounted or left to others.
fn stand_down_watcher() {
    use std::io::Write;
    if let Some(mut pipe) = WATCHER_PIPE.get() {
        let _ = pipe.write_all(b"x");
    }
}

/// `digestfs watch-mount`: waits until the daemon that started it is gone (its pipe on stdin
/// ends), then, unless the daemon said it was ending on purpose (a byte on the pipe), ends
/// (root) and lazily detaches the FUSE mount at `mp` if it is still the one with device `dev`.
pub fn watch_and_detach(mp: &Path, dev: u64) -> std::io::Result<()> {
    use std::io::Read;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: SIG_IGN for a signal this process never handles.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 16];
    let mut stood_down = false;
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => stood_down = true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if stood_down {
        return Ok(());
    }
    // The daemon's death ends the connection, unless systemd holds it too (`--fd-store`):
    // then it is taken out of the store (as the unit's process, this one may; outside a unit
    // this does nothing), and ended here where root may, so that files held open fail instead
    // of waiting.
    restart::forget_connection();
    if os::is_attached(mp, MountId::Device(dev))? {
        log::warn!(
            "the daemon serving {} ended without unmounting it; ending and detaching the mount",
            mp.display()
        );
        if let Err(e) = os::abort_fuse_device(dev) {
            log::debug!("aborting the FUSE connection of {}: {e}", mp.display());
        }
        os::unmount(mp, true)?;
    }
    Ok(())
}
