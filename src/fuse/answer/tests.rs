//! Requests answered without a mount, as either transport carries them: the bytes the kernel
//! would get back.

use std::sync::Arc;
use std::time::Duration;

use super::answer;
use crate::cas::Cas;
use crate::fs::{DigestFs, FsConfig, ROOT_INO};
use crate::fuse::wire::{self, InHeader};
use crate::store::{Importer, Store};

const TTL: Duration = Duration::from_millis(1500);

struct Fixture {
    _dir: tempfile::TempDir,
    core: DigestFs,
}

fn fixture() -> Fixture {
    fixture_with(FsConfig::default())
}

fn fixture_with(config: FsConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("lib/a.jar"), b"jar a").unwrap();
    std::fs::write(src.join("lib/big.jar"), vec![5u8; 700 * 1024]).unwrap();
    for i in 0..200 {
        std::fs::write(src.join(format!("lib/n{i:03}.jar")), format!("{i}")).unwrap();
    }
    std::os::unix::fs::symlink("lib/a.jar", src.join("link")).unwrap();
    let tree = Importer::new(&store).import_path(&src).unwrap();
    let core = DigestFs::new(Arc::new(Cas::local(store)), config);
    core.bind("v", "l", tree, true).unwrap();
    Fixture { _dir: dir, core }
}

fn header(opcode: u32, nodeid: u64) -> InHeader {
    InHeader {
        len: 0,
        opcode,
        unique: 7,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 1,
    }
}

/// Sends one request; the answer and the payload it wrote.
fn ask(
    core: &DigestFs,
    opcode: u32,
    nodeid: u64,
    op_in: &[u8],
    args: &[u8],
) -> Result<Vec<u8>, i32> {
    let mut payload = vec![0xAAu8; 1 << 20];
    payload[..args.len()].copy_from_slice(args);
    let n = answer(
        core,
        TTL,
        None,
        &header(opcode, nodeid),
        op_in,
        &mut payload,
        args.len(),
    )?;
    payload.truncate(n);
    Ok(payload)
}

fn lookup(core: &DigestFs, parent: u64, name: &str) -> Result<Vec<u8>, i32> {
    ask(
        core,
        wire::FUSE_LOOKUP,
        parent,
        &[],
        format!("{name}\0").as_bytes(),
    )
}

/// `fuse_read_in`: fh, offset, size.
fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(fh.to_ne_bytes());
    b.extend(offset.to_ne_bytes());
    b.extend(size.to_ne_bytes());
    b.extend([0u8; 20]);
    b
}

fn ino_of(entry_out: &[u8]) -> u64 {
    wire::u64_at(entry_out, 0).unwrap()
}

#[test]
fn lookup_answers_an_entry_with_the_cores_attributes_and_ttls() {
    let f = fixture();
    let v = lookup(&f.core, ROOT_INO, "v").unwrap();
    let lib = lookup(&f.core, ino_of(&v), "lib").unwrap();
    let jar = lookup(&f.core, ino_of(&lib), "a.jar").unwrap();
    assert_eq!(jar.len(), wire::ENTRY_OUT_LEN);
    let attr = f.core.getattr(ino_of(&jar)).unwrap();
    assert_eq!(ino_of(&jar), attr.ino);
    assert_eq!(wire::u64_at(&jar, 16), Some(1), "entry_valid secs");
    assert_eq!(
        wire::u32_at(&jar, 32),
        Some(500_000_000),
        "entry_valid nsecs"
    );
    // fuse_attr at 40: ino, size, blocks, 3 times, 3 nsecs, mode.
    assert_eq!(wire::u64_at(&jar, 40), Some(attr.ino));
    assert_eq!(wire::u64_at(&jar, 48), Some(5));
    assert_eq!(wire::u32_at(&jar, 40 + 60), Some(libc::S_IFREG | 0o444));
    assert_eq!(lookup(&f.core, ino_of(&lib), "nope.jar"), Err(libc::ENOENT));
    // getattr gives the same attributes in a fuse_attr_out.
    let out = ask(&f.core, wire::FUSE_GETATTR, attr.ino, &[0u8; 16], &[]).unwrap();
    assert_eq!(out.len(), 104);
    assert_eq!(&out[16..], &jar[40..]);
}

