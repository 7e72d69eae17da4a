//! The store layer against stores written by Pants' own code, through the library and the CLI.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use digestfs::cas::Cas;
use digestfs::store::{walk, Digest, Entry, EntryKind, Importer, Listing, Store, StoreError};

fn walk(store: &Store, root: &str) -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    walk::walk_paths::<StoreError>(
        &root.parse().unwrap(),
        &mut |d| store.load_directory(d),
        &mut |path, kind| {
            let k = match kind {
                EntryKind::Dir(d) => Kind::Dir {
                    digest: d.to_string(),
                },
                EntryKind::File { digest, executable } => Kind::File {
                    digest: digest.to_string(),
                    size: digest.size,
                    executable: *executable,
                },
                EntryKind::Symlink(t) => Kind::Symlink { target: t.clone() },
            };
            out.insert(path.to_string(), k);
            Ok(())
        },
    )
    .unwrap();
    out
}

#[test]
fn every_manifest_tree_reads_back_exactly() {
    let tmp = fixture_store();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let manifest = manifest();
    assert_eq!(manifest.len(), 3, "the MANIFEST walks three trees");
    for (tree, expected) in &manifest {
        let got = walk(&store, tree);
        assert_eq!(&got, expected, "tree {tree}");
        for (path, kind) in expected {
            if let Kind::File { digest, size, .. } = kind {
                let d: Digest = digest.parse().unwrap();
                let bytes = store.read_all(&d).unwrap();
                assert_eq!(bytes.len() as u64, *size, "{path}");
                assert_eq!(sha256_hex(&bytes), d.hex(), "{path}");
            }
        }
    }
}

#[test]
fn ranged_reads_match_whole_reads() {
    let tmp = fixture_store();
    let store = Store::open(tmp.path().join("store")).unwrap();
    for digest in [
        GUAVA,
        "28d3fdacea1c20cc9e50807793584990726fdd36c6fdc60358d1c35fec2af34f-524287",
    ] {
        let d: Digest = digest.parse().unwrap();
        let whole = store.read_all(&d).unwrap();
        let blob = store.open_blob(&d).unwrap();
        for (off, len) in [
            (0u64, 1usize),
            (1000, 4096),
            (d.size - 10, 4096),
            (d.size, 10),
            (d.size + 5, 10),
        ] {
            let part = store.read_blob(&blob, off, len).unwrap();
            let start = (off as usize).min(whole.len());
            let end = (start + len).min(whole.len());
            assert_eq!(part, &whole[start..end], "{digest} at {off}+{len}");
        }
    }
}

