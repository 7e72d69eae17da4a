//! Handles against a real core over a store built on the spot: round trips, STALE after a view
//! changes, never other content, and garbage refused.

use proptest::prelude::*;

use super::*;
use crate::cas::Cas;
use crate::fs::FsConfig;
use crate::store::{Importer, Store};

struct Fixture {
    _dir: tempfile::TempDir,
    fs: DigestFs,
    a: Digest,
    b: Digest,
}

fn import(store: &Store, files: &[(&str, &str)], links: &[(&str, &str)]) -> Digest {
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    for (path, content) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
    }
    for (path, target) in links {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, &p).unwrap();
    }
    Importer::new(store).import_path(root).unwrap()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let a = import(
        &store,
        &[("lib/guava.jar", "guava-a"), ("lib/x/deep.txt", "deep-a")],
        &[("lib/link", "guava.jar"), ("top", "lib")],
    );
    let b = import(
        &store,
        &[("lib/other.jar", "other-b"), ("lib/x/more.txt", "more-b")],
        &[("lib/blink", "other.jar")],
    );
    let fs = DigestFs::new(Arc::new(Cas::local(store)), FsConfig::default());
    Fixture {
        _dir: dir,
        fs,
        a,
        b,
    }
}

/// Looks a path up from the root, one name at a time, as a client does.
fn walk(fs: &DigestFs, memo: &Memo, path: &str) -> Result<Object, nfsstat3> {
    let mut obj = Object::root();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        obj = child(fs, memo, &obj, part)?;
    }
    Ok(obj)
}

fn read_all(fs: &DigestFs, node: &Node) -> Vec<u8> {
    fs.read_node(node, 0, 1 << 20).unwrap()
}

#[test]
fn every_kind_of_key_round_trips_within_56_bytes() {
    let d = Digest::of_bytes(b"x");
    let keys = [
        Key::Root,
        Key::Content,
        Key::Blobs,
        Key::Trees,
        Key::File {
            digest: d,
            executable: false,
        },
        Key::File {
            digest: d,
            executable: true,
        },
        Key::Tree(d),
        Key::Namespace { path: [1; 16] },
        Key::View {
            path: [1; 16],
            generation: [2; 16],
        },
        Key::Merged {
            path: [1; 16],
            generation: [2; 16],
            set: [3; 16],
        },
        Key::Symlink {
            dir: d,
            name: [4; 15],
        },
    ];
    for key in keys {
        let b = key.to_bytes();
        assert!(b.len() <= MAX_LEN, "{key:?} is {} bytes", b.len());
        assert_eq!(Key::from_bytes(&b), Some(key.clone()));
        // One byte more or less is garbage.
        assert_eq!(Key::from_bytes(&b[..b.len() - 1]), None, "{key:?}");
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(Key::from_bytes(&longer), None, "{key:?}");
    }
    assert_eq!(Key::from_bytes(&[]), None);
    assert_eq!(Key::from_bytes(&[0x7f]), None);
}

proptest! {
    #[test]
    fn garbage_is_refused_or_is_exactly_a_key(b in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Some(key) = Key::from_bytes(&b) {
            prop_assert_eq!(key.to_bytes(), b);
        }
    }
}

#[test]
fn handles_resolve_to_what_they_named_with_a_fresh_memo() {
    let f = fixture();
    f.fs.bind("jvm/resolves/one", "g", f.a, true).unwrap();
    let memo = Memo::default();
    for path in [
        "",
        "jvm",
        "jvm/resolves",
        "jvm/resolves/one",
        "jvm/resolves/one/lib",
        "jvm/resolves/one/lib/guava.jar",
        "jvm/resolves/one/lib/link",
        "jvm/resolves/one/top",
        ".digestfs",
        ".digestfs/trees",
    ] {
        let obj = walk(&f.fs, &memo, path).unwrap();
        // A client comes back with only the bytes, to a server that remembers nothing.
        let key = Key::from_bytes(&obj.key.to_bytes()).unwrap();
        let again = resolve(&f.fs, &Memo::default(), &key).unwrap();
        assert_eq!(again.node, obj.node, "{path}");
        // The fileid is the inode number the FUSE front end gives the same path.
        let mut ino = crate::fs::ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = f.fs.lookup(ino, std::ffi::OsStr::new(part)).unwrap().ino;
        }
        assert_eq!(f.fs.attr_of(&again.node).unwrap().ino, ino, "{path}");
    }
    let link = walk(&f.fs, &memo, "jvm/resolves/one/lib/link").unwrap();
    assert_eq!(crate::fs::readlink_of(&link.node).unwrap(), b"guava.jar");
    assert!(matches!(link.key, Key::Symlink { .. }));
    // The view's root is named by its path and layers, not by its content.
    let root = walk(&f.fs, &memo, "jvm/resolves/one").unwrap();
    assert!(matches!(root.key, Key::View { .. }));
    assert_eq!(root.node, Node::Tree(f.a));
}

