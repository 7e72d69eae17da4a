//! The command line: argument parsing and dispatch, nothing else.

mod daemon;
mod doctor;
mod progress;
mod remote;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::control::{self, protocol::Request, protocol::Response, protocol::WhichInfo};
use crate::fs::{DigestFs, FsConfig, DEFAULT_LAYER};
use crate::fuse::mount::{self, MountConfig};
use crate::fuse::Passthrough;
use crate::remote::Remote;
use crate::store::{self, Digest, EntryKind, Importer, Store};
use remote::RemoteArgs;

const EXAMPLES: &str = "\
Examples:
  digestfs import ./lib                        # store a directory, print its digest
  digestfs ls -R 93091a24…cd1-78               # list a tree
  digestfs mount --bind jvm/resolves/jvm-default/lib=<digest> --daemon /mnt/view
  digestfs mount --remote-store-address grpc://cache:8980 --bind lib=<digest> /mnt/view
  digestfs unmount /mnt/view

Logging: RUST_LOG=debug digestfs …  (default: info for digestfs, warn otherwise)
Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.";

#[derive(Parser, Debug)]
#[command(name = "digestfs", version, about = "A read-only FUSE view over the Pants local store", after_help = EXAMPLES)]
pub struct Cli {
    /// The Pants local store [default: $PANTS_LOCAL_STORE_DIR, else $XDG_CACHE_HOME/pants/lmdb_store, else ~/.cache/pants/lmdb_store]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
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
    #[command(
        after_help = "Example:\n  digestfs mount --bind jvm/resolves/jvm-default/lib=<digest> --daemon /mnt/view"
    )]
    Mount(MountArgs),
    /// Set one layer of the view at PATH to a tree, on a live mount
    #[command(
        after_help = "Example:\n  digestfs bind /mnt/view jvm/resolves/jvm-default/lib <digest> --layer group-a"
    )]
    Bind {
        #[command(flatten)]
        target: Target,
        /// Path under the mount root, e.g. jvm/resolves/jvm-default/lib
        path: String,
        /// The tree's digest
        digest: String,
        /// The layer to set; a view is the union of its layers
        #[arg(long, default_value = DEFAULT_LAYER)]
        layer: String,
        /// Skip checking that every Directory of the tree is in the store
        #[arg(long)]
        no_verify: bool,
    },
    /// Remove a layer (or, without --layer, the whole view) at PATH
    Unbind {
        #[command(flatten)]
        target: Target,
        path: String,
        #[arg(long)]
        layer: Option<String>,
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
    /// Unmount a digestfs mount (like fusermount3 -u)
    Unmount {
        /// Detach the mount even if it is busy
        #[arg(long, short = 'z')]
        lazy: bool,
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
            None => Ok(control::default_socket(&mount::absolute(&self.mountpoint)?)),
        }
    }

    fn call(&self, req: Request) -> Result<Response, Failure> {
        let resp = control::call(&self.socket()?, &req).map_err(Failure)?;
        if resp.ok {
            Ok(resp)
        } else {
            Err(Failure(
                resp.error
                    .unwrap_or_else(|| "the daemon refused the request".into()),
            ))
        }
    }
}

