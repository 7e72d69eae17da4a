//! Mount and session lifecycle: refusing live mounts, recovering stale ones, readiness, signals
//! and unmounting.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use super::{FuseAdapter, Passthrough};
use crate::fs::{DigestFs, Invalidator};

/// Forwards the core's invalidations to the kernel.
struct KernelInvalidator(fuser::Notifier);

impl Invalidator for KernelInvalidator {
    fn invalidate_entry(&self, parent: u64, name: &str) {
        if let Err(e) = self
            .0
            .inval_entry(fuser::INodeNo(parent), std::ffi::OsStr::new(name))
        {
            log::debug!("invalidating {name:?} in {parent:#x}: {e}");
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum MountState {
    Free,
    /// Mounted and answering.
    Live,
    /// Mounted but its daemon is gone ("Transport endpoint is not connected").
    Stale,
}

/// The absolute path of a mountpoint, resolved without touching the mountpoint itself (which
/// may be a dead FUSE mount that fails every stat).
pub fn absolute(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => Ok(abs),
    }
}

/// Unescapes the octal escapes (`\040` for space) that /proc/self/mountinfo uses.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Whether something is mounted at `path` (per /proc/self/mountinfo), and whether it answers.
pub fn mount_state(path: &Path) -> io::Result<MountState> {
    let abs = absolute(path)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == abs.as_os_str().as_bytes())
    });
    if !mounted {
        return Ok(MountState::Free);
    }
    // statfs always reaches the daemon (a stat may be answered from the kernel's cache).
    let c = CString::new(abs.as_os_str().as_bytes())?;
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
    {
        return Ok(MountState::Stale);
    }
    Ok(MountState::Live)
}

/// The digestfs mount containing `path` (absolute), as (mountpoint, path relative to it).
pub fn find_digestfs_mount(path: &Path) -> io::Result<Option<(PathBuf, PathBuf)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut best: Option<PathBuf> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        // Mounted directly the type is "fuse" with source "digestfs"; through fusermount3 it
        // is "fuse.digestfs".
        let (fstype, source) = (fields.get(sep + 1).copied(), fields.get(sep + 2).copied());
        if fstype != Some("fuse.digestfs")
            && !(fstype == Some("fuse") && source == Some("digestfs"))
        {
            continue;
        }
        let mp = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(fields[4])));
        if path.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|b| mp.as_os_str().len() > b.as_os_str().len())
        {
            best = Some(mp);
        }
    }
    Ok(best.map(|mp| {
        let rel = path
            .strip_prefix(&mp)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        (mp, rel)
    }))
}

/// Unmounts `path`: directly when root, else through `fusermount3 -u`. With `lazy`, detaches a
/// busy mount instead of failing.
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let abs = absolute(path)?;
    if unsafe { libc::geteuid() } == 0 {
        let c = CString::new(abs.as_os_str().as_bytes())?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(err);
        }
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg("--").arg(&abs).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running fusermount3 (is the fuse3 package installed?): {e}"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Unmounts, falling back to a lazy detach when the mount is busy.
pub fn unmount_or_detach(path: &Path) -> io::Result<()> {
    match unmount(path, false) {
        Ok(()) => Ok(()),
        Err(e) => {
            log::warn!(
                "unmounting {} failed ({e}); detaching it lazily",
                path.display()
            );
            unmount(path, true)
        }
    }
}

pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub ttl: Duration,
    pub threads: usize,
    pub allow_other: bool,
    pub passthrough: Passthrough,
    /// Kernel readahead for the mount, in KiB (0 leaves the kernel's default).
    pub read_ahead_kb: u32,
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

