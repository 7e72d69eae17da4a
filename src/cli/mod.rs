//! The command line: argument parsing and dispatch, nothing else.

mod daemon;
mod doctor;
mod mount;
mod progress;
mod remote;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::cas::{Cas, ReadError};
use crate::control::{self, protocol, protocol::Request, protocol::Response, protocol::WhichInfo};
use crate::fs::DEFAULT_LAYER;
use crate::os;
use crate::remote::Remote;
use crate::store::{self, Digest, EntryKind, Importer, ShardCount, Store};
use remote::RemoteArgs;

const EXAMPLES: &str = "\
Examples:
  digestfs import ./lib                        # store a directory, print its digest
  digestfs ls -R 93091a24…cd1-78               # list a tree
  digestfs mount --daemon --reuse .pants.d/bsp/jvm/resolves
  digestfs bind .pants.d/bsp/jvm/resolves jvm-default/lib <digest> --layer modules.src/jvm:lib
  digestfs unmount .pants.d/bsp/jvm/resolves

The daemon's refusals name their kind (error_kind in docs/PROTOCOL.md): missing (a digest
is not in the store: store or fetch it, then retry), conflict, bad_request, unavailable (the
remote CAS: retry later), internal.

Logging: RUST_LOG=debug digestfs …  (default: info for digestfs, off for nfs3_server, warn
otherwise)
Exit codes: 0 success (also when a reader such as `head` closes the output early),
1 failure (one line on stderr), 2 usage error.";

