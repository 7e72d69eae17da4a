//! Helpers shared by the integration and mount tests: the fixture store, its MANIFEST, and
//! running the `digestfs` binary with a timeout.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const JAR_TREE: &str = "93091a24f8d51c0ea4401c7dc9e2dd2c967608c2b7bcaf47a04eac9feb18ccd1-78";
pub const LIB_TREE: &str = "64d48ed9ebb10855020cceb60b3631ab4778a27210e5565387f119d452a5f956-6847";
pub const SRC_FOLLOWED: &str =
    "d1809efb519708d7ad9680803b5fc005e9f92f119e04e8d96937fcee03a75ee4-669";
pub const SRC_SYMLINKS: &str =
    "9d647aac3d36f1a59c80f778864ee2e8f2a00e2527f0e7d5dfd221298da279e6-634";
pub const JANSI: &str = "b56b71ae02b2451dfedd660d890d4e13b71b81b46f988475bf8af0a04c8ea0d5-94545";
pub const GUAVA: &str = "1d4ca0e3ee66921e8cb6521b62ecce32cc62abad391bf70b2fd14d40e7681f3a-2920436";

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_digestfs"))
}

/// `../shared/fixtures` beside the repository, or `$DIGESTFS_FIXTURES`. Missing fixtures fail
/// the test: they are the ground truth, never optional.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("DIGESTFS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        dir.join("pants-store").is_dir(),
        "fixture store not found at {} (set DIGESTFS_FIXTURES)",
        dir.display()
    );
    dir
}

/// A private, writable copy of the fixture store (the shared one is read-only).
pub fn fixture_store() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(fixtures_dir().join("pants-store"))
        .arg(tmp.path().join("store"))
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    tmp
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir {
        digest: String,
    },
    File {
        digest: String,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: String,
    },
}

/// Every tree of the MANIFEST: tree digest (`hex-size`) → path → kind. Directory paths carry no
/// trailing slash; the root is left out.
pub fn manifest() -> BTreeMap<String, BTreeMap<String, Kind>> {
    let text = std::fs::read_to_string(fixtures_dir().join("pants-store.MANIFEST.txt")).unwrap();
    let mut trees = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("== tree ") {
            let mut it = rest.split_whitespace();
            let key = format!("{}-{}", it.next().unwrap(), it.next().unwrap());
            trees.insert(key.clone(), BTreeMap::new());
            current = Some(key);
            continue;
        }
        let entries = trees.get_mut(current.as_ref().unwrap()).unwrap();
        let (fields, rest) = split_fields(line.trim_start(), 1);
        match fields[0] {
            "D" => {
                let (f, path) = split_fields(rest, 2);
                if path != "." {
                    let path = path.trim_end_matches('/').to_string();
                    entries.insert(
                        path,
                        Kind::Dir {
                            digest: format!("{}-{}", f[0], f[1]),
                        },
                    );
                }
            }
            "F" => {
                let (f, path) = split_fields(rest, 4);
                entries.insert(
                    path.to_string(),
                    Kind::File {
                        digest: format!("{}-{}", f[0], f[1]),
                        size: f[1].parse().unwrap(),
                        executable: f[2] == "x",
                    },
                );
            }
            "L" => {
                let rest = rest.strip_prefix("-> '").unwrap();
                let (target, path) = rest.split_once('\'').unwrap();
                entries.insert(
                    path.trim().to_string(),
                    Kind::Symlink {
                        target: target.to_string(),
                    },
                );
            }
            other => panic!("unknown MANIFEST line kind {other:?}"),
        }
    }
    trees
}

