//! The control socket the build daemon talks to: bind, unbind, views, status, which. One Unix
//! socket per mount, mode 0600 in a 0700 directory the user owns; peers of another uid are
//! refused (their uid read from the socket), and clients likewise refuse a socket served by
//! another uid before they send anything.

pub mod protocol;
pub mod state;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use self::protocol::*;
use crate::cas::ReadError;
use crate::fs::{BindError, DigestFs, NamespaceError, Node};
use crate::lease::LeaseStats;
use crate::os;
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

fn user_name(uid: u32) -> String {
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return format!("uid {uid}");
    }
    let name = unsafe { std::ffi::CStr::from_ptr((*pw).pw_name) }.to_string_lossy();
    format!("{name} (uid {uid})")
}

/// Makes sure `dir`, a directory for our sockets, exists, is ours and is private (0700). In a
/// shared `/tmp` another user could have created it first; then we refuse, naming the owner,
/// rather than put a socket where they could replace it.
pub fn prepare_socket_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_dir() || meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the socket directory {} {} {}, not by you ({}); someone may be trying to \
                 intercept the control socket. Remove it (sudo rm -r {}), or set \
                 XDG_RUNTIME_DIR to a private directory",
                dir.display(),
                if meta.file_type().is_dir() {
                    "is owned by"
                } else {
                    "is not a directory; it is owned by"
                },
                user_name(meta.uid()),
                user_name(me),
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds the socket, replacing one left by a dead daemon but never one that answers. The
    /// default socket directory is created private, or refused if another user owns it.
    pub fn bind(path: &Path) -> io::Result<Server> {
        if let Some(dir) = path.parent() {
            if dir == runtime_dir() {
                prepare_socket_dir(dir)?;
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
    pub fn spawn(self, core: Arc<DigestFs>, info: Arc<MountInfo>) -> io::Result<()> {
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
                        let _ = reply(
                            &stream,
                            &Response::refused(
                                ErrorKind::Unavailable,
                                "too many control connections",
                            ),
                        );
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

/// Whether the daemon's own mount is at its mountpoint, as `status` reports it: the daemon
/// answers for its mount, so clients need not read the mount table themselves.
pub struct Attachment {
    mountpoint: PathBuf,
    /// `None` until the front end is ready; then what identifies its mount (`None` inside:
    /// serving without one).
    mount: Mutex<Option<Option<os::MountId>>>,
}

impl Attachment {
    pub fn new(mountpoint: PathBuf) -> Attachment {
        Attachment {
            mountpoint,
            mount: Mutex::new(None),
        }
    }

    /// The front end is ready, with this mount (or none).
    pub fn ready(&self, id: Option<os::MountId>) {
        *self.mount.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// `mount_state` and `attached` for `status`.
    pub fn state(&self) -> (&'static str, bool) {
        let mount = *self.mount.lock().unwrap_or_else(|p| p.into_inner());
        match mount {
            None => (MOUNT_STARTING, false),
            Some(None) => (MOUNT_NONE, false),
            Some(Some(id)) => match os::is_attached(&self.mountpoint, id) {
                Ok(true) => (MOUNT_ATTACHED, true),
                Ok(false) => (MOUNT_DETACHED, false),
                Err(e) => {
                    log::warn!("reading the mount table: {e}");
                    (MOUNT_DETACHED, false)
                }
            },
        }
    }
}

/// What `status` reports about the mount itself.
pub struct MountInfo {
    pub mountpoint: PathBuf,
    /// Absolute.
    pub store: PathBuf,
    pub started: Instant,
    pub remote: Option<Arc<crate::remote::Remote>>,
    pub leases: Option<Arc<LeaseStats>>,
    /// The NFS front end's port, when it serves one.
    pub nfs_port: Option<u16>,
    pub frontend: &'static str,
    /// The FUSE transport in use, once the session is up.
    pub transport: Arc<crate::fuse::TransportInfo>,
    pub attachment: Arc<Attachment>,
    /// Where `--metrics-listen` serves `/metrics`.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where a takeover request goes (`mount --takeover`).
    pub takeover: Arc<crate::fuse::TakeoverDoor>,
}

fn reply(mut stream: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve_conn(stream: &UnixStream, core: &DigestFs, info: &MountInfo) -> io::Result<()> {
    let uid = os::peer_uid(stream.as_raw_fd())?;
    let me = unsafe { libc::geteuid() };
    if uid != me {
        log::warn!("control socket: refused a client with uid {uid}");
        return reply(
            stream,
            &Response::bad_request(format!(
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
            return reply(stream, &Response::bad_request(msg));
        }
        let resp = match parse_request(&line) {
            Ok(Request::Takeover {
                format,
                version,
                mountpoint,
                store,
            }) => match takeover(stream, info, format, &version, (&mountpoint, &store)) {
                Ok(()) => return Ok(()),
                Err(refusal) => *refusal,
            },
            Ok(req) => handle(core, info, req),
            Err(e) => Response::bad_request(e),
        };
        reply(stream, &resp)?;
    }
}

/// Passes a takeover request to the serving loop, which carries on the conversation on this
/// connection; the refusal to reply with if it cannot.
fn takeover(
    stream: &UnixStream,
    info: &MountInfo,
    format: u32,
    version: &str,
    (mountpoint, store): (&Path, &Path),
) -> Result<(), Box<Response>> {
    let refused = |why: String| {
        log::warn!("refused a takeover by digestfs {version}: {why}");
        Box::new(Response::refused(ErrorKind::BadRequest, why))
    };
    if format != crate::fuse::TAKEOVER_FORMAT {
        return Err(refused(format!(
            "this daemon (digestfs {}) hands over in format {}, not {format}; unmount and mount again instead",
            env!("CARGO_PKG_VERSION"),
            crate::fuse::TAKEOVER_FORMAT
        )));
    }
    if mountpoint != info.mountpoint || store != info.store {
        return Err(refused(format!(
            "this daemon serves {} from the store {}, not {} from {}",
            info.mountpoint.display(),
            info.store.display(),
            mountpoint.display(),
            store.display()
        )));
    }
    let conn = stream.try_clone().map_err(|e| refused(e.to_string()))?;
    log::info!("digestfs {version} asks to take the mount over");
    info.takeover
        .enter(crate::fuse::Successor::Daemon(conn))
        .map_err(refused)
}

/// The kind of a failure to read a tree.
fn read_error_kind(e: &ReadError) -> ErrorKind {
    if e.is_missing() {
        ErrorKind::Missing
    } else if e.is_unavailable() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    }
}

/// A refused bind or unbind, classified by its type (never by its text).
pub fn bind_refusal(e: &BindError) -> Response {
    let kind = match e {
        BindError::Path(_) | BindError::NoLayer { .. } => ErrorKind::BadRequest,
        BindError::Held { .. } => ErrorKind::Conflict,
        BindError::Namespace(NamespaceError::NotBound { .. }) => ErrorKind::BadRequest,
        BindError::Namespace(_) | BindError::Conflict(_) => ErrorKind::Conflict,
        BindError::Tree(r) => read_error_kind(r),
        BindError::Closed => ErrorKind::Unavailable,
    };
    Response::refused(kind, e.to_string())
        .about_digest(e.digest().map(|d| d.to_string()))
        .about_path(e.path().map(str::to_string))
}

/// Carries out one request against the filesystem core.
pub fn handle(core: &DigestFs, info: &MountInfo, req: Request) -> Response {
    let changed = |res: Result<crate::fs::Change, BindError>| match res {
        Ok(change) => Response {
            changed: Some(change.changed),
            ..Response::ok()
        },
        Err(e) => bind_refusal(&e),
    };
    match req {
        Request::Ping => Response::ok(),
        Request::Bind {
            path,
            digest,
            layer,
            verify,
            owner,
        } => match digest.parse::<Digest>() {
            Ok(d) => {
                let res = core.bind_as(&path, &layer, d, verify, owner.as_deref());
                match &res {
                    Ok(c) if !c.entries.is_empty() => {
                        log::info!("bound {d} at {path} (layer {layer})")
                    }
                    Err(e) => log::warn!("bind of {d} at {path} refused: {e}"),
                    _ => {}
                }
                changed(res)
            }
            Err(e) => Response::bad_request(e.to_string()).about_digest(Some(digest)),
        },
        Request::Unbind { path, layer, owner } => {
            let res = core.unbind_as(&path, layer.as_deref(), owner.as_deref());
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
                        layers: view.layer_digests(),
                        owners: view.holder_lists(),
                        path,
                    })
                    .collect(),
            ),
            ..Response::ok()
        },
        Request::Status => Response {
            status: Some(status(core, info)),
            ..Response::ok()
        },
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
            Err(e) => Response::bad_request(e.to_string()).about_path(Some(path)),
        },
        Request::Takeover { .. } => {
            Response::bad_request("a takeover is asked for on a connection of its own")
        }
    }
}

/// What `status` answers (and the metrics read).
pub fn status(core: &DigestFs, info: &MountInfo) -> StatusInfo {
    let s = &core.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let lease = |f: fn(&LeaseStats) -> &std::sync::atomic::AtomicU64| {
        info.leases.as_deref().map_or(0, |l| load(f(l)))
    };
    let (mount_state, attached) = info.attachment.state();
    StatusInfo {
        pid: std::process::id(),
        version: Some(env!("CARGO_PKG_VERSION").to_string()),
        attached: Some(attached),
        mount_state: mount_state.to_string(),
        mountpoint: info.mountpoint.display().to_string(),
        store: info.store.display().to_string(),
        shard_count: Some(core.cas().store().shard_count().get() as u32),
        frontend: info.frontend.to_string(),
        transport: info.transport.name.get().map(|t| t.to_string()),
        ring_requests: info
            .transport
            .name
            .get()
            .map(|_| load(&info.transport.ring_requests)),
        ring: info
            .transport
            .ring
            .get()
            .map(|&(queues, entries_per_queue)| protocol::RingInfo {
                queues,
                entries_per_queue,
            }),
        passthrough_opens: info
            .transport
            .name
            .get()
            .map(|_| load(&info.transport.passthrough_opens)),
        backing_ids: info
            .transport
            .name
            .get()
            .map(|_| load(&info.transport.backing_ids)),
        dev_requests: info
            .transport
            .name
            .get()
            .map(|_| load(&info.transport.dev_requests)),
        nfs_port: info.nfs_port,
        metrics: info.metrics.map(|a| format!("http://{a}/metrics")),
        uptime_secs: info.started.elapsed().as_secs(),
        requests: load(&s.requests),
        lookups: load(&s.lookups),
        opens: load(&s.opens),
        reads: load(&s.reads),
        read_bytes: load(&s.read_bytes),
        errors: load(&s.errors),
        open_handles: core.open_handles() as u64 + load(&info.transport.open_files),
        inodes: core.inode_count() as u64,
        cached_dir_entries: core.cached_entries() as u64,
        views: core.namespace().views().len() as u64,
        lease_rounds: lease(|l| &l.rounds),
        lease_tree_renewals: lease(|l| &l.tree_renewals),
        lease_last_unix: lease(|l| &l.last_unix),
        lease_last_renewed: lease(|l| &l.last_renewed),
        lease_last_missing: lease(|l| &l.last_missing),
        lease_last_duration_ms: lease(|l| &l.last_duration_ms),
        lease_last_longest_txn_us: lease(|l| &l.last_longest_txn_us),
        verified_dirs: load(&s.verified_dirs),
        remote: info.remote.as_ref().map(|r| r.status()),
    }
}

/// Why a control request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the daemon at {}: {source} (is the mount live, and is it yours?)", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to talk to {}: it is served by {}, not by you", socket.display(), user_name(*uid))]
    NotOurs { socket: PathBuf, uid: u32 },
    #[error("talking to the daemon at {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon at {} closed the connection without answering", socket.display())]
    Closed { socket: PathBuf },
    #[error(
        "the daemon at {} did not answer within {secs} s: it is stopped (state T in ps), hung, \
         or still restoring its views; `digestfs unmount --abort` on its mountpoint ends a \
         mount whose daemon will not run again",
        socket.display()
    )]
    NoAnswer { socket: PathBuf, secs: u64 },
    #[error("unreadable answer from the daemon at {}: {source}", socket.display())]
    Unreadable {
        socket: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// How long a request may take to be answered. `status` answers from memory at once (it takes
/// no lock a bind holds), so a daemon that does not answer it in seconds is stopped, hung or
/// still restoring its views, and the caller is told so rather than held. Anything else may
/// verify a tree or fetch listings from a remote CAS, which may take minutes.
fn answer_limit(req: &Request) -> Duration {
    match req {
        Request::Status => Duration::from_secs(10),
        _ => Duration::from_secs(600),
    }
}

/// Sends one request to the daemon behind `socket` and returns its answer. The socket must be
/// served by our own uid: a socket planted by another user is never sent anything.
pub fn call(socket: &Path, req: &Request) -> Result<Response, CallError> {
    let io_err = |source| CallError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|source| CallError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let uid = os::peer_uid(stream.as_raw_fd()).map_err(io_err)?;
    if uid != unsafe { libc::geteuid() } {
        return Err(CallError::NotOurs {
            socket: socket.to_path_buf(),
            uid,
        });
    }
    let limit = answer_limit(req);
    for set in [UnixStream::set_read_timeout, UnixStream::set_write_timeout] {
        set(&stream, Some(limit)).map_err(io_err)?;
    }
    let mut line = encode_request(req);
    line.push('\n');
    // A daemon that refuses a peer answers at once and hangs up, so a failed write may still
    // leave its answer to read.
    let written = (&stream).write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        return Err(match (written, read) {
            (Err(e), _) | (_, Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                CallError::NoAnswer {
                    socket: socket.to_path_buf(),
                    secs: limit.as_secs(),
                }
            }
            (Err(e), _) | (_, Err(e)) => io_err(e),
            _ => CallError::Closed {
                socket: socket.to_path_buf(),
            },
        });
    }
    serde_json::from_str(&answer).map_err(|source| CallError::Unreadable {
        socket: socket.to_path_buf(),
        source,
    })
}
