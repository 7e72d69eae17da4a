//! Writes new blobs into a Pants store the way pantsd does, from a process of its own: its own
//! LMDB environment handle, one write transaction per blob (content and lease), Pants' flags.
//! For the tests (a map grown by another process) and the benchmarks (another writer's
//! transaction latency while digestfs renews leases). Not installed with the package.
//!
//! Prints `DIGEST <hex>-<size>` for each blob written, then one JSON line of transaction
//! latencies in microseconds: `{"txns":N,"p50_us":…,"p99_us":…,"max_us":…}`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use lmdb::{DatabaseFlags, Environment, EnvironmentFlags, Transaction, WriteFlags};

use digestfs::store::{lease_until, Digest, ShardCount, Store};

#[derive(Parser)]
#[command(about = "Write new blobs into a Pants store as pantsd does (for tests and benchmarks)")]
struct Args {
    /// The store (an lmdb_store directory)
    #[arg(long)]
    store: PathBuf,
    /// Only write blobs of this shard (0 to the shard count - 1); default: any shard
    #[arg(long)]
    shard: Option<usize>,
    /// The store's LMDB shard count, as Pants' option of that name (a power of two, 1 to 128)
    /// [default: what the store's folders show, else 16]
    #[arg(long, value_name = "N", env = "DIGESTFS_LOCAL_STORE_SHARD_COUNT")]
    local_store_shard_count: Option<ShardCount>,
    /// Map size to open each environment with, in bytes (Pants: 4 GiB for files)
    #[arg(long, default_value_t = 4 << 30)]
    map_size: usize,
    /// Blobs to write (stops early with --seconds)
    #[arg(long, default_value_t = u64::MAX)]
    count: u64,
    /// Stop after this many seconds
    #[arg(long)]
    seconds: Option<f64>,
    /// Transactions per second (0: as fast as possible)
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Size of each blob in bytes (below 512 KiB, so it goes to LMDB)
    #[arg(long, default_value_t = 64 * 1024)]
    blob_size: usize,
    /// Makes the blobs of different runs different
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

struct Shard {
    env: Environment,
    content: lmdb::Database,
    leases: lmdb::Database,
}

fn open(args: &Args, shard: usize) -> Shard {
    let dir = args.store.join("files").join(ShardCount::folder(shard));
    std::fs::create_dir_all(&dir).expect("creating the shard directory");
    let env = Environment::new()
        .set_flags(EnvironmentFlags::NO_SYNC | EnvironmentFlags::NO_TLS)
        .set_max_dbs(2)
        .set_map_size(args.map_size)
        .open(&dir)
        .expect("opening the environment");
    let content = env
        .create_db(Some("content-versioned"), DatabaseFlags::empty())
        .expect("content db");
    let leases = env
        .create_db(Some("leases-versioned"), DatabaseFlags::empty())
        .expect("leases db");
    Shard {
        env,
        content,
        leases,
    }
}

fn main() {
    let args = Args::parse();
    assert!(
        args.blob_size < 512 * 1024,
        "--blob-size must stay below 512 KiB"
    );
    // Every shard folder of the count, as Pants makes them (no environment is opened here:
    // this process opens its own, below).
    let count = match Store::create_with(&args.store, args.local_store_shard_count) {
        Ok(store) => store.shard_count(),
        Err(e) => {
            eprintln!("digestfs-store-writer: {e}");
            std::process::exit(1);
        }
    };
    if let Some(s) = args.shard.filter(|s| *s >= count.get()) {
        eprintln!("digestfs-store-writer: --shard {s}: the store has {count} shards");
        std::process::exit(2);
    }
    let mut shards: Vec<Option<Shard>> = (0..count.get()).map(|_| None).collect();
    let started = Instant::now();
    let stop = args.seconds.map(Duration::from_secs_f64);
    let gap = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let mut latencies = Vec::new();
    let mut n = args.seed << 32;
    let mut written = 0;
    while written < args.count && stop.is_none_or(|s| started.elapsed() < s) {
        n += 1;
        let blob: Vec<u8> = n
            .to_le_bytes()
            .iter()
            .cycle()
            .take(args.blob_size)
            .copied()
            .collect();
        let d = Digest::of_bytes(&blob);
        let index = d.shard(count);
        if args.shard.is_some_and(|s| s != index) {
            continue;
        }
        let shard = shards[index].get_or_insert_with(|| open(&args, index));
        // Timed from asking for the write lock to the commit: what a lease renewal delays.
        let t = Instant::now();
        let mut txn = shard.env.begin_rw_txn().expect("write transaction");
        txn.put(shard.content, &d.lmdb_key(), &blob, WriteFlags::empty())
            .expect("put content");
        txn.put(
            shard.leases,
            &d.lmdb_key(),
            &lease_until().to_le_bytes(),
            WriteFlags::empty(),
        )
        .expect("put lease");
        txn.commit().expect("commit");
        latencies.push(t.elapsed().as_micros() as u64);
        println!("DIGEST {d}");
        written += 1;
        if let Some(gap) = gap {
            std::thread::sleep(gap.saturating_sub(t.elapsed()));
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"txns\":{},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or(0)
    );
}
