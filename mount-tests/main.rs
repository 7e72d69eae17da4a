//! Real FUSE mounts read by real clients: find, ls, sha256 through read(2), unzip, javac/java,
//! mmap. Run as root with /dev/fuse and fusermount3 present (scripts/test installs fuse3).

#[path = "../tests/common/mod.rs"]
mod common;
mod faults;
mod harness;
mod hostile;
mod lifecycle;
mod metrics;
mod nfs;
mod packaging;
mod remote;
mod systemd;
mod takeover;
mod transport;
mod views;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use harness::{is_mounted, Mount};

fn all_trees() -> Vec<(&'static str, &'static str)> {
    vec![
        ("jvm/resolves/jvm-default", JAR_TREE),
        ("src", SRC_SYMLINKS),
        ("followed", SRC_FOLLOWED),
    ]
}

#[test]
fn find_and_ls_match_the_manifest() {
    let m = Mount::fixture(&all_trees(), &[]);
    let manifest = manifest();
    for (bound, tree) in all_trees() {
        let root = m.path(bound);
        let out = run_ok(
            Command::new("find")
                .arg(&root)
                .arg("-mindepth")
                .arg("1")
                .args(["-printf", "%y %s %m %P\\0%l\\0"]),
        );
        let mut got = BTreeMap::new();
        let mut parts = out.split('\0');
        while let (Some(head), Some(link)) = (parts.next(), parts.next()) {
            let mut f = head.splitn(4, ' ');
            let (ty, size, mode, path) = (
                f.next().unwrap(),
                f.next().unwrap(),
                f.next().unwrap(),
                f.next().unwrap(),
            );
            got.insert(
                path.to_string(),
                (
                    ty.to_string(),
                    size.parse::<u64>().unwrap(),
                    mode.to_string(),
                    link.to_string(),
                ),
            );
        }
        let expected = &manifest[tree];
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "names under {bound}"
        );
        for (path, kind) in expected {
            let (ty, size, mode, link) = &got[path];
            match kind {
                Kind::Dir { .. } => {
                    assert_eq!((ty.as_str(), mode.as_str()), ("d", "555"), "{path}")
                }
                Kind::File {
                    size: s,
                    executable,
                    ..
                } => {
                    assert_eq!(ty, "f", "{path}");
                    assert_eq!(size, s, "{path}");
                    assert_eq!(mode, if *executable { "555" } else { "444" }, "{path}");
                }
                Kind::Symlink { target } => {
                    assert_eq!((ty.as_str(), link), ("l", target), "{path}");
                }
            }
        }
        let ls = run_ok(Command::new("ls").arg("-lR").arg(&root));
        for path in expected.keys() {
            let name = path.rsplit('/').next().unwrap();
            assert!(ls.contains(name), "ls -lR lacks {name}");
        }
    }
    // The root lists the bound paths; the intermediate directories appear on their own.
    let names: Vec<String> = std::fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for n in ["jvm", "src", "followed"] {
        assert!(names.contains(&n.to_string()));
    }
    assert!(m.path("jvm/resolves").is_dir());
}

#[test]
fn every_file_hashes_to_its_digest() {
    let m = Mount::fixture(&all_trees(), &["--passthrough", "off"]);
    let manifest = manifest();
    for (bound, tree) in all_trees() {
        for (path, kind) in &manifest[tree] {
            if let Kind::File { digest, .. } = kind {
                let bytes = std::fs::read(m.path(bound).join(path)).unwrap();
                assert_eq!(
                    format!("{}-{}", sha256_hex(&bytes), bytes.len()),
                    *digest,
                    "{bound}/{path}"
                );
            }
        }
    }
}

