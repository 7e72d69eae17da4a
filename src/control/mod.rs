//! The control socket the build daemon talks to: bind, unbind, views, status, which. One Unix
//! socket per mount, mode 0600 in a 0700 directory, and peers of another uid are refused
//! (SO_PEERCRED) even if the file modes were loosened.

pub mod protocol;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use self::protocol::*;
use crate::fs::{DigestFs, Node};
use crate::store::Digest;

const MAX_CLIENTS: usize = 64;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory for control sockets: `$XDG_RUNTIME_DIR/digestfs`, else `/run/digestfs` for
/// root, else `/tmp/digestfs-<uid>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("digestfs");
    }
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/digestfs")
    } else {
        PathBuf::from(format!("/tmp/digestfs-{uid}"))
    }
}

/// The default socket of the mount at `mountpoint` (an absolute path): the first 16 hex digits
/// of the sha256 of the path, so any client can find it from the mountpoint alone.
pub fn default_socket(mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let hash = Sha256::digest(mountpoint.as_os_str().as_bytes());
    runtime_dir().join(format!("{}.sock", &hex::encode(hash)[..16]))
}

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds the socket, replacing one left by a dead daemon but never one that answers.
    pub fn bind(path: &Path) -> io::Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            if dir.ends_with("digestfs")
                || dir
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("digestfs-"))
            {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "control socket {} is in use by a live daemon",
                        path.display()
                    ),
                ));
            }
            log::info!("removing the stale control socket {}", path.display());
            std::fs::remove_file(path)?;
        }
        // The umask makes the socket 0600 from its creation; chmod alone would leave a window.
        let old = unsafe { libc::umask(0o177) };
        let res = UnixListener::bind(path);
        unsafe { libc::umask(old) };
        Ok(Server {
            listener: res?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections on background threads for as long as the process lives.
    pub fn spawn(self, core: Arc<DigestFs>, info: MountInfo) -> io::Result<()> {
        let info = Arc::new(info);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let active = Arc::new(AtomicUsize::new(0));
                for conn in self.listener.incoming() {
                    let stream = match conn {
                        Ok(s) => s,
                        Err(e) => {
                            log::warn!("control socket: {e}");
                            continue;
                        }
                    };
                    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                        active.fetch_sub(1, Ordering::SeqCst);
                        let _ = reply(&stream, &Response::error("too many control connections"));
                        continue;
                    }
                    let (core, info, active) = (core.clone(), info.clone(), active.clone());
                    let spawned = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_conn(&stream, &core, &info) {
                                log::debug!("control connection ended: {e}");
                            }
                            active.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        log::warn!("control socket: could not start a connection thread");
                    }
                }
            })?;
        Ok(())
    }
}

/// What `status` reports about the mount itself.
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub store: PathBuf,
    pub started: Instant,
    pub remote: Option<std::sync::Arc<crate::remote::Remote>>,
}

fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
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

fn reply(mut stream: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve_conn(stream: &UnixStream, core: &DigestFs, info: &MountInfo) -> io::Result<()> {
    let uid = peer_uid(stream)?;
    let me = unsafe { libc::geteuid() };
    if uid != me {
        log::warn!("control socket: refused a client with uid {uid}");
        return reply(
            stream,
            &Response::error(format!(
                "permission denied: uid {uid} does not own this mount"
            )),
        );
    }
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let msg = if line.len() > MAX_LINE {
                format!("request longer than {MAX_LINE} bytes; closing")
            } else {
                "request not terminated by a newline; closing".to_string()
            };
            return reply(stream, &Response::error(msg));
        }
        let resp = match parse_request(&line) {
            Ok(req) => handle(core, info, req),
            Err(e) => Response::error(e),
        };
        reply(stream, &resp)?;
    }
}