#[derive(Parser, Debug)]
#[command(name = "digestfs", version, about = "Read-only views over the Pants local store, served by FUSE or NFS", after_help = EXAMPLES)]
pub struct Cli {
    /// The Pants local store [default: $PANTS_LOCAL_STORE_DIR, else $XDG_CACHE_HOME/pants/lmdb_store, else ~/.cache/pants/lmdb_store]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// The store's LMDB shard count, as Pants' option of that name: a power of two from 1 to
    /// 128. What `import` creates a new store with [default: what the store's folders show
    /// (files/0…files/<N-1 in hex>), else 16]
    #[arg(
        long,
        global = true,
        value_name = "N",
        env = "DIGESTFS_LOCAL_STORE_SHARD_COUNT"
    )]
    local_store_shard_count: Option<ShardCount>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the entries of a tree: kind, executable bit, size, digest, path
    Ls {
        /// Recurse into subdirectories
        #[arg(short = 'R', long)]
        recursive: bool,
        /// A Directory digest, <64 hex>-<size> or <64 hex>/<size>
        digest: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Write a file blob to stdout
    Cat {
        digest: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Put a directory (or file) from disk into the store; prints its digest
    Import { path: PathBuf },
    /// Copy a tree out of the store (the fallback where FUSE is unavailable)
    Materialize {
        digest: String,
        dest: PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Upload trees from the local store to a remote CAS (only the blobs it lacks)
    #[command(
        after_help = "Example:\n  digestfs push --remote-store-address grpc://cache.internal:8980 <digest>"
    )]
    Push {
        /// Directory digests of the trees to upload
        #[arg(required = true)]
        digests: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Mount a read-only view of the store
    Mount(mount::MountArgs),
    /// Set one layer of the view at PATH to a tree, on a live mount
    #[command(
        after_help = "Example:\n  digestfs bind .pants.d/bsp/jvm/resolves jvm-default/lib <digest> --layer modules.src/jvm:lib"
    )]
    Bind {
        #[command(flatten)]
        target: Target,
        /// Path under the mount root, e.g. jvm-default/lib
        path: String,
        /// The tree's digest
        digest: String,
        /// The layer to set; a view is the union of its layers. Any text up to 1024 bytes
        /// (Pants uses one per request kind and BSP target, e.g. modules.src/jvm:lib)
        #[arg(long, default_value = DEFAULT_LAYER)]
        layer: String,
        /// Skip checking that every Directory of the tree is in the store
        #[arg(long)]
        no_verify: bool,
        /// Hold the layer as OWNER (e.g. one BSP session): clients that bind the same tree as
        /// the same layer each hold it, and it stays until the last of them unbinds it
        #[arg(long)]
        owner: Option<String>,
    },
    /// Remove a layer (or, without --layer, the whole view) at PATH
    Unbind {
        #[command(flatten)]
        target: Target,
        path: String,
        #[arg(long)]
        layer: Option<String>,
        /// Let go of the layer as OWNER only: it goes once no one else holds it (without
        /// --layer, every layer of the view OWNER holds). Without it, the layer goes whoever
        /// holds it
        #[arg(long)]
        owner: Option<String>,
    },
    /// List the views of a mount: path, layers and their digests, entry count
    Views {
        #[command(flatten)]
        target: Target,
        /// Print the daemon's JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Show a mount's uptime, counters, open handles and cache sizes
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Print the digest behind each path inside a mount
    Which {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The mount's control socket, if it was mounted with --control
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Write the man pages and shell completions into DIR (for packaging)
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
    /// Detach the FUSE mount at MOUNTPOINT once the daemon that started this is gone (internal)
    #[command(hide = true)]
    WatchMount {
        /// The mount's device, as the mount table has it
        #[arg(long)]
        device: u64,
        mountpoint: PathBuf,
    },
    /// Check what mounting needs (FUSE, fusermount3, kernel, store, mountpoint, remote CAS), with fixes
    Doctor {
        /// Also check that --allow-other is permitted
        #[arg(long)]
        allow_other: bool,
        mountpoint: Option<PathBuf>,
        // With --remote-store-address, also check that the remote CAS answers.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Unmount a digestfs mount, FUSE or NFS (like fusermount3 -u or umount); its daemon exits 0
    Unmount {
        /// Detach the mount even if it is busy
        #[arg(long, short = 'z')]
        lazy: bool,
        /// For a hung daemon: first end every request the mount holds, so that readers of
        /// files it has open get an error instead of waiting; then detach it (FUSE on Linux,
        /// root)
        #[arg(long)]
        abort: bool,
        mountpoint: PathBuf,
    },
}

/// Which mount a control command talks to.
#[derive(clap::Args, Debug)]
struct Target {
    /// The mountpoint of a live digestfs mount
    mountpoint: PathBuf,
    /// The mount's control socket, if it was mounted with --control
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> Result<PathBuf, Failure> {
        match &self.control {
            Some(p) => Ok(p.clone()),
            None => Ok(control::default_socket(&os::absolute(&self.mountpoint)?)),
        }
    }

    fn call(&self, req: Request) -> Result<Response, Failure> {
        refused_or(control::call(&self.socket()?, &req)?)
    }
}

/// The answer if the daemon accepted the request, else its refusal as a failure.
fn refused_or(resp: Response) -> Result<Response, Failure> {
    if resp.ok {
        Ok(resp)
    } else {
        Err(Failure::Msg(
            resp.error
                .unwrap_or_else(|| "the daemon refused the request".into()),
        ))
    }
}

/// Why a command stopped early.
enum Failure {
    /// Reported as one line; exit code 1.
    Msg(String),
    /// The reader of our output went away (`digestfs status | head -1`): stop quietly, exit 0,
    /// as `ls` and `cat` do.
    Closed,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Msg(e.to_string())
    }
}

type CliResult = Result<(), Failure>;

/// Writes one line to stdout; a closed pipe ends the command quietly.
fn out_line(args: std::fmt::Arguments) -> CliResult {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => Failure::Closed,
            _ => Failure::Msg(format!("writing to stdout: {e}")),
        })
}

/// `println!` for commands: a closed pipe ends the command quietly instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::out_line(format_args!($($arg)*))? };
}
pub(crate) use outln;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = match &cli.command {
        Command::Mount(m) if daemon::is_child() => m.log_file.clone(),
        _ => None,
    };
    init_logging(log_file.as_deref());
    match run(cli) {
        Ok(()) | Err(Failure::Closed) => ExitCode::SUCCESS,
        Err(Failure::Msg(msg)) => {
            eprintln!("digestfs: {msg}");
            ExitCode::from(1)
        }
    }
}

/// The log filter when `RUST_LOG` is not set. The NFS server crate logs every call it answers
/// with an error (a STALE handle after a rebind, a LOOKUP of a missing name) at warn and error,
/// which are routine for an NFS client: off unless asked for (`RUST_LOG=nfs3_server=debug`).
pub const DEFAULT_LOG_FILTER: &str = "warn,digestfs=info,nfs3_server=off";