#[test]
fn cli_ls_and_cat_serve_the_fixture() {
    let tmp = fixture_store();
    let store = tmp.path().join("store");
    let out = digestfs(&store, &["ls", "-R", SRC_SYMLINKS]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let expected = &manifest()[SRC_SYMLINKS];
    let mut listed = 0;
    for line in text.lines() {
        listed += 1;
        let (path, kind) = if let Some(rest) = line.strip_prefix("L ") {
            let (left, target) = rest.split_once(" -> ").unwrap();
            let path = left.rsplit("  ").next().unwrap().trim();
            (
                path.to_string(),
                Kind::Symlink {
                    target: target.to_string(),
                },
            )
        } else {
            let f: Vec<&str> = line.splitn(5, ' ').collect();
            let (kind, exec) = (f[0], f[1]);
            let rest = f[2..].join(" ");
            let rest = rest.trim_start();
            let (size, rest) = rest.split_once(' ').unwrap();
            let (digest, path) = rest.split_once(' ').unwrap();
            match kind {
                "D" => (
                    path.trim_end_matches('/').to_string(),
                    Kind::Dir {
                        digest: digest.into(),
                    },
                ),
                "F" => (
                    path.to_string(),
                    Kind::File {
                        digest: digest.into(),
                        size: size.parse().unwrap(),
                        executable: exec == "x",
                    },
                ),
                k => panic!("unexpected kind {k} in {line:?}"),
            }
        };
        assert_eq!(expected.get(&path), Some(&kind), "line {line:?}");
    }
    assert_eq!(listed, expected.len());

    let out = digestfs(&store, &["cat", GUAVA]);
    assert!(out.status.success());
    assert_eq!(
        format!("{}-{}", sha256_hex(&out.stdout), out.stdout.len()),
        GUAVA
    );
}

#[test]
fn round_trip_reproduces_every_digest_and_proto() {
    let tmp = fixture_store();
    let fixture = Store::open(tmp.path().join("store")).unwrap();
    for tree in manifest().keys() {
        let digest: Digest = tree.parse().unwrap();
        let dest = tmp.path().join(format!("out-{}", &tree[..8]));
        digestfs::materialize::materialize(
            &Cas::local(fixture.clone()),
            &digest,
            &dest,
            &mut |_| {},
        )
        .unwrap();
        let fresh = Store::create(tmp.path().join(format!("fresh-{}", &tree[..8]))).unwrap();
        let again = Importer::new(&fresh).import_path(&dest).unwrap();
        assert_eq!(again, digest, "tree {tree}");
        let walked = fixture.tree_blobs(&[digest]);
        assert!(walked.errors.is_empty());
        for d in walked.dirs {
            assert_eq!(
                fresh.directory_bytes(&d).unwrap(),
                fixture.directory_bytes(&d).unwrap(),
                "{d}"
            );
        }
        // Large blobs land where Pants puts them, read-only.
        let guava: Digest = GUAVA.parse().unwrap();
        if fresh.has_file(&guava).unwrap() {
            let meta = std::fs::metadata(fresh.large_blob_path(&guava)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o555);
        }
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = fixture_store();
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();

    // Malformed digests and missing blobs: exit 1, one line that names the input.
    let missing = format!("{}-5", "ab".repeat(32));
    for (args, needle) in [
        (vec!["cat", "xyz"], "xyz"),
        (vec!["ls", "1234-5"], "1234-5"),
        (vec!["cat", &missing], missing.as_str()),
        (vec!["ls", &missing], missing.as_str()),
    ] {
        let out = digestfs(&root, &args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let out = digestfs(&root, &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");

    // A truncated large blob.
    let guava: Digest = GUAVA.parse().unwrap();
    let path = store.large_blob_path(&guava);
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    perms.set_mode(0o644);
    std::fs::set_permissions(&path, perms).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    assert!(matches!(
        store.open_blob(&guava),
        Err(StoreError::SizeMismatch { actual: 1000, .. })
    ));
    let out = digestfs(&root, &["cat", GUAVA]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(GUAVA));

    // A wrong-length LMDB value: store "abc" under the key of a 5-byte digest.
    let lying = Digest {
        size: 5,
        ..Digest::of_bytes(b"abc")
    };
    put_raw(&root.join("files"), &lying, b"abc");
    let err = store.read_all(&lying).unwrap_err();
    assert!(
        matches!(err, StoreError::SizeMismatch { actual: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&lying.to_string()));

    // Hostile names in a Directory written by the test.
    for name in ["..", ".", "", "a/b", "nul\0x"] {
        let listing = Listing {
            entries: vec![Entry {
                name: name.to_string(),
                kind: EntryKind::File {
                    digest: Digest::EMPTY,
                    executable: false,
                },
            }],
        };
        let mut imp = Importer::new(&store);
        let d = imp.put_directory(&listing).unwrap();
        drop(imp.import_path(Path::new("/dev/null")));
        let err = store.load_directory(&d).unwrap_err();
        assert!(matches!(err, StoreError::BadName { .. }), "{name:?}: {err}");
        let out = digestfs(&root, &["ls", &d.to_string()]);
        let msg = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            msg.contains(&d.to_string()) && msg.contains(&format!("{name:?}")),
            "{msg}"
        );
    }

    // Garbage where a Directory should be.
    let garbage = b"\x0a\xff\xff\xff\xff".to_vec();
    let gd = Digest::of_bytes(&garbage);
    put_raw(&root.join("directories"), &gd, &garbage);
    assert!(matches!(
        store.load_directory(&gd),
        Err(StoreError::CorruptDirectory { .. })
    ));
}

/// Writes a raw value into an LMDB shard, bypassing every check.

#[test]
fn concurrent_materialize_never_fails_or_exposes_partial_files() {
    let tmp = fixture_store();
    let root = tmp.path().join("store");
    let dest = tmp.path().join("dest");
    let expected: Vec<(String, String, u64)> = manifest()[JAR_TREE]
        .iter()
        .filter_map(|(p, k)| match k {
            Kind::File { digest, size, .. } => Some((p.clone(), digest.clone(), *size)),
            _ => None,
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader that checks every file it can see while the writers race.
    let reader = {
        let (dest, expected, stop) = (dest.clone(), expected.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut checked = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (path, digest, size) in &expected {
                    let p = dest.join(path);
                    let Ok(bytes) = std::fs::read(&p) else {
                        continue;
                    };
                    let mode = std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777);
                    assert_eq!(bytes.len() as u64, *size, "{path} seen partial");
                    assert_eq!(
                        format!("{}-{}", sha256_hex(&bytes), size),
                        *digest,
                        "{path}"
                    );
                    assert_eq!(mode.unwrap(), 0o444, "{path}");
                    checked += 1;
                }
            }
            checked
        })
    };
    for round in 0..20 {
        let children: Vec<_> = (0..8)
            .map(|_| {
                Command::new(bin())
                    .arg("--store")
                    .arg(&root)
                    .args(["materialize", JAR_TREE])
                    .arg(&dest)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0, "the reader checked files");
    for (path, digest, _) in &expected {
        let bytes = std::fs::read(dest.join(path)).unwrap();
        assert_eq!(format!("{}-{}", sha256_hex(&bytes), bytes.len()), *digest);
    }
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dest.join("lib"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".digestfs-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn reading_while_another_process_imports() {
    let tmp = fixture_store();
    let root = tmp.path().join("store");
    // A tree of many small files and a few large ones, new to the store.
    let src = tmp.path().join("src");
    for i in 0..400 {
        let dir = src.join(format!("d{}", i % 20));
        std::fs::create_dir_all(&dir).unwrap();
        let size = if i % 100 == 0 {
            700 * 1024
        } else {
            1000 + i * 37
        };
        std::fs::write(dir.join(format!("f{i}")), vec![(i % 251) as u8; size]).unwrap();
    }
    let mut importers: Vec<_> = (0..2)
        .map(|_| {
            Command::new(bin())
                .arg("--store")
                .arg(&root)
                .arg("import")
                .arg(&src)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let store = Store::open(&root).unwrap();
    let trees = manifest();
    let mut reads = 0;
    loop {
        for (path, kind) in &trees[JAR_TREE] {
            if let Kind::File { digest, .. } = kind {
                let d: Digest = digest.parse().unwrap();
                let bytes = store.read_all(&d).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(sha256_hex(&bytes), d.hex());
                reads += 1;
            }
        }
        if importers
            .iter_mut()
            .all(|c| c.try_wait().unwrap().is_some())
        {
            break;
        }
    }
    let mut digests = Vec::new();
    for c in importers {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "no progress bar when stderr is not a terminal"
        );
        digests.push(String::from_utf8(out.stdout).unwrap());
    }
    assert_eq!(digests[0], digests[1]);
    assert!(reads > 0);
    // What was imported reads back through this process's already-open environments.
    let imported: Digest = digests[0].trim().parse().unwrap();
    let listed = walk(&store, &imported.to_string());
    assert_eq!(
        listed
            .values()
            .filter(|k| matches!(k, Kind::File { .. }))
            .count(),
        400
    );
}

/// Another process (the store writer, as pantsd would) writes `count` 64 KiB blobs into shard 0,
/// opening it with a map of `map` bytes; returns their digests.
fn run_writer(store: &Path, map: usize, count: usize, seed: u64) -> Vec<Digest> {
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_digestfs-store-writer")).args([
            "--store",
            store.to_str().unwrap(),
            "--shard",
            "0",
            "--map-size",
            &map.to_string(),
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
        ]),
    );
    let digests: Vec<Digest> = out
        .lines()
        .filter_map(|l| l.strip_prefix("DIGEST "))
        .map(|d| d.trim().parse().unwrap())
        .collect();
    assert_eq!(digests.len(), count);
    digests
}

#[test]
fn a_map_grown_by_another_process_is_adopted_while_readers_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    // Another process creates the shard with a 1 MiB map; we open it and start reading.
    let first = run_writer(&root, 1 << 20, 4, 1);
    let store = std::sync::Arc::new(Store::open(&root).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (store, stop, first) = (store.clone(), stop.clone(), first.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for d in &first {
                        let bytes = store.read_all(d).unwrap_or_else(|e| panic!("{d}: {e}"));
                        assert_eq!(Digest::of_bytes(&bytes), *d);
                        reads += 1;
                    }
                }
                reads
            })
        })
        .collect();
    // Meanwhile a second process grows the map to 64 MiB and writes 3 MiB into it.
    let second = run_writer(&root, 64 << 20, 48, 2);
    // What it wrote lies past our old map: reading it means adopting the new size.
    for d in &second {
        let bytes = store.read_all(d).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(Digest::of_bytes(&bytes), *d);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
}

#[test]
fn long_operations_show_progress_on_a_terminal() {
    // `script` gives the command a pseudo-terminal, as a user's shell would.
    let tmp = fixture_store();
    let root = tmp.path().join("store");
    let dest = tmp.path().join("dest");
    let cmd = format!(
        "{} --store {} materialize {JAR_TREE} {}",
        bin().display(),
        root.display(),
        dest.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("materializing"), "{screen}");
    assert!(screen.contains("MiB"), "{screen}");
    assert!(dest.join("lib/guava.jar").exists());
}

#[test]
fn a_chain_of_100k_directories_is_one_error_line_never_an_abort() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let root = chain_tree(&store, 100_000, b"leaf");
    // ls -R prints what an OS path can hold, then one line naming the depth.
    let out = digestfs(&store, &["ls", "-R", &root]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("too deep") && stderr.contains("depth 2049"),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2048);
    // Plain ls and cat of the leaf are unaffected.
    assert_eq!(
        String::from_utf8_lossy(&digestfs(&store, &["ls", &root]).stdout)
            .lines()
            .count(),
        1
    );
    // materialize stops with one line naming the depth, before the OS refuses the path.
    let dest = tmp.path().join("out");
    let mut args = vec!["--store", store.to_str().unwrap(), "materialize", &root];
    args.push(dest.to_str().unwrap());
    let err = dfs_err(&args);
    assert!(err.contains("too deep") && err.contains("depth"), "{err}");
    // A chain short enough for the OS materializes whole.
    let short = chain_tree(&store, 500, b"short");
    let dest = tmp.path().join("short");
    dfs_ok(&[
        "--store",
        store.to_str().unwrap(),
        "materialize",
        &short,
        dest.to_str().unwrap(),
    ]);
    let leaf = dest.join("d/".repeat(500)).join("leaf.txt");
    assert_eq!(std::fs::read(leaf).unwrap(), b"short");
}

/// The shard folders of one kind (`files` or `directories`) in a store, sorted by number.
fn shard_folders(store: &Path, kind: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join(kind))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort_by_key(|n| usize::from_str_radix(n, 16).unwrap());
    names
}

