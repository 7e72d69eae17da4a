//! Reading through to a remote REAPI CAS: a real BuildGrid server on loopback (installed by
//! `scripts/install-deps --tests`), mounts over an empty local store, real readers.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use digestfs::remote::RemoteStatus;
use digestfs::store::{Digest, EntryKind, Store};

use crate::common::*;
use crate::harness::buildgrid::{BuildGrid, CORRUPT};
use crate::harness::Mount;

/// Uploads trees from `store` to the server's `instance` with `digestfs push`.
fn push(bg: &BuildGrid, instance: &str, store: &Path, trees: &[&str]) -> String {
    stdout_ok(push_with(
        bg,
        store,
        &["--remote-instance-name", instance],
        trees,
    ))
}

/// `digestfs push` with options of the caller's, whatever its outcome.
fn push_with(bg: &BuildGrid, store: &Path, extra: &[&str], trees: &[&str]) -> Output {
    let mut args = vec![
        "--store",
        store.to_str().unwrap(),
        "push",
        "--remote-store-address",
        &bg.address,
    ];
    args.extend(extra);
    args.extend(trees);
    dfs(&args)
}

/// A mount over an empty local store that reads through to `address`.
fn mount_remote(address: &str, binds: &[(&str, &str)], extra: &[&str]) -> (Mount, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("store")).unwrap();
    mount_store(tmp, address, binds, extra)
}

fn mount_store(
    tmp: tempfile::TempDir,
    address: &str,
    binds: &[(&str, &str)],
    extra: &[&str],
) -> (Mount, PathBuf) {
    let socket = tmp.path().join("ctl.sock");
    let mut args = vec![
        "--remote-store-address",
        address,
        "--remote-timeout-ms",
        "2000",
        "--remote-retries",
        "1",
        "--control",
        socket.to_str().unwrap(),
    ];
    args.extend(extra);
    let m = Mount::over(tmp, binds, &args);
    (m, socket)
}

fn remote_status(socket: &Path) -> RemoteStatus {
    crate::harness::status(socket)
        .remote
        .expect("status has a remote part")
}

/// The status once `done` holds of it; fails the test if that takes longer than `T`.
fn wait_for_status(socket: &Path, done: impl Fn(&RemoteStatus) -> bool) -> RemoteStatus {
    wait_until("the remote status", T, || {
        let s = remote_status(socket);
        done(&s).then_some(s)
    })
}

fn file_digests(tree: &str) -> Vec<(String, String)> {
    manifest()[tree]
        .iter()
        .filter_map(|(path, kind)| match kind {
            Kind::File { digest, .. } => Some((path.clone(), digest.clone())),
            _ => None,
        })
        .collect()
}

fn read_hashed(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("{}-{}", sha256_hex(&bytes), bytes.len())
}

/// Every file and `Directory` of `tree` is in the local `store`, read without any remote.
fn assert_all_local(store: &Path, tree: &str) {
    let store = Store::open(store).unwrap();
    let root: Digest = tree.parse().unwrap();
    let mut todo = vec![root];
    while let Some(d) = todo.pop() {
        let listing = store.load_directory(&d).unwrap();
        for e in listing.entries {
            match e.kind {
                EntryKind::Dir(sub) => todo.push(sub),
                EntryKind::File { digest, .. } => {
                    let bytes = store.read_all(&digest).unwrap();
                    assert_eq!(Digest::of_bytes(&bytes), digest, "{}", e.name);
                }
                EntryKind::Symlink(_) => {}
            }
        }
    }
}

/// `cat` of a file through the mount, bounded: a hang fails the test instead of CI.
fn cat(path: &Path) -> Output {
    run_timeout(Command::new("cat").arg(path), Duration::from_secs(60))
}

