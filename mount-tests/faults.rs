//! Faults the daemon must survive: blobs vanishing or changing under it, a store that briefly
//! disappears, clients that hang up mid-request, and users who are not the owner.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::harness::{all_threads_stopped, Mount};

const COMMONS_LANG3: &str =
    "eb2667f24a588f6c87f4875fed97e5aa7303eb6cfa4f32d0691dfd2ed4cf64d2-595165";

fn store_of(m: &Mount) -> digestfs::store::Store {
    digestfs::store::Store::open(&m.store).unwrap()
}

/// Reads a file in a separate process with a time limit: Ok(bytes), or Err(stderr).
fn cat(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let out = run_timeout(Command::new("cat").arg(path), Duration::from_secs(10));
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("{}-{}", sha256_hex(bytes), bytes.len())
}

#[test]
fn blobs_deleted_while_open_and_while_not() {
    for args in [&["--passthrough", "off"][..], &["--passthrough", "on"][..]] {
        let m = Mount::fixture(&[("lib", JAR_TREE)], args);
        let store = store_of(&m);
        // Open and partly read a large jar, then let "GC" delete its blob.
        let guava_path = m.path("lib/lib/guava.jar");
        let mut f = std::fs::File::open(&guava_path).unwrap();
        let mut head = vec![0u8; 4096];
        f.read_exact(&mut head).unwrap();
        let guava: digestfs::store::Digest = GUAVA.parse().unwrap();
        std::fs::remove_file(store.large_blob_path(&guava)).unwrap();
        // The open file still reads every byte right: its data was never wrong, only unlinked.
        let mut rest = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut rest).unwrap();
        assert_eq!(digest_of(&rest), GUAVA, "{args:?}");
        // A deleted blob that was never opened: EIO, no hang, nothing wrong served.
        let lang3: digestfs::store::Digest = COMMONS_LANG3.parse().unwrap();
        std::fs::remove_file(store.large_blob_path(&lang3)).unwrap();
        let err = cat(&m.path("lib/lib/commons-lang3.jar")).unwrap_err();
        assert!(err.contains("Input/output error"), "{args:?}: {err}");
        // Everything else keeps working.
        assert_eq!(
            digest_of(&cat(&m.path("lib/lib/jansi.jar")).unwrap()),
            JANSI
        );
    }
}

#[test]
fn a_small_blob_deleted_from_lmdb_is_eio() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    delete_small_blob(&m.store, JANSI);
    let err = cat(&m.path("lib/lib/jansi.jar")).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    assert!(cat(&m.path("lib/lib/guava.jar")).is_ok());
}

#[test]
fn a_large_blob_truncated_or_replaced_is_never_served_wrong() {
    // Truncated: the missing tail is EIO, never a short file.
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let guava: digestfs::store::Digest = GUAVA.parse().unwrap();
    let path = store_of(&m).large_blob_path(&guava);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let err = cat(&m.path("lib/lib/guava.jar")).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    drop(m);

    // Replaced by other bytes of the same length: with --verify, EIO before any byte is served.
    let m = Mount::fixture(&[("lib", JAR_TREE)], &["--verify"]);
    let path = store_of(&m).large_blob_path(&guava);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0xff;
    let tmp = path.with_extension("swap");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let err = cat(&m.path("lib/lib/guava.jar")).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    assert!(
        m.log_text().contains("does not hash to its digest"),
        "{}",
        m.log_text()
    );
    // Intact blobs verify and read.
    assert_eq!(
        digest_of(&cat(&m.path("lib/lib/jansi.jar")).unwrap()),
        JANSI
    );
}

#[test]
fn the_store_briefly_gone_is_eio_then_serves_again() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let immutable = m.store.join("immutable");
    let away = m.store.join("immutable.away");
    std::fs::rename(&immutable, &away).unwrap();
    let err = cat(&m.path("lib/lib/guava.jar")).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    assert!(
        cat(&m.path("lib/lib/jansi.jar")).is_ok(),
        "LMDB blobs still read"
    );
    std::fs::rename(&away, &immutable).unwrap();
    assert_eq!(
        digest_of(&cat(&m.path("lib/lib/guava.jar")).unwrap()),
        GUAVA
    );
}

#[test]
fn a_client_hanging_up_mid_request_changes_nothing() {
    let (m, socket) = Mount::fixture_with_control(&[("lib", JAR_TREE)], &[]);
    for partial in [
        &br#"{"v":1,"op":"bind","path":"x","dig"#[..],
        b"",
        br#"{"v":1,"op":"unbind","path":"lib"}"#,
    ] {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(partial).unwrap();
        drop(s); // no newline: the request is incomplete
    }
    let out = run_timeout(
        Command::new(bin()).args([
            "views",
            m.mnt.to_str().unwrap(),
            "--control",
            socket.to_str().unwrap(),
        ]),
        Duration::from_secs(30),
    );
    let views = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && views.starts_with("lib\t"),
        "{views}"
    );
    assert!(m.path("lib/lib/guava.jar").exists());
}

