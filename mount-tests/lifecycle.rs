//! The lifecycle a build server drives: start or reuse the daemon, survive its crash with the
//! views intact, and attributes that do not depend on when the mount started.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::*;
use crate::harness::{Mount, UnmountOnDrop};

fn process_alive(pid: i32) -> bool {
    crate::process_alive(pid)
}

/// `digestfs --store STORE mount --daemon --reuse MNT` run in `cwd`: the pid it prints.
fn start_or_reuse(cwd: &Path, store: &str, mnt: &Path) -> i32 {
    let out = run_ok(
        Command::new(bin())
            .current_dir(cwd)
            .args(["--store", store, "mount", "--daemon", "--reuse"])
            .arg(mnt),
    );
    out.trim().parse().unwrap()
}

fn status(mnt: &Path) -> serde_json::Value {
    serde_json::from_str(&dfs_ok(&["status", "--json", mnt.to_str().unwrap()])).unwrap()
}

#[test]
fn reuse_starts_once_reuses_and_refuses_another_store() {
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = UnmountOnDrop(&mnt);
    // Four callers at once (several BSP servers starting): one daemon, the same pid for all.
    let pids: Vec<i32> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..4)
            .map(|_| s.spawn(|| start_or_reuse(tmp.path(), "store", &mnt)))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(pids.iter().all(|p| *p == pids[0]), "{pids:?}");
    assert!(process_alive(pids[0]));
    // The store given relative is reported absolute.
    let store = tmp.path().join("store").canonicalize().unwrap();
    let s = status(&mnt);
    assert_eq!(s["store"], store.to_str().unwrap(), "{s}");
    assert_eq!(s["pid"], pids[0]);
    // The daemon says which digestfs it is (`--reuse` warns when it is another).
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "{s}");
    // Again, later, from elsewhere: reused.
    assert_eq!(
        start_or_reuse(Path::new("/"), store.to_str().unwrap(), &mnt),
        pids[0]
    );
    // Another store at the same mountpoint: refused, naming both.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let err = dfs_err(&[
        "--store",
        other.to_str().unwrap(),
        "mount",
        "--daemon",
        "--reuse",
        mnt.to_str().unwrap(),
    ]);
    assert!(err.contains(store.to_str().unwrap()), "{err}");
    assert!(err.contains(other.to_str().unwrap()), "{err}");
    // Without --reuse a live mountpoint is an error that says how to reuse it.
    let err = dfs_err(&[
        "--store",
        store.to_str().unwrap(),
        "mount",
        "--daemon",
        mnt.to_str().unwrap(),
    ]);
    assert!(
        err.contains("already mounted") && err.contains("--reuse"),
        "{err}"
    );
    dfs_ok(&["unmount", mnt.to_str().unwrap()]);
    wait_until("the daemon to exit", Duration::from_secs(10), || {
        (!process_alive(pids[0])).then_some(())
    });
}

/// Every file under `root` with its sha256.
fn hashes(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (path, meta) in entries(root) {
        if meta.is_file() {
            let bytes = std::fs::read(root.join(&path)).unwrap();
            out.insert(path, sha256_hex(&bytes));
        }
    }
    out
}

/// Every entry under `root` (not following symlinks), by relative path.
fn entries(root: &Path) -> BTreeMap<String, std::fs::Metadata> {
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let path = rel.join(e.file_name());
            let meta = std::fs::symlink_metadata(root.join(&path)).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.insert(path.to_string_lossy().into_owned(), meta);
        }
    }
    out
}

