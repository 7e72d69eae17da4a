//! `digestfs mount`: claim the mountpoint (reusing a live daemon with `--reuse`), restore the
//! views a crashed daemon left, bind `--bind`s, start the control socket and the lease keeper,
//! and serve until unmounted, through FUSE or NFS (one code path until the front end starts).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::remote::{self as remote_args, RemoteArgs};
use super::{daemon, open_cas, parse_digest, CliResult, Failure, StoreChoice};
use crate::control::{self, protocol, protocol::Request, state::StateKeeper};
use crate::fs::{DigestFs, FsConfig, DEFAULT_LAYER};
use crate::fuse::{Passthrough, Transport};
use crate::os::{self, MountState};

/// How the views reach the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Frontend {
    /// A FUSE mount (Linux, builds with the `fuse` feature)
    Fuse,
    /// An NFSv3 server on a local port, mounted with the OS's NFS client (macOS's way, as
    /// EdenFS does; needs no kernel extension)
    Nfs,
}

impl Frontend {
    /// FUSE where this build has it (Linux), NFS elsewhere.
    const DEFAULT: Frontend = if crate::fuse::AVAILABLE {
        Frontend::Fuse
    } else {
        Frontend::Nfs
    };

    fn name(self) -> &'static str {
        match self {
            Frontend::Fuse => "fuse",
            Frontend::Nfs => "nfs",
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  digestfs mount --daemon --reuse .pants.d/bsp/jvm/resolves
  digestfs mount --bind jvm-default/lib=<digest> --daemon .pants.d/bsp/jvm/resolves
  digestfs mount --takeover --daemon .pants.d/bsp/jvm/resolves   (after an upgrade)

The daemon keeps its views in a state file beside its control socket (<socket>.views.json),
rewritten on every bind and unbind; a daemon started again for the same mountpoint and store
(after a crash or kill -9) restores and verifies them before it answers. A clean unmount
removes the file.")]
pub(super) struct MountArgs {
    /// Show a Directory digest at PATH under the mount root (repeatable)
    #[arg(long = "bind", value_name = "PATH=DIGEST")]
    binds: Vec<String>,
    /// Return once the mount answers, leaving the daemon running in the background; prints its pid
    #[arg(long, short = 'd')]
    daemon: bool,
    /// If a live digestfs already serves MOUNTPOINT from the same store, print its pid and exit
    /// 0 instead of failing; from another store, exit 1 naming both
    #[arg(long)]
    reuse: bool,
    /// Take MOUNTPOINT over from the daemon serving it, without unmounting: its FUSE
    /// connection, the inodes the kernel holds and its views, so open files and working
    /// directories inside carry on (an upgrade or a restart). That daemon exits once this one
    /// serves, or refuses and goes on serving. Only mounts over /dev/fuse without passthrough
    /// are handed over, and they stay so (--transport and --passthrough do not apply)
    #[arg(long, conflicts_with_all = ["reuse", "binds"])]
    takeover: bool,
    /// Under a systemd unit with FileDescriptorStoreMax=2 (packaging/systemd): keep the FUSE
    /// connection in the unit's fd store, so that `systemctl restart` keeps the mount: stopped
    /// for a restart, the daemon leaves it there and exits without unmounting, and the next one
    /// serves it (a daemon serves a mount systemd kept for it, flag or not). /dev/fuse mounts
    /// without passthrough only
    #[arg(long)]
    fd_store: bool,
    /// How the views reach the kernel: fuse (Linux) or nfs (an NFSv3 server on localhost,
    /// mounted with the OS's NFS client; the default where FUSE is not built in, as on macOS)
    #[arg(long, value_enum, default_value_t = Frontend::DEFAULT)]
    frontend: Frontend,
    /// With --frontend nfs: the address to serve NFS on (port 0: any free port, shown by
    /// `digestfs status`)
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    nfs_listen: SocketAddr,
    /// With --frontend nfs: serve without mounting (for tests, or to mount by hand with
    /// mount_nfs / mount -t nfs, port and mountport from `digestfs status`); SIGTERM stops it
    #[arg(long)]
    nfs_no_mount: bool,
    /// FUSE: kernel entry and attribute cache lifetime, in seconds
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    ttl: u64,
    /// FUSE over /dev/fuse: request-handling threads. Each waits on the disk while it serves a
    /// cold read, so concurrent readers need several (8 cold IDE readers: 20% faster with 8
    /// than with 2). Over io-uring, see --queue-depth
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// FUSE over io-uring: entries per CPU queue, each served by a thread of its own, so that
    /// up to this many of one CPU's requests are served at once (a cold read or a remote fetch
    /// holds only its own). Each entry holds a buffer of up to 1 MiB once used
    #[arg(long, default_value_t = crate::fuse::DEFAULT_QUEUE_DEPTH, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    queue_depth: u16,
    /// FUSE: kernel readahead for the mount in KiB (needs root; 0 keeps the kernel's 128)
    #[arg(long, default_value_t = 4096, value_name = "KIB")]
    read_ahead_kb: u32,
    /// Answer user.pants.digest and user.checksum.sha256 (costs round trips on ls -l)
    #[arg(long)]
    xattrs: bool,
    /// FUSE: the kernel reads large blobs straight from their store file (Linux 6.9+, root;
    /// auto: where allowed). Whole-jar cold reads run at native speed, but every open costs a
    /// daemon round trip, which off saves: IDE-like access is slower with it, warm and cold
    /// (see the README's benchmarks)
    #[arg(long, value_enum, default_value_t = Passthrough::Off)]
    passthrough: Passthrough,
    /// FUSE: how requests travel. io-uring (Linux 6.14+, root sets
    /// /sys/module/fuse/parameters/enable_uring) serves each CPU's requests on its own queue;
    /// auto takes it when the kernel offers it, else /dev/fuse
    #[arg(long, value_enum, default_value_t = Transport::Auto, env = "DIGESTFS_TRANSPORT")]
    transport: Transport,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0: any free
    /// port, which `status` names). Off by default; loopback only unless --metrics-allow-remote
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Let --metrics-listen bind an address other machines can reach
    #[arg(long, requires = "metrics_listen")]
    metrics_allow_remote: bool,
    /// Let other users read the mount (FUSE: needs user_allow_other in /etc/fuse.conf unless
    /// root; NFS: answer calls from any uid, not only the owner's and root's)
    #[arg(long)]
    allow_other: bool,
    /// Skip checking that every Directory of a bound tree is in the store
    #[arg(long)]
    no_verify: bool,
    /// Renew the store leases of every bound blob this often, in seconds (0: never)
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    lease_interval: u64,
    /// Check each blob's sha256 once, on first use, before serving any of it
    #[arg(long)]
    verify: bool,
    /// Control socket path [default: derived from the mountpoint under $XDG_RUNTIME_DIR/digestfs]
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// With --daemon, append logs to this file (otherwise they are discarded)
    #[arg(long, value_name = "FILE")]
    pub(super) log_file: Option<PathBuf>,
    /// After each bind, fetch the tree's missing files from the remote CAS in the background
    /// (progress in `digestfs status`); without it, files are fetched on first read
    #[arg(long, requires = "remote_store_address")]
    prefetch: bool,
    mountpoint: PathBuf,
    #[command(flatten)]
    remote: RemoteArgs,
}

impl MountArgs {
    fn mountpoint(&self) -> Result<PathBuf, Failure> {
        os::absolute(&self.mountpoint)
            .map_err(|e| Failure::Msg(format!("{}: {e}", self.mountpoint.display())))
    }

    /// The control socket, absolute (the daemon leaves its starting directory).
    fn socket(&self, mountpoint: &Path) -> PathBuf {
        match &self.control {
            Some(path) if path.is_relative() => std::env::current_dir()
                .map(|cwd| cwd.join(path))
                .unwrap_or_else(|_| path.clone()),
            Some(path) => path.clone(),
            None => control::default_socket(mountpoint),
        }
    }
}

/// The store directory as the daemon reports it: absolute, symlinks resolved where it exists.
pub(super) fn absolute_store(dir: &Path) -> PathBuf {
    dir.canonicalize()
        .or_else(|_| os::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf())
}

/// What `--reuse` asks of a daemon it would reuse.
struct Wanted<'a> {
    store: &'a Path,
    shard_count: Option<crate::store::ShardCount>,
    frontend: Frontend,
    /// `--nfs-no-mount`: serving without a mount is what is wanted.
    no_mount: bool,
}

/// How long `--reuse` waits for a daemon whose mount is not ready yet, and for a stale one to
/// exit once asked.
const REUSE_WAIT: Duration = Duration::from_secs(30);

/// With `--reuse`: the pid of a live daemon already serving `mountpoint` as `want` says; `None`
/// when there is none (a free or stale mountpoint, or a daemon whose mount is gone, which is
/// stopped first); an error when it serves another store or through another front end, or
/// something that is not ours is mounted.
fn reusable(mountpoint: &Path, socket: &Path, want: &Wanted) -> Result<Option<u32>, Failure> {
    let deadline = std::time::Instant::now() + REUSE_WAIT;
    let status = loop {
        let answer = match control::call(socket, &Request::Status) {
            // Still restoring its views, perhaps: asked again until the wait is over. Never
            // past it, as a stopped daemon's mount would hold every reader, this one included.
            Err(control::CallError::NoAnswer { .. }) if std::time::Instant::now() < deadline => {
                continue;
            }
            Err(e @ control::CallError::NoAnswer { .. }) => {
                return Err(Failure::Msg(format!(
                    "{} has a digestfs daemon that cannot be reused: {e}",
                    mountpoint.display()
                )))
            }
            answer => answer,
        };
        let Some(s) = answer.ok().and_then(|r| r.status) else {
            break None;
        };
        check_same(mountpoint, &s, want)?;
        if s.mount_state == protocol::MOUNT_STARTING && std::time::Instant::now() < deadline {
            // Another caller's daemon (without --reuse, so not behind our lock) is mounting.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break Some(s);
    };
    if let Some(s) = status {
        match s.mount_state.as_str() {
            protocol::MOUNT_ATTACHED => {
                warn_other_version(mountpoint, &s);
                return Ok(Some(s.pid));
            }
            protocol::MOUNT_NONE if want.no_mount => return Ok(Some(s.pid)),
            protocol::MOUNT_NONE => {
                return Err(Failure::Msg(format!(
                    "{} is served by digestfs (pid {}) over NFS without a mount \
                     (--nfs-no-mount), not mounted as asked; stop it first (kill {}), or reuse \
                     it with --nfs-no-mount",
                    mountpoint.display(),
                    s.pid,
                    s.pid
                )))
            }
            protocol::MOUNT_STARTING => {
                return Err(Failure::Msg(format!(
                    "{} is being mounted by digestfs (pid {}), which did not become ready \
                     within {} s",
                    mountpoint.display(),
                    s.pid,
                    REUSE_WAIT.as_secs()
                )))
            }
            // A daemon that predates `mount_state`: the mount table says.
            "" if os::mount_state(mountpoint)? == MountState::Live => return Ok(Some(s.pid)),
            _ => {
                log::warn!(
                    "the daemon (pid {}) of {} no longer has its mount there (it was unmounted \
                     or lazily detached); stopping it and mounting afresh",
                    s.pid,
                    mountpoint.display()
                );
                stop_stale(mountpoint, socket, s.pid)?;
            }
        }
    }
    match os::mount_state(mountpoint)? {
        MountState::Live => Err(Failure::Msg(format!(
            "{} is mounted, but no digestfs daemon answers on {}; unmount it first",
            mountpoint.display(),
            socket.display()
        ))),
        MountState::Free | MountState::Stale => Ok(None),
    }
}

/// A daemon of another digestfs version is reused (replacing it would unmount what the IDE has
/// open), and the user is told how to move to this one.
fn warn_other_version(mountpoint: &Path, s: &protocol::StatusInfo) {
    if let Some(warning) = other_version(mountpoint, s.pid, s.version.as_deref()) {
        log::warn!("{warning}");
    }
}

fn other_version(mountpoint: &Path, pid: u32, version: Option<&str>) -> Option<String> {
    let ours = env!("CARGO_PKG_VERSION");
    if version == Some(ours) {
        return None;
    }
    let theirs = version.unwrap_or("an earlier version");
    Some(format!(
        "reusing the daemon (pid {}) of digestfs {theirs} at {}, not this digestfs {ours}: \
         to serve with {ours}, unmount it (digestfs unmount {}) and mount again",
        pid,
        mountpoint.display(),
        mountpoint.display()
    ))
}

/// Refuses to reuse a daemon that serves another store, reads it with another shard count, or
/// serves it through another front end; each message names both.
fn check_same(mountpoint: &Path, s: &protocol::StatusInfo, want: &Wanted) -> CliResult {
    let mp = mountpoint.display();
    let theirs = absolute_store(Path::new(&s.store));
    if theirs != want.store {
        return Err(Failure::Msg(format!(
            "{mp} is served by digestfs (pid {}) from the store {}, not from {}; unmount it \
             first (digestfs unmount {mp})",
            s.pid,
            theirs.display(),
            want.store.display(),
        )));
    }
    if let (Some(asked), Some(served)) = (want.shard_count, s.shard_count) {
        if asked.get() as u32 != served {
            return Err(Failure::Msg(format!(
                "{mp} is served by digestfs (pid {}) reading {} as {served} shards, not {asked} \
                 as --local-store-shard-count says; unmount it first (digestfs unmount {mp})",
                s.pid,
                want.store.display(),
            )));
        }
    }
    // Daemons that predate the field served FUSE only.
    let frontend = if s.frontend.is_empty() {
        "fuse"
    } else {
        s.frontend.as_str()
    };
    if frontend != want.frontend.name() {
        return Err(Failure::Msg(format!(
            "{mp} is served by digestfs (pid {}) through the {frontend} front end, not {} as \
             asked (--frontend {}); unmount it first (digestfs unmount {mp}), or reuse it with \
             --frontend {frontend}",
            s.pid,
            want.frontend.name(),
            want.frontend.name(),
        )));
    }
    Ok(())
}

/// Asks the daemon `pid` behind `socket`, whose mount is gone, to exit (SIGTERM: a daemon whose
/// mount is detached exits at once, leaving the mountpoint alone), and waits until its socket
/// no longer answers.
fn stop_stale(mountpoint: &Path, socket: &Path, pid: u32) -> CliResult {
    let pid_t = libc::pid_t::try_from(pid)
        .map_err(|_| Failure::Msg(format!("the daemon's pid {pid} is out of range")))?;
    if unsafe { libc::kill(pid_t, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(Failure::Msg(format!(
                "stopping the daemon (pid {pid}) of {}, whose mount is gone: {e}",
                mountpoint.display()
            )));
        }
    }
    let deadline = std::time::Instant::now() + REUSE_WAIT;
    while std::os::unix::net::UnixStream::connect(socket).is_ok() {
        if std::time::Instant::now() > deadline {
            return Err(Failure::Msg(format!(
                "the daemon (pid {pid}) of {}, whose mount is gone, did not exit within {} s of \
                 SIGTERM; stop it (kill {pid}) and mount again",
                mountpoint.display(),
                REUSE_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Refuses a live mount and clears a stale one: the one place that checks the mountpoint.
fn claim(mountpoint: &Path) -> CliResult {
    match os::mount_state(mountpoint)? {
        MountState::Free => Ok(()),
        MountState::Live => Err(Failure::Msg(format!(
            "{} is already mounted; unmount it first (digestfs unmount {}), or pass --reuse",
            mountpoint.display(),
            mountpoint.display()
        ))),
        MountState::Stale => {
            log::warn!(
                "{} is a stale mount left by a dead daemon; recovering it",
                mountpoint.display()
            );
            match os::unmount_or_detach(mountpoint) {
                Ok(()) => Ok(()),
                // The dead daemon's watcher may have detached it meanwhile.
                Err(_) if os::mount_state(mountpoint)? == MountState::Free => Ok(()),
                Err(e) => Err(Failure::Msg(format!(
                    "could not clear the stale mount at {}: {e}",
                    mountpoint.display()
                ))),
            }
        }
    }
}

pub(super) fn run(choice: &StoreChoice, args: MountArgs) -> CliResult {
    if args.frontend == Frontend::Fuse && !crate::fuse::AVAILABLE {
        return Err(Failure::Msg(
            "this digestfs has no FUSE front end (it is built only on Linux, with the `fuse` \
             feature); use --frontend nfs"
                .into(),
        ));
    }
    let mountpoint = args.mountpoint()?;
    let socket = args.socket(&mountpoint);
    let store_dir = absolute_store(&choice.dir());
    let choice = choice.at(store_dir.clone());
    if !daemon::is_child() {
        // Concurrent `--reuse` callers (several BSP servers starting) queue here, so one
        // starts the daemon and the others find it live.
        let _lock = match args.reuse {
            true => Some(lock_mount(&socket)?),
            false => None,
        };
        if args.reuse {
            let want = Wanted {
                store: &store_dir,
                shard_count: choice.shard_count,
                frontend: args.frontend,
                no_mount: args.frontend == Frontend::Nfs && args.nfs_no_mount,
            };
            if let Some(pid) = reusable(&mountpoint, &socket, &want)? {
                log::info!(
                    "reusing the live daemon (pid {pid}) at {}",
                    mountpoint.display()
                );
                super::outln!("{pid}");
                return Ok(());
            }
        }
        if args.daemon {
            let pid = daemon::spawn_and_wait(args.log_file.as_deref(), args.takeover)
                .map_err(Failure::Msg)?;
            super::outln!("{pid}");
            return Ok(());
        }
        return serve(&choice, args, &mountpoint, &socket);
    }
    serve(&choice, args, &mountpoint, &socket)
}

/// Serialises `--reuse` starts: an exclusive lock on the socket's directory (no lock file is
/// left behind), held until the daemon answers or is found.
fn lock_mount(socket: &Path) -> Result<std::fs::File, Failure> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    if dir == control::runtime_dir() {
        control::prepare_socket_dir(dir)
            .map_err(|e| Failure::Msg(format!("control socket {}: {e}", socket.display())))?;
    }
    os::lock_dir(dir).map_err(|e| Failure::Msg(format!("locking {}: {e}", dir.display())))
}

/// Everything after the reuse decision, in this process (the daemon child, or the foreground).
fn serve(choice: &StoreChoice, args: MountArgs, mountpoint: &Path, socket: &Path) -> CliResult {
    // Before any thread starts, so that only the mount's signal thread ever takes SIGTERM.
    let signals = os::block_termination_signals();
    os::limit_heap_retention();
    let store_dir = choice.dir();
    // A mount systemd kept for this daemon (the unit restarts) is taken first, with or without
    // --fd-store, so that whatever fails from here ends it (`unserved`) rather than leaving its
    // readers waiting on a connection nobody serves.
    let kept = unpark(&args, mountpoint, &store_dir);
    let mut unserved = LetGoOnDrop {
        device: kept.as_ref().and_then(kept_by_systemd),
        mountpoint: mountpoint.to_path_buf(),
    };
    let res = (|| -> CliResult {
        // The last read of a path the caller may have given relative (--remote-ca-certs); the
        // mountpoint, store and socket are absolute already, and the log file is open.
        let (cas, remote) = open_cas(choice, Some(&args.remote))?;
        // Now, and not on first use while serving: a daemon stopped mid-open would hold every
        // other opener of that shard (Pants included) on LMDB's lock file until it resumed. One
        // that cannot be opened now is tried again on first use, which reports it to the reader.
        match cas.store().open_existing_shards() {
            Ok(n) => log::debug!("opened {n} LMDB environments of {}", store_dir.display()),
            Err(e) => log::debug!("{e} (tried again on first use)"),
        }
        daemon::leave_cwd();
        if let Some(r) = &remote {
            r.probe_in_background();
        }
        let core = Arc::new(DigestFs::new(
            cas,
            FsConfig {
                xattrs: args.xattrs,
                verify: args.verify,
                ..FsConfig::default()
            },
        ));
        if args.prefetch {
            remote_args::spawn_prefetcher(&core)?;
        }
        // Everything slow is done before a takeover: the mount waits from here until this
        // daemon serves it. (A running daemon takes it back if this one fails.)
        let mut taken = match (args.takeover, kept) {
            (true, _) => Some(take_over(&args, socket, mountpoint, &store_dir)?),
            (false, kept) => kept,
        };
        let from_running = taken.as_ref().is_some_and(from_running_daemon);
        // Serving NFS without mounting leaves the mountpoint alone; a mount taken over is ours.
        if !(args.frontend == Frontend::Nfs && args.nfs_no_mount) && taken.is_none() {
            claim(mountpoint)?;
        }
        // Taking over, the running daemon keeps the socket until it goes (`Taken::go`).
        let listen_at = match from_running {
            true => socket.with_extension("next.sock"),
            false => socket.to_path_buf(),
        };
        let server = control::Server::bind(&listen_at)
            .map_err(|e| Failure::Msg(format!("control socket {}: {e}", listen_at.display())))?;
        // Taking over, the socket is the running daemon's until it goes.
        let mut remove_socket = RemoveOnDrop((!from_running).then(|| socket.to_path_buf()));
        let _remove_next = RemoveOnDrop(Some(listen_at.clone()));
        let state = Arc::new(StateKeeper::new(
            control::state::state_path(socket),
            mountpoint.to_path_buf(),
            store_dir.to_path_buf(),
        ));
        // Taking over, these are the running daemon's views, which it holds still for us (and
        // checked when it bound them): all of them, or no takeover.
        let restored = state.restore_checked(&core, taken.is_none());
        if let Some(t) = &mut taken {
            let views = (restored.views, state.path());
            adopt_handover(&core, t, views, (&listen_at, socket))?;
        }
        for bind in &args.binds {
            let (path, digest) = bind
                .rsplit_once('=')
                .ok_or_else(|| Failure::Msg(format!("--bind {bind:?}: expected PATH=DIGEST")))?;
            let digest = parse_digest(digest)?;
            core.bind(path, DEFAULT_LAYER, digest, !args.no_verify)
                .map_err(|e| Failure::Msg(format!("--bind {bind}: {e}")))?;
        }
        let keeper = state.clone();
        let save = move |ns: &crate::fs::Namespace| {
            if let Err(e) = keeper.save(ns) {
                log::error!("saving the views to {}: {e}", keeper.path().display());
            }
        };
        save(&core.namespace());
        core.on_namespace_change(Box::new(save));
        let leases = if args.lease_interval > 0 {
            let (poke, wake) = crossbeam_channel::bounded(64);
            // If the keeper is behind, its next full round covers a bound tree too.
            core.watch_binds(poke);
            Some(crate::lease::spawn(
                core.clone(),
                Duration::from_secs(args.lease_interval),
                wake,
            )?)
        } else {
            None
        };
        // `status` reports the NFS port, so it is bound before the control socket answers.
        let nfs = match args.frontend {
            Frontend::Nfs => {
                Some(crate::nfs::Listener::bind(args.nfs_listen).map_err(|e| {
                    Failure::Msg(format!("serving NFS on {}: {e}", args.nfs_listen))
                })?)
            }
            Frontend::Fuse => None,
        };
        let attachment = Arc::new(control::Attachment::new(mountpoint.to_path_buf()));
        let takeover_door = Arc::new(crate::fuse::TakeoverDoor::default());
        let transport = Arc::new(crate::fuse::TransportInfo::default());
        if let Some(addr) = args.metrics_listen {
            if !addr.ip().is_loopback() && !args.metrics_allow_remote {
                return Err(Failure::Msg(format!(
                    "--metrics-listen {addr} is reachable from other machines; use a loopback address, or add --metrics-allow-remote"
                )));
            }
        }
        if args.frontend == Frontend::Nfs {
            takeover_door.close("an NFS mount cannot be handed over");
        }
        // Everything that can fail is done: the running daemon goes, and the mount, its views
        // file and its control socket are this daemon's from here on.
        if let Some(t) = &taken {
            go(t)?;
            remove_socket.0 = Some(socket.to_path_buf());
        }
        // After the takeover: the running daemon may have held the port until it went, and the
        // mount is this daemon's now, so metrics that cannot be served do not stop it.
        let metrics = match (args.metrics_listen, &taken) {
            (Some(addr), None) => Some(bind_metrics(addr, false)?),
            (Some(addr), Some(_)) => match bind_metrics(addr, true) {
                Ok(l) => Some(l),
                Err(e) => {
                    if let Failure::Msg(msg) = e {
                        log::error!("{msg}; serving without metrics");
                    }
                    None
                }
            },
            (None, _) => None,
        };
        // Ready: `status` says attached from here on, and then the waiting parent is told.
        let ready = {
            let attachment = attachment.clone();
            move |res: Result<Option<os::MountId>, String>| match res {
                Ok(id) => {
                    attachment.ready(id);
                    daemon::report_ready(Ok(()));
                }
                Err(msg) => daemon::report_ready(Err(msg)),
            }
        };
        let info = Arc::new(control::MountInfo {
            mountpoint: mountpoint.to_path_buf(),
            store: store_dir.to_path_buf(),
            started: std::time::Instant::now(),
            remote: remote.clone(),
            leases,
            nfs_port: nfs.as_ref().map(|l| l.addr().port()),
            frontend: args.frontend.name(),
            transport: transport.clone(),
            attachment,
            metrics: metrics.as_ref().map(|m| m.addr),
            takeover: takeover_door.clone(),
        });
        server.spawn(core.clone(), info.clone())?;
        if let Some(listener) = metrics {
            let latency = transport.latency.get_or_init(Default::default);
            let status = {
                let (core, info) = (core.clone(), info.clone());
                Box::new(move || control::status(&core, &info))
            };
            let sources = crate::metrics::Sources {
                core: core.clone(),
                status,
            };
            let addr = listener.addr;
            match listener.spawn(crate::metrics::registry(latency, sources)) {
                Ok(()) => log::info!("metrics at http://{addr}/metrics"),
                // Taken over, the mount is ours now: it is served all the same.
                Err(e) if taken.is_some() => log::error!("serving metrics on {addr}: {e}"),
                Err(e) => return Err(Failure::Msg(format!("serving metrics on {addr}: {e}"))),
            }
        }
        log::info!("control socket at {}", socket.display());
        match nfs {
            Some(listener) => {
                let opts = crate::nfs::Options {
                    mountpoint: (!args.nfs_no_mount).then(|| mountpoint.to_path_buf()),
                    owner: (!args.allow_other).then(|| unsafe { libc::getuid() }),
                };
                crate::nfs::serve(core, listener, opts, signals, ready).map_err(Failure::Msg)?;
            }
            None => {
                // Ending the process while the mount is detached (files still open on it): the
                // views end with the mount, as after an unmount.
                let on_exit = {
                    let (state, socket) = (state.clone(), socket.to_path_buf());
                    move || {
                        state.remove();
                        let _ = std::fs::remove_file(&socket);
                    }
                };
                let ready = move |res: Result<os::MountId, String>| ready(res.map(Some));
                // From here the mount's own watcher ends it if this daemon fails.
                unserved.device = None;
                let fuse = FuseServe {
                    fd_store: args.fd_store,
                    store: store_dir.to_path_buf(),
                    transport,
                    takeover: takeover_door,
                    taken,
                };
                serve_fuse(core, &args, mountpoint, fuse, signals, ready, on_exit)?
            }
        }
        // Unmounted (or stopped) on purpose: the views end with the mount.
        state.remove();
        Ok(())
    })();
    if let Err(Failure::Msg(msg)) = &res {
        daemon::report_ready(Err(msg.clone()));
    }
    res
}

/// What the FUSE front end is given besides the mount's options.
struct FuseServe {
    fd_store: bool,
    store: PathBuf,
    transport: Arc<crate::fuse::TransportInfo>,
    takeover: Arc<crate::fuse::TakeoverDoor>,
    taken: Option<Taken>,
}

#[cfg(all(feature = "fuse", target_os = "linux"))]
type Taken = crate::fuse::takeover::Taken;
#[cfg(not(all(feature = "fuse", target_os = "linux")))]
type Taken = std::convert::Infallible;

/// Asks the daemon behind `socket` for its mount (`--takeover`).
#[cfg(all(feature = "fuse", target_os = "linux"))]
fn take_over(
    args: &MountArgs,
    socket: &Path,
    mountpoint: &Path,
    store: &Path,
) -> Result<Taken, Failure> {
    // --transport and --passthrough (or DIGESTFS_TRANSPORT) do not apply: the mount keeps how
    // it was served, /dev/fuse without passthrough, the only kind that is handed over.
    if args.frontend != Frontend::Fuse {
        return Err(Failure::Msg("--takeover is for FUSE mounts".into()));
    }
    let serves = crate::fuse::takeover::Serves {
        mountpoint: mountpoint.to_path_buf(),
        store: store.to_path_buf(),
    };
    crate::fuse::takeover::take(socket, &serves).map_err(Failure::Msg)
}

#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn take_over(_: &MountArgs, _: &Path, _: &Path, _: &Path) -> Result<Taken, Failure> {
    Err(Failure::Msg("--takeover needs the FUSE front end".into()))
}

/// The mount systemd kept across a restart of the unit, if it is this one's
/// ([`crate::fuse::restart`]).
#[cfg(all(feature = "fuse", target_os = "linux"))]
fn unpark(args: &MountArgs, mountpoint: &Path, store: &Path) -> Option<Taken> {
    if args.frontend != Frontend::Fuse {
        return None;
    }
    crate::fuse::restart::unpark(&crate::fuse::takeover::Serves {
        mountpoint: mountpoint.to_path_buf(),
        store: store.to_path_buf(),
    })
}

#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn unpark(_: &MountArgs, _: &Path, _: &Path) -> Option<Taken> {
    None
}

/// Whether a running daemon gave it (else systemd kept it).
#[cfg(all(feature = "fuse", target_os = "linux"))]
fn from_running_daemon(taken: &Taken) -> bool {
    taken.from_running_daemon()
}

#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn from_running_daemon(taken: &Taken) -> bool {
    match *taken {}
}

/// The device of a mount systemd kept (none for one a running daemon gave).
#[cfg(all(feature = "fuse", target_os = "linux"))]
fn kept_by_systemd(taken: &Taken) -> Option<u64> {
    (!taken.from_running_daemon()).then_some(taken.handover.device)
}

#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn kept_by_systemd(taken: &Taken) -> Option<u64> {
    match *taken {}
}

/// Ends the mount systemd kept (`device`), unless this daemon got to serve it.
struct LetGoOnDrop {
    device: Option<u64>,
    mountpoint: PathBuf,
}

impl Drop for LetGoOnDrop {
    fn drop(&mut self) {
        #[cfg(all(feature = "fuse", target_os = "linux"))]
        if let Some(dev) = self.device {
            crate::fuse::restart::let_go(dev, &self.mountpoint);
        }
        #[cfg(not(all(feature = "fuse", target_os = "linux")))]
        let _ = (self.device, &self.mountpoint);
    }
}

/// Serves metrics at `addr`; after a takeover, waiting (a few seconds at most) for the daemon
/// that went to let the port go.
fn bind_metrics(
    addr: std::net::SocketAddr,
    after_takeover: bool,
) -> Result<crate::metrics::Listener, Failure> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match crate::metrics::bind(addr) {
            Ok(l) => return Ok(l),
            Err(_) if after_takeover && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(Failure::Msg(format!("serving metrics on {addr}: {e}"))),
        }
    }
}

/// Tells the running daemon to go ([`crate::fuse::takeover::Taken::go`]).
#[cfg(all(feature = "fuse", target_os = "linux"))]
fn go(taken: &Taken) -> CliResult {
    taken.go().map_err(Failure::Msg)
}

#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn go(taken: &Taken) -> CliResult {
    match *taken {}
}

