//! Everything that differs between operating systems, in one place: what is mounted where,
//! NFS mounting, unmounting, the uid behind a Unix socket, termination signals. Linux is built
//! and tested; the macOS branches follow the system's documented interfaces but cannot be
//! compiled on the machines this project is tested on (docs/macos.md).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, PartialEq, Eq)]
pub enum MountState {
    Free,
    /// Mounted and answering.
    Live,
    /// Mounted but its server is gone ("Transport endpoint is not connected").
    Stale,
}

/// The absolute path of a mountpoint, resolved without touching the mountpoint itself (which
/// may be a dead mount that fails every stat).
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

fn c_path(path: &Path) -> io::Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

/// One mounted filesystem: where, what type, from what source.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The filesystem's own options (Linux's super options: `…,port=P,addr=A` for NFS); empty
    /// where the system does not say.
    pub options: String,
    /// The device number of the mounted filesystem (`st_dev` of its root), where the system
    /// says (Linux: mountinfo's `major:minor`).
    pub device: Option<u64>,
}

/// What tells one mount from another at the same mountpoint: a FUSE mount by its device (each
/// FUSE connection has its own), an NFS mount by its server's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountId {
    Device(u64),
    NfsPort(u16),
}

/// Whether the mount `id` is what `mountpoint` (absolute) shows now: the topmost mount there is
/// it. False once it has been unmounted or lazily detached (`fusermount3 -u -z`, `umount -l`),
/// even while its server still runs for files held open, or when another mount covers it.
pub fn is_attached(mountpoint: &Path, id: MountId) -> io::Result<bool> {
    let top = mounts()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint);
    let Some(top) = top else {
        return Ok(false);
    };
    Ok(match id {
        MountId::Device(dev) => match top.device {
            Some(d) => d == dev,
            // No device in the table (macOS): a FUSE mount of ours is there.
            None => top.fstype.contains("fuse") || top.fstype.contains("digestfs"),
        },
        MountId::NfsPort(port) => match nfs_server(&top) {
            Some(server) => server.port() == port,
            // No options in the table (macOS): an NFS mount of a loopback server is there.
            None => top.fstype.starts_with("nfs"),
        },
    })
}

/// Every mount this process sees.
#[cfg(target_os = "linux")]
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    /// Unescapes the octal escapes (`\040` for space) that /proc/self/mountinfo uses.
    fn unescape(field: &str) -> Vec<u8> {
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
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let device = fields.get(2).and_then(|d| {
                let (major, minor) = d.split_once(':')?;
                Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
            });
            Some(MountEntry {
                device,
                mountpoint: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(fields.get(4)?))),
                fstype: fields.get(sep + 1)?.to_string(),
                source: fields.get(sep + 2)?.to_string(),
                options: fields.get(sep + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect())
}

#[cfg(target_os = "macos")]
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    let mut list: *mut libc::statfs = std::ptr::null_mut();
    let n = unsafe { libc::getmntinfo(&mut list, libc::MNT_NOWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let text = |chars: &[libc::c_char]| unsafe {
        std::ffi::CStr::from_ptr(chars.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    Ok((0..n as usize)
        .map(|i| {
            let fs = unsafe { &*list.add(i) };
            MountEntry {
                mountpoint: PathBuf::from(text(&fs.f_mntonname)),
                fstype: text(&fs.f_fstypename),
                source: text(&fs.f_mntfromname),
                options: String::new(),
                device: None,
            }
        })
        .collect())
}

/// Whether something is mounted at `path`, and whether it answers.
pub fn mount_state(path: &Path) -> io::Result<MountState> {
    let abs = absolute(path)?;
    let Some(mount) = mounts()?.into_iter().find(|m| m.mountpoint == abs) else {
        return Ok(MountState::Free);
    };
    // A soft NFS mount whose server died makes statfs wait out every retry: ask the server's
    // port instead, where the mount says which it is.
    if let Some(server) = nfs_server(&mount) {
        let answers = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2));
        return Ok(match answers {
            Ok(_) => MountState::Live,
            Err(_) => MountState::Stale,
        });
    }
    // statfs always reaches the server (a stat may be answered from the kernel's cache).
    let c = c_path(&abs)?;
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        let err = io::Error::last_os_error().raw_os_error();
        // ECONNABORTED, ECANCELED: a request the io_uring transport held when its daemon died,
        // ended while the kernel tears the ring down (ENOTCONN from then on).
        if matches!(
            err,
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ETIMEDOUT)
        ) {
            return Ok(MountState::Stale);
        }
    }
    Ok(MountState::Live)
}

