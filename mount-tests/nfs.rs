//! The NFS front end, served with `--nfs-no-mount` and read by real NFSv3 clients that need no
//! kernel module: libnfs's `nfs-ls`, `nfs-cat` and `nfs-cp` (`scripts/install-deps --tests`),
//! and a small hand-written RPC client below for what those tools cannot say (stale handles,
//! the status of refused writes) and for malformed and fuzzed records.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::time::Duration;

use proptest::prelude::*;

use crate::common::*;
use crate::harness::nfs::NfsServer;

const PROG_NFS: u32 = 100_003;
const PROG_MOUNT: u32 = 100_005;
const NFS3ERR_ROFS: u32 = 30;
const NFS3ERR_STALE: u32 = 70;
const NFS3ERR_BADHANDLE: u32 = 10001;

mod load;

fn trees() -> Vec<(&'static str, &'static str)> {
    vec![
        ("jvm/resolves/jvm-default", JAR_TREE),
        ("src", SRC_SYMLINKS),
        ("followed", SRC_FOLLOWED),
    ]
}

/// Runs a libnfs tool; its output.
fn libnfs(tool: &str, args: &[&str]) -> std::process::Output {
    run_timeout(Command::new(tool).args(args), Duration::from_secs(30))
}

fn libnfs_ok(tool: &str, args: &[&str]) -> Vec<u8> {
    let out = libnfs(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn digest_of(bytes: &[u8]) -> String {
    format!("{}-{}", sha256_hex(bytes), bytes.len())
}

// ---- a raw NFSv3 client --------------------------------------------------------------------

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_opaque(out: &mut Vec<u8>, b: &[u8]) {
    put32(out, b.len() as u32);
    out.extend_from_slice(b);
    out.resize(out.len() + (4 - b.len() % 4) % 4, 0);
}

/// An RPC call message (no record mark), AUTH_UNIX as root.
fn call_msg(xid: u32, prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    let mut cred = Vec::new();
    put32(&mut cred, 0);
    put_opaque(&mut cred, b"test");
    for w in [0, 0, 0] {
        put32(&mut cred, w);
    }
    let mut m = Vec::new();
    for w in [xid, 0, 2, prog, vers, proc_, 1] {
        put32(&mut m, w);
    }
    put_opaque(&mut m, &cred);
    put32(&mut m, 0);
    put32(&mut m, 0);
    m.extend_from_slice(args);
    m
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u32 | 0x8000_0000).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> u32 {
        let v = u32::from_be_bytes(self.0[..4].try_into().unwrap());
        self.0 = &self.0[4..];
        v
    }
    fn u64(&mut self) -> u64 {
        ((self.u32() as u64) << 32) | self.u32() as u64
    }
    fn opaque(&mut self) -> Vec<u8> {
        let n = self.u32() as usize;
        let v = self.0[..n].to_vec();
        self.0 = &self.0[n + (4 - n % 4) % 4..];
        v
    }
    fn skip(&mut self, n: usize) {
        self.0 = &self.0[n..];
    }
    /// post_op_attr: present or not.
    fn post_op_attr(&mut self) -> Option<Attr> {
        (self.u32() == 1).then(|| self.fattr())
    }
    fn fattr(&mut self) -> Attr {
        let kind = self.u32();
        let mode = self.u32();
        self.skip(12); // nlink, uid, gid
        let size = self.u64();
        self.skip(16); // used, rdev
        self.skip(8); // fsid
        let fileid = self.u64();
        self.skip(24);
        Attr {
            kind,
            mode,
            size,
            fileid,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Attr {
    kind: u32,
    mode: u32,
    size: u64,
    fileid: u64,
}

/// How the server answered a call.
#[derive(Debug, PartialEq)]
enum Answer {
    /// Accepted with SUCCESS: the procedure's result.
    Ok(Vec<u8>),
    /// Accepted with another status (PROG_UNAVAIL 1, PROG_MISMATCH 2, GARBAGE_ARGS 4…).
    Accepted(u32),
    Denied,
}

struct Rpc {
    s: TcpStream,
    xid: u32,
}

impl Rpc {
    fn connect(port: u16) -> Rpc {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Rpc { s, xid: 1 }
    }

    fn read_record(&mut self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 4];
            self.s.read_exact(&mut h)?;
            let h = u32::from_be_bytes(h);
            let start = out.len();
            out.resize(start + (h & 0x7fff_ffff) as usize, 0);
            self.s.read_exact(&mut out[start..])?;
            if h & 0x8000_0000 != 0 {
                return Ok(out);
            }
        }
    }

    fn call(&mut self, prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Answer {
        self.xid += 1;
        let xid = self.xid;
        self.s
            .write_all(&framed(&call_msg(xid, prog, vers, proc_, args)))
            .unwrap();
        let reply = self.read_record().expect("a reply");
        let mut r = Reader(&reply);
        assert_eq!(r.u32(), xid, "the reply's xid");
        assert_eq!(r.u32(), 1, "a REPLY");
        if r.u32() != 0 {
            return Answer::Denied;
        }
        r.u32();
        r.opaque();
        match r.u32() {
            0 => Answer::Ok(r.0.to_vec()),
            stat => Answer::Accepted(stat),
        }
    }

    /// An NFSv3 procedure: its nfsstat3 and the rest of the result.
    fn nfs(&mut self, proc_: u32, args: &[u8]) -> (u32, Vec<u8>) {
        match self.call(PROG_NFS, 3, proc_, args) {
            Answer::Ok(body) => {
                let mut r = Reader(&body);
                let stat = r.u32();
                (stat, r.0.to_vec())
            }
            other => panic!("NFS procedure {proc_}: {other:?}"),
        }
    }

    fn mount_root(&mut self) -> Vec<u8> {
        let mut args = Vec::new();
        put_opaque(&mut args, b"/");
        let Answer::Ok(body) = self.call(PROG_MOUNT, 3, 1, &args) else {
            panic!("MNT refused")
        };
        let mut r = Reader(&body);
        assert_eq!(r.u32(), 0, "MNT status");
        r.opaque()
    }

    fn lookup(&mut self, dir: &[u8], name: &str) -> Result<Vec<u8>, u32> {
        let mut args = Vec::new();
        put_opaque(&mut args, dir);
        put_opaque(&mut args, name.as_bytes());
        match self.nfs(3, &args) {
            (0, body) => Ok(Reader(&body).opaque()),
            (stat, _) => Err(stat),
        }
    }

    fn walk(&mut self, path: &str) -> Vec<u8> {
        let mut fh = self.mount_root();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            fh = self
                .lookup(&fh, part)
                .unwrap_or_else(|s| panic!("LOOKUP {part} in {path}: {s}"));
        }
        fh
    }

    fn getattr(&mut self, fh: &[u8]) -> Result<Attr, u32> {
        let mut args = Vec::new();
        put_opaque(&mut args, fh);
        match self.nfs(1, &args) {
            (0, body) => Ok(Reader(&body).fattr()),
            (stat, _) => Err(stat),
        }
    }

    fn readlink(&mut self, fh: &[u8]) -> Result<String, u32> {
        let mut args = Vec::new();
        put_opaque(&mut args, fh);
        match self.nfs(5, &args) {
            (0, body) => {
                let mut r = Reader(&body);
                r.post_op_attr();
                Ok(String::from_utf8(r.opaque()).unwrap())
            }
            (stat, _) => Err(stat),
        }
    }

    fn read(&mut self, fh: &[u8], offset: u64, count: u32) -> Result<(Vec<u8>, bool), u32> {
        let mut args = Vec::new();
        put_opaque(&mut args, fh);
        put64(&mut args, offset);
        put32(&mut args, count);
        match self.nfs(6, &args) {
            (0, body) => {
                let mut r = Reader(&body);
                r.post_op_attr();
                let n = r.u32() as usize;
                let eof = r.u32() == 1;
                let data = r.opaque();
                assert_eq!(data.len(), n);
                Ok((data, eof))
            }
            (stat, _) => Err(stat),
        }
    }

    /// A whole file, read 1 MiB at a time until EOF.
    fn read_file(&mut self, fh: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let (data, eof) = self.read(fh, out.len() as u64, 1 << 20).unwrap();
            out.extend_from_slice(&data);
            if eof {
                return out;
            }
            assert!(!data.is_empty(), "an empty READ before EOF");
        }
    }
}

/// A fresh client reads a jar of the jar tree bound at `at`, and the daemon still runs.
fn healthy(server: &mut NfsServer, at: &str) {
    assert!(server.alive(), "the daemon died:\n{}", server.log_text());
    let mut rpc = Rpc::connect(server.port);
    let fh = rpc.walk(&format!("{at}/lib/jansi.jar"));
    assert_eq!(digest_of(&rpc.read_file(&fh)), JANSI);
}

fn no_panic(server: &NfsServer) {
    let log = server.log_text();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

// ---- the tests -----------------------------------------------------------------------------

#[test]
fn nfs_cat_and_nfs_cp_read_every_fixture_tree_byte_for_byte() {
    let server = NfsServer::fixture(&trees());
    let status = server.dfs_ok(&["status"]);
    assert!(
        status.contains(&format!("nfs            127.0.0.1 port {}", server.port)),
        "{status}"
    );
    let manifest = manifest();
    let out = tempfile::tempdir().unwrap();
    let mut files = 0;
    for (bound, tree) in trees() {
        for (path, kind) in &manifest[tree] {
            let Kind::File { digest, .. } = kind else {
                continue;
            };
            let url = server.url(&format!("{bound}/{path}"));
            let bytes = libnfs_ok("nfs-cat", &[&url]);
            assert_eq!(&digest_of(&bytes), digest, "nfs-cat {bound}/{path}");
            let dest = out.path().join(format!("{files}"));
            libnfs_ok("nfs-cp", &[&url, dest.to_str().unwrap()]);
            let copied = std::fs::read(&dest).unwrap();
            assert_eq!(&digest_of(&copied), digest, "nfs-cp {bound}/{path}");
            files += 1;
        }
    }
    assert!(files >= 90, "only {files} files");
    // Also by digest, through the content area.
    let bytes = libnfs_ok(
        "nfs-cat",
        &[&server.url(&format!(".digestfs/blobs/{GUAVA}"))],
    );
    assert_eq!(digest_of(&bytes), GUAVA);
    no_panic(&server);
}

/// One `nfs-ls -R` line: type and mode, size, path.
fn parse_ls(out: &str) -> BTreeMap<String, (char, String, u64)> {
    let mut got = BTreeMap::new();
    for line in out.lines() {
        let mut rest = line.trim_start();
        let mut fields = Vec::new();
        for _ in 0..5 {
            let end = rest.find(char::is_whitespace).unwrap();
            fields.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
        let mode = fields[0];
        got.insert(
            rest.to_string(),
            (
                mode.chars().next().unwrap(),
                mode[1..].to_string(),
                fields[4].parse().unwrap(),
            ),
        );
    }
    got
}

#[test]
fn nfs_ls_matches_the_manifest() {
    let server = NfsServer::fixture(&trees());
    let manifest = manifest();
    let mut rpc = Rpc::connect(server.port);
    for (bound, tree) in trees() {
        let out = libnfs_ok("nfs-ls", &["-R", &server.url(bound)]);
        let got = parse_ls(&String::from_utf8(out).unwrap());
        let expected = &manifest[tree];
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "names under {bound}"
        );
        for (path, kind) in expected {
            let (ty, mode, size) = &got[path];
            match kind {
                Kind::Dir { .. } => assert_eq!((*ty, mode.as_str()), ('d', "r-xr-xr-x"), "{path}"),
                Kind::File {
                    size: s,
                    executable,
                    ..
                } => {
                    let want = if *executable {
                        "r-xr-xr-x"
                    } else {
                        "r--r--r--"
                    };
                    assert_eq!((*ty, mode.as_str(), size), ('-', want, s), "{path}");
                }
                Kind::Symlink { target } => {
                    // nfs-ls shows no target: its size here, the target itself by READLINK.
                    assert_eq!((*ty, size), ('l', &(target.len() as u64)), "{path}");
                    let fh = rpc.walk(&format!("{bound}/{path}"));
                    assert_eq!(&rpc.readlink(&fh).unwrap(), target, "{path}");
                }
            }
        }
    }
    // The root lists the bound paths' first components; `.digestfs` is reachable, not listed.
    let root = parse_ls(&String::from_utf8(libnfs_ok("nfs-ls", &[&server.url("")])).unwrap());
    assert_eq!(root.keys().collect::<Vec<_>>(), ["followed", "jvm", "src"]);
    // The same content is the same fileid, as through FUSE.
    let a = rpc.walk("src/nested/same_content_as_deep_file.txt");
    let b = rpc.walk("src/nested/deeper/deepest/file.txt");
    assert_eq!(
        rpc.getattr(&a).unwrap().fileid,
        rpc.getattr(&b).unwrap().fileid
    );
    no_panic(&server);
}

#[test]
fn a_rebind_is_seen_by_a_fresh_client() {
    let server = NfsServer::fixture(&[("v", JAR_TREE)]);
    let ls = |path: &str| {
        let out = libnfs("nfs-ls", &[&server.url(path)]);
        out.status
            .success()
            .then(|| parse_ls(&String::from_utf8(out.stdout).unwrap()))
    };
    assert!(ls("v").unwrap().contains_key("lib"));
    server.bind("v", SRC_SYMLINKS);
    let names = ls("v").unwrap();
    assert!(
        names.contains_key("nested") && !names.contains_key("lib"),
        "{names:?}"
    );
    let bytes = libnfs_ok("nfs-cat", &[&server.url("v/bin/run.sh")]);
    assert!(bytes.starts_with(b"#!"), "{bytes:?}");
    // A second layer: the view shows the union.
    server.bind_layer("v", JAR_TREE, "two");
    let names = ls("v").unwrap();
    assert!(
        names.contains_key("nested") && names.contains_key("lib"),
        "{names:?}"
    );
    let bytes = libnfs_ok("nfs-cat", &[&server.url("v/lib/jansi.jar")]);
    assert_eq!(digest_of(&bytes), JANSI);
    server.unbind("v");
    assert!(ls("v").is_none(), "an unbound view is gone");
    assert!(ls("").unwrap().is_empty());
    no_panic(&server);
}

#[test]
fn a_stale_handle_is_refused_and_content_handles_keep_their_content() {
    let mut server = NfsServer::fixture(&[("a/v", JAR_TREE)]);
    let mut rpc = Rpc::connect(server.port);
    let view = rpc.walk("a/v");
    let ns = rpc.walk("a");
    let jar = rpc.walk("a/v/lib/jansi.jar");
    let before = rpc.getattr(&view).unwrap();
    assert_eq!(before.kind, 2, "a directory");

    server.bind("a/v", SRC_SYMLINKS);
    assert_eq!(rpc.getattr(&view), Err(NFS3ERR_STALE));
    // The name, looked up again, is the new view.
    let fresh = rpc.walk("a/v");
    assert_ne!(fresh, view);
    assert!(rpc.lookup(&fresh, "nested").is_ok());
    assert_eq!(rpc.lookup(&fresh, "lib"), Err(2), "NOENT");
    // The directory above the view is the same directory; the jar's handle names the jar.
    assert!(rpc.getattr(&ns).is_ok());
    assert_eq!(digest_of(&rpc.read_file(&jar)), JANSI);

    server.unbind("a/v");
    assert_eq!(rpc.getattr(&fresh), Err(NFS3ERR_STALE));
    assert_eq!(rpc.getattr(&ns), Err(NFS3ERR_STALE));
    // Handles that are not ours at all.
    assert_eq!(rpc.getattr(b"short"), Err(NFS3ERR_BADHANDLE));
    let mut forged = rpc.mount_root();
    forged.extend_from_slice(&[0x7f; 20]);
    assert_eq!(rpc.getattr(&forged), Err(NFS3ERR_BADHANDLE));
    server.bind("b", JAR_TREE);
    healthy(&mut server, "b");
    no_panic(&server);
}

#[test]
fn writes_are_refused() {
    let mut server = NfsServer::fixture(&[("v", JAR_TREE)]);
    let local = server.tmp.path().join("local.txt");
    std::fs::write(&local, "hello").unwrap();
    let out = libnfs(
        "nfs-cp",
        &[local.to_str().unwrap(), &server.url("v/new.txt")],
    );
    assert!(!out.status.success(), "nfs-cp into the export succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ROFS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rpc = Rpc::connect(server.port);
    let dir = rpc.walk("v/lib");
    let file = rpc.walk("v/lib/jansi.jar");
    let dirop = |name: &str| {
        let mut a = Vec::new();
        put_opaque(&mut a, &dir);
        put_opaque(&mut a, name.as_bytes());
        a
    };
    let unset_attrs = [0u8; 24]; // sattr3: nothing set
    let calls: Vec<(&str, u32, Vec<u8>)> = vec![
        ("SETATTR", 2, {
            let mut a = Vec::new();
            put_opaque(&mut a, &file);
            a.extend_from_slice(&unset_attrs);
            put32(&mut a, 0);
            a
        }),
        ("WRITE", 7, {
            let mut a = Vec::new();
            put_opaque(&mut a, &file);
            put64(&mut a, 0);
            put32(&mut a, 5);
            put32(&mut a, 2);
            put_opaque(&mut a, b"hello");
            a
        }),
        ("CREATE", 8, {
            let mut a = dirop("new.txt");
            put32(&mut a, 0);
            a.extend_from_slice(&unset_attrs);
            a
        }),
        ("MKDIR", 9, {
            let mut a = dirop("newdir");
            a.extend_from_slice(&unset_attrs);
            a
        }),
        ("SYMLINK", 10, {
            let mut a = dirop("newlink");
            a.extend_from_slice(&unset_attrs);
            put_opaque(&mut a, b"jansi.jar");
            a
        }),
        ("MKNOD", 11, {
            let mut a = dirop("fifo");
            put32(&mut a, 7); // NF3FIFO
            a.extend_from_slice(&unset_attrs);
            a
        }),
        ("REMOVE", 12, dirop("jansi.jar")),
        ("RMDIR", 13, dirop("lib")),
        ("RENAME", 14, {
            let mut a = dirop("jansi.jar");
            a.extend(dirop("moved.jar"));
            a
        }),
        ("LINK", 15, {
            let mut a = Vec::new();
            put_opaque(&mut a, &file);
            a.extend(dirop("hardlink.jar"));
            a
        }),
        ("COMMIT", 21, {
            let mut a = Vec::new();
            put_opaque(&mut a, &file);
            put64(&mut a, 0);
            put32(&mut a, 0);
            a
        }),
    ];
    for (name, proc_, args) in calls {
        assert_eq!(rpc.nfs(proc_, &args).0, NFS3ERR_ROFS, "{name}");
    }
    assert_eq!(digest_of(&rpc.read_file(&file)), JANSI);
    healthy(&mut server, "v");
    no_panic(&server);
}

#[test]
fn eight_concurrent_nfs_cats_of_different_jars() {
    let server = NfsServer::fixture(&[("v", JAR_TREE)]);
    let mut jars: Vec<(String, String, u64)> = manifest()[JAR_TREE]
        .iter()
        .filter_map(|(path, kind)| match kind {
            Kind::File { digest, size, .. } => Some((path.clone(), digest.clone(), *size)),
            _ => None,
        })
        .collect();
    jars.sort_by_key(|(_, _, size)| std::cmp::Reverse(*size));
    std::thread::scope(|s| {
        let handles: Vec<_> = jars[..8]
            .iter()
            .map(|(path, digest, _)| {
                let url = server.url(&format!("v/{path}"));
                s.spawn(move || {
                    let bytes = libnfs_ok("nfs-cat", &[&url]);
                    assert_eq!(&digest_of(&bytes), digest, "{path}");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    no_panic(&server);
}

/// Whether `got` holds one whole reply record.
fn whole_record(got: &[u8]) -> bool {
    got.len() >= 4
        && got.len() - 4
            >= (u32::from_be_bytes(got[..4].try_into().unwrap()) & 0x7fff_ffff) as usize
}

/// Sends `bytes` on a fresh connection, takes what comes back until a whole reply, the server
/// hanging up, or `wait`; hangs up.
fn send_and_hang_up(port: u16, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    if !wait.is_zero() {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if whole_record(&got) {
                break;
            }
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    got
}

/// The accept status of the one reply record in `got`.
fn accept_stat(got: &[u8]) -> Option<u32> {
    let mut r = Reader(got.get(4..)?);
    r.u32();
    r.u32();
    if r.u32() != 0 {
        return None;
    }
    r.u32();
    r.opaque();
    Some(r.u32())
}

#[test]
fn malformed_records_never_panic_or_stop_the_server() {
    let mut server = NfsServer::fixture(&[("jvm/resolves/jvm-default", JAR_TREE)]);
    let port = server.port;
    // Replies and hang-ups both end the wait: the time limit only bounds a broken server.
    let short = Duration::from_secs(10);
    let getattr_root = {
        let mut rpc = Rpc::connect(port);
        let root = rpc.mount_root();
        let mut a = Vec::new();
        put_opaque(&mut a, &root);
        a
    };
    // Well-formed records the server answers with an RPC error, on the same connection.
    for (what, msg, want) in [
        ("wrong program", call_msg(5, 100_099, 1, 0, &[]), Some(1)),
        (
            "wrong version",
            call_msg(5, PROG_NFS, 4, 1, &getattr_root),
            Some(2),
        ),
        (
            "wrong procedure",
            call_msg(5, PROG_NFS, 3, 99, &[]),
            Some(3),
        ),
        (
            "garbage arguments",
            call_msg(5, PROG_NFS, 3, 1, &[1, 2]),
            Some(4),
        ),
    ] {
        let got = send_and_hang_up(port, &framed(&msg), short);
        assert_eq!(accept_stat(&got), want, "{what}: {got:?}");
    }
    let mut wrong_rpc = call_msg(5, PROG_NFS, 3, 0, &[]);
    wrong_rpc[8..12].copy_from_slice(&3u32.to_be_bytes());
    let got = send_and_hang_up(port, &framed(&wrong_rpc), short);
    assert_eq!(
        got.get(12..16),
        Some(&1u32.to_be_bytes()[..]),
        "RPC version 3 is denied"
    );

    // Records that are refused: the connection closes, nothing else happens.
    let huge_fh = call_msg(6, PROG_NFS, 3, 1, &u32::MAX.to_be_bytes());
    let mut huge_groups = call_msg(7, PROG_NFS, 3, 0, &[]);
    huge_groups[52..56].copy_from_slice(&(1u32 << 30).to_be_bytes());
    let mut a_reply = call_msg(8, PROG_NFS, 3, 0, &[]);
    a_reply[4..8].copy_from_slice(&1u32.to_be_bytes());
    let many_fragments: Vec<u8> = std::iter::repeat_n(0u32.to_be_bytes(), 10_000)
        .flatten()
        .collect();
    for (what, bytes) in [
        (
            "a 2 GiB fragment header",
            0xffff_ffffu32.to_be_bytes().to_vec(),
        ),
        (
            "a 2 GiB first fragment",
            0x7fff_ffffu32.to_be_bytes().to_vec(),
        ),
        ("endless empty fragments", many_fragments),
        ("an empty record", framed(&[])),
        (
            "a truncated header",
            framed(&call_msg(9, PROG_NFS, 3, 0, &[])[..20]),
        ),
        ("a 4 GiB file handle", framed(&huge_fh)),
        ("2^30 groups", framed(&huge_groups)),
        ("a reply", framed(&a_reply)),
        ("garbage", framed(&[0xde, 0xad, 0xbe, 0xef].repeat(40))),
    ] {
        let got = send_and_hang_up(port, &bytes, short);
        assert!(got.is_empty(), "{what}: answered {got:?}");
        assert!(server.alive(), "{what} killed the daemon");
    }
    healthy(&mut server, "jvm/resolves/jvm-default");

    // Fuzzed: random records, and valid calls with random bytes changed, each on its own
    // connection; the server keeps answering.
    let templates: Vec<Vec<u8>> = vec![
        call_msg(11, PROG_NFS, 3, 1, &getattr_root),
        call_msg(12, PROG_NFS, 3, 0, &[]),
        call_msg(13, PROG_MOUNT, 3, 1, &{
            let mut a = Vec::new();
            put_opaque(&mut a, b"/");
            a
        }),
        call_msg(14, PROG_NFS, 3, 17, &{
            let mut a = getattr_root.clone();
            a.extend_from_slice(&[0; 16]);
            put32(&mut a, 4096);
            put32(&mut a, 65536);
            a
        }),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| framed(&b)),
        proptest::collection::vec(any::<u8>(), 0..64),
        (
            0..templates.len(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)
        )
            .prop_map(move |(t, edits)| {
                let mut m = templates[t].clone();
                for (at, b) in edits {
                    let i = at % m.len();
                    m[i] = b;
                }
                framed(&m)
            }),
    ];
    runner
        .run(&strategy, |bytes| {
            send_and_hang_up(port, &bytes, Duration::from_millis(50));
            Ok(())
        })
        .unwrap();
    healthy(&mut server, "jvm/resolves/jvm-default");
    let bytes = libnfs_ok(
        "nfs-cat",
        &[&server.url("jvm/resolves/jvm-default/lib/guava.jar")],
    );
    assert_eq!(digest_of(&bytes), GUAVA);
    no_panic(&server);
}

#[test]
fn a_client_that_hangs_up_mid_record_changes_nothing() {
    let mut server = NfsServer::fixture(&[("jvm/resolves/jvm-default", JAR_TREE)]);
    let port = server.port;
    let mut rpc = Rpc::connect(port);
    let jar = rpc.walk("jvm/resolves/jvm-default/lib/guava.jar");
    let mut read = Vec::new();
    put_opaque(&mut read, &jar);
    put64(&mut read, 0);
    put32(&mut read, 1 << 20);
    let whole = framed(&call_msg(3, PROG_NFS, 3, 6, &read));
    // 200 clients one after another, each hanging up at another point of a record; then one
    // that claims more than it sends, and one that asks for 1 MiB and leaves before the answer.
    for i in 0..200 {
        let cut = 1 + i % (whole.len() - 1);
        send_and_hang_up(port, &whole[..cut], Duration::ZERO);
    }
    let mut claims = 1000u32.to_be_bytes().to_vec();
    claims.extend_from_slice(&[0; 10]);
    send_and_hang_up(port, &claims, Duration::ZERO);
    send_and_hang_up(port, &whole, Duration::ZERO);
    // Nothing changed: the old connection and new ones are served, the jar reads whole.
    assert_eq!(digest_of(&rpc.read_file(&jar)), GUAVA);
    healthy(&mut server, "jvm/resolves/jvm-default");
    let status: serde_json::Value =
        serde_json::from_str(&server.dfs_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["errors"], 0, "{status}");
    no_panic(&server);
    // SIGTERM stops a server that mounted nothing: exit 0, the socket and the views file removed.
    let views = digestfs::control::state::state_path(&server.socket);
    assert!(views.exists(), "{}", views.display());
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(!server.socket.exists(), "the control socket is removed");
    assert!(!views.exists(), "the views file is removed");
}

/// One READDIRPLUS entry: name, fileid, attributes, whether a handle came with it.
type PlusEntry = (String, u64, Option<Attr>, bool);

/// READDIRPLUS of `dir`, `maxcount` bytes a reply, following cookies to the end: its entries,
/// and how many calls it took.
fn readdirplus(rpc: &mut Rpc, dir: &[u8], maxcount: u32) -> (Vec<PlusEntry>, usize) {
    let (mut entries, mut calls, mut cookie, mut verf) = (Vec::new(), 0, 0u64, [0u8; 8]);
    loop {
        let mut args = Vec::new();
        put_opaque(&mut args, dir);
        put64(&mut args, cookie);
        args.extend_from_slice(&verf);
        put32(&mut args, maxcount);
        put32(&mut args, maxcount);
        let (stat, body) = rpc.nfs(17, &args);
        assert_eq!(stat, 0, "READDIRPLUS");
        calls += 1;
        let mut r = Reader(&body);
        r.post_op_attr();
        verf.copy_from_slice(&r.0[..8]);
        r.skip(8);
        while r.u32() == 1 {
            let fileid = r.u64();
            let name = String::from_utf8(r.opaque()).unwrap();
            cookie = r.u64();
            let attr = r.post_op_attr();
            let handle = r.u32() == 1;
            if handle {
                r.opaque();
            }
            entries.push((name, fileid, attr, handle));
        }
        if r.u32() == 1 {
            return (entries, calls);
        }
    }
}

#[test]
fn reads_listings_and_callers_at_the_protocol_level() {
    let mut server = NfsServer::fixture(&[("v", JAR_TREE)]);
    let mut rpc = Rpc::connect(server.port);
    let guava = rpc.walk("v/lib/guava.jar");
    let size = rpc.getattr(&guava).unwrap().size;
    // READ is clamped to 1 MiB whatever the client asks; EOF is set exactly at the end.
    let (data, eof) = rpc.read(&guava, 0, 8 << 20).unwrap();
    assert_eq!((data.len(), eof), (1 << 20, false));
    let (data, eof) = rpc.read(&guava, size - 10, 100).unwrap();
    assert_eq!((data.len(), eof), (10, true));
    let (data, eof) = rpc.read(&guava, size + 5, 100).unwrap();
    assert_eq!((data.len(), eof), (0, true));
    assert_eq!(digest_of(&rpc.read_file(&guava)), GUAVA);
    let lib = rpc.walk("v/lib");
    let mut args = Vec::new();
    put_opaque(&mut args, &lib);
    put64(&mut args, 0);
    put32(&mut args, 10);
    assert_eq!(rpc.nfs(6, &args).0, 21, "READ of a directory is ISDIR");

    // READDIRPLUS pages by cookie; every entry has attributes and a handle, `.` and `..` too.
    let (entries, calls) = readdirplus(&mut rpc, &lib, 2048);
    assert!(
        calls > 2,
        "2 KiB replies page a 71-entry directory ({calls} calls)"
    );
    let names: Vec<&str> = entries.iter().map(|(n, ..)| n.as_str()).collect();
    let expected: Vec<String> = manifest()[JAR_TREE]
        .keys()
        .filter_map(|p| p.strip_prefix("lib/").map(String::from))
        .collect();
    assert_eq!(names[..2], [".", ".."]);
    assert_eq!(
        names[2..],
        expected.iter().map(|s| s.as_str()).collect::<Vec<_>>()
    );
    for (name, fileid, attr, handle) in &entries {
        let attr = attr.unwrap_or_else(|| panic!("{name} has no attributes"));
        assert!(handle, "{name} has no handle");
        assert_eq!(attr.fileid, *fileid, "{name}");
    }
    assert_eq!(entries[0].1, rpc.getattr(&lib).unwrap().fileid);
    let v = rpc.walk("v");
    assert_eq!(entries[1].1, rpc.getattr(&v).unwrap().fileid);

    // Calls from another uid are refused (mounts are private to their owner, as with FUSE).
    let mut other = call_msg(9, PROG_NFS, 3, 0, &[]);
    other[44..48].copy_from_slice(&4242u32.to_be_bytes());
    let got = send_and_hang_up(server.port, &framed(&other), Duration::from_secs(10));
    assert_eq!(got.get(12..16), Some(&1u32.to_be_bytes()[..]), "MSG_DENIED");
    healthy(&mut server, "v");
    no_panic(&server);
}

/// The args of a READ of `count` bytes at `offset` of `fh`.
fn read_args(fh: &[u8], offset: u64, count: u32) -> Vec<u8> {
    let mut a = Vec::new();
    put_opaque(&mut a, fh);
    put64(&mut a, offset);
    put32(&mut a, count);
    a
}

/// The data of a READ reply record, after its xid was checked by the caller.
fn read_reply_data(record: &[u8]) -> (u32, Vec<u8>) {
    let mut r = Reader(record);
    let xid = r.u32();
    assert_eq!(r.u32(), 1, "a REPLY");
    assert_eq!(r.u32(), 0, "MSG_ACCEPTED");
    r.u32();
    r.opaque();
    assert_eq!(r.u32(), 0, "SUCCESS");
    assert_eq!(r.u32(), 0, "NFS3_OK");
    r.post_op_attr();
    let n = r.u32() as usize;
    r.u32(); // eof
    let data = r.opaque();
    assert_eq!(data.len(), n);
    (xid, data)
}

#[test]
fn a_client_that_half_closes_gets_every_reply() {
    let mut server = NfsServer::fixture(&[("v", JAR_TREE)]);
    let mut rpc = Rpc::connect(server.port);
    let guava = rpc.walk("v/lib/guava.jar");
    let whole = rpc.read_file(&guava);
    assert_eq!(digest_of(&whole), GUAVA);
    // 16 READs of 128 KiB written at once, then the write side shut: all 16 replies come back,
    // with the right bytes, and only then does the server close its side.
    let chunk = 128 * 1024u64;
    let calls: Vec<(u32, u64)> = (0..16)
        .map(|i| (1000 + i as u32, (i * chunk) % whole.len() as u64))
        .collect();
    let mut pipelined = Vec::new();
    for (xid, offset) in &calls {
        let args = read_args(&guava, *offset, chunk as u32);
        pipelined.extend(framed(&call_msg(*xid, PROG_NFS, 3, 6, &args)));
    }
    let mut half = Rpc::connect(server.port);
    half.s.write_all(&pipelined).unwrap();
    half.s.shutdown(Shutdown::Write).unwrap();
    let mut answered = BTreeMap::new();
    for _ in 0..16 {
        let record = half.read_record().unwrap_or_else(|e| {
            panic!(
                "reply {} after the half-close: {e}\n{}",
                answered.len(),
                server.log_text()
            )
        });
        let (xid, data) = read_reply_data(&record);
        assert!(answered.insert(xid, data).is_none(), "xid {xid} twice");
    }
    for (xid, offset) in &calls {
        let start = *offset as usize;
        let end = (start + chunk as usize).min(whole.len());
        assert!(answered[xid] == whole[start..end], "READ {xid} at {offset}");
    }
    let mut rest = Vec::new();
    half.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing after the 16 replies: {rest:?}");
    healthy(&mut server, "v");
    no_panic(&server);
}

/// A GETATTR of a handle from another server generation: the crate logs "cannot resolve fh"
/// at warn (and its calls at debug) before it answers.
fn a_call_the_crate_logs(port: u16) {
    let mut rpc = Rpc::connect(port);
    let root = rpc.mount_root();
    let mut forged = root.clone();
    forged[0] ^= 0xff;
    assert!(rpc.getattr(&forged).is_err());
    assert!(rpc.getattr(&root).is_ok());
}

#[test]
fn the_server_crates_tracing_logs_reach_the_daemon_log_under_rust_log() {
    // Asked for: the crate's warnings, and its debug lines only at debug.
    for (filter, debug_lines) in [
        ("digestfs=info,nfs3_server=debug", true),
        ("digestfs=info,nfs3_server=warn", false),
    ] {
        let server = NfsServer::fixture_logging(&[("v", JAR_TREE)], Some(filter));
        a_call_the_crate_logs(server.port);
        let log = server.log_text();
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("nfs3_server::")
                && l.contains("cannot resolve fh")),
            "RUST_LOG={filter}:\n{log}"
        );
        assert_eq!(
            log.lines()
                .any(|l| l.contains("DEBUG") && l.contains("nfs3_server::")),
            debug_lines,
            "RUST_LOG={filter}:\n{log}"
        );
        assert!(
            log.contains("NFS server on"),
            "digestfs' own lines too:\n{log}"
        );
    }
    // Not asked for: neither RUST_LOG's other modules nor the default filter show them.
    for filter in [Some("digestfs=debug"), None] {
        let server = NfsServer::fixture_logging(&[("v", JAR_TREE)], filter);
        a_call_the_crate_logs(server.port);
        let log = server.log_text();
        assert!(!log.contains("nfs3_server"), "RUST_LOG={filter:?}:\n{log}");
        assert!(log.contains("NFS server on"), "RUST_LOG={filter:?}:\n{log}");
    }
}

/// The distinct content of a fixture tree, as FSSTAT counts it: (bytes, files).
fn usage_of(tree: &str) -> (u64, u64) {
    let mut files = BTreeMap::new();
    let mut dirs = std::collections::BTreeSet::from([tree.to_string()]);
    let mut links = 0;
    for kind in manifest()[tree].values() {
        match kind {
            Kind::File { digest, size, .. } => {
                files.insert(digest.clone(), *size);
            }
            Kind::Dir { digest } => {
                dirs.insert(digest.clone());
            }
            Kind::Symlink { .. } => links += 1,
        }
    }
    (
        files.values().sum(),
        files.len() as u64 + dirs.len() as u64 + links,
    )
}

/// One call of `proc_` whose only argument is `fh`: its status and the words after the
/// post_op_attr (which must be there on success).
fn fh_call(rpc: &mut Rpc, proc_: u32, fh: &[u8], extra: &[u8]) -> (u32, Vec<u8>, Option<Attr>) {
    let mut args = Vec::new();
    put_opaque(&mut args, fh);
    args.extend_from_slice(extra);
    let (stat, body) = rpc.nfs(proc_, &args);
    let mut r = Reader(&body);
    let attr = r.post_op_attr();
    (stat, r.0.to_vec(), attr)
}

#[test]
fn fsstat_fsinfo_pathconf_and_access_are_answered_from_the_view() {
    let mut server = NfsServer::fixture(&[("v", JAR_TREE)]);
    let mut rpc = Rpc::connect(server.port);
    let root = rpc.mount_root();
    let view = rpc.walk("v");
    let jar = rpc.walk("v/lib/guava.jar");
    let lib = rpc.walk("v/lib");

    // FSINFO: 1 MiB reads, the largest file size, nanosecond times, read-only (no hard links,
    // no settable times) and homogeneous.
    let (stat, body, attr) = fh_call(&mut rpc, 19, &root, &[]);
    assert_eq!(stat, 0, "FSINFO");
    assert_eq!(attr.unwrap().fileid, rpc.getattr(&root).unwrap().fileid);
    let mut r = Reader(&body);
    let (rtmax, rtpref, rtmult) = (r.u32(), r.u32(), r.u32());
    assert_eq!((rtmax, rtpref, rtmult), (1 << 20, 1 << 20, 4096));
    r.skip(16); // wtmax, wtpref, wtmult, dtpref
    assert_eq!(r.u64(), i64::MAX as u64, "maxfilesize");
    assert_eq!((r.u32(), r.u32()), (0, 1), "time_delta: 1 ns");
    assert_eq!(r.u32(), 0x2 | 0x8, "properties: SYMLINK | HOMOGENEOUS only");
    // READs are served up to exactly rtmax.
    assert_eq!(rpc.read(&jar, 0, rtmax).unwrap().0.len(), rtmax as usize);

    // FSSTAT: the bound content's size and file count; nothing free or available; variant.
    let fsstat = |rpc: &mut Rpc, fh: &[u8]| {
        let (stat, body, attr) = fh_call(rpc, 18, fh, &[]);
        assert_eq!(stat, 0, "FSSTAT");
        assert!(attr.is_some(), "FSSTAT attributes");
        let mut r = Reader(&body);
        let v: Vec<u64> = (0..6).map(|_| r.u64()).collect();
        (v, r.u32())
    };
    let (jar_bytes, jar_files) = usage_of(JAR_TREE);
    assert!(
        jar_bytes > 1 << 20 && jar_files > 70,
        "{jar_bytes} {jar_files}"
    );
    assert_eq!(
        fsstat(&mut rpc, &root),
        (vec![jar_bytes, 0, 0, jar_files, 0, 0], 0)
    );
    // The same from any handle of the export; and it follows binds.
    assert_eq!(fsstat(&mut rpc, &jar).0[0], jar_bytes);
    server.bind_layer("w", SRC_SYMLINKS, "default");
    let (src_bytes, src_files) = usage_of(SRC_SYMLINKS);
    assert_eq!(
        fsstat(&mut rpc, &root).0,
        vec![jar_bytes + src_bytes, 0, 0, jar_files + src_files, 0, 0]
    );

    // PATHCONF: 255-byte names, never truncated, case-sensitive and case-preserving.
    for fh in [&root, &lib, &jar] {
        let (stat, body, attr) = fh_call(&mut rpc, 20, fh, &[]);
        assert_eq!(stat, 0, "PATHCONF");
        assert!(attr.is_some());
        let mut r = Reader(&body);
        let words: Vec<u32> = (0..6).map(|_| r.u32()).collect();
        // linkmax, name_max, no_trunc, chown_restricted, case_insensitive, case_preserving
        assert_eq!(words, [1, 255, 1, 1, 0, 1]);
    }
    // A name longer than name_max is refused as too long, not truncated.
    assert_eq!(rpc.lookup(&lib, &"x".repeat(256)), Err(63), "NAMETOOLONG");

    // ACCESS: read and lookup (and execute where the mode has it), never modify, extend or
    // delete, and only what was asked.
    let access = |rpc: &mut Rpc, fh: &[u8], asked: u32| {
        let (stat, body, attr) = fh_call(rpc, 4, fh, &asked.to_be_bytes());
        (stat, (stat == 0).then(|| Reader(&body).u32()), attr)
    };
    let all = 0x3f;
    let (stat, granted, attr) = access(&mut rpc, &lib, all);
    assert_eq!((stat, granted), (0, Some(0x1 | 0x2 | 0x20)), "a directory");
    assert_eq!(attr.unwrap().kind, 2);
    assert_eq!(access(&mut rpc, &jar, all).1, Some(0x1), "a plain file");
    assert_eq!(
        access(&mut rpc, &jar, 0x4 | 0x8 | 0x10).1,
        Some(0),
        "no changes"
    );
    assert_eq!(
        access(&mut rpc, &lib, 0x2).1,
        Some(0x2),
        "only what was asked"
    );
    let run_sh = rpc.walk("w/bin/run.sh");
    assert_eq!(
        access(&mut rpc, &run_sh, all).1,
        Some(0x1 | 0x20),
        "an executable"
    );
    let link = rpc.walk("w/link_to_app.java");
    assert_eq!(access(&mut rpc, &link, all).1, Some(0x1), "a symlink");

    // A view that was unbound is STALE for all four, never a fixed answer.
    server.unbind("v");
    for proc_ in [4u32, 18, 19, 20] {
        let extra = if proc_ == 4 {
            all.to_be_bytes().to_vec()
        } else {
            vec![]
        };
        let (stat, _, attr) = fh_call(&mut rpc, proc_, &view, &extra);
        assert_eq!((stat, attr), (NFS3ERR_STALE, None), "procedure {proc_}");
    }
    // A handle of another server generation: the crate's own error, not NFS3_OK.
    let mut other = root.clone();
    other[0] ^= 0xff;
    for proc_ in [4u32, 18, 20] {
        let extra = if proc_ == 4 {
            all.to_be_bytes().to_vec()
        } else {
            vec![]
        };
        let (stat, _, _) = fh_call(&mut rpc, proc_, &other, &extra);
        assert!(
            [NFS3ERR_STALE, NFS3ERR_BADHANDLE].contains(&stat),
            "{proc_}: {stat}"
        );
    }
    // Another uid's ACCESS, FSSTAT, PATHCONF are refused like any other call.
    for proc_ in [4u32, 18, 20] {
        let mut args = Vec::new();
        put_opaque(&mut args, &root);
        if proc_ == 4 {
            put32(&mut args, all);
        }
        let mut msg = call_msg(9, PROG_NFS, 3, proc_, &args);
        msg[44..48].copy_from_slice(&4242u32.to_be_bytes());
        let got = send_and_hang_up(server.port, &framed(&msg), Duration::from_secs(10));
        assert_eq!(got.get(12..16), Some(&1u32.to_be_bytes()[..]), "MSG_DENIED");
    }
    // Arguments that do not decode are the crate's to refuse.
    let mut args = Vec::new();
    put_opaque(&mut args, &root);
    args.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(
        rpc.call(PROG_NFS, 3, 20, &args),
        Answer::Accepted(4),
        "GARBAGE_ARGS"
    );
    server.bind("v", JAR_TREE);
    healthy(&mut server, "v");
    no_panic(&server);
}

const NFS3ERR_BAD_COOKIE: u32 = 10003;

/// One plain READDIR (procedure 16) call: its status, and on success the verifier, the entries
/// (name, fileid, cookie) and EOF.
type ReaddirPage = ([u8; 8], Vec<(String, u64, u64)>, bool);

fn readdir_page(
    rpc: &mut Rpc,
    dir: &[u8],
    cookie: u64,
    verf: [u8; 8],
    count: u32,
) -> Result<ReaddirPage, u32> {
    let mut args = Vec::new();
    put_opaque(&mut args, dir);
    put64(&mut args, cookie);
    args.extend_from_slice(&verf);
    put32(&mut args, count);
    let (stat, body) = rpc.nfs(16, &args);
    if stat != 0 {
        return Err(stat);
    }
    let mut r = Reader(&body);
    assert!(r.post_op_attr().is_some(), "READDIR's directory attributes");
    let verf: [u8; 8] = r.0[..8].try_into().unwrap();
    r.skip(8);
    let mut entries = Vec::new();
    while r.u32() == 1 {
        let fileid = r.u64();
        let name = String::from_utf8(r.opaque()).unwrap();
        entries.push((name, fileid, r.u64()));
    }
    Ok((verf, entries, r.u32() == 1))
}

/// A whole directory by plain READDIR, `count` bytes a reply: its entries, the verifier of
/// every call (the first call sends none), and the number of calls.
fn readdir_all(rpc: &mut Rpc, dir: &[u8], count: u32) -> (Vec<(String, u64, u64)>, [u8; 8], usize) {
    let (mut all, mut cookie, mut verf, mut calls) = (Vec::new(), 0u64, [0u8; 8], 0);
    loop {
        let (v, entries, eof) = readdir_page(rpc, dir, cookie, verf, count).expect("READDIR");
        if calls > 0 {
            assert_eq!(v, verf, "the verifier of call {calls}");
        }
        calls += 1;
        verf = v;
        assert!(eof || !entries.is_empty(), "an empty page before EOF");
        for e in entries {
            assert!(e.2 > cookie, "cookies increase: {} after {cookie}", e.2);
            cookie = e.2;
            all.push(e);
        }
        if eof {
            return (all, verf, calls);
        }
    }
}

#[test]
fn plain_readdir_pages_2000_entries_by_cookie_and_verifier() {
    let tmp = fixture_store();
    let src = tmp.path().join("big");
    std::fs::create_dir(&src).unwrap();
    let names: Vec<String> = (0..2000).map(|i| format!("file-{i:04}.jar")).collect();
    for n in &names {
        std::fs::write(src.join(n), n).unwrap();
    }
    let big = import(&tmp.path().join("store"), &src);
    let mut server = NfsServer::over(tmp, &[("a/big", &big)], Some("digestfs=debug"));
    let mut rpc = Rpc::connect(server.port);
    let dir = rpc.walk("a/big");
    let dir_id = rpc.getattr(&dir).unwrap().fileid;

    // 8 KiB replies: 2,002 entries take many calls, each resuming at the cookie before.
    let (entries, verf, calls) = readdir_all(&mut rpc, &dir, 8192);
    assert!(calls >= 5, "{calls} calls");
    assert_ne!(verf, [0; 8], "a verifier");
    let got: Vec<&str> = entries.iter().map(|(n, ..)| n.as_str()).collect();
    let mut want = vec![".", ".."];
    want.extend(names.iter().map(|s| s.as_str()));
    assert_eq!(got, want);
    assert_eq!(entries[0].1, dir_id, "`.` is the directory");
    let a = rpc.walk("a");
    assert_eq!(entries[1].1, rpc.getattr(&a).unwrap().fileid, "`..` is `a`");
    for (name, fileid, _) in &entries[2..] {
        let fh = rpc.lookup(&dir, name).unwrap();
        assert_eq!(rpc.getattr(&fh).unwrap().fileid, *fileid, "{name}");
        if name.ends_with("0.jar") {
            assert_eq!(rpc.read_file(&fh), name.as_bytes(), "{name}");
        }
    }
    // Resuming from any cookie with the verifier gives the rest; a wrong verifier is refused.
    let cookie_at_1000 = entries[1000].2;
    let (v, page, _) = readdir_page(&mut rpc, &dir, cookie_at_1000, verf, 8192).unwrap();
    assert_eq!(v, verf);
    assert_eq!(page[0].0, entries[1001].0);
    assert_eq!(
        readdir_page(&mut rpc, &dir, cookie_at_1000, [7; 8], 8192).map(|_| ()),
        Err(NFS3ERR_BAD_COOKIE)
    );
    // A reply too small for even one entry is TOOSMALL, not an empty page.
    assert_eq!(
        readdir_page(&mut rpc, &dir, 0, [0; 8], 16).map(|_| ()),
        Err(10005),
        "NFS3ERR_TOOSMALL"
    );

    // The namespace directory above: its verifier changes when a bind changes what it lists.
    let (_, a_verf, _) = readdir_all(&mut rpc, &a, 8192);
    server.bind("a/other", JAR_TREE);
    let (a_entries, a_verf2, _) = readdir_all(&mut rpc, &a, 8192);
    assert_ne!(a_verf, a_verf2, "the verifier of `a` after a bind");
    assert_eq!(
        a_entries
            .iter()
            .map(|(n, ..)| n.as_str())
            .collect::<Vec<_>>(),
        [".", "..", "big", "other"]
    );
    assert_eq!(
        readdir_page(&mut rpc, &a, 3, a_verf, 8192).map(|_| ()),
        Err(NFS3ERR_BAD_COOKIE),
        "the old verifier of `a`"
    );

    // A rebind of the view: the old handle is STALE; the new one lists the union under another
    // verifier, and a cookie under the old verifier is refused.
    server.bind_layer("a/big", SRC_SYMLINKS, "two");
    assert_eq!(
        readdir_page(&mut rpc, &dir, 0, [0; 8], 8192).map(|_| ()),
        Err(NFS3ERR_STALE)
    );
    let dir2 = rpc.walk("a/big");
    let (entries2, verf2, _) = readdir_all(&mut rpc, &dir2, 8192);
    assert_ne!(verf2, verf, "the verifier after a rebind");
    assert_eq!(
        entries2.len(),
        entries.len() + 8,
        "the union with the second layer"
    );
    assert!(entries2.iter().any(|(n, ..)| n == "bin"));
    assert_eq!(
        readdir_page(&mut rpc, &dir2, cookie_at_1000, verf, 8192).map(|_| ()),
        Err(NFS3ERR_BAD_COOKIE)
    );
    healthy(&mut server, "a/other");
    no_panic(&server);
}