#[test]
fn views_survive_kill_9_mid_read_and_come_back_with_reuse() {
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = UnmountOnDrop(&mnt);
    let store = tmp.path().join("store");
    let store = store.to_str().unwrap();
    let pid = start_or_reuse(tmp.path(), store, &mnt);
    let m = mnt.to_str().unwrap();
    for (path, tree, layer) in [
        ("jvm-default/lib", LIB_TREE, "modules.src/jvm:lib"),
        ("jvm-default/lib", LIB_TREE, "sources.src/jvm:lib"),
        ("jvm-default/plugins", SRC_SYMLINKS, "scalac.src/jvm:lib"),
    ] {
        dfs_ok(&["bind", m, path, tree, "--layer", layer]);
    }
    let views = dfs_ok(&["views", "--json", m]);
    let lib = mnt.join("jvm-default/lib");
    let before = hashes(&lib);
    assert_eq!(before.len(), 71);

    // Readers keep reading, each read bounded: a reader that hangs fails the test.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let (lib, stop, names) = (lib.clone(), stop.clone(), before.clone());
            std::thread::spawn(move || {
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed) {
                    for (name, hash) in names.iter().skip(i) {
                        let out = run_timeout(
                            Command::new("cat").arg(lib.join(name)),
                            Duration::from_secs(20),
                        );
                        if out.status.success() {
                            assert_eq!(&sha256_hex(&out.stdout), hash, "{name}");
                            ok += 1;
                        }
                    }
                }
                ok
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until("the daemon to die", Duration::from_secs(10), || {
        (!process_alive(pid)).then_some(())
    });
    // What the kernel has not cached fails at once on the dead mount (what it has cached it
    // still serves); the readers above neither hang nor see bad bytes.
    let uncached = mnt.join("jvm-default/plugins/données avec espace.txt");
    let out = run_timeout(Command::new("cat").arg(&uncached), Duration::from_secs(20));
    assert!(!out.status.success(), "{out:?}");

    let pid2 = start_or_reuse(tmp.path(), store, &mnt);
    assert_ne!(pid, pid2);
    assert_eq!(dfs_ok(&["views", "--json", m]), views, "the views are back");
    assert_eq!(
        hashes(&lib),
        before,
        "files opened after the remount read the same bytes"
    );
    assert_eq!(std::fs::read(&uncached).unwrap().len(), 13);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0, "every reader read something");
    }
    dfs_ok(&["unmount", m]);
}

type Stat = (u64, u32, u64, u32, u32, u64, u64, u64, [i64; 6]);

fn stat_of(meta: &std::fs::Metadata) -> Stat {
    (
        meta.ino(),
        meta.mode(),
        meta.nlink(),
        meta.uid(),
        meta.gid(),
        meta.size(),
        meta.blocks(),
        meta.blksize(),
        [
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            meta.atime(),
            meta.atime_nsec(),
        ],
    )
}

#[test]
fn a_remount_leaves_every_stat_identical() {
    let trees = [
        ("jvm-default/lib", LIB_TREE),
        ("src", SRC_SYMLINKS),
        ("followed", SRC_FOLLOWED),
    ];
    let stats = |m: &Mount| -> BTreeMap<String, Stat> {
        entries(&m.mnt)
            .into_iter()
            .map(|(p, meta)| (p, stat_of(&meta)))
            .collect()
    };
    let first = stats(&Mount::fixture(&trees, &[]));
    // A later mount, by another daemon, on another mountpoint, the views bound in another order.
    std::thread::sleep(Duration::from_millis(1100));
    let mut reversed = trees;
    reversed.reverse();
    let second = stats(&Mount::fixture(&reversed, &[]));
    assert_eq!(first.len(), second.len());
    for (path, st) in &first {
        assert_eq!(Some(st), second.get(path), "{path}");
    }
    // No time is in the future, and content times are stable, not the mount's start.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (path, st) in &first {
        assert!(
            st.8[0] < now && st.8[0] >= 1_577_836_800,
            "{path}: {:?}",
            st.8
        );
    }
}

/// Sends SIGKILL to a daemon left running when a test fails early.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if process_alive(self.0) {
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// `digestfs --store STORE mount --daemon --reuse ARGS… MNT`: its output.
fn reuse_with(store: &Path, args: &[&str], mnt: &Path) -> std::process::Output {
    run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(store)
            .args(["mount", "--daemon", "--reuse"])
            .args(args)
            .arg(mnt),
        T,
    )
}