/// Stores of 1, 2, 4 and 128 shards, written by `import` with `--local-store-shard-count` (or
/// its environment variable): every folder Pants would make, every blob in the folder of its
/// shard, and `ls -R` and `cat` of every file, told nothing, give exactly what the fixture's
/// 16-shard store gives.
#[test]
fn stores_of_any_shard_count_import_and_read_back_byte_for_byte() {
    use digestfs::store::ShardCount;
    let tmp = fixture_store();
    let fixture = tmp.path().join("store");
    let trees = [LIB_TREE, SRC_SYMLINKS, SRC_FOLLOWED];
    let ls = |store: &Path, tree: &str, env: Option<&str>| {
        let mut cmd = Command::new(bin());
        cmd.arg("--store").arg(store).args(["ls", "-R", tree]);
        match env {
            Some(n) => cmd.env("DIGESTFS_LOCAL_STORE_SHARD_COUNT", n),
            None => cmd.env_remove("DIGESTFS_LOCAL_STORE_SHARD_COUNT"),
        };
        stdout_ok(run_timeout(&mut cmd, T))
    };
    let expected: Vec<String> = trees.iter().map(|t| ls(&fixture, t, None)).collect();
    let fixture_store = Store::open(&fixture).unwrap();
    assert_eq!(fixture_store.shard_count(), ShardCount::DEFAULT);
    let dirs: Vec<_> = trees
        .iter()
        .map(|t| {
            let dest = tmp.path().join(format!("out-{}", &t[..8]));
            dfs_ok(&[
                "--store",
                fixture.to_str().unwrap(),
                "materialize",
                t,
                dest.to_str().unwrap(),
            ]);
            dest
        })
        .collect();
    for (count, via_env) in [(1, false), (2, true), (4, false), (128, false)] {
        let store = tmp.path().join(format!("store-{count}"));
        let n = count.to_string();
        for (tree, dir) in trees.iter().zip(&dirs) {
            let mut cmd = Command::new(bin());
            cmd.arg("--store").arg(&store);
            if via_env {
                cmd.env("DIGESTFS_LOCAL_STORE_SHARD_COUNT", &n);
            } else {
                cmd.args(["--local-store-shard-count", &n]);
            }
            let got = run_ok(cmd.arg("import").arg(dir));
            assert_eq!(got.trim(), *tree, "{count} shards");
        }
        let folders: Vec<String> = (0..count).map(|i| format!("{i:x}")).collect();
        assert_eq!(shard_folders(&store, "files"), folders, "{count} shards");
        assert_eq!(
            shard_folders(&store, "directories"),
            folders,
            "{count} shards"
        );

        // Told nothing, a reader finds the count from the folders.
        let reader = Store::open(&store).unwrap();
        assert_eq!(reader.shard_count().get(), count);
        for ((tree, want), _) in trees.iter().zip(&expected).zip(&dirs) {
            assert_eq!(
                &ls(&store, tree, None),
                want,
                "ls -R {tree}, {count} shards"
            );
            let walked = fixture_store.tree_blobs(&[tree.parse().unwrap()]);
            for d in walked.dirs {
                assert_eq!(
                    reader.directory_bytes(&d).unwrap(),
                    fixture_store.directory_bytes(&d).unwrap()
                );
            }
            for f in walked.files {
                let a = dfs_ok_bytes(&["--store", store.to_str().unwrap(), "cat", &f.to_string()]);
                let b =
                    dfs_ok_bytes(&["--store", fixture.to_str().unwrap(), "cat", &f.to_string()]);
                assert_eq!(a, b, "cat {f}, {count} shards");
                assert_eq!(sha256_hex(&a), f.hex());
            }
        }
        assert!(reader.schema_check().unwrap() > 0);
        drop(reader);
        // Each small blob sits in the environment of the folder Pants would read it from.
        let count_ = ShardCount::new(count as u32).unwrap();
        let walked = fixture_store.tree_blobs(&[LIB_TREE.parse().unwrap()]);
        for kind in ["files", "directories"] {
            let digests: Vec<Digest> = match kind {
                "files" => walked
                    .files
                    .iter()
                    .filter(|d| !d.is_large() && !d.is_empty())
                    .copied()
                    .collect(),
                _ => walked.dirs.clone(),
            };
            assert!(!digests.is_empty());
            for i in 0..count {
                let dir = store.join(kind).join(format!("{i:x}"));
                if !dir.join("data.mdb").exists() {
                    assert!(digests.iter().all(|d| d.shard(count_) != i), "{dir:?}");
                    continue;
                }
                use lmdb::Transaction;
                let env = lmdb::Environment::new().set_max_dbs(2).open(&dir).unwrap();
                let db = env.open_db(Some("content-versioned")).unwrap();
                let txn = env.begin_ro_txn().unwrap();
                for d in &digests {
                    assert_eq!(
                        txn.get(db, &d.lmdb_key()).is_ok(),
                        d.shard(count_) == i,
                        "{d} in {kind}/{i:x}"
                    );
                }
            }
        }
    }
}