#[test]
fn a_tree_only_the_remote_has_is_served_verified_and_kept_locally() {
    let mut bg = BuildGrid::start();
    let fixture = fixture_store();
    let report = push(
        &bg,
        "",
        &fixture.path().join("store"),
        &[JAR_TREE, SRC_SYMLINKS],
    );
    assert!(report.contains("uploaded"), "{report}");
    let doctor = |address: &str| {
        dfs(&[
            "--store",
            fixture.path().join("store").to_str().unwrap(),
            "doctor",
            "--remote-store-address",
            address,
            "--remote-timeout-ms",
            "2000",
        ])
    };
    let out = doctor(&bg.address);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("answers and offers SHA256"),
        "{out:?}"
    );

    // Bound at startup: the Directories come by GetTree while the bind is checked.
    let (m, socket) = mount_remote(&bg.address, &[("lib", JAR_TREE)], &[]);
    let before = remote_status(&socket);
    assert!(before.get_tree_calls >= 1, "{before:?}");
    assert_eq!(
        before.bytestream_reads + before.batch_reads,
        0,
        "files wait for a read"
    );
    for (path, digest) in file_digests(JAR_TREE) {
        assert_eq!(read_hashed(&m.path("lib").join(&path)), digest, "{path}");
    }
    run_timeout(
        Command::new("unzip")
            .arg("-tq")
            .arg(m.path("lib/lib/guava.jar")),
        T,
    );
    let after = remote_status(&socket);
    assert_eq!(after.health, "ok", "{after:?}");
    assert_eq!(after.refused_corrupt, 0);
    assert!(
        after.bytestream_reads >= 1 && after.batch_reads >= 1,
        "{after:?}"
    );
    assert_eq!(
        after.blobs_fetched as usize,
        file_digests(JAR_TREE).len() + 2,
        "every file once, plus the two Directories: {after:?}"
    );
    // Bound live, by the control socket: the root Directory is fetched too.
    m.bind(&socket, "src", SRC_SYMLINKS);
    assert_eq!(
        std::fs::read_link(m.path("src/nested/link_to_src_dir")).unwrap(),
        Path::new("../src")
    );
    // Everything read is now in the local store, in Pants' format.
    assert_all_local(&m.store, JAR_TREE);
    let tmp = tempfile::tempdir().unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&m.store)
        .arg(tmp.path().join("store"))
        .status()
        .unwrap();
    assert!(copied.success());
    drop(m);

    // With the server gone, what was fetched still reads (a new mount, so nothing comes from
    // the kernel's cache), and what was never fetched fails with EIO, without hanging.
    bg.stop();
    let out = doctor(&bg.address);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("FAIL  remote CAS {}", bg.address)) && text.contains("fix:"),
        "{text}"
    );
    let (m, socket) = mount_store(
        tmp,
        &bg.address,
        &[("lib", JAR_TREE), ("src", SRC_SYMLINKS)],
        &[],
    );
    for (path, digest) in file_digests(JAR_TREE) {
        assert_eq!(read_hashed(&m.path("lib").join(&path)), digest, "{path}");
    }
    let out = cat(&m.path("src/src/main/java/org/example/App.java"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{out:?}"
    );
    let status = remote_status(&socket);
    assert_eq!(status.health, "failing", "{status:?}");
    assert!(status.last_error.is_some());
    assert!(
        m.log_text()
            .contains("src/src/main/java/org/example/App.java"),
        "the log names the path:\n{}",
        m.log_text()
    );
}

#[test]
fn a_silent_remote_gives_eio_after_the_timeout_and_local_files_still_read() {
    // Accepts connections and never answers: only the timeout can end a call.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("grpc://{}", listener.local_addr().unwrap());
    let _acceptor = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    // The fixture store has the jar tree; one small jar is deleted, so only the remote could
    // serve it.
    let tmp = fixture_store();
    delete_small_blob(&tmp.path().join("store"), JANSI);
    let (m, socket) = mount_store(tmp, &address, &[("lib", JAR_TREE)], &[]);
    let out = cat(&m.path("lib/lib/jansi.jar"));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{out:?}"
    );
    // The reader was let go because the timeout passed, not for any other failure.
    assert!(m.log_text().contains("within 2.0 s"), "{}", m.log_text());
    assert_eq!(read_hashed(&m.path("lib/lib/guava.jar")), GUAVA);
    let status = remote_status(&socket);
    assert_eq!(status.health, "failing", "{status:?}");
}

/// Imports a tree holding one 24 MiB blob of pseudo-random bytes (`big.jar`), large enough that
/// readers overlap while it streams, and pushes it to the server. Returns the tree and the bytes.
fn push_big_tree(bg: &BuildGrid) -> (String, Vec<u8>) {
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("tree");
    std::fs::create_dir(&dir).unwrap();
    let mut big = vec![0u8; 24 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.join("big.jar"), &big).unwrap();
    let store = src.path().join("store");
    let tree = import(&store, &dir);
    push(bg, "", &store, &[&tree]);
    (tree, big)
}