/// Splits off `n` whitespace-separated fields; the rest (which may hold spaces) is trimmed.
fn split_fields(s: &str, n: usize) -> (Vec<&str>, &str) {
    let mut fields = Vec::new();
    let mut rest = s.trim_start();
    for _ in 0..n {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        fields.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    (fields, rest.trim_end())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// How long one command of a test may run.
pub const T: Duration = Duration::from_secs(120);

/// Polls `f` every 20 ms until it gives a value; fails the test, naming `what`, after `limit`.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, killing it if it outlives `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// The stdout of a command that must have succeeded.
pub fn stdout_ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must succeed; its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run_timeout(cmd, T);
    if !out.status.success() {
        eprintln!("{cmd:?} failed");
    }
    stdout_ok(out)
}

/// Runs `digestfs ARGS…`.
pub fn dfs(args: &[&str]) -> Output {
    run_timeout(Command::new(bin()).args(args), T)
}

/// Runs `digestfs ARGS…`, which must succeed; its stdout.
pub fn dfs_ok(args: &[&str]) -> String {
    let out = dfs(args);
    if !out.status.success() {
        eprintln!("digestfs {args:?} failed");
    }
    stdout_ok(out)
}

/// `digestfs --store STORE import DIR`, which must succeed: the tree's digest.
pub fn import(store: &Path, dir: &Path) -> String {
    let out = dfs_ok(&[
        "--store",
        store.to_str().unwrap(),
        "import",
        dir.to_str().unwrap(),
    ]);
    out.trim().to_string()
}

/// Runs `digestfs ARGS…`, which must fail with exit code 1 and one line on stderr; that line.
pub fn dfs_err(args: &[&str]) -> String {
    let out = dfs(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "digestfs {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Deletes a small file blob from the store's LMDB shard the way Pants' GC does: from another
/// handle on the environment than any reader's.
pub fn delete_small_blob(store: &Path, digest: &str) {
    use lmdb::Transaction;
    let d: digestfs::store::Digest = digest.parse().unwrap();
    let env = lmdb::Environment::new()
        .set_max_dbs(2)
        .open(&store.join("files").join(shard_folder(store, &d)))
        .unwrap();
    let db = env.open_db(Some("content-versioned")).unwrap();
    let mut txn = env.begin_rw_txn().unwrap();
    txn.del(db, &d.lmdb_key(), None).unwrap();
    txn.commit().unwrap();
}

/// The folder of `digest`'s LMDB shard in the store at `store`, by the count its folders show.
pub fn shard_folder(store: &Path, digest: &digestfs::store::Digest) -> String {
    use digestfs::store::ShardCount;
    ShardCount::folder(digest.shard(ShardCount::resolve(store, None).unwrap()))
}

/// Runs `digestfs --store STORE ARGS…`.
pub fn digestfs(store: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--store", store.to_str().unwrap()];
    all.extend(args);
    dfs(&all)
}

/// Writes a chain `d/d/…/d/leaf.txt` of `depth` nested `Directory` protos into the store at
/// `store` (created if need be), as a hostile or merely odd tree would be; its digest.
pub fn chain_tree(store: &Path, depth: usize, leaf: &[u8]) -> String {
    use digestfs::store::{Entry, EntryKind, Importer, Listing, Store};
    let store = Store::create(store).unwrap();
    let mut imp = Importer::new(&store);
    let file = imp.put_bytes(leaf).unwrap();
    let one = |name: &str, kind| Listing {
        entries: vec![Entry {
            name: name.into(),
            kind,
        }],
    };
    let mut d = imp
        .put_directory(&one(
            "leaf.txt",
            EntryKind::File {
                digest: file,
                executable: false,
            },
        ))
        .unwrap();
    for _ in 0..depth {
        d = imp.put_directory(&one("d", EntryKind::Dir(d))).unwrap();
    }
    imp.finish().unwrap();
    d.to_string()
}

/// Stores `value` under `digest` in the LMDB shard of `kind_dir` (`<store>/files` or
/// `<store>/directories`) with no check at all: how the tests plant corrupt blobs.
pub fn put_raw(kind_dir: &Path, digest: &digestfs::store::Digest, value: &[u8]) {
    use lmdb::Transaction;
    let env = lmdb::Environment::new()
        .set_max_dbs(2)
        .set_map_size(1 << 30)
        .open(&kind_dir.join(shard_folder(kind_dir.parent().unwrap(), digest)))
        .unwrap();
    let db = env
        .create_db(Some("content-versioned"), lmdb::DatabaseFlags::empty())
        .unwrap();
    let mut txn = env.begin_rw_txn().unwrap();
    txn.put(db, &digest.lmdb_key(), &value, lmdb::WriteFlags::empty())
        .unwrap();
    txn.commit().unwrap();
}