/// Blocks the termination signals in this thread and every thread it spawns later, so that
/// one dedicated thread can take them with `sigwait`. Call it before starting any thread.
pub fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Mounts `core` and serves until the mount goes away (unmount, `fusermount3 -u`, or a
/// termination signal, which unmounts). `ready` is called once the mount answers, or with the
/// reason it could not be made.
pub fn serve(
    core: Arc<DigestFs>,
    cfg: &MountConfig,
    ready: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Result<(), String> {
    let mp = absolute(&cfg.mountpoint).map_err(|e| format!("{}: {e}", cfg.mountpoint.display()))?;
    let fail = |msg: String| Err(msg);
    match mount_state(&mp).map_err(|e| format!("{}: {e}", mp.display()))? {
        MountState::Live => {
            let msg = format!(
                "{} is already mounted; unmount it first (digestfs unmount {})",
                mp.display(),
                mp.display()
            );
            ready(Err(msg.clone()));
            return fail(msg);
        }
        MountState::Stale => {
            log::warn!(
                "{} is a stale mount left by a dead daemon; recovering it",
                mp.display()
            );
            if let Err(e) = unmount_or_detach(&mp) {
                let msg = format!("could not clear the stale mount at {}: {e}", mp.display());
                ready(Err(msg.clone()));
                return fail(msg);
            }
        }
        MountState::Free => {}
    }
    if !mp.is_dir() {
        let msg = format!("mountpoint {} is not a directory", mp.display());
        ready(Err(msg.clone()));
        return fail(msg);
    }

    let sigset = block_signals();
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
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = cfg.threads > 1;

    let core_for_notify = core.clone();
    let adapter = FuseAdapter::new(core, cfg.ttl, cfg.passthrough);
    let session = match fuser::Session::new(adapter, &mp, &config) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("mounting {} failed: {e}", mp.display());
            ready(Err(msg.clone()));
            return fail(msg);
        }
    };

    core_for_notify.set_invalidator(Box::new(KernelInvalidator(session.notifier())));

    // Signals: unmount, then give the session a moment to drain before giving up on it.
    let sig_mp = mp.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            if unsafe { libc::sigwait(&sigset, &mut sig) } != 0 {
                continue;
            }
            log::info!("signal {sig}: unmounting {}", sig_mp.display());
            if let Err(e) = unmount_or_detach(&sig_mp) {
                log::error!("unmounting {} failed: {e}", sig_mp.display());
            }
            std::thread::sleep(Duration::from_secs(5));
            log::warn!("the session did not end within 5 s of the unmount; exiting");
            std::process::exit(0);
        })
        .map_err(|e| e.to_string())?;

    // Readiness: the session is mounted and initialised; wait until the root answers a stat,
    // which needs the request loop below to be running.
    let probe_mp = mp.clone();
    let ended = Arc::new(AtomicBool::new(false));
    let probe_ended = ended.clone();
    let (tx, rx) = crossbeam_channel::bounded::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("ready".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let res = loop {
                match std::fs::metadata(&probe_mp) {
                    Ok(m) if std::os::unix::fs::MetadataExt::ino(&m) == crate::fs::ROOT_INO => {
                        break Ok(())
                    }
                    // Unmounted before it was seen to answer: the session has ended.
                    _ if probe_ended.load(Ordering::SeqCst) => {
                        break Err(format!(
                            "{} was unmounted before it answered",
                            probe_mp.display()
                        ))
                    }
                    _ if Instant::now() > deadline => {
                        break Err(format!("{} did not answer within 20 s", probe_mp.display()))
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            let _ = tx.send(res);
        })
        .map_err(|e| e.to_string())?;
    let (ra_mp, ra_kb) = (mp.clone(), cfg.read_ahead_kb);
    let ready_thread = std::thread::spawn(move || {
        let res = rx
            .recv()
            .unwrap_or_else(|_| Err("the mount ended before it answered".into()));
        if res.is_ok() && ra_kb > 0 {
            set_read_ahead(&ra_mp, ra_kb);
        }
        ready(res);
    });

    log::info!("serving {}", mp.display());
    let res = session.run();
    ended.store(true, Ordering::SeqCst);
    let _ = ready_thread.join();
    log::info!("{} unmounted", mp.display());
    res.map_err(|e| format!("serving {}: {e}", mp.display()))
}