#[test]
fn passthrough_serves_large_blobs() {
    // Over this run's transport: over io-uring the opens and their backing ids go by the ring.
    let (m, socket) = Mount::fixture_with_control(&[("jvm", JAR_TREE)], &["--passthrough", "on"]);
    for (path, kind) in &manifest()[JAR_TREE] {
        if let Kind::File { digest, .. } = kind {
            let bytes = std::fs::read(m.path("jvm").join(path)).unwrap();
            assert_eq!(
                format!("{}-{}", sha256_hex(&bytes), bytes.len()),
                *digest,
                "{path}"
            );
        }
    }
    assert!(
        m.log_text().contains("passthrough for large blobs: on"),
        "{}",
        m.log_text()
    );
    let status = harness::status(&socket);
    // One backing id per large jar opened (the tree's blobs of 512 KiB and more).
    let large = manifest()[JAR_TREE]
        .values()
        .filter(|k| matches!(k, Kind::File { size, .. } if *size >= 524_288))
        .count() as u64;
    assert!(large > 0);
    assert_eq!(status.passthrough_opens, Some(large), "{status:?}");
    assert_eq!(status.backing_ids, Some(large), "{status:?}");
    // And the kernel read them itself: the daemon served the small blobs' bytes at most.
    let small_bytes: u64 = manifest()[JAR_TREE]
        .values()
        .filter_map(|k| match k {
            Kind::File { size, .. } if *size < 524_288 => Some(*size),
            _ => None,
        })
        .sum();
    assert!(status.read_bytes <= small_bytes, "{status:?}");
    assert!(status.opens >= large, "{status:?}");

    // Opened again, with the first handles closed: each blob's id is reused, none made anew,
    // and the bytes are still exact.
    for (path, kind) in &manifest()[JAR_TREE] {
        if let Kind::File { digest, .. } = kind {
            let bytes = std::fs::read(m.path("jvm").join(path)).unwrap();
            assert_eq!(format!("{}-{}", sha256_hex(&bytes), bytes.len()), *digest);
        }
    }
    let again = harness::status(&socket);
    assert_eq!(again.passthrough_opens, Some(2 * large), "{again:?}");
    assert_eq!(again.backing_ids, Some(large), "{again:?}");
    assert!(again.read_bytes <= 2 * small_bytes, "{again:?}");
    // A blob with an id is opened again with no visit to the core: only the small ones were.
    let small = manifest()[JAR_TREE]
        .values()
        .filter(|k| matches!(k, Kind::File { size, .. } if *size < 524_288))
        .count() as u64;
    assert_eq!(again.opens - status.opens, small, "{status:?} {again:?}");

    // Files open are counted as handles while they are, and until the kernel releases them.
    let status = || harness::status(&socket);
    let manifest = manifest();
    let jar = manifest[JAR_TREE]
        .iter()
        .find_map(|(p, k)| matches!(k, Kind::File { size, .. } if *size >= 524_288).then_some(p))
        .unwrap();
    let all_released = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while status().open_handles != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a handle was never released"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The kernel releases closed files in the background: the passes' first.
    all_released();
    let held = std::fs::File::open(m.path("jvm").join(jar)).unwrap();
    assert_eq!(status().open_handles, 1);
    drop(held);
    all_released();
}

#[test]
fn unzip_reads_every_jar() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let mut jars = 0;
    for entry in std::fs::read_dir(m.path("lib/lib")).unwrap() {
        let path = entry.unwrap().path();
        let listing = run_ok(Command::new("unzip").arg("-l").arg(&path));
        assert!(
            listing.contains("META-INF/"),
            "{}: {listing}",
            path.display()
        );
        // Test every entry's CRC too: this reads the whole jar out of order.
        run_ok(Command::new("unzip").arg("-tq").arg(&path));
        jars += 1;
    }
    assert_eq!(jars, 71);
}

#[test]
fn javac_compiles_and_java_runs_against_the_mounted_classpath() {
    let m = Mount::fixture(&[("jvm/resolves/jvm-default", JAR_TREE)], &[]);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("Hello.java"),
        r#"import com.google.common.base.Joiner;
import org.apache.commons.lang3.StringUtils;
public class Hello {
    public static void main(String[] args) {
        System.out.println(Joiner.on("+").join("guava", StringUtils.capitalize("lang3")));
    }
}
"#,
    )
    .unwrap();
    let cp = format!("{}/*", m.path("jvm/resolves/jvm-default/lib").display());
    run_ok(
        Command::new("javac")
            .arg("-cp")
            .arg(&cp)
            .arg("-d")
            .arg(work.path())
            .arg(work.path().join("Hello.java")),
    );
    let out = run_ok(
        Command::new("java")
            .arg("-cp")
            .arg(format!("{cp}:{}", work.path().display()))
            .arg("Hello"),
    );
    assert_eq!(out.trim(), "guava+Lang3");
}

#[test]
fn mmap_of_a_large_jar_reads_the_right_bytes() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &["--passthrough", "off"]);
    let jar = m.path("lib/lib/guava.jar");
    let script = r#"
