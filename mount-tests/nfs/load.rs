//! Load and faults over NFS, as the FUSE path has them (`mount-tests/views.rs`, `faults.rs`):
//! libnfs readers while a rebinder swaps layers, a client that vanishes mid-READ of a large
//! blob, a thousand connections opened and dropped; and the server's anonymous memory stays
//! flat through each.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;

/// How much the server's RssAnon may grow over a test: a few MiB of allocator slack, far less
/// than what a leak of the buffers involved would show (1 MiB per READ reply, a 1 MiB pipe
/// per connection).
const RSS_SLACK: u64 = 8 << 20;

/// How long the rebinder swaps layers (the test's wall time stays under a minute).
const SWAP_TIME: Duration = Duration::from_secs(35);

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn assert_flat(server: &NfsServer, start: u64, what: &str) {
    let end = server.rss_anon();
    eprintln!(
        "{what}: RssAnon {:.1} MiB at the start, {:.1} MiB at the end",
        mib(start),
        mib(end)
    );
    assert!(
        end <= start + RSS_SLACK,
        "{what}: RssAnon grew from {:.1} MiB to {:.1} MiB",
        mib(start),
        mib(end)
    );
}

/// The files of the jar tree: path under the tree → digest.
fn jar_files() -> Vec<(String, String)> {
    manifest()[JAR_TREE]
        .iter()
        .filter_map(|(p, k)| match k {
            Kind::File { digest, .. } => Some((p.clone(), digest.clone())),
            _ => None,
        })
        .collect()
}

/// What a reader may see for a path: always its bytes, or also a refusal.
#[derive(Clone, Copy, Debug, PartialEq)]
enum May {
    /// A view never touched: every read succeeds.
    Succeed,
    /// A file of a layer that stays while another layer of its view is swapped: the view's
    /// handles go stale (STALE), the content never changes.
    GoStale,
    /// A file of what is bound and unbound: STALE, or not there (NOENT).
    Vanish,
}

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    stale: u64,
    gone: u64,
    wrong: Vec<String>,
    refused: Vec<String>,
}