/// Logs go through `log` and env_logger, filtered by `RUST_LOG`. The crates that log through
/// `tracing` instead (nfs3_server 0.11.1 above all; also tonic, h2 and hyper) reach the same
/// logger by `tracing`'s own `log` feature, enabled in Cargo.toml: with no `tracing`
/// subscriber installed (and digestfs installs none), every `tracing` event is emitted as a
/// `log` record with its module path as the target, which `RUST_LOG` filters like any other.
/// This needs nothing from nfs3_server, which depends on `tracing` with default features only
/// (features unify, so our `log` feature reaches its calls too), and no subscriber of ours:
/// the `tracing-log` crate bridges the other way (log records into a `tracing` subscriber).
/// `nfs3_server` uses events only, no spans, so nothing is lost by the absence of a
/// subscriber. `mount-tests/nfs.rs` checks that its lines reach the daemon's log when
/// `RUST_LOG` asks for them, and only then.
fn init_logging(file: Option<&Path>) {
    let mut b = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(DEFAULT_LOG_FILTER),
    );
    if let Some(path) = file {
        if let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            b.target(env_logger::Target::Pipe(Box::new(f)));
        }
    }
    let _ = b.try_init();
}

/// Which store a command works on: `--store` and `--local-store-shard-count`.
#[derive(Clone, Debug)]
pub(crate) struct StoreChoice {
    dir: Option<PathBuf>,
    shard_count: Option<ShardCount>,
}

impl StoreChoice {
    fn of(cli: &Cli) -> StoreChoice {
        StoreChoice {
            dir: cli.store.clone(),
            shard_count: cli.local_store_shard_count,
        }
    }

    /// The same choice, for the store at `dir`.
    fn at(&self, dir: PathBuf) -> StoreChoice {
        StoreChoice {
            dir: Some(dir),
            ..self.clone()
        }
    }

    fn dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(store::default_store_dir)
    }

    fn open(&self) -> Result<Store, Failure> {
        Ok(Store::open_with(self.dir(), self.shard_count)?)
    }

    fn create(&self) -> Result<Store, Failure> {
        Ok(Store::create_with(self.dir(), self.shard_count)?)
    }
}

/// The local store, reading through to the remote CAS if one is given. With a remote the local
/// store may start empty, so it is created if need be.
fn open_cas(
    choice: &StoreChoice,
    remote: Option<&RemoteArgs>,
) -> Result<(Arc<Cas>, Option<Arc<Remote>>), Failure> {
    match remote.map(RemoteArgs::config).transpose()?.flatten() {
        None => Ok((Arc::new(Cas::local(choice.open()?)), None)),
        Some(cfg) => {
            let remote = Remote::new(cfg)?;
            let cas = Cas::new(choice.create()?, Some(remote.clone()));
            Ok((Arc::new(cas), Some(remote)))
        }
    }
}

fn parse_digest(s: &str) -> Result<Digest, Failure> {
    Ok(s.parse::<Digest>()?)
}