import hashlib, mmap, sys
with open(sys.argv[1], 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
    tail = mm[-22:]
    assert tail[:4] == b'PK\x05\x06', tail   # the zip end-of-central-directory record
    print(hashlib.sha256(mm).hexdigest(), len(mm))
"#;
    let out = run_ok(Command::new("python3").arg("-c").arg(script).arg(&jar));
    assert_eq!(out.trim().replace(' ', "-"), GUAVA);
}

#[test]
fn one_jar_is_one_inode_across_views_and_the_content_area() {
    let m = Mount::fixture(&[("a", JAR_TREE), ("b", LIB_TREE)], &[]);
    let a = std::fs::metadata(m.path("a/lib/guava.jar")).unwrap();
    let b = std::fs::metadata(m.path("b/guava.jar")).unwrap();
    let c = std::fs::metadata(m.path(&format!(".digestfs/blobs/{GUAVA}"))).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.ino(), c.ino());
    assert_eq!(
        (a.mtime(), a.mtime_nsec(), a.size()),
        (b.mtime(), b.mtime_nsec(), b.size())
    );
    // A directory digest is one inode too: a/lib and b show the same Directory.
    let d1 = std::fs::metadata(m.path("a/lib")).unwrap();
    let d2 = std::fs::metadata(m.path("b")).unwrap();
    let d3 = std::fs::metadata(m.path(&format!(".digestfs/trees/{LIB_TREE}"))).unwrap();
    assert_eq!(d1.ino(), d2.ino());
    assert_eq!(d1.ino(), d3.ino());
    // Ownership and sizes as promised.
    assert_eq!(a.uid(), unsafe { libc::getuid() });
    assert_eq!((a.blksize(), a.blocks()), (4096, 2920436u64.div_ceil(512)));
    // `..` leads back where we came from.
    let up = std::fs::canonicalize(m.path("a/lib/..")).unwrap();
    assert_eq!(up, m.path("a"));
}

#[test]
fn every_write_is_erofs() {
    let m = Mount::fixture(&[("src", SRC_SYMLINKS)], &[]);
    let file = m.path("src/bin/run.sh");
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map(drop),
        "open for write",
    );
    erofs(std::fs::write(m.path("src/new.txt"), b"x"), "create");
    erofs(std::fs::create_dir(m.path("src/newdir")), "mkdir");
    erofs(std::fs::remove_file(&file), "unlink");
    erofs(std::fs::remove_dir(m.path("src/empty_dir")), "rmdir");
    erofs(std::fs::rename(&file, m.path("src/renamed")), "rename");
    erofs(std::os::unix::fs::symlink("x", m.path("src/ln")), "symlink");
    erofs(std::fs::hard_link(&file, m.path("src/hl")), "link");
    use std::os::unix::fs::PermissionsExt;
    erofs(
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    let c = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    let truncated = unsafe { libc::truncate(c.as_ptr(), 0) };
    erofs(
        if truncated == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        },
        "truncate",
    );
    // And the content is untouched.
    assert_eq!(
        sha256_hex(&std::fs::read(&file).unwrap()),
        "8415c3a2cc25c3d9b7cd17dc51898c13cb6afdcfeb67f9887cc90be4c0e805dd"
    );
}

#[test]
fn symlinks_empty_entries_and_non_ascii_names() {
    let m = Mount::fixture(&[("src", SRC_SYMLINKS)], &[]);
    assert_eq!(
        std::fs::read_link(m.path("src/nested/link_to_src_dir")).unwrap(),
        Path::new("../src")
    );
    // Followed by the kernel, the link leads back into the same view.
    assert_eq!(
        std::fs::read(m.path("src/link_to_app.java")).unwrap(),
        std::fs::read(m.path("src/src/main/java/org/example/App.java")).unwrap()
    );
    assert_eq!(std::fs::read(m.path("src/empty.txt")).unwrap(), b"");
    assert_eq!(
        std::fs::read_dir(m.path("src/empty_dir")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read(m.path("src/données avec espace.txt"))
            .unwrap()
            .len(),
        13
    );
}

#[test]
fn xattrs_are_opt_in() {
    let script = r#"
import errno, os, sys
p = sys.argv[1]
try:
    print(os.getxattr(p, 'user.pants.digest').decode(), os.getxattr(p, 'user.checksum.sha256').decode(), ','.join(sorted(os.listxattr(p))))
except OSError as e:
    print('errno', errno.errorcode[e.errno])
"#;
    let on = Mount::fixture(&[("lib", JAR_TREE)], &["--xattrs"]);
    let out = run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(on.path("lib/lib/guava.jar")),
    );
    let hex = GUAVA.split('-').next().unwrap();
    assert_eq!(
        out.trim(),
        format!("{GUAVA} {hex} user.checksum.sha256,user.pants.digest")
    );
    let off = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let out = run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(off.path("lib/lib/guava.jar")),
    );
    // ENOSYS from the daemon reaches callers as EOPNOTSUPP (Python names it ENOTSUP).
    assert_eq!(out.trim(), "errno ENOTSUP");
}