/// Takes over what the running daemon handed over besides its connection, once the views
/// are restored (`restored` of them, from `views_file`): they must be the ones it serves. The
/// inodes the kernel holds, under their numbers; this daemon's control socket, listening at
/// `next`, to go to `socket` at go.
#[cfg(all(feature = "fuse", target_os = "linux"))]
fn adopt_handover(
    core: &DigestFs,
    taken: &mut Taken,
    (restored, views_file): (usize, &Path),
    (next, socket): (&Path, &Path),
) -> CliResult {
    let from_running = taken.from_running_daemon();
    let h = &mut taken.handover;
    if restored != h.views || control::state::views_digest(&core.namespace()) != h.views_digest {
        let then = match from_running {
            true => "it goes on serving",
            false => "its mount is ended",
        };
        return Err(Failure::Msg(format!(
            "the views restored from {} ({restored} of them) are not the {} digestfs {} (pid {}) served (see the log); {then}",
            views_file.display(),
            h.views,
            h.version,
            h.pid
        )));
    }
    let inodes = std::mem::take(&mut h.inodes);
    log::info!(
        "taking over from digestfs {} (pid {}): {} inodes held",
        h.version,
        h.pid,
        inodes.len()
    );
    core.import_inodes(inodes);
    taken.swap_socket_at_go(next, socket);
    Ok(())
}

