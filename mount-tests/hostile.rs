//! What a careless or hostile environment does to the commands: trees deeper than any stack,
//! readers that close the output early, and other users squatting the socket directory or
//! planting a socket.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::harness::{Mount, TempUser, SYSTEM_PYTHON};

/// Runs a command whose stdout is a pipe nobody reads any more (`cmd | head -1` once `head`
/// has gone): every write gets EPIPE. Exit code and stderr.
fn into_closed_pipe(cmd: &mut Command) -> (Option<i32>, String) {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_until(&format!("{cmd:?} to exit"), T, || child.try_wait().unwrap());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn every_printing_command_stops_quietly_when_its_reader_goes() {
    let (m, socket) = Mount::fixture_with_control(&[("lib", JAR_TREE)], &[]);
    let (mnt, sock, store) = (
        m.mnt.to_str().unwrap(),
        socket.to_str().unwrap(),
        m.store.to_str().unwrap(),
    );
    let jar = m.path("lib/lib/guava.jar");
    let deep = chain_tree(&m.store, 3000, b"leaf");
    for args in [
        vec!["status", mnt, "--control", sock],
        vec!["status", "--json", mnt, "--control", sock],
        vec!["views", mnt, "--control", sock],
        vec!["views", "--json", mnt, "--control", sock],
        vec!["which", "--control", sock, jar.to_str().unwrap()],
        vec!["--store", store, "ls", "-R", JAR_TREE],
        vec!["--store", store, "ls", "-R", &deep],
        vec!["--store", store, "cat", GUAVA],
        vec!["--store", store, "doctor", mnt],
        vec!["--help"],
        vec!["mount", "--help"],
        vec!["--version"],
    ] {
        let (code, err) = into_closed_pipe(Command::new(bin()).args(&args));
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        assert!(err.is_empty(), "{args:?} printed on stderr: {err}");
    }
    // And through a real `head -1`, with more output than a pipe holds.
    let out = run_timeout(
        Command::new("bash").args([
            "-c",
            &format!(
                "{} --store {store} ls -R {deep} | head -1; echo \"exit=${{PIPESTATUS[0]}}\" >&2",
                bin().display()
            ),
        ]),
        T,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "exit=0\n");
}

#[test]
fn a_chain_of_100k_directories_binds_renews_and_reads() {
    let (m, socket) = Mount::fixture_with_control(&[], &["--lease-interval", "1"]);
    let root = chain_tree(&m.store, 100_000, b"at the bottom");
    let (mnt, sock) = (m.mnt.to_str().unwrap(), socket.to_str().unwrap());
    // The bind checks all 100,001 Directories; the lease keeper's rounds renew them all.
    dfs_ok(&["bind", mnt, "--control", sock, "deep", &root]);
    let status = wait_until("the lease round of the bound chain", T, || {
        let s: serde_json::Value =
            serde_json::from_str(&dfs_ok(&["status", "--json", mnt, "--control", sock])).unwrap();
        (s["lease_last_renewed"] == 100_002).then_some(s)
    });
    assert_eq!(status["lease_last_missing"], 0, "{status}");
    assert!(
        status["verified_dirs"].as_u64().unwrap() >= 100_001,
        "{status}"
    );
    // The top of the chain reads through the mount like any tree.
    let top = m.path("deep/d/d/d");
    assert_eq!(
        std::fs::read_dir(&top)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name(),
        "d"
    );
    // A second, different chain in another layer is compared level by level, not recursively.
    let other = chain_tree(&m.store, 100_000, b"something else");
    let out = dfs(&[
        "bind",
        mnt,
        "--control",
        sock,
        "deep",
        &other,
        "--layer",
        "b",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("digestfs: conflict at deep/d/d/d"),
        "{}",
        &err[..200]
    );
    assert!(
        err.contains("/d/leaf.txt: tree "),
        "the conflict is named at the bottom"
    );
    assert!(m.log_text().lines().all(|l| !l.contains("overflow")));
}

#[test]
fn a_squatted_socket_directory_is_refused_naming_its_owner() {
    let store = fixture_store();
    let user = TempUser::create();
    let squatter = TempUser::create();
    std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = store.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Another user got there first, world-writable.
    let dir = Path::new("/tmp").join(format!("digestfs-{}", user.uid));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(squatter.uid), Some(squatter.gid)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _remove = Remove(&dir);
    let out = user.run(
        "env",
        &[
            "-u",
            "XDG_RUNTIME_DIR",
            bin().to_str().unwrap(),
            "--store",
            store.path().join("store").to_str().unwrap(),
            "mount",
            mnt.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains(&format!("uid {}", squatter.uid)), "{err}");
    assert!(
        err.contains("XDG_RUNTIME_DIR") && err.contains("Remove it"),
        "{err}"
    );
    assert!(!err.contains("Operation not permitted"), "{err}");
    // Nothing was put there.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn a_socket_planted_by_another_user_is_never_sent_anything() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = tmp.path().join("planted.sock");
    let got = tmp.path().join("received");
    let user = TempUser::create();
    // The impostor accepts one connection and records every byte it receives.
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
s.listen(1)
c, _ = s.accept()
c.settimeout(5)
data = b''
try:
    while True:
        d = c.recv(4096)
        if not d:
            break
        data += d
except OSError:
    pass
open(sys.argv[2], 'wb').write(data)
"#;
    let mut impostor = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--clear-groups", SYSTEM_PYTHON, "-c", script])
        .arg(&sock)
        .arg(&got)
        .spawn()
        .unwrap();
    wait_until("the impostor's socket", Duration::from_secs(30), || {
        sock.exists().then_some(())
    });
    let err = dfs_err(&["status", "--control", sock.to_str().unwrap(), "/nowhere"]);
    assert!(err.contains("refusing to talk to"), "{err}");
    assert!(err.contains(&format!("uid {}", user.uid)), "{err}");
    let status = wait_until("the impostor to finish", Duration::from_secs(30), || {
        impostor.try_wait().unwrap()
    });
    assert!(status.success());
    assert_eq!(
        std::fs::read(&got).unwrap(),
        b"",
        "the impostor received nothing"
    );
}