/// The server of an NFS mount, from its options (`addr=`, `port=`).
fn nfs_server(m: &MountEntry) -> Option<std::net::SocketAddr> {
    if !m.fstype.starts_with("nfs") {
        return None;
    }
    let opt = |key: &str| {
        m.options
            .split(',')
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    };
    let ip: std::net::IpAddr = opt("addr")?.parse().ok()?;
    let port: u16 = opt("port")?.parse().ok()?;
    Some(std::net::SocketAddr::new(ip, port))
}

/// The mount of ours (FUSE type `digestfs`, or an NFS mount of `localhost:/`) containing
/// `path` (absolute), as (mountpoint, path relative to it).
pub fn find_digestfs_mount(path: &Path) -> io::Result<Option<(PathBuf, PathBuf)>> {
    let best = mounts()?
        .into_iter()
        .filter(|m| {
            // Mounted directly the type is "fuse" with source "digestfs"; through fusermount3
            // it is "fuse.digestfs". Over NFS it is the export `/` of a loopback server.
            m.fstype == "fuse.digestfs"
                || (m.fstype == "fuse" && m.source == "digestfs")
                || (m.fstype == "nfs"
                    && ["localhost:/", "127.0.0.1:/", "[::1]:/"].contains(&m.source.as_str()))
        })
        .map(|m| m.mountpoint)
        .filter(|mp| path.starts_with(mp))
        .max_by_key(|mp| mp.as_os_str().len());
    Ok(best.map(|mp| {
        let rel = path
            .strip_prefix(&mp)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        (mp, rel)
    }))
}

/// Mount options of the NFS front end, besides `ro`, the version, the transport and the ports.
/// - Attribute cache: a regular file's handle names its content, so its attributes never
///   change: an hour (`acregmin=acregmax=3600`). Directories are revalidated every second
///   (`acdirmin=acdirmax=1`): a rebind changes the mtime of the namespace directories it
///   touches, and NFS has no invalidation, so this is how long a client may show an old
///   listing. Store directories never change, so this costs only a GETATTR now and then.
/// - `soft` with `timeo=50,retrans=2` (deciseconds, growing by `timeo` each retry over TCP):
///   if the daemon dies, calls fail with an error after 5 + 10 + 15 = 30 s instead of hanging
///   forever; a live daemon answers long before (a read waiting on a remote CAS fetch is
///   bounded by `--remote-timeout-ms`, 30 s by default: keep it below this).
/// - Linux: `nocto`, since content never changes, opens need no GETATTR (as FUSE's zero-message
///   opens); `nolock` and `mountproto=tcp`: the server has neither NLM nor UDP.
/// - macOS: `rdirplus` (READDIRPLUS: names and attributes in one round trip), `nolocks`,
///   `nobrowse` (not a Finder volume, so Spotlight does not crawl it), `noquota`.
///
/// Read sizes are left to the server's FSINFO (1 MiB).
const NFS_CACHE_OPTIONS: &str =
    "soft,timeo=50,retrans=2,acregmin=3600,acregmax=3600,acdirmin=1,acdirmax=1";

/// The command that mounts the NFS export `/` of the server at `addr` on `mountpoint`.
pub fn nfs_mount_command(addr: std::net::SocketAddr, mountpoint: &Path) -> std::process::Command {
    let port = addr.port();
    #[cfg(target_os = "macos")]
    let cmd = {
        // The literal address: `localhost` may resolve to ::1 first, where nothing listens.
        let host = match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let mut cmd = std::process::Command::new("mount_nfs");
        cmd.arg("-o").arg(format!(
            "ro,nolocks,vers=3,tcp,port={port},mountport={port},rdirplus,intr,noquota,nobrowse,{NFS_CACHE_OPTIONS}"
        ));
        cmd.arg(format!("{host}:/")).arg(mountpoint);
        cmd
    };
    #[cfg(not(target_os = "macos"))]
    let cmd = {
        let host = match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let mut cmd = std::process::Command::new("mount");
        cmd.args(["-t", "nfs", "-o"]).arg(format!(
            "ro,nolock,vers=3,proto=tcp,port={port},mountport={port},mountproto=tcp,nocto,{NFS_CACHE_OPTIONS}"
        ));
        cmd.arg(format!("{host}:/")).arg(mountpoint);
        cmd
    };
    cmd
}

/// Mounts the NFS export `/` of the server at `addr` on `mountpoint` (see
/// [`nfs_mount_command`]). On Linux this needs root and the `mount.nfs` helper (nfs-common).
pub fn nfs_mount(addr: std::net::SocketAddr, mountpoint: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "mounting NFS on Linux needs root; serve with --nfs-no-mount and mount by hand, \
             or use --frontend fuse",
        ));
    }
    let mut cmd = nfs_mount_command(addr, mountpoint);
    log::debug!("running {cmd:?}");
    run_unmount(&mut cmd, "the NFS mount command")
}