/// `digestfs cat` output that must have succeeded.
fn dfs_ok_bytes(args: &[&str]) -> Vec<u8> {
    let out = dfs(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An option that contradicts the store's folders, and counts that are no count, are refused
/// with a clear message; `doctor` says how many shards it found.
#[test]
fn a_shard_count_that_contradicts_the_store_is_refused_naming_the_folder() {
    let tmp = fixture_store();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    for n in ["4", "8"] {
        let err = dfs_err(&["--store", s, "--local-store-shard-count", n, "ls", LIB_TREE]);
        assert!(err.contains(&format!("{s}/files/f")), "{err}");
        assert!(
            err.contains(&format!("a store of {n} shards"))
                && err.contains("--local-store-shard-count 16"),
            "{err}"
        );
    }
    // The same for the environment variable, and for cat.
    let out = run_timeout(
        Command::new(bin())
            .args(["--store", s, "cat", GUAVA])
            .env("DIGESTFS_LOCAL_STORE_SHARD_COUNT", "2"),
        T,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("files/f"));
    // The right count, given, changes nothing.
    dfs_ok(&[
        "--store",
        s,
        "--local-store-shard-count",
        "16",
        "ls",
        LIB_TREE,
    ]);
    // Not a count: a usage error that says what is accepted.
    for bad in ["3", "0", "256", "many"] {
        let out = dfs(&[
            "--store",
            s,
            "--local-store-shard-count",
            bad,
            "ls",
            LIB_TREE,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("power of two from 1 to 128"), "{err}");
    }
    // doctor names the count it found, and a count the keys contradict.
    let out = dfs(&["--store", s, "doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("16 shards (found from its folders"), "{text}");
    let four = tmp.path().join("four");
    dfs_ok(&[
        "--store",
        four.to_str().unwrap(),
        "--local-store-shard-count",
        "4",
        "import",
        fixtures_dir().join("README.md").to_str().unwrap(),
    ]);
    let out = dfs(&["--store", four.to_str().unwrap(), "doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("4 shards (found from its folders: files/0…files/3)"),
        "{text}"
    );
}
