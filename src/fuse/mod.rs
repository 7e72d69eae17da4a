//! The FUSE front end (Linux, cargo feature `fuse`): mounting and the session (`mount`), INIT
//! (`init`), the two transports (`dev` for /dev/fuse, `uring` for io_uring), what both answer
//! (`answer`, over the messages in `wire`), passthrough's backing ids (`backing`), binds told to
//! the kernel (`notify`), and handing a live mount to the next daemon (`takeover`, and
//! `restart` through systemd's fd store).
//! Elsewhere only the option types below are compiled, so the command line is the same on every
//! platform; `crate::nfs` is the front end there.

#[cfg(all(feature = "fuse", target_os = "linux"))]
mod answer;
#[cfg(all(feature = "fuse", target_os = "linux"))]
mod backing;
#[cfg(all(feature = "fuse", target_os = "linux"))]
mod dev;
#[cfg(all(feature = "fuse", target_os = "linux"))]
mod init;
#[cfg(all(feature = "fuse", target_os = "linux"))]
pub mod mount;
#[cfg(all(feature = "fuse", target_os = "linux"))]
mod notify;
#[cfg(all(feature = "fuse", target_os = "linux"))]
pub mod restart;
#[cfg(all(feature = "fuse", target_os = "linux"))]
pub mod takeover;
#[cfg(all(feature = "fuse", target_os = "linux"))]
pub mod uring;
#[cfg(all(feature = "fuse", target_os = "linux"))]
mod wire;

/// Entries per io-uring queue unless `--queue-depth` says otherwise.
pub const DEFAULT_QUEUE_DEPTH: u16 = 4;

/// Whether this build has the FUSE front end.
pub const AVAILABLE: bool = cfg!(all(feature = "fuse", target_os = "linux"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Passthrough {
    /// Use passthrough for large blobs when the kernel and privileges allow it.
    Auto,
    /// Require passthrough; the mount fails without it.
    On,
    /// Serve every read through the daemon.
    Off,
}

/// How requests travel between the kernel and the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// io-uring when the kernel offers it (Linux 6.14+ with the fuse module's `enable_uring`),
    /// else /dev/fuse; one log line says which.
    Auto,
    /// Read and write /dev/fuse, one request per system call.
    Dev,
    /// FUSE over io_uring: a queue per CPU; the mount fails if the kernel does not offer it.
    #[value(name = "io-uring")]
    IoUring,
}

impl Transport {
    /// As `status` reports the one in use.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Dev => "dev",
            Transport::IoUring => "io-uring",
        }
    }
}

/// The transport a FUSE session ended up with, for `status`.
#[derive(Debug, Default)]
pub struct TransportInfo {
    /// `dev` or `io-uring`, once the session is up.
    pub name: std::sync::OnceLock<&'static str>,
    /// Over io-uring: the queues, and the entries each lends the kernel.
    pub ring: std::sync::OnceLock<(usize, usize)>,
    /// Requests answered over the io_uring queues.
    pub ring_requests: std::sync::atomic::AtomicU64,
    /// Request latencies, once metrics are on (`--metrics-listen`).
    pub latency: std::sync::OnceLock<crate::metrics::Latency>,
    /// Opens answered with a backing id (FUSE passthrough), on either transport.
    pub passthrough_opens: std::sync::atomic::AtomicU64,
    /// Backing ids made: one per blob opened with passthrough, reused by its later opens.
    pub backing_ids: std::sync::atomic::AtomicU64,
    /// Files open with a handle of ours: with passthrough agreed, every open file (without it,
    /// opens send no message and none is seen).
    pub open_files: std::sync::atomic::AtomicU64,
    /// Requests answered over /dev/fuse, but for forgets and interrupts (which the kernel sends
    /// there on either transport).
    pub dev_requests: std::sync::atomic::AtomicU64,
    /// A ring queue failed once serving and aborted the connection: the daemon exits 1.
    pub ring_failed: std::sync::atomic::AtomicBool,
}

/// The format of a takeover's handover (`mount --takeover`): a daemon takes a mount over only
/// from one that hands it over in the same format.
pub const TAKEOVER_FORMAT: u32 = 1;

/// Who asks the serving loop for the mount.
pub enum Successor {
    /// `mount --takeover`, on the control connection it asked on.
    Daemon(std::os::unix::net::UnixStream),
    /// The unit's next daemon, after systemd's restart: the mount goes into the unit's fd
    /// store. If it does not, why, to the signal thread, which then unmounts.
    Restart(std::sync::mpsc::Sender<String>),
}

/// Where a successor goes while the door is open; why not while it is closed.
type Door = Result<Box<dyn Fn(Successor) + Send>, String>;

/// Where the control socket passes a takeover request, and the signal thread a restart: open
/// while the mount can be handed over, else closed with the reason, which the requester is
/// told.
pub struct TakeoverDoor {
    door: std::sync::Mutex<Door>,
}

impl Default for TakeoverDoor {
    fn default() -> TakeoverDoor {
        TakeoverDoor {
            door: std::sync::Mutex::new(Err("the mount is not being served yet".into())),
        }
    }
}

impl TakeoverDoor {
    fn door(&self) -> std::sync::MutexGuard<'_, Door> {
        self.door.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests go to `to` from now on.
    pub fn open(&self, to: impl Fn(Successor) + Send + 'static) {
        *self.door() = Ok(Box::new(to));
    }

    /// Requests are refused, with `why`.
    pub fn close(&self, why: impl Into<String>) {
        *self.door() = Err(why.into());
    }

    /// Passes `request` on, or says why the mount cannot be handed over.
    pub fn enter(&self, request: Successor) -> Result<(), String> {
        match &*self.door() {
            Ok(to) => {
                to(request);
                Ok(())
            }
            Err(why) => Err(why.clone()),
        }
    }
}
