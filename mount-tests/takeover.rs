//! `mount --takeover`: a new daemon takes a live mount over, and readers with open files or a
//! working directory inside see nothing of it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::common::*;
use crate::harness::{is_mounted, shell_inside, status, Mount, UnmountOnDrop};

const DEV: &[&str] = &["--transport", "dev", "--passthrough", "off"];
/// The same with nothing kept in the kernel's caches past a request, so that readers keep
/// asking the daemon, whichever it is at the time.
const DEV_UNCACHED: &[&str] = &["--transport", "dev", "--passthrough", "off", "--ttl", "0"];

/// The files of JAR_TREE: path → sha256 (a file's digest is the sha256 of its bytes).
fn jars() -> BTreeMap<String, String> {
    manifest()[JAR_TREE]
        .iter()
        .filter_map(|(path, kind)| match kind {
            Kind::File { digest, .. } => {
                Some((path.clone(), digest.split('-').next().unwrap().to_string()))
            }
            _ => None,
        })
        .collect()
}

/// `mount --takeover --daemon` of `m`'s mountpoint: the new daemon's pid.
fn take_over(m: &Mount, socket: &Path, log: &str) -> Result<u32, String> {
    let out = run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(&m.store)
            .args(["mount", "--takeover", "--daemon", "--control"])
            .arg(socket)
            .arg("--log-file")
            .arg(m.tmp.path().join(log))
            .arg(&m.mnt)
            .env("RUST_LOG", "digestfs=debug"),
        T,
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap())
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