#[test]
fn eight_nfs_cat_readers_while_a_rebinder_swaps_layers() {
    let mut server = NfsServer::fixture(&[("stable", JAR_TREE), ("v", JAR_TREE)]);
    let run_sh = manifest()[SRC_SYMLINKS]
        .iter()
        .find_map(|(p, k)| match k {
            Kind::File { digest, .. } if p == "bin/run.sh" => Some(digest.clone()),
            _ => None,
        })
        .unwrap();
    let jars = jar_files();
    let mut paths: Vec<(String, String, May)> = Vec::new();
    for (p, d) in &jars {
        paths.push((format!("stable/{p}"), d.clone(), May::Succeed));
        paths.push((format!("v/{p}"), d.clone(), May::GoStale));
    }
    paths.push(("v/bin/run.sh".into(), run_sh.clone(), May::Vanish));
    paths.push(("w/bin/run.sh".into(), run_sh.clone(), May::Vanish));

    // Warm up (every jar once, 8 at a time), then take the memory at the start.
    std::thread::scope(|s| {
        for chunk in jars.chunks(jars.len().div_ceil(8)) {
            let server = &server;
            s.spawn(move || {
                for (p, d) in chunk {
                    let bytes = libnfs_ok("nfs-cat", &[&server.url(&format!("stable/{p}"))]);
                    assert_eq!(&digest_of(&bytes), d, "{p}");
                }
            });
        }
    });
    let rss_start = server.rss_anon();

    // Handles taken before any swap: content handles keep reading right throughout; the
    // untouched view's handle never goes stale; the swapped view's does.
    let mut rpc = Rpc::connect(server.port);
    let guava_fh = rpc.walk("v/lib/guava.jar");
    let stable_root = rpc.walk("stable");
    let v_root = rpc.walk("v");
    server.bind("w", SRC_SYMLINKS);
    let run_fh = rpc.walk("w/bin/run.sh");

    let stop = AtomicBool::new(false);
    let swaps = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    let checker_reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        // The rebinder: a layer of `v` and all of `w`, bound and unbound in turn.
        s.spawn(|| {
            let deadline = Instant::now() + SWAP_TIME;
            while Instant::now() < deadline {
                server.bind_layer("v", SRC_SYMLINKS, "swap");
                server.unbind("w");
                server.unbind_layer("v", "swap");
                server.bind("w", SRC_SYMLINKS);
                swaps.fetch_add(1, Ordering::Relaxed);
            }
            stop.store(true, Ordering::Relaxed);
        });
        // 8 readers, each through its own nfs-cat processes (a mount, LOOKUPs, READs).
        for r in 0..8 {
            let (paths, tally, stop, server) = (&paths, &tally, &stop, &server);
            s.spawn(move || {
                let mut i = r * 7;
                while !stop.load(Ordering::Relaxed) {
                    let (path, digest, may) = &paths[i % paths.len()];
                    i += 1;
                    let out = libnfs("nfs-cat", &[&server.url(path)]);
                    let err = String::from_utf8_lossy(&out.stderr).to_string();
                    let mut t = tally.lock().unwrap();
                    if out.status.success() {
                        if digest_of(&out.stdout) == *digest {
                            t.ok += 1;
                        } else {
                            t.wrong.push(path.clone());
                        }
                    } else if err.contains("STALE") && *may != May::Succeed {
                        t.stale += 1;
                    } else if err.contains("NOENT") && *may == May::Vanish {
                        t.gone += 1;
                    } else {
                        t.refused.push(format!("{path} ({may:?}): {}", err.trim()));
                    }
                }
            });
        }
        // A raw client on its old handles, all the while.
        s.spawn(|| {
            let mut rpc = Rpc::connect(server.port);
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(digest_of(&rpc.read_file(&guava_fh)), GUAVA);
                assert_eq!(digest_of(&rpc.read_file(&run_fh)), run_sh);
                assert!(rpc.getattr(&stable_root).is_ok(), "the untouched view");
                checker_reads.fetch_add(1, Ordering::Relaxed);
            }
        });
    });
    let t = tally.into_inner().unwrap();
    let swaps = swaps.into_inner();
    eprintln!(
        "{swaps} swaps; nfs-cat: {} right, {} stale, {} gone, {} wrong, {} refused; \
         {} rounds of the raw client",
        t.ok,
        t.stale,
        t.gone,
        t.wrong.len(),
        t.refused.len(),
        checker_reads.into_inner()
    );
    assert!(t.wrong.is_empty(), "wrong bytes: {:?}", t.wrong);
    assert!(t.refused.is_empty(), "refused: {:#?}", t.refused);
    assert!(swaps > 0 && t.ok > 0);
    // The swapped view's old handle is stale while its layers differ from when it was made
    // (a view's handle names its layers), and names the same view again once they are back;
    // the untouched view's handle never went stale.
    server.bind_layer("v", SRC_SYMLINKS, "swap");
    assert_eq!(rpc.getattr(&v_root), Err(NFS3ERR_STALE));
    server.unbind_layer("v", "swap");
    assert!(rpc.getattr(&v_root).is_ok());
    assert!(rpc.getattr(&stable_root).is_ok());
    let status: serde_json::Value =
        serde_json::from_str(&server.dfs_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["errors"], 0, "{status}");
    healthy(&mut server, "stable");
    no_panic(&server);
    assert_flat(&server, rss_start, "8 readers and a rebinder");
}

