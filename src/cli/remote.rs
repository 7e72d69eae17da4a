//! The remote-CAS options shared by the commands that read the store, and the daemon's parts
//! of it: prefetching bound trees and showing the remote in `status`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{outln, CliResult, Failure};
use crate::fs::DigestFs;
use crate::remote::{RemoteConfig, RemoteStatus};
use crate::store::Digest;

/// The remote CAS, named like Pants' own `remote_*` options.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Remote CAS")]
pub(super) struct RemoteArgs {
    /// Fetch blobs missing from the local store from this REAPI CAS (grpc://HOST:PORT or grpcs://HOST:PORT)
    #[arg(long, value_name = "URL")]
    remote_store_address: Option<String>,
    /// The REAPI instance name
    #[arg(long, default_value = "", value_name = "NAME")]
    remote_instance_name: String,
    /// PEM file of the certificates to trust for grpcs:// [default: the system's]
    #[arg(long, value_name = "FILE")]
    remote_ca_certs: Option<PathBuf>,
    /// A header sent with every call, such as authorization=Bearer… (repeatable). Tokens on a
    /// command line are visible to other users in `ps`: pass them in $DIGESTFS_REMOTE_HEADERS
    /// instead, one KEY=VALUE per line
    #[arg(
        long = "remote-header",
        value_name = "KEY=VALUE",
        env = "DIGESTFS_REMOTE_HEADERS",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    remote_headers: Vec<String>,
    /// How long a remote call (or a stream between two messages) may go unanswered before it fails
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    remote_timeout_ms: u64,
    /// Further attempts after a failure that may pass (unavailable, timeout, ...)
    #[arg(long, default_value_t = 3, value_name = "N")]
    remote_retries: u32,
    /// Remote calls in flight at once
    #[arg(long, default_value_t = 16, value_name = "N")]
    remote_concurrency: usize,
    /// Answer reads of a large blob not yet local at once, by ranged reads, while the whole
    /// blob is fetched and verified in the background; those first bytes are served before they
    /// can be verified (see docs/remote.md)
    #[arg(long)]
    remote_ranged_reads: bool,
}

impl RemoteArgs {
    pub(super) fn config(&self) -> Result<Option<RemoteConfig>, Failure> {
        let Some(address) = &self.remote_store_address else {
            if self.remote_ca_certs.is_some() || !self.remote_headers.is_empty() {
                return Err(Failure::Msg(
                    "--remote-ca-certs and --remote-header need --remote-store-address".into(),
                ));
            }
            return Ok(None);
        };
        let headers = self
            .remote_headers
            .iter()
            .map(|h| {
                h.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .ok_or_else(|| {
                        Failure::Msg(format!("--remote-header {h:?}: expected KEY=VALUE"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(RemoteConfig {
            address: address.clone(),
            instance_name: self.remote_instance_name.clone(),
            ca_certs: self.remote_ca_certs.clone(),
            headers,
            timeout: Duration::from_millis(self.remote_timeout_ms.max(1)),
            retries: self.remote_retries,
            concurrency: self.remote_concurrency,
            ranged_reads: self.remote_ranged_reads,
        }))
    }
}

pub(super) fn print_status(r: &RemoteStatus) -> CliResult {
    let instance = if r.instance_name.is_empty() {
        String::new()
    } else {
        format!(" (instance {})", r.instance_name)
    };
    outln!("remote         {}{instance}: {}", r.address, r.health);
    if let (Some(e), "failing") = (&r.last_error, r.health.as_str()) {
        outln!("remote error   {e}");
    }
    outln!(
        "remote calls   {} ({} failed, {} retries): {} FindMissingBlobs, {} BatchReadBlobs, {} ByteStream.Read, {} GetTree",
        r.calls, r.call_failures, r.retries, r.find_missing_calls, r.batch_reads, r.bytestream_reads, r.get_tree_calls
    );
    outln!(
        "fetched        {} blobs, {} bytes ({} refused as corrupt, {} failed, {} joined a fetch under way)",
        r.blobs_fetched, r.bytes_fetched, r.refused_corrupt, r.fetch_failures, r.joined_fetches
    );
    let p = &r.prefetch;
    if p.trees > 0 || p.running > 0 {
        outln!(
            "prefetch       {}{} of {} blobs, {} of {} bytes ({} failed), {} trees done",
            if p.running > 0 { "running: " } else { "" },
            p.blobs_done,
            p.blobs_total,
            p.bytes_done,
            p.bytes_total,
            p.blobs_failed,
            p.trees
        );
    }
    Ok(())
}

/// Prefetches each bound tree in turn, in a thread of its own.
pub(super) fn spawn_prefetcher(core: &Arc<DigestFs>) -> CliResult {
    let (tx, rx) = crossbeam_channel::unbounded::<Digest>();
    core.watch_binds(tx);
    let cas = core.cas().clone();
    std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            for root in rx {
                match cas.prefetch(&root) {
                    Ok(()) => log::info!("prefetched tree {root}"),
                    Err(e) => log::warn!("prefetching tree {root}: {e}"),
                }
            }
        })?;
    Ok(())
}
