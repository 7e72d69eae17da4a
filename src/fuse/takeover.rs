//! Handing a live mount to the next daemon (`mount --takeover`), for upgrades and restarts
//! without an unmount: the /dev/fuse connection (its fd, over the control socket with
//! `SCM_RIGHTS`) and the inodes the kernel holds. The views travel through the views file the
//! old daemon keeps current (binds are refused during a takeover, with `unavailable`).
//!
//! The conversation, on one control connection opened by the new daemon:
//! 1. new → old: `{"v":1,"op":"takeover","format":F,"version":…,"mountpoint":…,"store":…}`.
//!    The old daemon refuses (a JSON reply, as to any request) a format other than its own,
//!    another mountpoint or store, a mount it cannot hand over (io-uring, passthrough, NFS), or
//!    one whose requests it cannot finish within [`STOP_LIMIT`]. Else it refuses binds
//!    (`unavailable`: retry), stops reading /dev/fuse between requests, and sends one byte
//!    carrying the fd, then a [`Handover`] line.
//! 2. new: restores the views and inodes, readies everything but its readers and its control
//!    socket, then sends `{"step":"ready","pid":…}`.
//! 3. old → new: `{"step":"go"}` (after naming the new daemon a systemd unit's main process,
//!    under one), and the old daemon exits without unmounting. The new one starts reading.
//!    Nothing read was left unanswered, so no reader waits on a request lost in between; what
//!    arrived meanwhile waits in the kernel's queue.
//!
//! Until the old daemon says go, it can take everything back: a new daemon that fails, closes
//! the connection or stays silent for [`STEP_LIMIT`] leaves it serving as before.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::protocol::{ErrorKind, Response};
use crate::fs::{DigestFs, SlotRecord};

/// The handover's format: a daemon takes over only from one that speaks the same.
pub const FORMAT: u32 = super::TAKEOVER_FORMAT;
/// How long the old daemon waits for the requests it is answering before it refuses.
pub const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How long either side waits for the other's next step; the mount's requests wait as long.
pub const STEP_LIMIT: Duration = Duration::from_secs(30);
/// The byte that carries the fd; a refusal starts with `{` instead.
const FD_BYTE: u8 = b'F';

/// What the old daemon hands over besides the fd.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub format: u32,
    /// The old daemon's version and pid, for the log.
    pub version: String,
    pub pid: u32,
    /// The mount's device.
    pub device: u64,
    /// The largest request payload the connection was set up for at INIT (its max_write).
    pub max_payload: usize,
    /// How many views the daemon serves (in its views file), and their digest
    /// ([`crate::control::state::views_digest`]): the new one restores the very same.
    pub views: usize,
    pub views_digest: String,
    pub inodes: Vec<SlotRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
enum Step {
    Ready { pid: u32 },
    Go,
}

/// What the new daemon serves, which must be what the old one serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serves {
    /// Absolute.
    pub mountpoint: PathBuf,
    /// Absolute.
    pub store: PathBuf,
}

fn write_line(mut stream: &UnixStream, value: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn read_line(reader: &mut impl BufRead, what: &str) -> io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the other daemon closed the connection before {what}"),
        ));
    }
    Ok(line)
}

// ---- the daemon that gives -------------------------------------------------------------------

/// Sends `fuse` and `handover` to the daemon at the other end of `stream`, which asked for them,
/// and waits until it is ready. `Ok` once it was told to go: the caller must exit at once,
/// leaving the mount, the views file and the control socket to it. `Err` if it did not take
/// them: the caller goes on serving.
pub fn give(stream: &UnixStream, fuse: BorrowedFd<'_>, handover: &Handover) -> io::Result<()> {
    stream.set_read_timeout(Some(STEP_LIMIT))?;
    stream.set_write_timeout(Some(STEP_LIMIT))?;
    crate::os::send_with_fd(stream.as_fd(), &[FD_BYTE], fuse)?;
    write_line(stream, handover)?;
    let line = read_line(&mut BufReader::new(stream), "it was ready")?;
    match serde_json::from_str::<Step>(&line) {
        Ok(Step::Ready { pid }) => {
            // This process may be a systemd unit's main one (the unit's reload runs the
            // takeover): the unit lives on in the new daemon, not with this one.
            crate::systemd::notify(&format!("MAINPID={pid}\n"));
            let go = write_line(stream, &Step::Go);
            if go.is_err() {
                // Not gone after all: the unit is this process again.
                let me = std::process::id();
                crate::systemd::notify(&format!("MAINPID={me}\n"));
            }
            go
        }
        _ => Err(io::Error::other(format!(
            "the new daemon sent {:?} where ready was due",
            line.trim_end()
        ))),
    }
}