#[test]
fn ranged_reads_answer_the_tail_of_a_large_blob_before_it_is_local() {
    let bg = BuildGrid::start();
    let (tree, big) = push_big_tree(&bg);
    let (m, socket) = mount_remote(&bg.address, &[("lib", &tree)], &["--remote-ranged-reads"]);
    // What a zip reader does first: the last 64 KiB, where the central directory is.
    let f = std::fs::File::open(m.path("lib/big.jar")).unwrap();
    let mut tail = vec![0u8; 64 << 10];
    let at = big.len() - tail.len();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut tail, at as u64).unwrap();
    assert!(tail == big[at..], "the tail's bytes");
    // Then entries in the middle (a range that ends before the blob does).
    let mut entry = vec![0u8; 16 << 10];
    let at = 5 << 20;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut entry, at as u64).unwrap();
    assert!(entry == big[at..at + entry.len()], "an entry's bytes");
    let status = remote_status(&socket);
    assert!(status.ranged_reads >= 1, "{status:?}");
    // The whole blob arrives, verified, in the background; then it is served locally.
    assert_eq!(
        read_hashed(&m.path("lib/big.jar")),
        format!("{}-{}", sha256_hex(&big), big.len())
    );
    let d: Digest = format!("{}-{}", sha256_hex(&big), big.len())
        .parse()
        .unwrap();
    wait_for_status(&socket, |_| {
        Store::open(&m.store).unwrap().has_file(&d).unwrap()
    });
    let s = remote_status(&socket);
    assert_eq!(
        s.bytestream_reads,
        1 + s.ranged_reads,
        "one full fetch: {s:?}"
    );
}

#[test]
fn concurrent_readers_of_one_unfetched_blob_share_one_remote_read() {
    let bg = BuildGrid::start();
    let (tree, big) = push_big_tree(&bg);
    let want = format!("{}-{}", sha256_hex(&big), big.len());
    let (m, socket) = mount_remote(&bg.address, &[("lib", &tree)], &["--threads", "8"]);
    let path = m.path("lib/big.jar");
    let barrier = Arc::new(Barrier::new(8));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Each starts at its own offset, so the kernel sends reads for different
                // pages at once rather than queueing every reader behind one page.
                let f = std::fs::File::open(&path).unwrap();
                barrier.wait();
                let mut buf = vec![0u8; 4096];
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, (i as u64) << 21).unwrap();
                read_hashed(&path)
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), want);
    }
    let status = remote_status(&socket);
    assert_eq!(status.bytestream_reads, 1, "{status:?}");
    assert!(
        status.joined_fetches >= 1,
        "the readers overlapped: {status:?}"
    );
    assert_eq!(
        status.refused_corrupt + status.fetch_failures,
        0,
        "{status:?}"
    );
}

#[test]
fn corrupt_bytes_from_the_remote_are_refused_never_served() {
    let bg = BuildGrid::start();
    let fixture = fixture_store();
    push(&bg, CORRUPT, &fixture.path().join("store"), &[JAR_TREE]);
    // The disk instance serves what is in its files: flip one byte of a large blob (read by
    // ByteStream) and of a small one (read by BatchReadBlobs), keeping their lengths.
    for digest in [GUAVA, JANSI] {
        let path = bg.disk_object(digest);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let (m, socket) = mount_remote(
        &bg.address,
        &[("lib", JAR_TREE)],
        &["--remote-instance-name", CORRUPT],
    );
    for jar in ["guava.jar", "jansi.jar"] {
        let out = cat(&m.path("lib/lib").join(jar));
        assert!(!out.status.success(), "{jar} was served");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
            "{jar}: {out:?}"
        );
    }
    // The rest of the tree is served as usual.
    assert_eq!(
        read_hashed(&m.path("lib/lib/commons-lang3.jar")),
        "eb2667f24a588f6c87f4875fed97e5aa7303eb6cfa4f32d0691dfd2ed4cf64d2-595165"
    );
    let status = remote_status(&socket);
    assert!(status.refused_corrupt >= 2, "{status:?}");
    // Nothing corrupt reached the local store.
    let store = Store::open(&m.store).unwrap();
    for digest in [GUAVA, JANSI] {
        let d: Digest = digest.parse().unwrap();
        assert!(!store.has_file(&d).unwrap(), "{digest} was stored");
    }
    assert!(
        m.log_text().contains("do not match the digest"),
        "{}",
        m.log_text()
    );
    drop(m);

    // With ranged reads, bytes read before the whole blob is checked are served unverified
    // (that is the option's bargain); once the check fails, nothing more is served.
    let (m, socket) = mount_remote(
        &bg.address,
        &[("lib", JAR_TREE)],
        &["--remote-instance-name", CORRUPT, "--remote-ranged-reads"],
    );
    let f = std::fs::File::open(m.path("lib/lib/guava.jar")).unwrap();
    let mut tail = vec![0u8; 64 << 10];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut tail, 2920436 - (64 << 10)).unwrap();
    wait_for_status(&socket, |s| s.refused_corrupt > 0);
    let mut head = vec![0u8; 64 << 10];
    let err = std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 1 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let d: Digest = GUAVA.parse().unwrap();
    assert!(!Store::open(&m.store).unwrap().has_file(&d).unwrap());
}

