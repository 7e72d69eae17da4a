//! The command line: argument parsing and dispatch, nothing else.

mod daemon;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::fs::{DigestFs, FsConfig, DEFAULT_LAYER};
use crate::fuse::mount::{self, MountConfig};
use crate::fuse::Passthrough;
use crate::store::{self, Digest, EntryKind, Importer, Store};

const EXAMPLES: &str = "\
Examples:
  digestfs import ./lib                        # store a directory, print its digest
  digestfs ls -R 93091a24…cd1-78               # list a tree
  digestfs mount --bind jvm/resolves/jvm-default/lib=<digest> --daemon /mnt/view
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
    },
    /// Write a file blob to stdout
    Cat { digest: String },
    /// Put a directory (or file) from disk into the store; prints its digest
    Import { path: PathBuf },
    /// Copy a tree out of the store (the fallback where FUSE is unavailable)
    Materialize { digest: String, dest: PathBuf },
    /// Mount a read-only view of the store
    #[command(
        after_help = "Example:\n  digestfs mount --bind jvm/resolves/jvm-default/lib=<digest> --daemon /mnt/view"
    )]
    Mount(MountArgs),
    /// Unmount a digestfs mount (like fusermount3 -u)
    Unmount {
        /// Detach the mount even if it is busy
        #[arg(long, short = 'z')]
        lazy: bool,
        mountpoint: PathBuf,
    },
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
    /// Answer user.pants.digest and user.checksum.sha256 (costs round trips on ls -l)
    #[arg(long)]
    xattrs: bool,
    /// Serve large blobs by FUSE passthrough
    #[arg(long, value_enum, default_value_t = Passthrough::Auto)]
    passthrough: Passthrough,
    /// Let other users read the mount (needs user_allow_other in /etc/fuse.conf unless root)
    #[arg(long)]
    allow_other: bool,
    /// Skip checking that every Directory of a bound tree is in the store
    #[arg(long)]
    no_verify: bool,
    /// With --daemon, append logs to this file (otherwise they are discarded)
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    mountpoint: PathBuf,
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
    let dir = cli_store.clone().unwrap_or_else(store::default_store_dir);
    Ok(Arc::new(Store::open(dir)?))
}

fn parse_digest(s: &str) -> Result<Digest, Failure> {
    Ok(s.parse::<Digest>()?)
}

fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Ls { recursive, digest } => ls(
            &*open_store(&cli.store)?,
            &parse_digest(&digest)?,
            recursive,
        ),
        Command::Cat { digest } => cat(&*open_store(&cli.store)?, &parse_digest(&digest)?),
        Command::Import { path } => {
            let dir = cli.store.clone().unwrap_or_else(store::default_store_dir);
            let store = Store::create(dir)?;
            let digest = Importer::new(&store).import_path(&path)?;
            println!("{digest}");
            Ok(())
        }
        Command::Materialize { digest, dest } => {
            let digest = parse_digest(&digest)?;
            store::materialize(&*open_store(&cli.store)?, &digest, &dest)?;
            Ok(())
        }
        Command::Mount(args) => mount_cmd(&cli.store, args),
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
    let run = || -> CliResult {
        let store = open_store(cli_store)?;
        let core = Arc::new(DigestFs::new(
            store,
            FsConfig {
                xattrs: args.xattrs,
                ..FsConfig::default()
            },
        ));
        for bind in &args.binds {
            let (path, digest) = bind
                .rsplit_once('=')
                .ok_or_else(|| Failure(format!("--bind {bind:?}: expected PATH=DIGEST")))?;
            let digest = parse_digest(digest)?;
            core.bind(path, DEFAULT_LAYER, digest, !args.no_verify)
                .map_err(|e| Failure(format!("--bind {bind}: {e}")))?;
        }
        let cfg = MountConfig {
            mountpoint: args.mountpoint.clone(),
            ttl: Duration::from_secs(args.ttl),
            threads: args.threads,
            allow_other: args.allow_other,
            passthrough: args.passthrough,
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