#[test]
fn ten_takeovers_in_a_row_under_load_cost_readers_nothing() {
    let (mut m, socket) = Mount::fixture_with_control(&[("v", JAR_TREE)], DEV_UNCACHED);
    let _unmount = UnmountOnDrop(&m.mnt.clone());
    let jars = jars();
    let paths: Vec<(PathBuf, String)> = jars
        .iter()
        .map(|(p, sha)| (m.path("v").join(p), sha.clone()))
        .collect();
    let inos: Vec<u64> = paths
        .iter()
        .map(|(p, _)| std::fs::metadata(p).unwrap().ino())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (errors, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    // One reader holds the largest jar open and reads it through that one descriptor, its
    // page cache dropped before each read so that the reads reach the daemon.
    let (held_path, held_sha) = paths
        .iter()
        .max_by_key(|(p, _)| std::fs::metadata(p).unwrap().len())
        .cloned()
        .unwrap();
    let held = std::fs::File::open(&held_path).unwrap();
    let mut readers = vec![];
    {
        let (stop, errors, reads) = (stop.clone(), errors.clone(), reads.clone());
        readers.push(std::thread::spawn(move || {
            let len = held.metadata().unwrap().len() as usize;
            while !stop.load(Ordering::Relaxed) {
                let mut buf = vec![0u8; len];
                unsafe { libc::posix_fadvise(held.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                match held.read_exact_at(&mut buf, 0) {
                    Ok(()) if sha256_hex(&buf) == held_sha => {}
                    other => {
                        eprintln!("held jar: {other:?}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Others hash every jar by path, again and again.
    for _ in 0..2 {
        let (stop, errors, reads, paths) =
            (stop.clone(), errors.clone(), reads.clone(), paths.clone());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (p, sha) in &paths {
                    match std::fs::read(p) {
                        Ok(b) if sha256_hex(&b) == *sha => {}
                        other => {
                            eprintln!("{}: {:?}", p.display(), other.map(|b| b.len()));
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let stop_file = m.tmp.path().join("stop");
    let mut shell = shell_inside(&held_path, &stop_file);

    let mut pid = m.pid();
    for i in 0..10 {
        let before = reads.load(Ordering::Relaxed);
        wait_until("readers read between takeovers", T, || {
            (reads.load(Ordering::Relaxed) > before + 2).then_some(())
        });
        let new = take_over(&m, &socket, &format!("daemon-{i}.log"))
            .unwrap_or_else(|e| panic!("takeover {i}: {e}\n{}", m.log_text()));
        assert_ne!(new, pid);
        wait_until("the old daemon exits", T, || (!alive(pid)).then_some(()));
        assert_eq!(status(&socket).pid, new);
        // The readers' requests reach the new daemon.
        wait_until("the new daemon answers the readers", T, || {
            (status(&socket).dev_requests.unwrap_or(0) > 10).then_some(())
        });
        pid = new;
    }
    let before = reads.load(Ordering::Relaxed);
    wait_until("readers read after the last takeover", T, || {
        (reads.load(Ordering::Relaxed) > before + 2).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    std::fs::write(&stop_file, b"").unwrap();
    let shell_status = shell.wait().unwrap();

    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "reads that failed or differed"
    );
    assert!(shell_status.success(), "the shell inside the mount failed");
    let after: Vec<u64> = paths
        .iter()
        .map(|(p, _)| std::fs::metadata(p).unwrap().ino())
        .collect();
    assert_eq!(after, inos, "inode numbers changed");
    // The first daemon, the test's child, exited cleanly, leaving the mount to the others.
    assert!(m.wait_exit(T).success());
    let last_log = std::fs::read_to_string(m.tmp.path().join("daemon-9.log")).unwrap();
    assert!(last_log.contains("took"), "{last_log}");
    // The last one unmounts as any daemon does.
    dfs_ok(&["unmount", m.mnt.to_str().unwrap()]);
    wait_until("the last daemon exits", T, || (!alive(pid)).then_some(()));
}

/// Sends a takeover request as a daemon of `format` serving `store` would; the first line of
/// the answer.
fn ask_takeover(socket: &Path, format: u32, store: &str) -> (UnixStream, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let request = serde_json::json!({
        "v": 1, "op": "takeover", "format": format, "version": "9.9.9",
        "mountpoint": status(socket).mountpoint, "store": store,
    });
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    (s, line)
}

fn serves(m: &Mount, socket: &Path) {
    let jar = m.path("v").join(jars().keys().next().unwrap());
    assert!(std::fs::read(&jar).is_ok(), "{}", jar.display());
    assert_eq!(status(socket).pid, m.pid());
}

/// After a takeover that was not made: the daemon reads its mount again, as before.
fn serves_again(m: &Mount, socket: &Path) {
    wait_until("the daemon serves again", T, || {
        m.log_text().contains("serving again").then_some(())
    });
    serves(m, socket);
}

#[test]
fn a_takeover_that_cannot_be_made_leaves_the_daemon_serving() {
    let (m, socket) = Mount::fixture_with_control(&[("v", JAR_TREE)], DEV);
    let store = status(&socket).store;
    // Another format, another store: refused before anything stops.
    let (_, line) = ask_takeover(&socket, 999, &store);
    assert!(
        line.contains(r#""ok":false"#) && line.contains("format"),
        "{line}"
    );
    let (_, line) = ask_takeover(&socket, 1, "/elsewhere");
    assert!(
        line.contains(r#""ok":false"#) && line.contains("/elsewhere"),
        "{line}"
    );
    serves(&m, &socket);
    // A taker that leaves after the handover: meanwhile binds are refused, to be retried, and
    // then the daemon takes its connection back.
    let (s, line) = ask_takeover(&socket, 1, &store);
    assert!(
        line.starts_with('F'),
        "the fd byte and the handover: {line}"
    );
    let bind = digestfs::control::call(
        &socket,
        &digestfs::control::protocol::Request::Bind {
            path: "w".into(),
            digest: JAR_TREE.into(),
            layer: "default".into(),
            verify: true,
            owner: None,
        },
    )
    .unwrap();
    assert_eq!(
        bind.error_kind,
        Some(digestfs::control::protocol::ErrorKind::Unavailable),
        "{bind:?}"
    );
    drop(s);
    serves_again(&m, &socket);
    assert!(is_mounted(&m.mnt));
    m.bind(&socket, "w", JAR_TREE);
    assert!(m.path("w").join(jars().keys().next().unwrap()).exists());
}

#[test]
fn a_taker_that_fails_before_go_leaves_socket_views_and_mount_alone() {
    let (m, socket) = Mount::fixture_with_control(&[("v", JAR_TREE)], DEV);
    let views_file = socket.with_extension("views.json");
    let views_before = std::fs::read(&views_file).unwrap();
    let socket_ino = std::fs::metadata(&socket).unwrap().ino();
    // Refused after it took the handover (and restored the views): metrics on an address
    // other machines reach, without --metrics-allow-remote.
    let out = run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(&m.store)
            .args(["mount", "--takeover", "--control"])
            .arg(&socket)
            .args(["--metrics-listen", "0.0.0.0:0"])
            .arg(&m.mnt),
        T,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("metrics"),
        "{out:?}"
    );
    serves_again(&m, &socket);
    assert_eq!(std::fs::metadata(&socket).unwrap().ino(), socket_ino);
    assert_eq!(std::fs::read(&views_file).unwrap(), views_before);
    m.bind(&socket, "w", JAR_TREE);
}

#[test]
fn a_passthrough_mount_is_not_taken_over() {
    let (m, socket) = Mount::fixture_with_control(
        &[("v", JAR_TREE)],
        &["--transport", "dev", "--passthrough", "on"],
    );
    let err = take_over(&m, &socket, "taker.log").unwrap_err();
    assert!(err.contains("passthrough"), "{err}");
    serves(&m, &socket);
}

/// In the suite's pass over io-uring (scripts/test), where the kernel offers the ring.
#[test]
fn a_mount_over_io_uring_is_not_taken_over() {
    if std::env::var("DIGESTFS_TRANSPORT").as_deref() != Ok("io-uring") {
        return;
    }
    let (m, socket) = Mount::fixture_with_control(&[("v", JAR_TREE)], &["--transport", "io-uring"]);
    let err = take_over(&m, &socket, "taker.log").unwrap_err();
    assert!(err.contains("io_uring"), "{err}");
    serves(&m, &socket);
}

/// A systemd unit's reload (packaging/systemd: `ExecReload=digestfs mount --takeover --daemon`),
/// twice: each time the daemon that is the unit's main process names the new one the main
/// process before it exits, so systemd never sees its main process end. The second time that
/// is the first reload's daemon, which must still have the notify socket.
#[test]
fn a_unit_reload_hands_the_main_process_over_without_an_unmount() {
    use std::os::unix::net::UnixDatagram;
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let socket = tmp.path().join("ctl.sock");
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = notify
            .recv(&mut buf)
            .expect("a notification within the limit");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mount = |extra: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.arg("--store")
            .arg(tmp.path().join("store"))
            .arg("mount")
            .args(extra)
            .args(DEV)
            .arg("--control")
            .arg(&socket)
            .arg(&mnt)
            .env("NOTIFY_SOCKET", &notify_path);
        cmd
    };
    // ExecStart: in the foreground.
    let mut old = mount(&["--bind", &format!("lib={JAR_TREE}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _unmount = UnmountOnDrop(&mnt);
    let msg = next();
    assert!(msg.contains(&format!("MAINPID={}", old.id())), "{msg}");
    let jar = mnt.join("lib/lib/jansi.jar");
    let held = std::fs::File::open(&jar).unwrap();
    // ExecReload.
    let reload = || {
        let out = run_timeout(&mut mount(&["--takeover", "--daemon"]), T);
        let new: u32 = stdout_ok(out).trim().parse().unwrap();
        let msg = next();
        assert_eq!(
            msg,
            format!("MAINPID={new}\n"),
            "named before the old daemon goes"
        );
        new
    };
    let first = reload();
    let status = wait_until("the old daemon exits", T, || old.try_wait().unwrap());
    assert!(status.success());
    let new = reload();
    wait_until("the first reload's daemon exits", T, || {
        (!alive(first)).then_some(())
    });
    let mut buf = vec![0u8; 94545];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(sha256_hex(&buf), JANSI.split('-').next().unwrap());
    assert!(is_mounted(&mnt));
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/digestfs@.service"),
    )
    .unwrap();
    assert!(
        unit.contains("NotifyAccess=all")
            && unit
                .contains("ExecReload=/usr/bin/digestfs mount --takeover --daemon --fd-store %f"),
        "{unit}"
    );
    drop(held);
    dfs_ok(&["unmount", mnt.to_str().unwrap()]);
    wait_until("the new daemon exits", T, || (!alive(new)).then_some(()));
}