#[test]
fn a_rebind_or_unbind_makes_the_view_stale_never_other_content() {
    let f = fixture();
    f.fs.bind("v/one", "g", f.a, true).unwrap();
    let memo = Memo::default();
    let view = walk(&f.fs, &memo, "v/one").unwrap();
    let ns = walk(&f.fs, &memo, "v").unwrap();
    let jar = walk(&f.fs, &memo, "v/one/lib/guava.jar").unwrap();
    let lib = walk(&f.fs, &memo, "v/one/lib").unwrap();

    f.fs.bind("v/one", "g", f.b, true).unwrap();
    assert_eq!(
        resolve(&f.fs, &memo, &view.key),
        Err(nfsstat3::NFS3ERR_STALE)
    );
    // Looked up again, the name shows the new tree.
    let fresh = walk(&f.fs, &memo, "v/one").unwrap();
    assert_ne!(fresh.key, view.key);
    assert_eq!(fresh.node, Node::Tree(f.b));
    // The namespace directory is the same directory, now listing the new view.
    assert_eq!(resolve(&f.fs, &memo, &ns.key).unwrap().node, ns.node);
    // Content handles name content: still exactly the old bytes, wherever they are bound.
    let jar_now = resolve(&f.fs, &memo, &jar.key).unwrap();
    assert_eq!(read_all(&f.fs, &jar_now.node), b"guava-a");
    assert_eq!(resolve(&f.fs, &memo, &lib.key).unwrap().node, lib.node);

    // Rebinding back gives the first generation again: the old handle works again, showing
    // what it named.
    f.fs.bind("v/one", "g", f.a, true).unwrap();
    assert_eq!(
        resolve(&f.fs, &memo, &view.key).unwrap().node,
        Node::Tree(f.a)
    );

    f.fs.unbind("v/one", None).unwrap();
    for key in [&view.key, &ns.key] {
        assert_eq!(
            resolve(&f.fs, &Memo::default(), key),
            Err(nfsstat3::NFS3ERR_STALE)
        );
    }
}

#[test]
fn merged_directories_resolve_by_search_and_go_stale_with_their_view() {
    let f = fixture();
    f.fs.bind("m", "one", f.a, true).unwrap();
    f.fs.bind("m", "two", f.b, true).unwrap();
    let memo = Memo::default();
    let lib = walk(&f.fs, &memo, "m/lib").unwrap();
    let x = walk(&f.fs, &memo, "m/lib/x").unwrap();
    assert!(matches!(lib.key, Key::Merged { .. }), "{:?}", lib.key);
    assert!(matches!(x.key, Key::Merged { .. }));
    // With nothing remembered, a breadth-first search below the view finds them.
    let fresh = Memo::default();
    assert_eq!(resolve(&f.fs, &fresh, &x.key).unwrap().node, x.node);
    assert_eq!(resolve(&f.fs, &fresh, &lib.key).unwrap().node, lib.node);
    let names: Vec<String> = match list(&f.fs, &memo, &lib).unwrap() {
        Listing::Content(c) => c.iter().map(|(n, _)| n.to_string()).collect(),
        Listing::Namespace(_) => panic!("a merged directory is content"),
    };
    assert_eq!(
        names,
        ["blink", "guava.jar", "link", "other.jar", "x"].map(String::from)
    );
    // Symlinks in a merged directory are named by the layer that lists them.
    for (name, target) in [("link", "guava.jar"), ("blink", "other.jar")] {
        let l = child(&f.fs, &memo, &lib, name).unwrap();
        let again = resolve(&f.fs, &Memo::default(), &l.key).unwrap();
        assert_eq!(
            crate::fs::readlink_of(&again.node).unwrap(),
            target.as_bytes()
        );
    }
    // A forged set hash under a live view is stale, not something else.
    let Key::Merged {
        path, generation, ..
    } = lib.key.clone()
    else {
        unreachable!()
    };
    let forged = Key::Merged {
        path,
        generation,
        set: [9; 16],
    };
    assert_eq!(
        resolve(&f.fs, &fresh, &forged),
        Err(nfsstat3::NFS3ERR_STALE)
    );
    // Dropping a layer changes the view's generation.
    f.fs.unbind("m", Some("two")).unwrap();
    assert_eq!(resolve(&f.fs, &memo, &x.key), Err(nfsstat3::NFS3ERR_STALE));
}