/// Closes `s` with a reset, as a client that crashes or loses its network does: no FIN, and
/// whatever the server sends next fails.
fn vanish(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// 30 MB of bytes that are not all alike, the same on every run.
fn thirty_mb() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..30_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_client_that_vanishes_mid_read_of_a_30_mb_blob_changes_nothing() {
    let tmp = fixture_store();
    let src = tmp.path().join("big");
    std::fs::create_dir(&src).unwrap();
    let bytes = thirty_mb();
    std::fs::write(src.join("big.bin"), &bytes).unwrap();
    let tree = import(&tmp.path().join("store"), &src);
    let mut server = NfsServer::over(tmp, &[("big", &tree), ("v", JAR_TREE)], None);
    let want = digest_of(&bytes);
    let mut rpc = Rpc::connect(server.port);
    let fh = rpc.walk("big/big.bin");
    assert_eq!(digest_of(&rpc.read_file(&fh)), want);
    let rss_start = server.rss_anon();

    // All 29 MiB-sized READs of the blob sent at once; then the client is gone: before reading
    // anything, a little way into the first reply, or after a half-close (while the server
    // still answers what it was sent).
    let mut pipelined = Vec::new();
    for i in 0..29u64 {
        let args = read_args(&fh, i << 20, 1 << 20);
        pipelined.extend(framed(&call_msg(100 + i as u32, PROG_NFS, 3, 6, &args)));
    }
    for round in 0..12 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&pipelined).unwrap();
        match round % 3 {
            0 => {}
            1 => {
                let mut some = vec![0u8; 100_000];
                s.read_exact(&mut some).unwrap();
            }
            _ => {
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut some = vec![0u8; 3 << 20];
                s.read_exact(&mut some).unwrap();
            }
        }
        vanish(s);
    }
    // The old connection and new ones read the blob whole, with the right bytes.
    assert_eq!(digest_of(&rpc.read_file(&fh)), want);
    let copied = libnfs_ok("nfs-cat", &[&server.url("big/big.bin")]);
    assert!(copied == bytes, "nfs-cat of the 30 MB blob");
    healthy(&mut server, "v");
    let status: serde_json::Value =
        serde_json::from_str(&server.dfs_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["errors"], 0, "{status}");
    no_panic(&server);
    assert_flat(&server, rss_start, "12 clients gone mid-READ of 30 MB");
}

/// Whether 100 clients at once each get an answer to an NFS NULL call.
fn a_hundred_clients_answered(port: u16) -> bool {
    let null = framed(&call_msg(1, PROG_NFS, 3, 0, &[]));
    let clients: Vec<Option<TcpStream>> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            s.write_all(&null).ok()?;
            Some(s)
        })
        .collect();
    clients.into_iter().all(|s| {
        s.is_some_and(|mut s| {
            let mut reply = [0u8; 28];
            s.read_exact(&mut reply).is_ok() && reply[8..12] == 1u32.to_be_bytes()
        })
    })
}

#[test]
fn a_thousand_connections_opened_and_dropped_change_nothing() {
    let mut server = NfsServer::fixture(&[("v", JAR_TREE)]);
    let port = server.port;
    let mut rpc = Rpc::connect(port);
    let guava = rpc.walk("v/lib/guava.jar");
    assert_eq!(digest_of(&rpc.read_file(&guava)), GUAVA);
    assert!(a_hundred_clients_answered(port));
    let rss_start = server.rss_anon();

    // 1,000 connections, 50 at a time: dropped at once, after a call, inside a record, or
    // reset after asking for 1 MiB.
    let null = framed(&call_msg(1, PROG_NFS, 3, 0, &[]));
    let read = framed(&call_msg(2, PROG_NFS, 3, 6, &read_args(&guava, 0, 1 << 20)));
    let mut opened = 0;
    for _ in 0..20 {
        let batch: Vec<TcpStream> = (0..50)
            .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
            .collect();
        for (i, mut s) in batch.into_iter().enumerate() {
            opened += 1;
            match i % 4 {
                0 => drop(s),
                1 => {
                    let _ = s.write_all(&null);
                    drop(s);
                }
                2 => {
                    let _ = s.write_all(&read[..read.len() / 2]);
                    drop(s);
                }
                _ => {
                    let _ = s.write_all(&read);
                    vanish(s);
                }
            }
        }
    }
    assert_eq!(opened, 1000, "every connection was accepted by the kernel");
    // Every connection's place is given back: 100 clients at once are served again (once the
    // server has noticed the last hang-ups).
    wait_until(
        "100 clients served at once",
        Duration::from_secs(30),
        || a_hundred_clients_answered(port).then_some(()),
    );
    // The connection held all along is still served.
    assert_eq!(digest_of(&rpc.read_file(&guava)), GUAVA);
    healthy(&mut server, "v");
    no_panic(&server);
    assert_flat(&server, rss_start, "1,000 connections");
}