#[derive(clap::Args, Debug)]
struct MountArgs {
    /// Show a Directory digest at PATH under the mount root (repeatable)
    #[arg(long = "bind", value_name = "PATH=DIGEST")]
    binds: Vec<String>,
    /// Return once the mount answers, leaving the daemon running in the background
    #[arg(long, short = 'd')]
    daemon: bool,
    /// Kernel entry and attribute cache lifetime, in seconds
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    ttl: u64,
    /// Request-handling threads
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Kernel readahead for the mount in KiB (needs root; 0 keeps the kernel's 128)
    #[arg(long, default_value_t = 4096, value_name = "KIB")]
    read_ahead_kb: u32,
    /// Answer user.pants.digest and user.checksum.sha256 (costs round trips on ls -l)
    #[arg(long)]
    xattrs: bool,
    /// Serve large blobs by FUSE passthrough (Linux 6.9+, root). Off by default: it needs a
    /// daemon round trip per open, while without it opens cost none; see the README's benchmarks
    #[arg(long, value_enum, default_value_t = Passthrough::Off)]
    passthrough: Passthrough,
    /// Let other users read the mount (needs user_allow_other in /etc/fuse.conf unless root)
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
    log_file: Option<PathBuf>,
    /// After each bind, fetch the tree's missing files from the remote CAS in the background
    /// (progress in `digestfs status`); without it, files are fetched on first read
    #[arg(long, requires = "remote_store_address")]
    prefetch: bool,
    mountpoint: PathBuf,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// A failure reported as one line; exit code 1.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

type CliResult = Result<(), Failure>;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = match &cli.command {
        Command::Mount(m) if daemon::is_child() => m.log_file.clone(),
        _ => None,
    };
    init_logging(log_file.as_deref());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("digestfs: {msg}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(file: Option<&Path>) {
    let mut b = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,digestfs=info"),
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

fn open_store(cli_store: &Option<PathBuf>) -> Result<Arc<Store>, Failure> {
    Ok(open_store_with_remote(cli_store, None)?.0)
}

/// The local store, reading through to the remote CAS if one is given. With a remote the local
/// store may start empty, so it is created if need be.
fn open_store_with_remote(
    cli_store: &Option<PathBuf>,
    remote: Option<&RemoteArgs>,
) -> Result<(Arc<Store>, Option<Arc<Remote>>), Failure> {
    let dir = cli_store.clone().unwrap_or_else(store::default_store_dir);
    match remote.map(RemoteArgs::config).transpose()?.flatten() {
        None => Ok((Arc::new(Store::open(dir)?), None)),
        Some(cfg) => {
            let remote = Remote::new(cfg)?;
            let store = Store::create(dir)?.with_backfill(remote.clone());
            Ok((Arc::new(store), Some(remote)))
        }
    }
}

fn parse_digest(s: &str) -> Result<Digest, Failure> {
    Ok(s.parse::<Digest>()?)
}

fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Ls {
            recursive,
            digest,
            remote,
        } => ls(
            &open_store_with_remote(&cli.store, Some(&remote))?.0,
            &parse_digest(&digest)?,
            recursive,
        ),
        Command::Cat { digest, remote } => cat(
            &open_store_with_remote(&cli.store, Some(&remote))?.0,
            &parse_digest(&digest)?,
        ),
        Command::Push { digests, remote } => {
            let digests = digests
                .iter()
                .map(|d| parse_digest(d))
                .collect::<Result<Vec<_>, _>>()?;
            let store = open_store(&cli.store)?;
            let cfg = remote
                .config()?
                .ok_or_else(|| Failure("push needs --remote-store-address".into()))?;
            let address = cfg.address.clone();
            let report = Remote::new(cfg)?.push(&store, &digests)?;
            println!(
                "{address}: {} of {} blobs were missing, uploaded {} bytes",
                report.missing, report.blobs, report.bytes_sent
            );
            Ok(())
        }
        Command::Import { path } => {
            let dir = cli.store.clone().unwrap_or_else(store::default_store_dir);
            let store = Store::create(dir)?;
            let bar = progress::bytes(|| progress::disk_size(&path), "importing");
            let digest = Importer::new(&store)
                .with_progress(|n| bar.inc(n))
                .import_path(&path)?;
            bar.finish_and_clear();
            println!("{digest}");
            Ok(())
        }
        Command::Materialize {
            digest,
            dest,
            remote,
        } => {
            let digest = parse_digest(&digest)?;
            let store = open_store_with_remote(&cli.store, Some(&remote))?.0;
            let bar = progress::bytes(|| progress::tree_size(&store, &digest), "materializing");
            store::materialize_with_progress(&store, &digest, &dest, &mut |n| bar.inc(n))?;
            bar.finish_and_clear();
            Ok(())
        }
        Command::Mount(args) => mount_cmd(&cli.store, args),
        Command::Bind {
            target,
            path,
            digest,
            layer,
            no_verify,
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
        } => {
            target.call(Request::Unbind { path, layer })?;
            Ok(())
        }
        Command::Views { target, json } => {
            let resp = target.call(Request::Views)?;
            let views = resp.views.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
                return Ok(());
            }
            for v in views {
                let entries = v.entries.map_or("?".to_string(), |n| n.to_string());
                println!("{}\t{entries} entries", v.path);
                for (layer, digest) in v.layers {
                    println!("  {layer}\t{digest}");
                }
            }
            Ok(())
        }
        Command::Status { target, json } => {
            let s = target
                .call(Request::Status)?
                .status
                .ok_or_else(|| Failure("no status in the answer".into()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!("mountpoint     {}", s.mountpoint);
            println!("store          {}", s.store);
            println!("pid            {}", s.pid);
            println!("uptime         {} s", s.uptime_secs);
            println!("views          {}", s.views);
            println!(
                "requests       {} lookups, {} opens, {} reads ({} bytes)",
                s.lookups, s.opens, s.reads, s.read_bytes
            );
            println!("errors         {}", s.errors);
            println!("open handles   {}", s.open_handles);
            println!("inodes held    {}", s.inodes);
            println!("cached entries {}", s.cached_dir_entries);
            if s.lease_rounds == 0 {
                println!("leases         not renewed yet");
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                println!(
                    "leases         {} blobs renewed {} s ago ({} missing), {} rounds",
                    s.lease_last_renewed,
                    now.saturating_sub(s.lease_last_unix),
                    s.lease_last_missing,
                    s.lease_rounds
                );
            }
            if let Some(r) = &s.remote {
                remote::print_status(r);
            }
            Ok(())
        }
        Command::Which { paths, control } => which(&paths, control.as_deref()),
        Command::GenerateAssets { dir } => generate_assets(&dir),
        Command::Doctor {
            allow_other,
            mountpoint,
            remote,
        } => {
            let remote = remote.config()?;
            if doctor::run(
                cli.store.clone(),
                mountpoint.as_deref(),
                allow_other,
                remote,
            ) {
                Ok(())
            } else {
                Err(Failure("some checks failed (see the fixes above)".into()))
            }
        }
        Command::Unmount { lazy, mountpoint } => {
            if mount::mount_state(&mountpoint)? == mount::MountState::Free {
                return Err(Failure(format!("{} is not mounted", mountpoint.display())));
            }
            mount::unmount(&mountpoint, lazy)
                .map_err(|e| format!("unmounting {}: {e}", mountpoint.display()))?;
            Ok(())
        }
    }
}

/// Prints `<digest>\t<path>` for each path, asking the daemon of the mount it lies in.
fn which(paths: &[PathBuf], control: Option<&Path>) -> CliResult {
    let mut failed = 0;
    for path in paths {
        let res = (|| -> Result<String, Failure> {
            let abs = mount::absolute(path)?;
            let (mountpoint, rel) = mount::find_digestfs_mount(&abs)?.ok_or_else(|| {
                Failure(format!("{} is not inside a digestfs mount", path.display()))
            })?;
            let rel = rel.to_string_lossy().into_owned();
            let socket = control
                .map(Path::to_path_buf)
                .unwrap_or_else(|| control::default_socket(&mountpoint));
            let resp = control::call(&socket, &Request::Which { path: rel }).map_err(Failure)?;
            if !resp.ok {
                return Err(Failure(resp.error.unwrap_or_default()));
            }
            Ok(match resp.which {
                Some(WhichInfo::File { digest, .. }) | Some(WhichInfo::Tree { digest }) => digest,
                Some(WhichInfo::Merged { digests }) => digests.join("+"),
                Some(WhichInfo::Symlink { target }) => format!("symlink:{target}"),
                Some(WhichInfo::Mount) | None => "-".to_string(),
            })
        })();
        match res {
            Ok(d) => println!("{d}\t{}", path.display()),
            Err(Failure(msg)) => {
                eprintln!("digestfs: {}: {msg}", path.display());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(Failure(format!(
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

fn ls(store: &Store, root: &Digest, recursive: bool) -> CliResult {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut print = |path: &str, kind: &EntryKind| -> store::Result<()> {
        let line = match kind {
            EntryKind::File { digest, executable } => {
                format!(
                    "F {} {:>10} {digest} {path}",
                    if *executable { "x" } else { "-" },
                    digest.size
                )
            }
            EntryKind::Dir(d) => format!("D - {:>10} {d} {path}/", d.size),
            EntryKind::Symlink(t) => format!(
                "L - {:>10} {:<width$} {path} -> {t}",
                t.len(),
                "-",
                width = 64 + 1 + 1
            ),
        };
        writeln!(out, "{line}").map_err(|source| store::StoreError::Io {
            context: "writing to stdout".into(),
            source,
        })
    };
    let res = if recursive {
        store.walk(root, &mut print)
    } else {
        store
            .load_directory(root)?
            .entries
            .iter()
            .try_for_each(|e| print(&e.name, &e.kind))
    };
    match res {
        Err(store::StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        other => Ok(other?),
    }
}

fn cat(store: &Store, digest: &Digest) -> CliResult {
    let blob = store.open_blob(digest)?;
    let mut out = io::stdout().lock();
    let mut offset = 0;
    while offset < digest.size {
        let chunk = store.read_blob(&blob, offset, 1 << 20)?;
        match out.write_all(&chunk) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
        offset += chunk.len() as u64;
    }
    match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn mount_cmd(cli_store: &Option<PathBuf>, args: MountArgs) -> CliResult {
    if args.daemon && !daemon::is_child() {
        return daemon::spawn_and_wait().map_err(Failure);
    }
    // Before any thread starts, so that only the mount's signal thread ever takes SIGTERM.
    mount::block_signals();
    let run = || -> CliResult {
        let (store, remote) = open_store_with_remote(cli_store, Some(&args.remote))?;
        if let Some(r) = &remote {
            r.probe_in_background();
        }
        let core = Arc::new(DigestFs::new(
            store,
            FsConfig {
                xattrs: args.xattrs,
                verify: args.verify,
                ..FsConfig::default()
            },
        ));
        if let (true, Some(remote)) = (args.prefetch, &remote) {
            remote::spawn_prefetcher(&core, remote.clone())?;
        }
        for bind in &args.binds {
            let (path, digest) = bind
                .rsplit_once('=')
                .ok_or_else(|| Failure(format!("--bind {bind:?}: expected PATH=DIGEST")))?;
            let digest = parse_digest(digest)?;
            core.bind(path, DEFAULT_LAYER, digest, !args.no_verify)
                .map_err(|e| Failure(format!("--bind {bind}: {e}")))?;
        }
        let mountpoint = mount::absolute(&args.mountpoint)
            .map_err(|e| Failure(format!("{}: {e}", args.mountpoint.display())))?;
        if mount::mount_state(&mountpoint)? == mount::MountState::Live {
            return Err(Failure(format!(
                "{} is already mounted; unmount it first (digestfs unmount {})",
                mountpoint.display(),
                mountpoint.display()
            )));
        }
        let socket = args
            .control
            .clone()
            .unwrap_or_else(|| control::default_socket(&mountpoint));
        let server = control::Server::bind(&socket)
            .map_err(|e| format!("control socket {}: {e}", socket.display()))?;
        let _remove_socket = RemoveOnDrop(socket.clone());
        server.spawn(
            core.clone(),
            control::MountInfo {
                mountpoint: mountpoint.clone(),
                store: core.store().root().to_path_buf(),
                started: std::time::Instant::now(),
                remote: remote.clone(),
            },
        )?;
        log::info!("control socket at {}", socket.display());
        if args.lease_interval > 0 {
            let (poke, wake) = crossbeam_channel::bounded(64);
            // If the keeper is behind, its next full round covers a bound tree too.
            core.watch_binds(poke);
            crate::lease::spawn(core.clone(), Duration::from_secs(args.lease_interval), wake)?;
        }
        let cfg = MountConfig {
            mountpoint,
            ttl: Duration::from_secs(args.ttl),
            threads: args.threads,
            allow_other: args.allow_other,
            passthrough: args.passthrough,
            read_ahead_kb: args.read_ahead_kb,
        };
        mount::serve(core, &cfg, daemon::report_ready)?;
        Ok(())
    };
    let res = run();
    if let Err(Failure(msg)) = &res {
        daemon::report_ready(Err(msg.clone()));
    }
    res
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