/// Unmounts `path`: directly when root, else through `fusermount3 -u` (Linux) or `umount`
/// (macOS). With `lazy`, detaches a busy mount instead of failing.
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let abs = absolute(path)?;
    #[cfg(target_os = "linux")]
    {
        if unsafe { libc::geteuid() } == 0 {
            let c = c_path(&abs)?;
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
        run_unmount(
            cmd.arg("--").arg(&abs),
            "fusermount3 (is the fuse3 package installed?)",
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        let mut cmd = std::process::Command::new("umount");
        if lazy {
            cmd.arg("-f");
        }
        run_unmount(cmd.arg(&abs), "umount")
    }
}

/// Runs a mount or unmount command; its stderr is the error.
fn run_unmount(cmd: &mut std::process::Command, what: &str) -> io::Result<()> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running {what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The device of the topmost FUSE mount at `mountpoint`, as the mount table has it: what names
/// its connection, whatever is mounted over or instead of it later.
#[cfg(target_os = "linux")]
pub fn fuse_device_at(mountpoint: &Path) -> io::Result<u64> {
    let abs = absolute(mountpoint)?;
    mounts()?
        .into_iter()
        .rfind(|m| m.mountpoint == abs && m.fstype.starts_with("fuse"))
        .and_then(|m| m.device)
        .ok_or_else(|| io::Error::other(format!("no FUSE mount at {}", abs.display())))
}

/// Aborts the FUSE connection mounted at `mountpoint` (the top one there): every request it
/// holds ends with an error and new ones fail at once, as when its daemon dies. Root.
#[cfg(target_os = "linux")]
pub fn abort_fuse_connection(mountpoint: &Path) -> io::Result<()> {
    abort_fuse_device(fuse_device_at(mountpoint)?)
}

/// Aborts the FUSE connection whose superblock is device `dev` (see [`fuse_device_at`]). Root.
#[cfg(target_os = "linux")]
pub fn abort_fuse_device(dev: u64) -> io::Result<()> {
    // The kernel names a connection by its superblock's device number, encoded as it does.
    let id = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
    let connections = Path::new("/sys/fs/fuse/connections");
    let abort = connections.join(id.to_string()).join("abort");
    if !abort.exists() {
        // The fusectl filesystem is not always mounted (systemd mounts it; containers may not).
        let c = |s: &str| CString::new(s).expect("no NUL");
        let (src, dir, fstype) = (c("fusectl"), c("/sys/fs/fuse/connections"), c("fusectl"));
        // SAFETY: NUL-terminated strings that outlive the call; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dir.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::other(format!(
                "mounting fusectl on {}: {e}",
                connections.display()
            )));
        }
    }
    std::fs::write(abort, "1")
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