#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn adopt_handover(
    _: &DigestFs,
    taken: &mut Taken,
    _: (usize, &Path),
    _: (&Path, &Path),
) -> CliResult {
    match *taken {}
}

#[cfg(all(feature = "fuse", target_os = "linux"))]
fn serve_fuse(
    core: Arc<DigestFs>,
    args: &MountArgs,
    mountpoint: &Path,
    fuse: FuseServe,
    signals: os::SignalSet,
    ready: impl FnOnce(Result<os::MountId, String>) + Send + 'static,
    on_exit: impl FnOnce() + Send + 'static,
) -> CliResult {
    let cfg = crate::fuse::mount::MountConfig {
        mountpoint: mountpoint.to_path_buf(),
        store: fuse.store,
        fd_store: fuse.fd_store,
        ttl: Duration::from_secs(args.ttl),
        threads: args.threads,
        queue_depth: usize::from(args.queue_depth),
        allow_other: args.allow_other,
        passthrough: args.passthrough,
        read_ahead_kb: args.read_ahead_kb,
        transport: args.transport,
        transport_used: fuse.transport,
        takeover: fuse.takeover,
    };
    crate::fuse::mount::serve(core, &cfg, fuse.taken, signals, ready, on_exit).map_err(Failure::Msg)
}

/// Not reached: `run` refuses `--frontend fuse` in a build without FUSE.
#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn serve_fuse(
    _core: Arc<DigestFs>,
    args: &MountArgs,
    _mountpoint: &Path,
    fuse: FuseServe,
    _signals: os::SignalSet,
    _ready: impl FnOnce(Result<os::MountId, String>) + Send + 'static,
    _on_exit: impl FnOnce() + Send + 'static,
) -> CliResult {
    let _ = (args.ttl, args.threads, args.queue_depth, args.passthrough);
    let _ = args.read_ahead_kb;
    let _ = args.transport;
    let _ = (&fuse.store, &fuse.transport, &fuse.takeover, &fuse.taken);
    let _ = fuse.fd_store;
    Err(Failure::Msg("this digestfs has no FUSE front end".into()))
}

/// Removes the file, if any, when dropped.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reusing_a_daemon_of_another_version_says_which_and_how_to_move() {
        let mp = Path::new("/repo/.pants.d/bsp/jvm/resolves");
        assert_eq!(other_version(mp, 7, Some(env!("CARGO_PKG_VERSION"))), None);
        let w = other_version(mp, 7, Some("0.0.1")).unwrap();
        assert!(w.contains("pid 7") && w.contains("digestfs 0.0.1"), "{w}");
        assert!(w.contains(env!("CARGO_PKG_VERSION")), "{w}");
        assert!(
            w.contains(&format!("digestfs unmount {}", mp.display())),
            "{w}"
        );
        let w = other_version(mp, 7, None).unwrap();
        assert!(w.contains("digestfs an earlier version"), "{w}");
    }
}