#[test]
fn reads_opens_and_links_answer_as_the_kernel_expects() {
    let f = fixture();
    let v = ino_of(&lookup(&f.core, ROOT_INO, "v").unwrap());
    let lib = ino_of(&lookup(&f.core, v, "lib").unwrap());
    let big = ino_of(&lookup(&f.core, lib, "big.jar").unwrap());
    // Zero-message opens: ENOSYS for a read-only open, EROFS for a write.
    let flags = |f: i32| [(f as u32).to_ne_bytes(), [0; 4]].concat();
    assert_eq!(
        ask(&f.core, wire::FUSE_OPEN, big, &flags(libc::O_RDONLY), &[]),
        Err(libc::ENOSYS)
    );
    assert_eq!(
        ask(&f.core, wire::FUSE_OPEN, big, &flags(libc::O_WRONLY), &[]),
        Err(libc::EROFS)
    );
    // A 1 MiB read past the blob's 700 KiB answers what there is, byte for byte.
    let data = ask(
        &f.core,
        wire::FUSE_READ,
        big,
        &read_in(0, 4096, 1 << 20),
        &[],
    )
    .unwrap();
    assert_eq!(data, vec![5u8; 700 * 1024 - 4096]);
    let link = ino_of(&lookup(&f.core, v, "link").unwrap());
    assert_eq!(
        ask(&f.core, wire::FUSE_READLINK, link, &[], &[]).unwrap(),
        b"lib/a.jar"
    );
    assert_eq!(
        ask(&f.core, wire::FUSE_OPENDIR, lib, &[0; 8], &[]),
        Err(libc::ENOSYS)
    );
    assert_eq!(
        ask(&f.core, wire::FUSE_OPENDIR, big, &[0; 8], &[]),
        Err(libc::ENOTDIR)
    );
    for op in [
        wire::FUSE_WRITE,
        wire::FUSE_MKDIR,
        wire::FUSE_UNLINK,
        wire::FUSE_SETATTR,
        wire::FUSE_CREATE,
    ] {
        assert_eq!(
            ask(&f.core, op, lib, &[0; 64], b"x\0"),
            Err(libc::EROFS),
            "opcode {op}"
        );
    }
    assert_eq!(
        ask(&f.core, 4096, lib, &[], &[]),
        Err(libc::ENOSYS),
        "an unknown opcode"
    );
    // Xattrs are off by default: the kernel is told, once, that there are none.
    assert_eq!(
        ask(&f.core, wire::FUSE_GETXATTR, big, &[0; 8], b"user.x\0"),
        Err(libc::ENOSYS)
    );
    let statfs = ask(&f.core, wire::FUSE_STATFS, ROOT_INO, &[], &[]).unwrap();
    assert_eq!(statfs.len(), 80);
    assert_eq!(wire::u32_at(&statfs, 44), Some(255), "namelen");
}

/// Every entry of a listing, paged the way the kernel pages it: (name, ino, type) of each.
fn list(core: &DigestFs, ino: u64, plus: bool, size: u32) -> (Vec<(String, u64, u32)>, usize) {
    let op = if plus {
        wire::FUSE_READDIRPLUS
    } else {
        wire::FUSE_READDIR
    };
    let (mut out, mut offset, mut pages) = (Vec::new(), 0u64, 0);
    let mut last_len = None;
    loop {
        let page = ask(core, op, ino, &read_in(0, offset, size), &[]).unwrap();
        assert!(page.len() <= size as usize, "a reply larger than asked for");
        if page.is_empty() {
            return (out, pages);
        }
        pages += 1;
        let first_len = {
            let base = if plus { wire::ENTRY_OUT_LEN } else { 0 };
            base + (24 + wire::u32_at(&page, base + 16).unwrap() as usize).div_ceil(8) * 8
        };
        if let Some(prev) = last_len {
            // The reply before was full: this page's first entry would not have fitted in it.
            assert!(
                prev + first_len > size as usize,
                "a page ended with room for the next entry"
            );
        }
        last_len = Some(page.len());
        let mut at = 0;
        while at < page.len() {
            let base = if plus { at + wire::ENTRY_OUT_LEN } else { at };
            let ino = wire::u64_at(&page, base).unwrap();
            offset = wire::u64_at(&page, base + 8).unwrap();
            let namelen = wire::u32_at(&page, base + 16).unwrap() as usize;
            let kind = wire::u32_at(&page, base + 20).unwrap();
            let name = String::from_utf8(page[base + 24..base + 24 + namelen].to_vec()).unwrap();
            if plus && name != "." && name != ".." {
                assert_eq!(
                    ino_of(&page[at..]),
                    ino,
                    "{name}: entry_out names the same inode"
                );
            }
            out.push((name, ino, kind));
            at = base + (24 + namelen).div_ceil(8) * 8;
        }
        assert_eq!(
            at,
            page.len(),
            "entries are padded to 8 and fill the reply exactly"
        );
    }
}