#[test]
fn content_the_store_lacks_is_stale_where_it_is_read() {
    let f = fixture();
    let memo = Memo::default();
    let missing = Digest::of_bytes(b"never stored");
    // Handles of content resolve without asking the store: the check is where the blob is read.
    let file = resolve(
        &f.fs,
        &memo,
        &Key::File {
            digest: missing,
            executable: false,
        },
    )
    .unwrap();
    assert_eq!(f.fs.attr_of(&file.node).unwrap().size, missing.size);
    assert_eq!(
        f.fs.read_node(&file.node, 0, 10).map_err(status),
        Err(nfsstat3::NFS3ERR_STALE)
    );
    let tree = resolve(&f.fs, &memo, &Key::Tree(missing)).unwrap();
    assert_eq!(f.fs.attr_of(&tree.node), Err(FsError::Gone));
    assert_eq!(
        f.fs.attr_of(&tree.node).map_err(status),
        Err(nfsstat3::NFS3ERR_STALE)
    );
    assert_eq!(
        list(&f.fs, &memo, &tree).map(|_| ()),
        Err(nfsstat3::NFS3ERR_STALE)
    );
    assert_eq!(
        child(&f.fs, &memo, &tree, "x").map(|_| ()),
        Err(nfsstat3::NFS3ERR_STALE)
    );
    // What a symlink handle names is found by reading its Directory: STALE there too, as for
    // views and namespace directories that are not bound.
    for key in [
        Key::Symlink {
            dir: missing,
            name: [0; 15],
        },
        Key::Namespace { path: [0; 16] },
        Key::View {
            path: [0; 16],
            generation: [0; 16],
        },
    ] {
        assert_eq!(
            resolve(&f.fs, &memo, &key),
            Err(nfsstat3::NFS3ERR_STALE),
            "{key:?}"
        );
    }
    // A symlink hash that names no entry of a real Directory.
    let key = Key::Symlink {
        dir: f.a,
        name: [0; 15],
    };
    assert_eq!(
        resolve(&f.fs, &Memo::default(), &key),
        Err(nfsstat3::NFS3ERR_STALE)
    );
}

#[test]
fn a_blob_removed_after_its_handle_was_issued_is_stale_and_the_rest_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let big = vec![7u8; 600 * 1024];
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("big.jar"), &big).unwrap();
    std::fs::write(src.path().join("small.jar"), "small").unwrap();
    let tree = Importer::new(&store).import_path(src.path()).unwrap();
    let fs = DigestFs::new(Arc::new(Cas::local(store)), FsConfig::default());
    fs.bind("v", crate::fs::DEFAULT_LAYER, tree, true).unwrap();
    let memo = Memo::default();
    let big_h = walk(&fs, &memo, "v/big.jar").unwrap();
    let small_h = walk(&fs, &memo, "v/small.jar").unwrap();
    assert_eq!(read_all(&fs, &big_h.node)[..4], [7; 4]);
    // Pants' garbage collection takes the blob away (and the read cache forgets it).
    let digest = Digest::of_bytes(&big);
    std::fs::remove_file(fs.cas().store().large_blob_path(&digest)).unwrap();
    let fresh = DigestFs::new(fs.cas().clone(), FsConfig::default());
    fresh
        .bind("v", crate::fs::DEFAULT_LAYER, tree, true)
        .unwrap();
    let again = resolve(&fresh, &memo, &big_h.key).unwrap();
    assert_eq!(
        fresh.read_node(&again.node, 0, 4096).map_err(status),
        Err(nfsstat3::NFS3ERR_STALE)
    );
    let small = resolve(&fresh, &memo, &small_h.key).unwrap();
    assert_eq!(read_all(&fresh, &small.node), b"small");
}

#[test]
fn dot_and_dot_dot() {
    let f = fixture();
    f.fs.bind("v/one", "g", f.a, true).unwrap();
    let memo = Memo::default();
    let lib = walk(&f.fs, &memo, "v/one/lib").unwrap();
    assert_eq!(child(&f.fs, &memo, &lib, ".").unwrap(), lib);
    let up = child(&f.fs, &memo, &lib, "..").unwrap();
    assert_eq!(up.node, Node::Tree(f.a));
    assert!(matches!(up.key, Key::View { .. }));
    let ns = child(&f.fs, &memo, &up, "..").unwrap();
    assert_eq!(ns.node, Node::Namespace("v".into()));
    assert_eq!(child(&f.fs, &memo, &ns, "..").unwrap(), Object::root());
    assert_eq!(
        child(&f.fs, &memo, &Object::root(), "..").unwrap(),
        Object::root()
    );
    // A store directory reached from nowhere we saw has no known parent.
    let stray = resolve(&f.fs, &Memo::default(), &lib.key).unwrap();
    assert_eq!(
        parent(&f.fs, &Memo::default(), &stray),
        Err(nfsstat3::NFS3ERR_NOENT)
    );
    let jar = walk(&f.fs, &memo, "v/one/lib/guava.jar").unwrap();
    assert_eq!(
        child(&f.fs, &memo, &jar, "x"),
        Err(nfsstat3::NFS3ERR_NOTDIR)
    );
    assert_eq!(
        child(&f.fs, &memo, &lib, "nope"),
        Err(nfsstat3::NFS3ERR_NOENT)
    );
}

#[test]
fn namespace_listings_come_from_one_snapshot() {
    let f = fixture();
    f.fs.bind("v/one", "g", f.a, true).unwrap();
    f.fs.bind("v/two", "g", f.b, true).unwrap();
    let memo = Memo::default();
    let v = walk(&f.fs, &memo, "v").unwrap();
    let Listing::Namespace(entries) = list(&f.fs, &memo, &v).unwrap() else {
        panic!("a namespace directory lists views");
    };
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["one", "two"]);
    for (name, obj) in &entries {
        assert_eq!(obj, &child(&f.fs, &memo, &v, name).unwrap());
    }
}