fn run(cli: Cli) -> CliResult {
    let choice = StoreChoice::of(&cli);
    match cli.command {
        Command::Ls {
            recursive,
            digest,
            remote,
        } => ls(
            &open_cas(&choice, Some(&remote))?.0,
            &parse_digest(&digest)?,
            recursive,
        ),
        Command::Cat { digest, remote } => cat(
            &open_cas(&choice, Some(&remote))?.0,
            &parse_digest(&digest)?,
        ),
        Command::Push { digests, remote } => {
            let digests = digests
                .iter()
                .map(|d| parse_digest(d))
                .collect::<Result<Vec<_>, _>>()?;
            let store = choice.open()?;
            let cfg = remote
                .config()?
                .ok_or_else(|| Failure::Msg("push needs --remote-store-address".into()))?;
            let address = cfg.address.clone();
            let report = Remote::new(cfg)?.push(&store, &digests)?;
            outln!(
                "{address}: {} of {} blobs were missing, uploaded {} bytes",
                report.missing,
                report.blobs,
                report.bytes_sent
            );
            Ok(())
        }
        Command::Import { path } => {
            let store = choice.create()?;
            let bar = progress::bytes(|| progress::disk_size(&path), "importing");
            let digest = Importer::new(&store)
                .with_progress(|n| bar.inc(n))
                .import_path(&path)?;
            bar.finish_and_clear();
            outln!("{digest}");
            Ok(())
        }
        Command::Materialize {
            digest,
            dest,
            remote,
        } => {
            let digest = parse_digest(&digest)?;
            let cas = open_cas(&choice, Some(&remote))?.0;
            let bar = progress::bytes(|| progress::tree_size(&cas, &digest), "materializing");
            crate::materialize::materialize(&cas, &digest, &dest, &mut |n| bar.inc(n))?;
            bar.finish_and_clear();
            Ok(())
        }
        Command::Mount(args) => mount::run(&choice, args),
        Command::Bind {
            target,
            path,
            digest,
            layer,
            no_verify,
            owner,
        } => {
            parse_digest(&digest)?;
            let socket = target.socket()?;
            // The daemon checks every Directory of the tree (fetching any from a remote CAS):
            // on a terminal, count them from its status while the bind is under way.
            let checked = || {
                control::call(&socket, &Request::Status)
                    .ok()
                    .and_then(|r| r.status)
                    .map(|s| s.verified_dirs)
            };
            let what = format!("checking {digest}");
            let request = Request::Bind {
                path,
                digest,
                layer,
                verify: !no_verify,
                owner,
            };
            let resp = if no_verify {
                target.call(request)
            } else {
                progress::counting(&what, "directories", checked, || target.call(request))
            }?;
            if resp.changed == Some(false) {
                eprintln!("digestfs: already bound; nothing changed");
            }
            Ok(())
        }
        Command::Unbind {
            target,
            path,
            layer,
            owner,
        } => {
            target.call(Request::Unbind { path, layer, owner })?;
            Ok(())
        }
        Command::Views { target, json } => {
            let views = target.call(Request::Views)?.views.unwrap_or_default();
            if json {
                outln!("{}", serde_json::to_string_pretty(&views)?);
                return Ok(());
            }
            for v in views {
                let entries = v.entries.map_or("?".to_string(), |n| n.to_string());
                outln!("{}\t{entries} entries", v.path);
                for (layer, digest) in v.layers {
                    match v.owners.get(&layer) {
                        Some(o) => outln!("  {layer}\t{digest}\theld by {}", o.join(", ")),
                        None => outln!("  {layer}\t{digest}"),
                    }
                }
            }
            Ok(())
        }
        Command::Status { target, json } => {
            let s = target
                .call(Request::Status)?
                .status
                .ok_or_else(|| Failure::Msg("no status in the answer".into()))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            print_status(&s)
        }
        Command::Which { paths, control } => which(&paths, control.as_deref()),
        Command::GenerateAssets { dir } => generate_assets(&dir),
        Command::WatchMount { device, mountpoint } => watch_mount(&mountpoint, device),
        Command::Doctor {
            allow_other,
            mountpoint,
            remote,
        } => {
            let remote = remote.config()?;
            if doctor::run(
                choice.dir(),
                choice.shard_count,
                mountpoint.as_deref(),
                allow_other,
                remote,
            )? {
                Ok(())
            } else {
                Err(Failure::Msg(
                    "some checks failed (see the fixes above)".into(),
                ))
            }
        }
        Command::Unmount {
            lazy,
            abort,
            mountpoint,
        } => {
            // The mount table only: a stat or statfs would wait on a hung daemon.
            let abs = os::absolute(&mountpoint)?;
            let mounted = || -> Result<_, Failure> {
                Ok(os::mounts()?.into_iter().rfind(|m| m.mountpoint == abs))
            };
            let Some(top) = mounted()? else {
                return Err(Failure::Msg(format!(
                    "{} is not mounted",
                    mountpoint.display()
                )));
            };
            if abort {
                if !top.fstype.starts_with("fuse") {
                    return Err(Failure::Msg(format!(
                        "{} is a {} mount, not FUSE: --abort ends the requests of a FUSE mount",
                        mountpoint.display(),
                        top.fstype
                    )));
                }
                abort_connection(&abs)?;
            }
            match os::unmount(&mountpoint, lazy || abort) {
                // Its watcher may have detached it as the connection ended.
                Err(_) if abort && mounted()?.is_none() => Ok(()),
                r => r.map_err(|e| format!("unmounting {}: {e}", mountpoint.display()).into()),
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn abort_connection(mountpoint: &Path) -> CliResult {
    os::abort_fuse_connection(mountpoint).map_err(|e| {
        let root = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (--abort needs root)"
        } else {
            ""
        };
        Failure::Msg(format!(
            "ending the requests of the FUSE mount at {}: {e}{root}",
            mountpoint.display()
        ))
    })
}

#[cfg(not(target_os = "linux"))]
fn abort_connection(_mountpoint: &Path) -> CliResult {
    Err(Failure::Msg(
        "--abort is for FUSE mounts on Linux; unmount -f detaches an NFS mount".into(),
    ))
}

#[cfg(all(feature = "fuse", target_os = "linux"))]
fn watch_mount(mountpoint: &Path, device: u64) -> CliResult {
    crate::fuse::mount::watch_and_detach(mountpoint, device)
        .map_err(|e| Failure::Msg(format!("detaching {}: {e}", mountpoint.display())))
}

#[cfg(not(all(feature = "fuse", target_os = "linux")))]
fn watch_mount(_mountpoint: &Path, _device: u64) -> CliResult {
    Err(Failure::Msg("this build has no FUSE front end".into()))
}

fn print_status(s: &control::protocol::StatusInfo) -> CliResult {
    outln!("mountpoint     {}", s.mountpoint);
    outln!("store          {}", s.store);
    if let Some(n) = s.shard_count {
        outln!("shards         {n}");
    }
    outln!("pid            {}", s.pid);
    if let Some(v) = &s.version {
        outln!("version        {v}");
    }
    outln!("uptime         {} s", s.uptime_secs);
    if !s.frontend.is_empty() {
        outln!("frontend       {}", s.frontend);
    }
    if !s.mount_state.is_empty() {
        let what = match s.mount_state.as_str() {
            protocol::MOUNT_ATTACHED => "attached (the mountpoint shows this daemon's mount)",
            protocol::MOUNT_DETACHED => {
                "detached (unmounted or lazily detached; serving only files still open)"
            }
            protocol::MOUNT_NONE => "none (serving NFS without a mount)",
            protocol::MOUNT_STARTING => "starting",
            other => other,
        };
        outln!("mount          {what}");
    }
    if let Some(port) = s.nfs_port {
        outln!("nfs            127.0.0.1 port {port}");
    }
    if let Some(url) = &s.metrics {
        outln!("metrics        {url}");
    }
    if let Some(t) = &s.transport {
        let how = match t.as_str() {
            "io-uring" => &match s.ring {
                Some(r) => format!(
                    "io-uring ({} queues of {} entries; {} requests over the ring)",
                    r.queues,
                    r.entries_per_queue,
                    s.ring_requests.unwrap_or(0)
                ),
                None => format!(
                    "io-uring ({} requests over the ring)",
                    s.ring_requests.unwrap_or(0)
                ),
            },
            "dev" => "dev (/dev/fuse)",
            other => other,
        };
        outln!("transport      {how}");
    }
    if let (Some(opens), Some(ids)) = (s.passthrough_opens, s.backing_ids) {
        if opens > 0 {
            outln!("passthrough    {opens} opens served by the kernel from {ids} backing ids");
        }
    }
    outln!("views          {}", s.views);
    outln!(
        "requests       {} lookups, {} opens, {} reads ({} bytes)",
        s.lookups,
        s.opens,
        s.reads,
        s.read_bytes
    );
    outln!("errors         {}", s.errors);
    outln!("open handles   {}", s.open_handles);
    outln!("inodes held    {}", s.inodes);
    outln!("cached entries {}", s.cached_dir_entries);
    if s.lease_rounds == 0 {
        outln!("leases         not renewed yet");
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        outln!(
            "leases         {} blobs renewed {} s ago in {} ms ({} missing), {} rounds",
            s.lease_last_renewed,
            now.saturating_sub(s.lease_last_unix),
            s.lease_last_duration_ms,
            s.lease_last_missing,
            s.lease_rounds
        );
    }
    if let Some(r) = &s.remote {
        remote::print_status(r)?;
    }
    Ok(())
}

/// Prints `<digest>\t<path>` for each path, asking the daemon of the mount it lies in.
fn which(paths: &[PathBuf], control: Option<&Path>) -> CliResult {
    let mut failed = 0;
    for path in paths {
        let res = (|| -> Result<String, Failure> {
            let abs = os::absolute(path)?;
            let (mountpoint, rel) = os::find_digestfs_mount(&abs)?.ok_or_else(|| {
                Failure::Msg(format!("{} is not inside a digestfs mount", path.display()))
            })?;
            let rel = rel.to_string_lossy().into_owned();
            let socket = control
                .map(Path::to_path_buf)
                .unwrap_or_else(|| control::default_socket(&mountpoint));
            let resp = refused_or(control::call(&socket, &Request::Which { path: rel })?)?;
            Ok(match resp.which {
                Some(WhichInfo::File { digest, .. }) | Some(WhichInfo::Tree { digest }) => digest,
                Some(WhichInfo::Merged { digests }) => digests.join("+"),
                Some(WhichInfo::Symlink { target }) => format!("symlink:{target}"),
                Some(WhichInfo::Mount) | None => "-".to_string(),
            })
        })();
        match res {
            Ok(d) => outln!("{d}\t{}", path.display()),
            Err(Failure::Msg(msg)) => {
                eprintln!("digestfs: {}: {msg}", path.display());
                failed += 1;
            }
            Err(closed) => return Err(closed),
        }
    }
    if failed > 0 {
        return Err(Failure::Msg(format!(
            "{failed} of {} paths could not be resolved",
            paths.len()
        )));
    }
    Ok(())
}

/// Man pages (one per command) and completions, generated from the clap definitions.
fn generate_assets(dir: &Path) -> CliResult {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    let mut pages = vec![(cmd.get_name().to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap names are 'static; this process is short-lived, so leaking a few is fine.
        let name: &'static str = Box::leak(format!("digestfs-{}", sub.get_name()).into_boxed_str());
        pages.push((name.to_string(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        std::fs::write(man.join(format!("{name}.1")), out)?;
    }
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "digestfs", &completions)?;
    }
    Ok(())
}

/// Why `ls` stopped: the store, or the output.
enum LsError {
    Read(ReadError),
    Out(Failure),
}

impl From<ReadError> for LsError {
    fn from(e: ReadError) -> LsError {
        LsError::Read(e)
    }
}

impl From<store::StoreError> for LsError {
    fn from(e: store::StoreError) -> LsError {
        LsError::Read(e.into())
    }
}

fn ls(cas: &Cas, root: &Digest, recursive: bool) -> CliResult {
    let mut print = |path: &str, kind: &EntryKind| -> Result<(), LsError> {
        let line = match kind {
            EntryKind::File { digest, executable } => format!(
                "F {} {:>10} {digest} {path}",
                if *executable { "x" } else { "-" },
                digest.size
            ),
            EntryKind::Dir(d) => format!("D - {:>10} {d} {path}/", d.size),
            EntryKind::Symlink(t) => format!(
                "L - {:>10} {:<width$} {path} -> {t}",
                t.len(),
                "-",
                width = 64 + 1 + 1
            ),
        };
        out_line(format_args!("{line}")).map_err(LsError::Out)
    };
    let res = if recursive {
        cas.walk_paths(root, &mut print)
    } else {
        cas.load_directory(root)
            .map_err(LsError::from)
            .and_then(|l| l.entries.iter().try_for_each(|e| print(&e.name, &e.kind)))
    };
    match res {
        Ok(()) => Ok(()),
        Err(LsError::Read(e)) => Err(e.into()),
        Err(LsError::Out(f)) => Err(f),
    }
}

fn cat(cas: &Cas, digest: &Digest) -> CliResult {
    let blob = cas.open_blob(digest)?;
    let mut out = io::stdout().lock();
    let closed = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe => Failure::Closed,
        _ => Failure::Msg(format!("writing to stdout: {e}")),
    };
    let mut offset = 0;
    while offset < digest.size {
        let chunk = cas.read_blob(&blob, offset, 1 << 20)?;
        out.write_all(&chunk).map_err(closed)?;
        offset += chunk.len() as u64;
    }
    out.flush().map_err(closed)
}