#[test]
fn a_blob_deleted_after_mounting_is_eio_and_the_rest_reads() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &["--passthrough", "off"]);
    let digest: digestfs::store::Digest = GUAVA.parse().unwrap();
    let store = digestfs::store::Store::open(&m.store).unwrap();
    std::fs::remove_file(store.large_blob_path(&digest)).unwrap();
    // Run the reader as its own process with a time limit: a hang fails the test, never CI.
    let out = run_timeout(
        Command::new("cat").arg(m.path("lib/lib/guava.jar")),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{out:?}"
    );
    let other = std::fs::read(m.path("lib/lib/commons-lang3.jar")).unwrap();
    assert_eq!(
        sha256_hex(&other),
        "eb2667f24a588f6c87f4875fed97e5aa7303eb6cfa4f32d0691dfd2ed4cf64d2"
    );
    let small = std::fs::read(m.path("lib/lib/jansi.jar")).unwrap();
    assert_eq!(small.len(), 94545);
    assert!(
        m.log_text().contains(&digest.to_string()),
        "the log names the digest"
    );
    assert!(
        m.log_text().contains("/lib/lib/guava.jar"),
        "the log names the path"
    );
}

#[test]
fn unmount_leaves_no_mount_and_no_process() {
    // Our own unmount command.
    let mut m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    dfs_ok(&["unmount", m.mnt.to_str().unwrap()]);
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", m.log_text());
    assert!(!is_mounted(&m.mnt));
    // fusermount3 -u.
    let mut m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    run_ok(Command::new("fusermount3").arg("-u").arg(&m.mnt));
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", m.log_text());
    assert!(!is_mounted(&m.mnt));
    // SIGTERM.
    let mut m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", m.log_text());
    assert!(!is_mounted(&m.mnt));
    // Unmounting what is not mounted is an error.
    dfs_err(&["unmount", m.mnt.to_str().unwrap()]);
}

#[test]
fn daemon_mode_returns_once_the_mount_answers() {
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let store = tmp.path().join("store");
    let log = tmp.path().join("log");
    let out = run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(&store)
            .args([
                "mount",
                "--daemon",
                "--bind",
                &format!("lib={JAR_TREE}"),
                "--log-file",
            ])
            .arg(&log)
            .arg(&mnt),
        T,
    );
    let _guard = harness::UnmountOnDrop(&mnt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Ready means ready: no waiting before the first read.
    assert_eq!(
        std::fs::read(mnt.join("lib/lib/jansi.jar")).unwrap().len(),
        94545
    );

    // A second mount on a live mountpoint is a clear error.
    let again = run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(&store)
            .args(["mount", "--daemon"])
            .arg(&mnt),
        T,
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already mounted"),
        "{again:?}"
    );

    dfs_ok(&["unmount", mnt.to_str().unwrap()]);
    wait_until(
        "the daemon to exit after unmount",
        Duration::from_secs(10),
        || (!process_alive(pid)).then_some(()),
    );
    assert!(!is_mounted(&mnt));
    assert!(std::fs::read_to_string(&log).unwrap().contains("serving"));
    let socket = digestfs::control::default_socket(&mnt);
    assert!(
        !socket.exists(),
        "the control socket {} is removed on exit",
        socket.display()
    );
    let state = digestfs::control::state::state_path(&socket);
    assert!(
        !state.exists(),
        "a clean unmount forgets the views ({})",
        state.display()
    );
}

/// Alive and not a zombie waiting for a parent that does not reap.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn mount_failures_exit_nonzero_with_the_reason() {
    let tmp = fixture_store();
    let store = tmp.path().join("store");
    let missing_mnt = tmp.path().join("does-not-exist");
    for extra in [&[][..], &["--daemon"][..]] {
        let out = run_timeout(
            Command::new(bin())
                .arg("--store")
                .arg(&store)
                .arg("mount")
                .args(extra)
                .arg(&missing_mnt),
            T,
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does-not-exist"),
            "{out:?}"
        );
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let absent = format!("{}-99", "ab".repeat(32));
    for (bind, needle) in [
        (format!("lib={absent}"), absent.clone()),
        ("lib=nothex-1".to_string(), "nothex-1".to_string()),
        (format!("../up={JAR_TREE}"), "..".to_string()),
    ] {
        let out = run_timeout(
            Command::new(bin())
                .arg("--store")
                .arg(&store)
                .args(["mount", "--daemon", "--bind", &bind])
                .arg(&mnt),
            T,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bind}: {err}");
        assert!(err.contains(&needle), "{err}");
        assert!(!is_mounted(&mnt));
    }
}