/// Carries out one request against the filesystem core.
pub fn handle(core: &DigestFs, info: &MountInfo, req: Request) -> Response {
    let changed = |res: Result<crate::fs::Change, String>| match res {
        Ok(change) => Response {
            changed: Some(change.changed),
            ..Response::ok()
        },
        Err(e) => Response::error(e),
    };
    match req {
        Request::Ping => Response::ok(),
        Request::Bind {
            path,
            digest,
            layer,
            verify,
        } => match digest.parse::<Digest>() {
            Ok(d) => {
                let res = core.bind(&path, &layer, d, verify);
                match &res {
                    Ok(c) if !c.entries.is_empty() => {
                        log::info!("bound {d} at {path} (layer {layer})")
                    }
                    Err(e) => log::warn!("bind of {d} at {path} refused: {e}"),
                    _ => {}
                }
                changed(res)
            }
            Err(e) => Response::error(e.to_string()),
        },
        Request::Unbind { path, layer } => {
            let res = core.unbind(&path, layer.as_deref());
            if res.is_ok() {
                log::info!(
                    "unbound {path}{}",
                    layer
                        .as_ref()
                        .map(|l| format!(" (layer {l})"))
                        .unwrap_or_default()
                );
            }
            changed(res)
        }
        Request::Views => Response {
            views: Some(
                core.namespace()
                    .views()
                    .into_iter()
                    .map(|(path, view)| ViewInfo {
                        entries: core.entry_count(&view.node()),
                        layers: view
                            .layers
                            .iter()
                            .map(|(l, d)| (l.clone(), d.to_string()))
                            .collect(),
                        path,
                    })
                    .collect(),
            ),
            ..Response::ok()
        },
        Request::Status => {
            let s = &core.stats;
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            Response {
                status: Some(StatusInfo {
                    pid: std::process::id(),
                    mountpoint: info.mountpoint.display().to_string(),
                    store: info.store.display().to_string(),
                    uptime_secs: info.started.elapsed().as_secs(),
                    requests: load(&s.requests),
                    lookups: load(&s.lookups),
                    opens: load(&s.opens),
                    reads: load(&s.reads),
                    read_bytes: load(&s.read_bytes),
                    errors: load(&s.errors),
                    open_handles: core.open_handles() as u64,
                    inodes: core.inode_count() as u64,
                    cached_dir_entries: core.cached_entries() as u64,
                    views: core.namespace().views().len() as u64,
                    lease_rounds: load(&s.lease_rounds),
                    lease_last_unix: load(&s.lease_last_unix),
                    lease_last_renewed: load(&s.lease_last_renewed),
                    lease_last_missing: load(&s.lease_last_missing),
                    verified_dirs: load(&s.verified_dirs),
                    remote: info.remote.as_ref().map(|r| r.status()),
                }),
                ..Response::ok()
            }
        }
        Request::Which { path } => match core.resolve(&path) {
            Ok(node) => Response {
                which: Some(match node {
                    Node::File { digest, executable } => WhichInfo::File {
                        digest: digest.to_string(),
                        executable,
                    },
                    Node::Tree(d) => WhichInfo::Tree {
                        digest: d.to_string(),
                    },
                    Node::Merged(ds) => WhichInfo::Merged {
                        digests: ds.iter().map(|d| d.to_string()).collect(),
                    },
                    Node::Symlink(t) => WhichInfo::Symlink {
                        target: t.to_string(),
                    },
                    _ => WhichInfo::Mount,
                }),
                ..Response::ok()
            },
            Err(e) => Response::error(format!("{path}: {e}")),
        },
    }
}

/// Sends one request to the daemon behind `socket` and returns its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Response, String> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the daemon at {}: {e} (is the mount live, and is it yours?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    let mut line = encode_request(req);
    line.push('\n');
    // A daemon that refuses a peer answers at once and hangs up, so a failed write may still
    // leave its answer to read.
    let written = (&stream).write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        return Err(match (written, read) {
            (Err(e), _) => format!("sending the request: {e}"),
            (_, Err(e)) => format!("reading the daemon's answer: {e}"),
            _ => "the daemon closed the connection without answering".into(),
        });
    }
    serde_json::from_str(&answer).map_err(|e| format!("unreadable answer from the daemon: {e}"))
}