/// Why a takeover did not happen.
pub enum Kept {
    /// Refused before the readers stopped: they go on.
    Serving(String),
    /// The readers stopped for it: the caller starts them again.
    Stopped(String),
}

impl Kept {
    pub fn why(&self) -> &str {
        match self {
            Kept::Serving(why) | Kept::Stopped(why) => why,
        }
    }
}

/// Hands the mount at `mountpoint`, served by `dev` on `fuse`, to the daemon that sent
/// `request`: [`freeze`], then give. `Ok` once the new daemon is ready: the caller exits at
/// once.
pub fn hand_over(
    dev: &super::dev::DevLoop,
    request: &UnixStream,
    fuse: BorrowedFd<'_>,
    core: &DigestFs,
    mountpoint: &Path,
    max_payload: usize,
) -> Result<(), Kept> {
    let handover = freeze(dev, core, mountpoint, max_payload).inspect_err(|kept| {
        let refusal = Response::refused(ErrorKind::Unavailable, kept.why().to_string());
        let _ = write_line(request, &refusal);
    })?;
    // Binds stay closed once it is given: the next daemon has the views.
    give(request, fuse, &handover).map_err(|e| {
        core.close_binds(false);
        Kept::Stopped(format!("the new daemon did not take over: {e}"))
    })
}

/// Readies the mount at `mountpoint` for the next daemon: refuses binds (a bind under way ends
/// first) and stops the readers between requests, so that nothing read is left unanswered.
/// What the next daemon needs besides the fd; binds stay refused. After an error binds are
/// open again, and the readers stopped only if it says so.
pub fn freeze(
    dev: &super::dev::DevLoop,
    core: &DigestFs,
    mountpoint: &Path,
    max_payload: usize,
) -> Result<Handover, Kept> {
    let device = crate::os::fuse_device_at(mountpoint).map_err(|e| {
        Kept::Serving(format!(
            "the mount's device: {e} (is {} still mounted here?)",
            mountpoint.display()
        ))
    })?;
    core.close_binds(true);
    if !dev.stop_within(STOP_LIMIT) {
        core.close_binds(false);
        return Err(Kept::Stopped(format!(
            "requests were still being answered after {} s; try again",
            STOP_LIMIT.as_secs()
        )));
    }
    Ok(Handover {
        format: FORMAT,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        device,
        max_payload,
        views: core.namespace().views().len(),
        views_digest: crate::control::state::views_digest(&core.namespace()),
        inodes: core.export_inodes(),
    })
}

// ---- the daemon that takes -------------------------------------------------------------------

/// A connection received, not yet served.
pub struct Taken {
    pub fuse: OwnedFd,
    pub handover: Handover,
    /// To the daemon that gave it; none when it came from systemd's fd store (a restart).
    stream: Option<UnixStream>,
    /// This daemon's control socket, and where it goes at go.
    socket: Option<(PathBuf, PathBuf)>,
}