#[test]
fn a_stale_mount_left_by_kill_9_is_recovered() {
    let mut m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    m.kill9_with_watcher();
    assert!(is_mounted(&m.mnt));
    // Over io_uring a request the ring held when the daemon died ends with ECONNABORTED or
    // ECANCELED while the kernel tears the ring down; every call fails at once, and then the
    // mount is stale (ENOTCONN).
    wait_until("the mount to be stale", Duration::from_secs(10), || {
        let err = harness::statfs(&m.mnt).expect_err("a dead daemon answered");
        match err.raw_os_error() {
            Some(libc::ENOTCONN) => Some(()),
            Some(libc::ECONNABORTED | libc::ECANCELED) => None,
            _ => panic!("the mount is stale: {err}"),
        }
    });
    // Hand the stale mount to a new daemon; the old guard is pointed elsewhere so that
    // dropping it does not clean up what the new daemon must recover.
    let tmp = std::mem::replace(&mut m.tmp, tempfile::tempdir().unwrap());
    m.mnt = m.tmp.path().join("unused");
    drop(m);
    let m2 = Mount::over(tmp, &[("lib", JAR_TREE)], &[]);
    assert_eq!(
        std::fs::read(m2.path("lib/lib/jansi.jar")).unwrap().len(),
        94545
    );
    assert!(m2.log_text().contains("stale mount"), "{}", m2.log_text());
}

#[test]
fn tar_archives_a_view_exactly() {
    let m = Mount::fixture(&[("src", SRC_SYMLINKS)], &[]);
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("view.tar");
    run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(m.path("src"))
            .arg("."),
    );
    let dest = out.path().join("x");
    std::fs::create_dir(&dest).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&dest),
    );
    for (path, kind) in &manifest()[SRC_SYMLINKS] {
        let p = dest.join(path);
        match kind {
            Kind::File {
                digest, executable, ..
            } => {
                let bytes = std::fs::read(&p).unwrap();
                assert_eq!(
                    format!("{}-{}", sha256_hex(&bytes), bytes.len()),
                    *digest,
                    "{path}"
                );
                let mode = std::fs::metadata(&p).unwrap().mode() & 0o111;
                assert_eq!(mode != 0, *executable, "{path}");
            }
            Kind::Dir { .. } => assert!(p.is_dir(), "{path}"),
            Kind::Symlink { target } => {
                assert_eq!(std::fs::read_link(&p).unwrap(), Path::new(target), "{path}")
            }
        }
    }
}

/// A store Pants wrote with 4 shards (here: `import --local-store-shard-count 4` of the
/// fixture's trees), mounted with nothing said about its count: every file reads byte for byte
/// and `status` says 4 shards.
#[test]
fn a_store_of_4_shards_mounts_and_reads_byte_for_byte() {
    let fixture = fixture_store();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    for (i, (_, tree)) in all_trees().into_iter().enumerate() {
        let out = tmp.path().join(format!("tree-{i}"));
        dfs_ok(&[
            "--store",
            fixture.path().join("store").to_str().unwrap(),
            "materialize",
            tree,
            out.to_str().unwrap(),
        ]);
        let got = dfs_ok(&[
            "--store",
            store.to_str().unwrap(),
            "--local-store-shard-count",
            "4",
            "import",
            out.to_str().unwrap(),
        ]);
        assert_eq!(got.trim(), tree);
    }
    let m = Mount::over(tmp, &all_trees(), &[]);
    let manifest = manifest();
    for (bound, tree) in all_trees() {
        for (path, kind) in &manifest[tree] {
            if let Kind::File { digest, size, .. } = kind {
                let bytes = std::fs::read(m.path(bound).join(path)).unwrap();
                assert_eq!(bytes.len() as u64, *size, "{bound}/{path}");
                assert_eq!(format!("{}-{size}", sha256_hex(&bytes)), *digest);
            }
        }
    }
    let status: serde_json::Value =
        serde_json::from_str(&dfs_ok(&["status", "--json", m.mnt.to_str().unwrap()])).unwrap();
    assert_eq!(status["shard_count"], 4, "{status}");
}

