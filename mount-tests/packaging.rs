//! What packaging relies on: `digestfs doctor` against good and broken setups, and the systemd
//! readiness notification the user unit (packaging/systemd) waits for.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::harness::{statfs, Mount, UnmountOnDrop};

fn doctor(store: &Path, extra: &[&str], path_env: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("--store").arg(store).arg("doctor").args(extra);
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let out = run_timeout(&mut cmd, Duration::from_secs(30));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn doctor_passes_a_good_setup_and_names_fixes_for_a_broken_one() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let free = m.tmp.path().join("free");
    std::fs::create_dir(&free).unwrap();
    let (code, out) = doctor(&m.store, &[free.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    for line in [
        "/dev/fuse is present and usable",
        "fusermount3 is at",
        "kernel ",
        "schema version 2",
        "is free",
    ] {
        assert!(out.contains(line), "{out} lacks {line:?}");
    }
    let (code, out) = doctor(&m.store, &[m.mnt.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("is a live digestfs mount"), "{out}");

    // Broken: no store, no fusermount3 on PATH, a store of another schema, a stale mount.
    let (code, out) = doctor(&m.tmp.path().join("nope"), &[], None);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL  no store at") && out.contains("fix: "),
        "{out}"
    );
    let (code, out) = doctor(&m.store, &[], Some("/nonexistent"));
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL  fusermount3 is missing") && out.contains("apt-get install fuse3"),
        "{out}"
    );
    let odd = m.tmp.path().join("odd-store");
    {
        use lmdb::Transaction;
        let dir = odd.join("files/0");
        std::fs::create_dir_all(&dir).unwrap();
        let env = lmdb::Environment::new()
            .set_max_dbs(2)
            .set_map_size(1 << 20)
            .open(&dir)
            .unwrap();
        let db = env
            .create_db(Some("content-versioned"), lmdb::DatabaseFlags::empty())
            .unwrap();
        env.create_db(Some("leases-versioned"), lmdb::DatabaseFlags::empty())
            .unwrap();
        let mut txn = env.begin_rw_txn().unwrap();
        txn.put(db, &[0u8; 32], b"v1 key", lmdb::WriteFlags::empty())
            .unwrap();
        txn.commit().unwrap();
    }
    let (code, out) = doctor(&odd, &[], None);
    assert_eq!(code, 1);
    assert!(out.contains("not Pants' schema version 2"), "{out}");
    let mut stale = Mount::fixture(&[], &[]);
    stale.kill9_with_watcher();
    let (code, out) = doctor(&m.store, &[stale.mnt.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(
        out.contains("stale mount") && out.contains("fusermount3 -u -z"),
        "{out}"
    );
}

#[test]
fn systemd_is_told_when_the_mount_answers() {
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(bin())
        .arg("--store")
        .arg(tmp.path().join("store"))
        .args(["mount", "--bind", &format!("lib={JAR_TREE}")])
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = UnmountOnDrop(&mnt);
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .expect("no READY=1 from the daemon within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", child.id())), "{msg}");
    // Ready means the mount answers now.
    statfs(&mnt).unwrap();
    assert_eq!(
        std::fs::read(mnt.join("lib/lib/jansi.jar")).unwrap().len(),
        94545
    );
    // systemd stops the unit with SIGTERM: clean unmount, exit 0.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_until(
        "the daemon to exit on SIGTERM",
        Duration::from_secs(10),
        || child.try_wait().unwrap(),
    );
    assert!(status.success());
    assert!(!crate::harness::is_mounted(&mnt));
    // The unit file waits for exactly this.
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/digestfs@.service"),
    )
    .unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("ExecStart=/usr/bin/digestfs mount --transport dev --fd-store %f")
    );
}

#[test]
fn a_bind_shows_its_check_on_a_terminal_and_stays_quiet_when_piped() {
    let (m, socket) = Mount::fixture_with_control(&[], &[]);
    let bind = |path: &str| {
        format!(
            "{} bind --control {} {} {path} {JAR_TREE}",
            bin().display(),
            socket.display(),
            m.mnt.display()
        )
    };
    // `script` gives the command a pseudo-terminal, as a user's shell would.
    let out = run_timeout(
        Command::new("script").args(["-qec", &bind("a"), "/dev/null"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains(&format!("checking {JAR_TREE}")) && screen.contains("directories"),
        "{screen}"
    );
    let out = run_timeout(
        Command::new("sh").args(["-c", &bind("b")]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty() && out.stdout.is_empty(), "{out:?}");
    assert!(m.path("a/lib/guava.jar").exists() && m.path("b/lib/guava.jar").exists());
}
