//! The FUSE transport (`--transport`, or DIGESTFS_TRANSPORT for the whole suite: scripts/test
//! runs every mount test once over /dev/fuse and once over io_uring).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::harness::{all_threads_stopped, is_mounted, Mount};

fn uring_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y")
}

/// What this run's mounts are asked for, and so what they must report.
fn expected() -> &'static str {
    match std::env::var("DIGESTFS_TRANSPORT").as_deref() {
        Ok("io-uring") => "io-uring",
        Ok("dev") => "dev",
        // auto: io-uring exactly when the kernel offers it.
        _ if uring_enabled() => "io-uring",
        _ => "dev",
    }
}

fn status(m: &Mount, socket: &std::path::Path) -> serde_json::Value {
    let out = dfs_ok(&[
        "status",
        "--json",
        m.mnt.to_str().unwrap(),
        "--control",
        socket.to_str().unwrap(),
    ]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn the_transport_asked_for_is_the_one_that_serves() {
    let (m, socket) = Mount::fixture_with_control(&[("lib", JAR_TREE)], &["--queue-depth", "3"]);
    for (path, kind) in &manifest()[JAR_TREE] {
        if let Kind::File { digest, .. } = kind {
            let bytes = std::fs::read(m.path("lib").join(path)).unwrap();
            assert_eq!(
                &format!("{}-{}", sha256_hex(&bytes), bytes.len()),
                digest,
                "{path}"
            );
        }
    }
    let s = status(&m, &socket);
    assert_eq!(s["transport"], expected(), "{s}");
    let over_ring = s["ring_requests"].as_u64().unwrap();
    let over_dev = s["dev_requests"].as_u64().unwrap();
    if expected() == "io-uring" {
        // All of them: once INIT agreed to the ring the kernel sends it every request (holding
        // them until each queue has an entry), and /dev/fuse only forgets and interrupts.
        assert!(over_ring > 0, "{s}");
        assert_eq!(over_dev, 0, "{s}");
        assert!(m.log_text().contains("FUSE transport: io-uring"));
        // A queue per possible CPU, as the kernel counts them, each lending what was asked.
        let queues = digestfs::fuse::uring::possible_cpus().unwrap();
        assert_eq!(s["ring"]["queues"], queues as u64, "{s}");
        assert_eq!(s["ring"]["entries_per_queue"], 3, "{s}");
    } else {
        assert!(s.get("ring").is_none(), "{s}");
        assert_eq!(over_ring, 0, "{s}");
        assert!(over_dev > 0, "{s}");
    }
    let text = String::from_utf8(
        dfs(&[
            "status",
            m.mnt.to_str().unwrap(),
            "--control",
            socket.to_str().unwrap(),
        ])
        .stdout,
    )
    .unwrap();
    assert!(
        text.contains(&format!("transport      {}", expected())),
        "{text}"
    );
}

#[test]
fn an_explicit_transport_is_honoured_or_refused_with_the_reason() {
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = crate::harness::UnmountOnDrop(&mnt);
    let mount = |args: &[&str]| {
        run_timeout(
            Command::new(bin())
                .arg("--store")
                .arg(tmp.path().join("store"))
                .args(["mount", "--daemon", "--bind", &format!("lib={JAR_TREE}")])
                .args(args)
                .arg(&mnt),
            T,
        )
    };
    // A control socket per daemon: the one unmounted may still be exiting.
    let transport_of = |socket: &std::path::Path| {
        let s: serde_json::Value = serde_json::from_str(&dfs_ok(&[
            "status",
            "--json",
            mnt.to_str().unwrap(),
            "--control",
            socket.to_str().unwrap(),
        ]))
        .unwrap();
        s["transport"].as_str().unwrap().to_string()
    };
    let (first, second) = (tmp.path().join("ctl1.sock"), tmp.path().join("ctl2.sock"));
    // With passthrough too: the ring carries its opens.
    let out = mount(&[
        "--transport",
        "io-uring",
        "--passthrough",
        "on",
        "--control",
        first.to_str().unwrap(),
    ]);
    if uring_enabled() {
        assert!(out.status.success(), "{out:?}");
        assert_eq!(transport_of(&first), "io-uring");
        crate::harness::teardown(&mnt);
    } else {
        // Never a silent fall back when io-uring was asked for by name.
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("enable_uring"), "{err}");
        assert!(!is_mounted(&mnt));
    }
    // auto takes the ring exactly when the kernel offers it, and says which it took.
    let out = mount(&["--transport", "auto", "--control", second.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let want = if uring_enabled() { "io-uring" } else { "dev" };
    assert_eq!(transport_of(&second), want);
    crate::harness::teardown(&mnt);
}

/// A daemon killed while requests wait on it (stopped first: the requests are queued in the
/// kernel for this run's transport, a stopped thread taking none): every reader gets an error
/// at once, none waits, none gets bytes.
#[test]
fn a_daemon_killed_mid_request_leaves_no_reader_waiting() {
    let mut m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    let pid = m.pid() as i32;
    let jars: Vec<_> = std::fs::read_dir(m.path("lib/lib"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // kill returns before every thread has stopped; a thread still running could answer.
    wait_until("every daemon thread stopped", T, || {
        all_threads_stopped(pid).then_some(())
    });
    let started = Instant::now();
    let readers: Vec<_> = jars
        .iter()
        .take(8)
        .cloned()
        .map(|jar| {
            std::thread::spawn(move || {
                let out = run_timeout(Command::new("cat").arg(&jar), Duration::from_secs(60));
                (jar, out, Instant::now())
            })
        })
        .collect();
    // The readers are blocked in the kernel on the stopped daemon.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(i) = readers.iter().position(|r| r.is_finished()) {
        let (jar, out, _) = readers.into_iter().nth(i).unwrap().join().unwrap();
        panic!("a read finished while the daemon was stopped: {jar:?} {out:?}");
    }
    let killed = Instant::now();
    m.kill9();
    for r in readers {
        let (jar, out, done) = r.join().unwrap();
        assert!(
            !out.status.success(),
            "{jar:?} read from a dead daemon: {out:?}"
        );
        assert!(out.stdout.is_empty(), "{jar:?}: bytes from a dead daemon");
        // Not a speed figure: a reader still blocked is the failure (`cat` is killed at 60 s).
        let waited = done.saturating_duration_since(killed);
        assert!(
            waited < Duration::from_secs(20),
            "{jar:?} waited {waited:?} after the kill ({:?} in all)",
            done - started
        );
    }
    // And no dead mount is left: the daemon's watcher detaches it.
    wait_until("the killed daemon's mount to be detached", T, || {
        (!is_mounted(&m.mnt)).then_some(())
    });
}

/// What a ring queue that cannot go on does to its connection (so that no reader of its CPU
/// waits): aborting it ends every request at once, those already waiting on the daemon too,
/// and no dead mount is left.
#[test]
fn aborting_the_connection_ends_every_request_at_once() {
    let m = Mount::fixture(&[("lib", JAR_TREE)], &[]);
    assert_eq!(
        std::fs::read(m.path("lib/lib/jansi.jar")).unwrap().len(),
        94545
    );
    let pid = m.pid() as i32;
    // Stopped, so that the readers below are waiting on it when the connection is aborted.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until("every daemon thread stopped", T, || {
        all_threads_stopped(pid).then_some(())
    });
    let readers: Vec<_> = ["guava.jar", "commons-io.jar"]
        .iter()
        .map(|jar| {
            let path = m.path("lib/lib").join(jar);
            std::thread::spawn(move || {
                run_timeout(Command::new("cat").arg(path), Duration::from_secs(60))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        readers.iter().all(|r| !r.is_finished()),
        "a read finished while the daemon was stopped"
    );
    digestfs::os::abort_fuse_connection(&m.mnt).unwrap();
    // Over io_uring a request already handed to an entry is completed in the daemon's own task,
    // so it ends only once the daemon runs again (the failing queue that aborts is running);
    // what it must not do then is answer the aborted requests.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for r in readers {
        let out = r.join().unwrap();
        assert!(!out.status.success() && out.stdout.is_empty(), "{out:?}");
    }
    // No dead mount is left: the daemon's session ends with its connection, and it unmounts.
    wait_until("the aborted mount to be unmounted", T, || {
        (!is_mounted(&m.mnt)).then_some(())
    });
}