/// The effective uid of the process at the other end of a Unix socket.
pub fn peer_uid(fd: std::os::fd::RawFd) -> io::Result<u32> {
    #[cfg(target_os = "linux")]
    {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.uid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (mut uid, mut gid) = (0, 0);
        if unsafe { libc::getpeereid(fd, &mut uid, &mut gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(uid)
    }
}

/// The termination signals, blocked in the calling thread and every thread it spawns later,
/// so that one dedicated thread takes them with [`wait_for_signal`]. Call it before starting
/// any thread.
pub fn block_termination_signals() -> SignalSet {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        SignalSet(set)
    }
}

/// The signals [`block_termination_signals`] blocked.
#[derive(Clone, Copy)]
pub struct SignalSet(libc::sigset_t);

// A sigset_t is plain data.
unsafe impl Send for SignalSet {}

/// Waits for one of the blocked signals; returns its number.
pub fn wait_for_signal(set: &SignalSet) -> i32 {
    loop {
        let mut sig = 0;
        if unsafe { libc::sigwait(&set.0, &mut sig) } == 0 {
            return sig;
        }
    }
}

/// Marks every file descriptor of this process above stderr close-on-exec, so that a program
/// it starts next inherits none of them: descriptors this process was itself given by its
/// caller (a pipe the caller reads to its end, say) would otherwise outlive it in a daemon.
pub fn cloexec_inherited_fds() -> io::Result<()> {
    let dir = if cfg!(target_os = "linux") {
        "/proc/self/fd"
    } else {
        "/dev/fd"
    };
    let fds: Vec<i32> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // The directory's own descriptor is closed by now: EBADF, nothing to do.
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

/// Takes an exclusive `flock` on the directory `dir`, waiting for it; released when the
/// returned handle is dropped.
pub fn lock_dir(dir: &Path) -> io::Result<std::fs::File> {
    let f = std::fs::File::open(dir)?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// The address ranges where this process maps files whose path satisfies `which` (Linux reads
/// /proc/self/maps; elsewhere there are none to report).
pub fn file_mappings(which: impl Fn(&str) -> bool) -> Vec<(usize, usize)> {
    #[cfg(target_os = "linux")]
    {
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return Vec::new();
        };
        // Fields: range, perms, offset, device, inode, then the path (which may hold spaces).
        let path = |line: &str| {
            let mut rest = line;
            for _ in 0..5 {
                rest = rest.trim_start().split_once(' ').map_or("", |(_, r)| r);
            }
            rest.trim_start().to_string()
        };
        maps.lines()
            .filter(|l| which(&path(l)))
            .filter_map(|l| {
                let (a, b) = l.split(' ').next()?.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .collect()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = which;
        Vec::new()
    }
}

/// statfs(2) of `path`, for whether a filesystem answers (FUSE never answers it from a cache).
pub fn statfs(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `madvise` over `[start, end)`; advice only, so failure changes nothing.
pub fn advise_range((start, end): (usize, usize), advice: libc::c_int) {
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
}

/// Keeps large heap blocks out of the heap. glibc raises its mmap threshold to the largest block
/// freed so far, so once the inode table has doubled a few times, its old arrays (MiBs each)
/// are freed into the heap and stay resident. A fixed 2 MiB, above the largest read buffer
/// (1 MiB), maps and unmaps those blocks on their own and keeps every per-request buffer on the
/// heap. Measured with 100,000 entries walked: 36 MiB of the daemon's own memory, 27 MiB with it.
pub fn limit_heap_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
    }
}

/// Returns the heap's free pages to the system (glibc keeps them for reuse otherwise).
pub fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends `payload` with `fd` attached (`SCM_RIGHTS`) on the connected socket `sock`.
pub fn send_with_fd(sock: BorrowedFd<'_>, payload: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let sent = one_fd_message(
        payload.as_ptr() as *mut libc::c_void,
        payload.len(),
        |msg| {
            // SAFETY: the control buffer holds one cmsghdr with room for one fd (CMSG_SPACE);
            // sendmsg only reads the payload.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
                libc::sendmsg(sock.as_raw_fd(), msg, SEND_FLAGS)
            }
        },
    );
    match usize::try_from(sent) {
        Ok(n) if n == payload.len() => Ok(()),
        Ok(n) => Err(io::Error::other(format!(
            "sent {n} of {} bytes",
            payload.len()
        ))),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// Receives into `buf` on `sock`, with the fd sent along, if any (close-on-exec): how many
/// bytes came (0 at the end of the stream), and the fd.
#[cfg(target_os = "linux")]
pub fn recv_with_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<std::os::fd::OwnedFd>)> {
    use std::os::fd::FromRawFd;
    one_fd_message(buf.as_mut_ptr().cast(), buf.len(), |msg| {
        let n = loop {
            let n = unsafe { libc::recvmsg(sock.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC) };
            let e = io::Error::last_os_error();
            if n >= 0 || e.kind() != io::ErrorKind::Interrupted {
                break if n < 0 { Err(e) } else { Ok(n as usize) };
            }
        }?;
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("the fd did not fit (MSG_CTRUNC)"));
        }
        let mut fd = None;
        // SAFETY: the kernel filled `msg_controllen` bytes of the buffer with cmsghdrs.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                    fd = Some(std::os::fd::OwnedFd::from_raw_fd(raw));
                }
                c = libc::CMSG_NXTHDR(msg, c);
            }
        }
        Ok((n, fd))
    })
}

/// Runs `call` on a message over `len` bytes at `buf`, with room for one fd's control message.
fn one_fd_message<R>(
    buf: *mut libc::c_void,
    len: usize,
    call: impl FnOnce(&mut libc::msghdr) -> R,
) -> R {
    let mut iov = libc::iovec {
        iov_base: buf,
        iov_len: len,
    };
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // u64s, for the alignment a cmsghdr needs.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    call(&mut msg)
}

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

/// Whether stderr is a pipe (someone reads it to its end).
pub fn stderr_is_pipe() -> bool {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(2, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO }
}

/// Runs `cmd` and returns its stdout, or an error if it fails, or does not end within `limit`
/// (then it is killed).
pub fn output_within(mut cmd: std::process::Command, limit: Duration) -> io::Result<String> {
    use std::io::Read;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", limit.as_secs_f32()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = reader
        .join()
        .map_err(|_| io::Error::other("reading its output failed"))??;
    if !status.success() {
        return Err(io::Error::other(format!("it exited with {status}")));
    }
    Ok(out)
}
