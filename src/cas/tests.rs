//! The read layer over a local store: typed errors, and walks of trees deeper than any stack.

use super::*;
use crate::store::{Entry, Importer, Listing};

/// A store holding a chain `d/d/…/leaf.txt` of `depth` directories; returns it and the root.
fn chain_store(depth: usize) -> (tempfile::TempDir, Store, Digest) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("store")).unwrap();
    let mut imp = Importer::new(&store);
    let leaf = imp.put_bytes(b"leaf").unwrap();
    let mut d = imp
        .put_directory(&Listing {
            entries: vec![Entry {
                name: "leaf.txt".into(),
                kind: EntryKind::File {
                    digest: leaf,
                    executable: false,
                },
            }],
        })
        .unwrap();
    for _ in 0..depth {
        d = imp
            .put_directory(&Listing {
                entries: vec![Entry {
                    name: "d".into(),
                    kind: EntryKind::Dir(d),
                }],
            })
            .unwrap();
    }
    imp.finish().unwrap();
    (dir, store, d)
}

#[test]
fn deep_trees_walk_and_materialize_without_overflowing() {
    let (dir, store, root) = chain_store(100_000);
    let cas = Cas::local(store);
    let tree = cas.tree_blobs(&[root]);
    assert!(tree.errors.is_empty());
    assert_eq!((tree.dirs.len(), tree.files.len()), (100_001, 1));

    let mut printed = 0;
    let err = cas
        .walk_paths::<ReadError>(&root, &mut |_, _| {
            printed += 1;
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(err, ReadError::Store(StoreError::TooDeep { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("depth 2049"), "{err}");
    assert_eq!(printed, 2048);

    // Materializing stops with one error naming the depth, before the OS refuses the path.
    let dest = dir.path().join("out");
    let err = crate::materialize::materialize(&cas, &root, &dest, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, ReadError::Store(StoreError::TooDeep { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("depth"), "{err}");
}

#[test]
fn errors_say_what_is_missing_and_of_which_kind() {
    let (_dir, store, root) = chain_store(1);
    let cas = Cas::local(store);
    let absent = Digest::of_bytes(b"absent");
    let err = cas.load_directory(&absent).unwrap_err();
    assert!(err.is_missing() && !err.is_unavailable());
    assert_eq!(err.digest(), Some(absent));
    assert_eq!(
        err.to_string(),
        format!("directory {absent} is not in the store")
    );
    let err = cas.read_all(&absent).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("file {absent} is not in the store")
    );
    assert!(!cas.has_file(&absent).unwrap());
    assert_eq!(cas.read_all(&Digest::of_bytes(b"leaf")).unwrap(), b"leaf");
    assert!(cas.load_directory(&root).is_ok());
}