#[test]
fn the_mount_is_private_to_its_owner() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let user = crate::harness::TempUser::create();
    let as_user = |args: &[&str]| user.run(args[0], &args[1..]);
    // The mountpoint's parent must be reachable for the test to mean anything.
    std::fs::set_permissions(m.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_user(&["stat", m.path("lib/lib/guava.jar").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // With --allow-other the same user may read (and still not write).
    let m2 = Mount::fixture(&[("lib", JAR_TREE)], &["--allow-other"]);
    std::fs::set_permissions(m2.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_user(&["sha256sum", m2.path("lib/lib/guava.jar").to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(GUAVA.split('-').next().unwrap()));
    let out = as_user(&["touch", m2.path("lib/new").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{out:?}"
    );
}

/// LMDB locks `lock.mdb` exclusively while the first process opens an environment, and every
/// other opener waits for it. A daemon stopped (SIGSTOP, a debugger) in that window would hold
/// Pants and the plugin's fallback (`materialize`) until it ran again. So it opens every shard
/// before it serves, not at the first bind that reaches one (whose lease renewal runs on after
/// the bind is answered), and a stopped daemon leaves the store to everyone else.
#[test]
fn a_stopped_daemon_holds_up_no_other_reader_of_the_store() {
    let m = Mount::fixture(&[], &[]);
    let pid = m.pid() as i32;
    let open: std::collections::HashSet<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .collect();
    let mut locks = 0;
    for kind in ["files", "directories"] {
        for shard in std::fs::read_dir(m.store.join(kind)).unwrap() {
            let shard = shard.unwrap().path();
            if shard.join("data.mdb").exists() {
                let lock = shard.join("lock.mdb");
                locks += 1;
                assert!(
                    open.contains(&lock),
                    "{lock:?} is not open in the serving daemon"
                );
            }
        }
    }
    assert!(locks > 1, "the fixture store has LMDB environments");
    // Stopped while the bind's lease renewal may still run.
    let mnt = m.mnt.to_str().unwrap();
    dfs_ok(&["bind", mnt, "lib", JAR_TREE]);
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until("every daemon thread stopped", T, || {
        all_threads_stopped(pid).then_some(())
    });
    let out_dir = tempfile::tempdir().unwrap();
    let out = run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(&m.store)
            .args(["materialize", JAR_TREE])
            .arg(out_dir.path().join("lib")),
        Duration::from_secs(60),
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(out.status.success(), "{out:?}");
    let jansi = std::fs::read(out_dir.path().join("lib/lib/jansi.jar")).unwrap();
    assert_eq!(digest_of(&jansi), JANSI);
}

/// `digestfs unmount --abort` is the way out of a hung daemon: it reads only the mount table
/// (a statfs would wait on the daemon), ends every request the mount holds, so readers get an
/// error instead of waiting, and detaches it. Over /dev/fuse: a request already handed to an
/// io_uring entry ends only once its daemon runs (transport.rs).
#[test]
fn unmount_abort_ends_the_reads_a_stopped_daemon_holds() {
    let mut m = Mount::fixture(&[("lib", JAR_TREE)], &["--transport", "dev"]);
    let pid = m.pid() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until("every daemon thread stopped", T, || {
        all_threads_stopped(pid).then_some(())
    });
    let jar = m.path("lib/lib/guava.jar");
    let reader = std::thread::spawn(move || {
        run_timeout(Command::new("cat").arg(&jar), Duration::from_secs(60))
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reader.is_finished(),
        "a read finished while the daemon was stopped"
    );
    let mnt = m.mnt.to_str().unwrap().to_owned();
    let out = run_timeout(
        Command::new(bin()).args(["unmount", "--abort", &mnt]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    let read = reader.join().unwrap();
    let err = String::from_utf8_lossy(&read.stderr);
    // Ended by the abort, with the connection's error, not killed at its limit.
    assert!(
        !read.status.success() && read.stdout.is_empty() && err.contains("connect"),
        "{read:?}"
    );
    assert!(!crate::harness::is_mounted(&m.mnt));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Its connection gone, the daemon ends once it runs again.
    assert!(m.wait_exit(T).code().is_some());
}

/// A stopped (or hung) daemon is named, not waited on: `status` gives up after its limit, and
/// `mount --reuse` refuses it at once rather than stat a mount that would hold it too.
#[test]
fn a_stopped_daemon_is_named_not_waited_on() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let pid = m.pid() as i32;
    let mnt = m.mnt.to_str().unwrap().to_owned();
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until("every daemon thread stopped", T, || {
        all_threads_stopped(pid).then_some(())
    });
    let status = run_timeout(
        Command::new(bin()).args(["status", &mnt]),
        Duration::from_secs(60),
    );
    let reuse = run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(&m.store)
            .args(["mount", "--daemon", "--reuse", &mnt]),
        Duration::from_secs(60),
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for out in [&status, &reuse] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("did not answer within 10 s"),
            "{out:?}"
        );
    }
    assert!(String::from_utf8_lossy(&reuse.stderr).contains("cannot be reused"));
    // Running again, it answers as before.
    dfs_ok(&["status", &mnt]);
}