#[test]
fn listings_page_by_offset_and_never_overflow_the_asked_size() {
    let f = fixture();
    let v = ino_of(&lookup(&f.core, ROOT_INO, "v").unwrap());
    let lib = ino_of(&lookup(&f.core, v, "lib").unwrap());
    let expected: Vec<String> = {
        let mut names = vec![
            ".".to_string(),
            "..".to_string(),
            "a.jar".into(),
            "big.jar".into(),
        ];
        names.extend((0..200).map(|i| format!("n{i:03}.jar")));
        names
    };
    for plus in [false, true] {
        let (entries, pages) = list(&f.core, lib, plus, 4096);
        let names: Vec<String> = entries.iter().map(|e| e.0.clone()).collect();
        assert_eq!(names, expected, "plus={plus}");
        assert!(
            pages > 1,
            "plus={plus}: 204 entries take several 4 KiB replies"
        );
        let (_, jar_ino, kind) = &entries[2];
        assert_eq!(*kind, libc::DT_REG as u32);
        assert_eq!(*jar_ino, ino_of(&lookup(&f.core, lib, "a.jar").unwrap()));
    }
    // A reply too small for even one entry is empty rather than overflowing.
    assert_eq!(
        ask(&f.core, wire::FUSE_READDIR, lib, &read_in(0, 0, 16), &[]).unwrap(),
        b""
    );
}

#[test]
fn malformed_requests_are_errors_not_panics() {
    let f = fixture();
    // Per-op headers cut short, names without their NUL, a node that does not exist.
    for op in [
        wire::FUSE_READ,
        wire::FUSE_OPEN,
        wire::FUSE_READDIR,
        wire::FUSE_GETXATTR,
    ] {
        assert_eq!(
            ask(&f.core, op, ROOT_INO, &[1, 2], &[]),
            Err(libc::EINVAL),
            "opcode {op}"
        );
    }
    assert_eq!(
        ask(&f.core, wire::FUSE_LOOKUP, ROOT_INO, &[], b"v").map(|b| b.len()),
        Ok(wire::ENTRY_OUT_LEN)
    );
    assert!(ask(&f.core, wire::FUSE_GETATTR, 0xdead_beef, &[0; 16], &[]).is_err());
    assert_eq!(lookup(&f.core, ROOT_INO, "v/lib"), Err(libc::ENOENT));
    assert_eq!(InHeader::parse(&[0u8; 39]), None);
    let mut b = [0u8; wire::IN_HEADER_LEN];
    header(wire::FUSE_GETATTR, 9).write(&mut b);
    assert_eq!(InHeader::parse(&b), Some(header(wire::FUSE_GETATTR, 9)));
}

#[test]
fn readdirplus_counts_a_lookup_only_for_what_it_delivered() {
    let f = fixture();
    let v = ino_of(&lookup(&f.core, ROOT_INO, "v").unwrap());
    let lib = ino_of(&lookup(&f.core, v, "lib").unwrap());
    let before = f.core.inode_count();
    let (entries, _) = list(&f.core, lib, true, 4096);
    let delivered: Vec<_> = entries
        .iter()
        .filter(|e| e.0 != "." && e.0 != "..")
        .collect();
    assert_eq!(f.core.inode_count(), before + delivered.len());
    // The kernel forgets each delivered entry once: the table is back where it was, so no
    // entry that did not fit was counted.
    for (_, ino, _) in &delivered {
        f.core.forget(*ino, 1);
    }
    assert_eq!(f.core.inode_count(), before);
}

