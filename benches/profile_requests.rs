//! Replays, against the filesystem core without a mount, the requests a cold workload sends the
//! daemon, one request kind per run, so that `valgrind --tool=callgrind` can count the
//! instructions of each kind (a daemon under callgrind mounts but answers nothing; design.md §9).
//! `scripts/profile-requests` builds the store with `digestfs import` and runs this under
//! callgrind; `docs/profile.md` has the figures.
//!
//! Usage: `profile_requests STORE TREE KIND` where TREE is the digest `digestfs import` printed
//! for a directory of jars and KIND is one of `lookup`, `getattr`, `readdirplus`, `zip`,
//! `read128k`, `read1m`. Only the function named `measured_<kind>` does the requests counted
//! (callgrind's `--toggle-collect=*measured_<kind>*`); it prints how many it made. Without
//! arguments (as `cargo bench` runs it) it says so and does nothing.

use std::ffi::OsStr;
use std::hint::black_box;
use std::sync::Arc;

use digestfs::cas::Cas;
use digestfs::fs::{DigestFs, FileKind, FsConfig, NO_HANDLE, ROOT_INO};
use digestfs::store::{Digest, Store};

/// The view every kind works in, as a resolve's `lib` is bound.
const VIEW: &str = "r/lib";

struct Setup {
    fs: DigestFs,
    /// The view's directory, looked up as the kernel would before listing it.
    dir: u64,
    /// The view's entries, by name, with their sizes.
    names: Vec<(String, u64)>,
}

fn setup(store: &str, tree: Digest) -> Setup {
    let store = Store::open(store).expect("store");
    let fs = DigestFs::new(Arc::new(Cas::local(store)), FsConfig::default());
    fs.bind(VIEW, "default", tree, false).expect("bind");
    let r = fs.lookup(ROOT_INO, OsStr::new("r")).expect("r").ino;
    let dir = fs.lookup(r, OsStr::new("lib")).expect("lib").ino;
    // The names come from a separate core, so that this one's directory cache stays cold.
    let other = DigestFs::new(fs.cas().clone(), FsConfig::default());
    other.bind(VIEW, "default", tree, false).expect("bind");
    let node = other.resolve(VIEW).expect("view");
    let names = other
        .children_of(&node)
        .expect("children")
        .iter()
        .filter_map(|(name, n)| {
            let a = other.attr_of(n).ok()?;
            (a.kind == FileKind::File).then(|| (name.to_string(), a.size))
        })
        .collect();
    Setup { fs, dir, names }
}

fn lookup_all(s: &Setup) -> Vec<u64> {
    s.names
        .iter()
        .map(|(n, _)| s.fs.lookup(s.dir, OsStr::new(n)).expect("lookup").ino)
        .collect()
}

/// A cold `find`: one LOOKUP per name, the view's directory read from the store by the first.
#[inline(never)]
fn measured_lookup(s: &Setup) -> usize {
    black_box(lookup_all(s)).len()
}

/// A GETATTR per file (an `lstat` once the attributes' TTL ran out), and one of the directory.
#[inline(never)]
fn measured_getattr(s: &Setup, inos: &[u64]) -> usize {
    for &ino in inos {
        black_box(s.fs.getattr(ino).expect("getattr"));
    }
    black_box(s.fs.getattr(s.dir).expect("getattr"));
    inos.len() + 1
}

/// READDIRPLUS of the whole view in 4 KiB replies, as fuser packs them (24-byte header, the
/// name padded to 8, 128 bytes of entry and attributes); returns the entries listed.
#[inline(never)]
fn measured_readdirplus(s: &Setup) -> usize {
    let mut offset = 0;
    let mut listed = 0;
    loop {
        let mut used = 0;
        let mut last = None;
        s.fs.readdir(s.dir, offset, true, |e| {
            let len = (24 + e.name.len()).div_ceil(8) * 8 + 128;
            if used + len > 4096 {
                return true;
            }
            used += len;
            last = Some(e.next_offset);
            black_box(e.attr);
            false
        })
        .expect("readdirplus");
        match last {
            Some(next) => {
                listed += (next - offset) as usize;
                offset = next;
            }
            None => return listed,
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}

/// A zip reader's first look at a jar, as a JVM or an IDE makes it: the last 64 KiB (end of
/// central directory), the central directory, then three entries by their local headers.
/// Returns the reads made.
#[inline(never)]
fn measured_zip(s: &Setup, inos: &[u64]) -> usize {
    let mut reads = 0;
    let mut read = |ino: u64, off: u64, len: u64| {
        reads += 1;
        s.fs.read(ino, NO_HANDLE, off, len as u32).expect("read")
    };
    for (&ino, (_, size)) in inos.iter().zip(&s.names) {
        let tail_at = size.saturating_sub(65536);
        let tail = read(ino, tail_at, size - tail_at);
        let Some(eocd) = tail.windows(4).rposition(|w| w == b"PK\x05\x06") else {
            continue;
        };
        let (cd_len, cd_at) = (u32_at(&tail, eocd + 12), u32_at(&tail, eocd + 16));
        let cd = read(ino, cd_at, cd_len);
        let mut at = 0;
        for _ in 0..3 {
            if at + 46 > cd.len() || cd[at..at + 4] != *b"PK\x01\x02" {
                break;
            }
            let entry_len = u32_at(&cd, at + 20);
            let local = u32_at(&cd, at + 42);
            let header = read(ino, local, 30);
            let data_at = local + 30 + (u16_at(&header, 26) + u16_at(&header, 28)) as u64;
            black_box(read(ino, data_at, entry_len));
            at += 46 + u16_at(&cd, at + 28) + u16_at(&cd, at + 30) + u16_at(&cd, at + 32);
        }
    }
    reads
}

/// Reads every file of at least 4 MiB from start to end in requests of `chunk` bytes, as the
/// kernel's readahead sends them (128 KiB by default, 1 MiB with a large read_ahead_kb).
fn read_sequential(s: &Setup, inos: &[u64], chunk: u64) -> usize {
    let mut reads = 0;
    for (&ino, (_, size)) in inos.iter().zip(&s.names) {
        if *size < 4 << 20 {
            continue;
        }
        let mut off = 0;
        while off < *size {
            black_box(s.fs.read(ino, NO_HANDLE, off, chunk as u32).expect("read"));
            off += chunk;
            reads += 1;
        }
    }
    reads
}

#[inline(never)]
fn measured_read128k(s: &Setup, inos: &[u64]) -> usize {
    read_sequential(s, inos, 128 << 10)
}

#[inline(never)]
fn measured_read1m(s: &Setup, inos: &[u64]) -> usize {
    read_sequential(s, inos, 1 << 20)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, tree, kind] = args.as_slice() else {
        eprintln!("profile_requests: run scripts/profile-requests (needs STORE TREE KIND)");
        return;
    };
    let tree: Digest = tree.parse().expect("tree digest");
    let s = setup(store, tree);
    let n = match kind.as_str() {
        "lookup" => measured_lookup(&s),
        "getattr" => measured_getattr(&s, &lookup_all(&s)),
        "readdirplus" => measured_readdirplus(&s),
        "zip" => measured_zip(&s, &lookup_all(&s)),
        "read128k" => measured_read128k(&s, &lookup_all(&s)),
        "read1m" => measured_read1m(&s, &lookup_all(&s)),
        _ => panic!("unknown kind {kind}"),
    };
    println!("{kind} {n}");
}
