//! What a daemon says to systemd and asks of it, when a unit runs it: readiness and the main
//! pid (sd_notify), the unit's file descriptor store (`FDSTORE=1`, handed back at the next
//! start as `LISTEN_FDS`), and whether the stop under way is a restart. No FUSE here: the
//! front end decides what to store ([`crate::fuse`]'s `restart`).
//!
//! Outside a unit (no `NOTIFY_SOCKET`, no `LISTEN_PID` of ours) every call is a no-op, and on
//! other systems too.

use std::os::fd::{BorrowedFd, OwnedFd};

/// Tells systemd `msg` (`READY=1`, `MAINPID=…`), if it listens (`NOTIFY_SOCKET`: a Type=notify
/// unit's process).
pub fn notify(msg: &str) {
    if let Err(e) = send(msg, None) {
        log::warn!("could not notify systemd ({msg:?}): {e}");
    }
}

/// Puts `fd` in the unit's file descriptor store under `name` (at most 255 printable
/// characters, no `:`), replacing nothing: systemd keeps one copy of an open file however often
/// it is stored. Needs `FileDescriptorStoreMax=` in the unit; without it systemd drops the fd
/// and logs why.
pub fn store_fd(name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    send(&format!("FDSTORE=1\nFDNAME={name}\n"), Some(fd))
}

/// Takes the fds stored under `name` out of the unit's store (those this process was given
/// stay open here).
pub fn remove_stored(name: &str) {
    if let Err(e) = send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), None) {
        log::warn!("could not take {name} out of systemd's fd store: {e}");
    }
}

/// Whether systemd runs this process as a unit that may listen (`NOTIFY_SOCKET`).
pub fn under_unit() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

#[cfg(target_os = "linux")]
fn send(msg: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.connect_addr(&addr)?;
    match fd {
        Some(fd) => crate::os::send_with_fd(socket.as_fd(), msg.as_bytes(), fd),
        None => socket.send(msg.as_bytes()).map(drop),
    }
}

#[cfg(not(target_os = "linux"))]
fn send(_msg: &str, _fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    Ok(())
}

/// The fds systemd gave this process at its start (`LISTEN_FDS`, from the fd store or socket
/// activation), with their names (`LISTEN_FDNAMES`). Once per process: later calls get none,
/// and the variables are ignored when they were meant for another process (`LISTEN_PID`).
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    use std::os::fd::FromRawFd;
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let var = |name| std::env::var(name).ok();
    let ours = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    if !ours || TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Vec::new();
    }
    let count = var("LISTEN_FDS")
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (0..count.clamp(0, 1024))
        .map(|i| {
            let raw = 3 + i;
            // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process (LISTEN_PID), and this
            // is their one owner (TAKEN). Not inherited by what it starts.
            unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
            let name = names.next().unwrap_or("unknown").to_string();
            (name, unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .collect()
}

/// Whether the stop this process was told to make (SIGTERM) is the stop half of a restart
/// (`systemctl restart`, `try-restart`, `reload-or-restart` without a reload): a job of type
/// `restart` runs for this process's unit. Asked of systemctl, which answers within
/// `limit` or is taken to say no (a stop), as is any doubt: a stop unmounts, which is what a
/// daemon did before it could tell.
pub fn restart_pending(limit: std::time::Duration) -> bool {
    let Some(unit) = own_unit() else {
        return false;
    };
    let mut cmd = std::process::Command::new("systemctl");
    // Only a user manager sets MANAGERPID in its services' environment.
    if std::env::var_os("MANAGERPID").is_some() {
        cmd.arg("--user");
    }
    cmd.args([
        "list-jobs",
        "--no-legend",
        "--plain",
        "--full",
        "--no-pager",
    ])
    .stdin(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let jobs = match crate::os::output_within(cmd, limit) {
        Ok(out) => out,
        Err(e) => {
            log::warn!("asking systemd whether {unit} restarts: {e}; taking it for a stop");
            return false;
        }
    };
    let restarting = restart_listed(&jobs, &unit);
    log::debug!("{unit}: restart job listed: {restarting}");
    restarting
}

/// Whether `systemctl list-jobs --plain --no-legend` lists a restart of `unit` (lines of
/// `ID UNIT TYPE STATE`).
fn restart_listed(jobs: &str, unit: &str) -> bool {
    jobs.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(unit) && fields.next() == Some("restart")
    })
}

/// The unit this process runs in, from its cgroup (systemd names the cgroup after the unit).
fn own_unit() -> Option<String> {
    if !under_unit() {
        return None;
    }
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroups(&cgroups)
}

/// The unified hierarchy's line (`0::/…/x.service`), else the named systemd one (cgroup v1).
fn unit_of_cgroups(cgroups: &str) -> Option<String> {
    let path = |prefix: &str| {
        cgroups
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_string)
    };
    let unit_in = |path: String| {
        path.rsplit('/')
            .find(|c| c.ends_with(".service"))
            .map(str::to_string)
    };
    path("0::").and_then(unit_in).or_else(|| {
        cgroups
            .lines()
            .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p.to_string()))
            .and_then(unit_in)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_is_read_from_either_hierarchy() {
        let v2 = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/digestfs@x.service\n";
        assert_eq!(unit_of_cgroups(v2).as_deref(), Some("digestfs@x.service"));
        let hybrid = "9:name=systemd:/app.slice/digestfs@a\\x2db.service\n0::/\n";
        assert_eq!(
            unit_of_cgroups(hybrid).as_deref(),
            Some("digestfs@a\\x2db.service")
        );
        assert_eq!(unit_of_cgroups("0::/init.scope\n"), None);
    }

    #[test]
    fn only_a_restart_of_this_unit_counts() {
        let jobs = "31 digestfs@m.service restart running\n32 other.service restart waiting\n";
        assert!(restart_listed(jobs, "digestfs@m.service"));
        assert!(!restart_listed(jobs, "digestfs@n.service"));
        assert!(!restart_listed(
            "46 digestfs@m.service stop running\n",
            "digestfs@m.service"
        ));
        assert!(!restart_listed("", "digestfs@m.service"));
    }
}