#[test]
fn xattrs_answer_their_size_then_their_value_or_erange() {
    let f = fixture_with(FsConfig {
        xattrs: true,
        ..FsConfig::default()
    });
    let v = ino_of(&lookup(&f.core, ROOT_INO, "v").unwrap());
    let lib = ino_of(&lookup(&f.core, v, "lib").unwrap());
    let jar = ino_of(&lookup(&f.core, lib, "a.jar").unwrap());
    let want = f
        .core
        .getxattr(jar, std::ffi::OsStr::new("user.pants.digest"))
        .unwrap();
    let size_in = |n: u32| [n.to_ne_bytes(), [0; 4]].concat();
    let name = b"user.pants.digest\0";
    let out = ask(&f.core, wire::FUSE_GETXATTR, jar, &size_in(0), name).unwrap();
    assert_eq!(
        wire::u32_at(&out, 0),
        Some(want.len() as u32),
        "size 0 asks for the size"
    );
    assert_eq!(
        ask(&f.core, wire::FUSE_GETXATTR, jar, &size_in(3), name),
        Err(libc::ERANGE)
    );
    assert_eq!(
        ask(&f.core, wire::FUSE_GETXATTR, jar, &size_in(4096), name).unwrap(),
        want
    );
    let list = ask(&f.core, wire::FUSE_LISTXATTR, jar, &size_in(4096), &[]).unwrap();
    assert!(
        list.split(|&b| b == 0).any(|n| n == b"user.pants.digest"),
        "{list:?}"
    );
}

/// A READDIRPLUS reply parsed as the kernel's `parse_dirplusfile` does: every record a
/// `fuse_direntplus` (entry_out, then a dirent and its name padded to 8), each consumed whole.
/// (node id of the entry_out, dirent ino, name) per record.
fn kernel_parse_dirplus(mut buf: &[u8]) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let base = wire::ENTRY_OUT_LEN;
        assert!(
            buf.len() >= base + 24,
            "a record cut short: {} bytes",
            buf.len()
        );
        let namelen = wire::u32_at(buf, base + 16).unwrap() as usize;
        let reclen = (base + 24 + namelen).div_ceil(8) * 8;
        assert!(
            namelen > 0 && namelen <= 255 && reclen <= buf.len(),
            "a malformed record"
        );
        let name = String::from_utf8(buf[base + 24..base + 24 + namelen].to_vec()).unwrap();
        out.push((ino_of(buf), wire::u64_at(buf, base).unwrap(), name));
        buf = &buf[reclen..];
    }
    out
}

#[test]
fn readdirplus_records_are_direntplus_even_without_attributes() {
    let f = fixture();
    let attr = f.core.getattr(ROOT_INO).unwrap();
    let entry = |name, attr| crate::fs::DirEntryOut {
        ino: 42,
        next_offset: 3,
        kind: crate::fs::FileKind::File,
        name,
        attr,
    };
    let mut buf = vec![0u8; 4096];
    let mut w = wire::Writer::new(&mut buf);
    assert!(super::dir_record(&mut w, true, &entry("bare", None), TTL));
    assert!(super::dir_record(
        &mut w,
        true,
        &entry("full", Some(attr)),
        TTL
    ));
    let n = w.len();
    // Without attributes: node id 0 (the kernel links nothing), the dirent still names it.
    assert_eq!(
        kernel_parse_dirplus(&buf[..n]),
        vec![
            (0, 42, "bare".to_string()),
            (attr.ino, 42, "full".to_string())
        ]
    );
    // A plain READDIR record of the same entry is the dirent alone.
    let mut plain = vec![0u8; 64];
    let mut w = wire::Writer::new(&mut plain);
    assert!(super::dir_record(&mut w, false, &entry("bare", None), TTL));
    assert_eq!(w.len(), 32);
    // And a whole listing over the ring parses as the kernel parses it.
    let v = ino_of(&lookup(&f.core, ROOT_INO, "v").unwrap());
    let lib = ino_of(&lookup(&f.core, v, "lib").unwrap());
    let page = ask(
        &f.core,
        wire::FUSE_READDIRPLUS,
        lib,
        &read_in(0, 0, 4096),
        &[],
    )
    .unwrap();
    let records = kernel_parse_dirplus(&page);
    assert_eq!(records[0].2, ".");
    assert_eq!(records[2].2, "a.jar");
    for (nodeid, ino, name) in &records[2..] {
        assert_eq!(nodeid, ino, "{name}");
    }
}