/// Asks the daemon behind `socket` for its mount, which must be `serves`. The error says why
/// it was not given: the old daemon's refusal, or what failed on the way.
pub fn take(socket: &Path, serves: &Serves) -> Result<Taken, String> {
    let failed = |e: io::Error| format!("taking over through {}: {e}", socket.display());
    let stream = UnixStream::connect(socket).map_err(failed)?;
    // As every client: nothing is sent to a daemon of another user.
    let uid = crate::os::peer_uid(stream.as_raw_fd()).map_err(failed)?;
    if uid != unsafe { libc::geteuid() } {
        return Err(format!(
            "the daemon behind {} runs as uid {uid}, not as you",
            socket.display()
        ));
    }
    stream.set_read_timeout(Some(STEP_LIMIT)).map_err(failed)?;
    stream.set_write_timeout(Some(STEP_LIMIT)).map_err(failed)?;
    let request = serde_json::json!({
        "v": crate::control::protocol::VERSION,
        "op": "takeover",
        "format": FORMAT,
        "version": env!("CARGO_PKG_VERSION"),
        "mountpoint": serves.mountpoint,
        "store": serves.store,
    });
    write_line(&stream, &request).map_err(failed)?;
    let mut first = [0u8];
    let (n, fd) = crate::os::recv_with_fd(stream.as_fd(), &mut first).map_err(failed)?;
    if n == 0 {
        return Err(failed(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the running daemon closed the connection without an answer",
        )));
    }
    let first = first[0];
    let mut reader = BufReader::new(stream.try_clone().map_err(failed)?);
    let Some(fuse) = fd.filter(|_| first == FD_BYTE) else {
        // A refusal: a control reply, whose first byte came with the recvmsg.
        let rest = read_line(&mut reader, "its answer").map_err(failed)?;
        let line = format!("{}{rest}", first as char);
        let reason = serde_json::from_str::<crate::control::protocol::Response>(&line)
            .ok()
            .and_then(|r| r.error)
            .unwrap_or_else(|| format!("unexpected answer {:?}", line.trim_end()));
        return Err(format!("the running daemon refused the takeover: {reason}"));
    };
    let line = read_line(&mut reader, "the handover").map_err(failed)?;
    let handover: Handover =
        serde_json::from_str(&line).map_err(|e| failed(io::Error::other(e)))?;
    if handover.format != FORMAT {
        return Err(format!(
            "the running daemon (digestfs {}) handed over format {}, not {FORMAT}",
            handover.version, handover.format
        ));
    }
    Ok(Taken {
        fuse,
        handover,
        stream: Some(stream),
        socket: None,
    })
}

impl Taken {
    /// A connection the daemon before this one left in systemd's fd store, with its handover
    /// (`super::restart`): nobody to tell at go.
    pub(super) fn stored(fuse: OwnedFd, handover: Handover) -> Taken {
        Taken {
            fuse,
            handover,
            stream: None,
            socket: None,
        }
    }

    /// Whether the daemon that gave it still runs, keeping its control socket until go.
    pub fn from_running_daemon(&self) -> bool {
        self.stream.is_some()
    }

    /// At [`Taken::go`], this daemon's control socket, listening at `next`, takes the place of
    /// the running daemon's at `socket`.
    pub fn swap_socket_at_go(&mut self, next: &Path, socket: &Path) {
        self.socket = Some((next.to_path_buf(), socket.to_path_buf()));
    }

    /// Everything is ready but the readers: asks the old daemon to go, and returns once it said
    /// it goes (it exits right after, without unmounting), this daemon's control socket in the
    /// place of its. After an error the old daemon goes on serving, its socket untouched.
    pub fn go(&self) -> Result<(), String> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        let failed = |e: io::Error| format!("taking over from pid {}: {e}", self.handover.pid);
        ready_and_go(stream).map_err(failed)?;
        // The old daemon no longer answers there: clients that find its socket meanwhile are
        // refused, as by a daemon restarting, and retry.
        if let Some((next, socket)) = &self.socket {
            if let Err(e) = std::fs::rename(next, socket) {
                log::error!(
                    "control socket: moving {} to {}: {e}",
                    next.display(),
                    socket.display()
                );
            }
        }
        Ok(())
    }
}

fn ready_and_go(stream: &UnixStream) -> io::Result<()> {
    let ready = Step::Ready {
        pid: std::process::id(),
    };
    write_line(stream, &ready)?;
    let line = read_line(&mut BufReader::new(stream), "it said go")?;
    match serde_json::from_str::<Step>(&line) {
        Ok(Step::Go) => Ok(()),
        _ => Err(io::Error::other(format!(
            "it sent {:?} where go was due",
            line.trim_end()
        ))),
    }
}