#[test]
fn prefetch_fetches_a_bound_tree_in_the_background() {
    let bg = BuildGrid::start();
    let fixture = fixture_store();
    push(&bg, "", &fixture.path().join("store"), &[JAR_TREE]);
    let (m, socket) = mount_remote(&bg.address, &[], &["--prefetch"]);
    m.bind(&socket, "lib", JAR_TREE);
    let status = wait_for_status(&socket, |s| {
        s.prefetch.trees == 1 && s.prefetch.running == 0
    });
    let files = file_digests(JAR_TREE);
    let distinct: std::collections::HashSet<_> = files.iter().map(|(_, d)| d).collect();
    let p = &status.prefetch;
    assert_eq!(p.blobs_total as usize, distinct.len(), "{status:?}");
    assert_eq!(
        (p.blobs_done, p.blobs_failed),
        (p.blobs_total, 0),
        "{status:?}"
    );
    assert_eq!(p.bytes_done, p.bytes_total);
    // Small blobs go many to a call.
    assert!(status.batch_reads * 2 < p.blobs_total, "{status:?}");
    // Every blob is local without a single read through the mount.
    assert_all_local(&m.store, JAR_TREE);
    let status_text = dfs_ok(&[
        "status",
        "--control",
        socket.to_str().unwrap(),
        m.mnt.to_str().unwrap(),
    ]);
    assert!(status_text.contains("prefetch"), "{status_text}");
    assert!(status_text.contains(&bg.address), "{status_text}");
}

#[test]
fn a_chain_of_100k_directories_is_pushed_bound_and_prefetched() {
    let bg = BuildGrid::start();
    let src = tempfile::tempdir().unwrap();
    let store = src.path().join("store");
    let root = chain_tree(&store, 100_000, b"at the bottom of the chain");
    // push walks the chain (without recursion) and uploads its 100,001 Directories.
    let out = push(&bg, "", &store, &[&root]);
    assert!(out.contains("100002 blobs were missing"), "{out}");
    // An empty local store: the bind fetches every Directory, the prefetcher the leaf. The
    // server is Python and the tests run in parallel: give its first GetTree page time.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("store")).unwrap();
    let socket = tmp.path().join("ctl.sock");
    let m = Mount::over(
        tmp,
        &[],
        &[
            "--remote-store-address",
            &bg.address,
            "--remote-timeout-ms",
            "60000",
            "--control",
            socket.to_str().unwrap(),
            "--prefetch",
        ],
    );
    m.bind(&socket, "deep", &root);
    let status = wait_for_status(&socket, |s| {
        s.prefetch.trees == 1 && s.prefetch.running == 0
    });
    assert_eq!(
        (status.prefetch.blobs_done, status.prefetch.blobs_failed),
        (1, 0),
        "{status:?}"
    );
    let leaf = Digest::of_bytes(b"at the bottom of the chain");
    let local = Store::open(&m.store).unwrap();
    assert_eq!(
        local.read_all(&leaf).unwrap(),
        b"at the bottom of the chain"
    );
    assert!(local.tree_blobs(&[root.parse().unwrap()]).errors.is_empty());
    assert!(m.log_text().lines().all(|l| !l.contains("overflow")));
}