#[test]
fn reuse_refuses_a_daemon_of_another_frontend() {
    // A FUSE daemon: asking for NFS is refused, naming both front ends; FUSE is reused.
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = UnmountOnDrop(&mnt);
    let store = tmp.path().join("store");
    let pid = start_or_reuse(tmp.path(), store.to_str().unwrap(), &mnt);
    let _kill = KillOnDrop(pid);
    for args in [
        &["--frontend", "nfs", "--nfs-no-mount"][..],
        &["--frontend", "nfs"],
    ] {
        let out = reuse_with(&store, args, &mnt);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("through the fuse front end, not nfs as asked")
                && err.contains(&pid.to_string()),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "no pid printed: {out:?}");
    }
    assert_eq!(status(&mnt)["pid"], pid, "the daemon is untouched");
    let out = reuse_with(&store, &["--frontend", "fuse"], &mnt);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pid.to_string());
    dfs_ok(&["unmount", mnt.to_str().unwrap()]);
    wait_until("the daemon to exit", Duration::from_secs(10), || {
        (!process_alive(pid)).then_some(())
    });

    // An NFS server (without a mount: this kernel has no NFS client): asking for FUSE is
    // refused, naming both; asking for a mounted NFS is refused, naming --nfs-no-mount; the
    // same request is reused.
    let server = crate::harness::nfs::NfsServer::fixture(&[]);
    let _guard = UnmountOnDrop(&server.mnt);
    let store = server.tmp.path().join("store");
    let socket = server.socket.to_str().unwrap();
    let out = reuse_with(&store, &["--control", socket], &server.mnt);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("through the nfs front end, not fuse as asked"),
        "{err}"
    );
    let out = reuse_with(
        &store,
        &["--control", socket, "--frontend", "nfs"],
        &server.mnt,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--nfs-no-mount"), "{err}");
    let out = reuse_with(
        &store,
        &["--control", socket, "--frontend", "nfs", "--nfs-no-mount"],
        &server.mnt,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        server.pid().to_string(),
        "{out:?}"
    );
    let s: serde_json::Value = serde_json::from_str(&server.dfs_ok(&["status", "--json"])).unwrap();
    assert_eq!(
        (&s["frontend"], &s["mount_state"], &s["attached"]),
        (&"nfs".into(), &"none".into(), &false.into()),
        "{s}"
    );
}

#[test]
fn reuse_replaces_a_daemon_whose_mount_was_lazily_detached() {
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = UnmountOnDrop(&mnt);
    let store = tmp.path().join("store");
    let bind = format!("lib={JAR_TREE}");
    let start = || -> i32 {
        let out = reuse_with(&store, &["--bind", &bind], &mnt);
        stdout_ok(out).trim().parse().unwrap()
    };
    let pid = start();
    let _kill = KillOnDrop(pid);
    let s = status(&mnt);
    assert_eq!(
        (&s["frontend"], &s["mount_state"], &s["attached"]),
        (&"fuse".into(), &"attached".into(), &true.into()),
        "{s}"
    );
    let text = dfs_ok(&["status", mnt.to_str().unwrap()]);
    assert!(
        text.contains("frontend       fuse") && text.contains("mount          attached"),
        "{text}"
    );

    // A file held open keeps the daemon serving after a lazy detach.
    let jar = mnt.join("lib/lib/jansi.jar");
    let mut held = std::fs::File::open(&jar).unwrap();
    let mut head = [0u8; 4];
    std::io::Read::read_exact(&mut held, &mut head).unwrap();
    assert_eq!(&head, b"PK\x03\x04");
    run_ok(Command::new("fusermount3").args(["-u", "-z"]).arg(&mnt));
    assert!(!crate::harness::is_mounted(&mnt));
    assert!(process_alive(pid), "the detached daemon still runs");
    let s = status(&mnt);
    assert_eq!(s["pid"], pid);
    assert_eq!(
        (&s["mount_state"], &s["attached"]),
        (&"detached".into(), &false.into()),
        "{s}"
    );
    let text = dfs_ok(&["status", mnt.to_str().unwrap()]);
    assert!(text.contains("mount          detached"), "{text}");

    // --reuse does not hand out the detached daemon: it stops it and mounts afresh.
    let pid2 = start();
    let _kill2 = KillOnDrop(pid2);
    assert_ne!(pid, pid2);
    wait_until(
        "the detached daemon to exit",
        Duration::from_secs(10),
        || (!process_alive(pid)).then_some(()),
    );
    assert!(crate::harness::is_mounted(&mnt));
    assert_eq!(std::fs::read(&jar).unwrap().len(), 94545);
    let s = status(&mnt);
    assert_eq!(
        (&s["pid"], &s["mount_state"], &s["attached"]),
        (&pid2.into(), &"attached".into(), &true.into()),
        "{s}"
    );
    // And it is reused in turn.
    assert_eq!(start(), pid2);
    drop(held);
    dfs_ok(&["unmount", mnt.to_str().unwrap()]);
    wait_until("the daemon to exit", Duration::from_secs(10), || {
        (!process_alive(pid2)).then_some(())
    });
}
