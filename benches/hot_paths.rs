//! Microbenchmarks of the hot paths, for regression checks: `cargo bench`.

use std::ffi::OsStr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use digestfs::cas::Cas;
use digestfs::fs::{DigestFs, FsConfig, InodeTable, Node, ROOT_INO};
use digestfs::store::{Digest, Entry, EntryKind, Importer, Listing, Store};

fn listing(n: usize) -> Listing {
    Listing {
        entries: (0..n)
            .map(|i| Entry {
                name: format!("f{i:06}.jar"),
                kind: EntryKind::File {
                    digest: Digest::of_bytes(&i.to_le_bytes()),
                    executable: false,
                },
            })
            .collect(),
    }
}

fn lookup_in_a_large_directory(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).unwrap();
    let mut imp = Importer::new(&store);
    let tree = imp.put_directory(&listing(100_000)).unwrap();
    imp.finish().unwrap();
    let fs = DigestFs::new(Arc::new(Cas::local(store)), FsConfig::default());
    fs.bind("lib", "default", tree, true).unwrap();
    let lib = fs.lookup(ROOT_INO, OsStr::new("lib")).unwrap().ino;
    let mut i = 0usize;
    c.bench_function("lookup + forget in a 100k-entry directory", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            let a = fs.lookup(lib, OsStr::new(&format!("f{i:06}.jar"))).unwrap();
            fs.forget(a.ino, 1);
        })
    });
}

/// A resolve's `lib/` as the BSP server binds it: 300 jars per target layer, most shared with
/// the other targets of the resolve. Measures one bind (with verification and the conflict
/// check against the view's other layers) and the unbind that undoes it.
fn bind_a_300_jar_layer(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path()).unwrap();
    let mut imp = Importer::new(&store);
    // Ten targets: each has 270 jars in common and 30 of its own.
    let layers: Vec<Digest> = (0..10)
        .map(|t| {
            let mut l = listing(270);
            l.entries.extend((0..30).map(|i| Entry {
                name: format!("t{t:02}-{i:02}.jar"),
                kind: EntryKind::File {
                    digest: Digest::of_bytes(format!("{t}/{i}").as_bytes()),
                    executable: false,
                },
            }));
            l.entries.sort_by(|a, b| a.name.cmp(&b.name));
            imp.put_directory(&l).unwrap()
        })
        .collect();
    imp.finish().unwrap();
    let fs = DigestFs::new(Arc::new(Cas::local(store)), FsConfig::default());
    for (t, layer) in layers[..9].iter().enumerate() {
        fs.bind("r/lib", &format!("modules.t{t}"), *layer, true)
            .unwrap();
    }
    c.bench_function("bind + unbind a 300-jar layer into a 9-layer view", |b| {
        b.iter(|| {
            fs.bind("r/lib", "modules.t9", layers[9], true).unwrap();
            fs.unbind("r/lib", Some("modules.t9")).unwrap();
        })
    });
}

fn directory_decode(c: &mut Criterion) {
    let bytes = listing(10_000).encode();
    let digest = Digest::of_bytes(&bytes);
    c.bench_function("decode a 10k-entry Directory", |b| {
        b.iter(|| Listing::decode(&digest, &bytes).unwrap())
    });
}

fn inode_table_churn(c: &mut Criterion) {
    let nodes: Vec<Node> = (0..10_000u32)
        .map(|i| Node::File {
            digest: Digest::of_bytes(&i.to_le_bytes()),
            executable: false,
        })
        .collect();
    c.bench_function("acquire then forget 10k inodes", |b| {
        b.iter_batched(
            InodeTable::new,
            |mut t| {
                let inos: Vec<u64> = nodes.iter().map(|n| t.acquire(n, ROOT_INO).0).collect();
                for ino in inos {
                    t.forget(ino, 1);
                }
                t
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    lookup_in_a_large_directory,
    bind_a_300_jar_layer,
    directory_decode,
    inode_table_churn
);
criterion_main!(benches);