#[test]
fn grpcs_with_the_servers_ca_works_and_without_it_is_refused() {
    let (bg, ca) = BuildGrid::start_tls();
    let fixture = fixture_store();
    let store = fixture.path().join("store");
    let out = push_with(
        &bg,
        &store,
        &["--remote-ca-certs", ca.to_str().unwrap()],
        &[JAR_TREE],
    );
    assert!(stdout_ok(out).contains("uploaded"));
    // Each read into a store of its own, so that nothing is local yet.
    let cat = |extra: &[&str]| {
        let empty = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--store",
            empty.path().to_str().unwrap(),
            "cat",
            "--remote-store-address",
            &bg.address,
            "--remote-retries",
            "0",
        ];
        args.extend(extra);
        args.push(JANSI);
        dfs(&args)
    };
    let out = cat(&["--remote-ca-certs", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let bytes = out.stdout;
    assert_eq!(format!("{}-{}", sha256_hex(&bytes), bytes.len()), JANSI);
    // The system's roots do not know the test CA.
    let out = cat(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("certificate"),
        "{out:?}"
    );
}

#[test]
fn headers_carry_the_token_a_server_requires() {
    let (bg, token) = BuildGrid::start_jwt("digestfs-test-secret");
    let fixture = fixture_store();
    let store = fixture.path().join("store");
    let bearer = format!("authorization=Bearer {token}");
    let push = |extra: &[&str]| {
        let mut all = vec!["--remote-retries", "0"];
        all.extend(extra);
        push_with(&bg, &store, &all, &[JAR_TREE])
    };
    let refused = push(&[]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{refused:?}"
    );
    assert!(stdout_ok(push(&["--remote-header", &bearer])).contains("uploaded"));
    // And reads carry it too: a mount over an empty store with the header.
    let (m, _socket) = mount_remote(
        &bg.address,
        &[("lib", JAR_TREE)],
        &["--remote-header", &bearer],
    );
    assert_eq!(read_hashed(&m.path("lib/lib/guava.jar")), GUAVA);
}

#[test]
fn bad_remote_options_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["--remote-store-address", "localhost:1"], "localhost:1"),
        (vec!["--remote-store-address", "ftp://h:1"], "grpc://"),
        (
            vec![
                "--remote-store-address",
                "grpc://h:1",
                "--remote-header",
                "novalue",
            ],
            "novalue",
        ),
        (
            vec![
                "--remote-store-address",
                "grpc://h:1",
                "--remote-ca-certs",
                "/x",
            ],
            "grpcs://",
        ),
    ] {
        let mut all = vec!["--store", store, "cat"];
        all.extend(args.iter());
        all.push(GUAVA);
        let out = dfs(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = dfs(&["--store", store, "push", JAR_TREE]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--remote-store-address"));
}

/// `cmd` run on CPU 0 only: the FUSE request it makes goes to CPU 0's queue over io-uring.
fn on_cpu0(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_setaffinity on a zeroed set with one CPU; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A read held by a stalled remote holds only its own request: a lookup from another process
/// on the same CPU is answered meanwhile (over io-uring by another entry of that CPU's queue,
/// over /dev/fuse by another reader thread), and the held read ends with the right bytes once
/// the remote answers. Completion is asserted, not time.
#[test]
fn a_read_held_by_the_remote_holds_up_no_other_request_from_its_cpu() {
    let bg = BuildGrid::start();
    let (tree, big) = push_big_tree(&bg);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("store")).unwrap();
    let socket = tmp.path().join("ctl.sock");
    // A timeout far beyond the test's: the read waits on the stopped server, it does not fail.
    let m = Mount::over(
        tmp,
        &[("lib", &tree)],
        &[
            "--remote-store-address",
            &bg.address,
            "--remote-timeout-ms",
            "600000",
            "--control",
            socket.to_str().unwrap(),
        ],
    );
    let status = || crate::harness::status(&socket);
    let path = m.path("lib/big.jar");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), big.len() as u64);
    let before = status().remote.unwrap().bytestream_reads;
    bg.pause();
    let mut reader = on_cpu0(Command::new("sha256sum").arg(&path))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The read is in the daemon's hands: its fetch of the blob waits on the stopped server.
    wait_until("the held read to reach the remote", T, || {
        (status().remote.unwrap().bytestream_reads > before).then_some(())
    });
    for i in 0..3 {
        // A name never looked up: the kernel must ask the daemon.
        let out = run_timeout(
            on_cpu0(Command::new("stat").arg(m.path(&format!("lib/absent-{i}.jar")))),
            T,
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("No such file"),
            "{out:?}"
        );
    }
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the read was not held (the server is stopped)"
    );
    bg.resume();
    let out = reader.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&sha256_hex(&big)),
        "{out:?}"
    );
}