/// Reads `file` (a pipe's read end) to its end on a thread; the receiver gets what was read
/// once the last writer has closed it.
fn read_to_eof(file: std::fs::File) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut file = file;
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut file, &mut v);
        let _ = tx.send(v);
    });
    rx
}

/// `mount --daemon` run as a build tool runs it (Python's `subprocess.run(capture_output=True)`,
/// with relative paths, and handing it one more descriptor, as `pass_fds` does): every pipe the
/// caller reads ends when the command exits; the daemon holds none of the caller's descriptors
/// (stdin and stdout /dev/null, stderr the log), runs in a session of its own from `/`, and
/// still serves its relative --control socket.
#[test]
fn daemon_mode_detaches_from_its_caller() {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(tmp.path().join("ctl")).unwrap();
    let _guard = harness::UnmountOnDrop(&mnt);
    // One more pipe for the command to inherit: close-on-exec here, so that only this child
    // (not another test's) gets its write end.
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (extra_r, extra_w) = (fds[0], fds[1]);
    let mut cmd = Command::new(bin());
    cmd.current_dir(tmp.path())
        .args([
            "--store",
            "store",
            "mount",
            "--daemon",
            "--log-file",
            "daemon.log",
        ])
        .args([
            "--control",
            "ctl/ctl.sock",
            "--bind",
            &format!("lib={JAR_TREE}"),
            "mnt",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(extra_w, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    unsafe { libc::close(extra_w) };
    let stdout = read_to_eof(std::fs::File::from(std::os::fd::OwnedFd::from(
        child.stdout.take().unwrap(),
    )));
    let stderr = read_to_eof(std::fs::File::from(std::os::fd::OwnedFd::from(
        child.stderr.take().unwrap(),
    )));
    let extra = read_to_eof(unsafe { std::fs::File::from_raw_fd(extra_r) });
    // A hang here is the failure: the daemon kept a pipe of its caller's open.
    let limit = Duration::from_secs(60);
    let out = stdout
        .recv_timeout(limit)
        .expect("EOF on the command's stdout");
    let err = stderr
        .recv_timeout(limit)
        .expect("EOF on the command's stderr");
    extra
        .recv_timeout(limit)
        .expect("EOF on the descriptor the command inherited");
    let status = wait_until("the command to exit", limit, || child.try_wait().unwrap());
    assert!(status.success(), "{}", String::from_utf8_lossy(&err));
    let pid: i32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    assert!(process_alive(pid));

    let fd = |n: u32| std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
    assert_eq!(fd(0), Path::new("/dev/null"));
    assert_eq!(fd(1), Path::new("/dev/null"));
    assert_eq!(fd(2), tmp.path().join("daemon.log").canonicalize().unwrap());
    // The one pipe it holds is its watcher's (`digestfs watch-mount`, its child): the watcher
    // reads that pipe as its stdin.
    let watcher_pipes: Vec<_> = harness::children(pid as u32)
        .into_iter()
        .filter_map(|w| std::fs::read_link(format!("/proc/{w}/fd/0")).ok())
        .collect();
    assert_eq!(watcher_pipes.len(), 1, "{watcher_pipes:?}");
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(entry.unwrap().path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().starts_with("pipe:") || watcher_pipes.contains(&target),
            "the daemon holds a pipe of its caller's: {target:?}"
        );
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/")
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid.to_string(), "a session of its own: {stat}");

    // It serves, and its relative socket (and state file beside it) work from `/`.
    assert_eq!(
        std::fs::read(mnt.join("lib/lib/jansi.jar")).unwrap().len(),
        94545
    );
    let socket = tmp.path().join("ctl/ctl.sock");
    let m = mnt.to_str().unwrap();
    let ctl = ["--control", socket.to_str().unwrap()];
    dfs_ok(&[&["bind", m, "src", SRC_SYMLINKS][..], &ctl].concat());
    assert!(digestfs::control::state::state_path(&socket).exists());
    let s: serde_json::Value =
        serde_json::from_str(&dfs_ok(&[&["status", "--json", m][..], &ctl].concat())).unwrap();
    assert_eq!(s["pid"], pid);
    dfs_ok(&["unmount", m]);
    wait_until("the daemon to exit", limit, || {
        (!process_alive(pid)).then_some(())
    });
}
