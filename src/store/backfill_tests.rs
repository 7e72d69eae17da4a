//! The store's side of a backfill, with a second local store standing in for the remote.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

/// Serves blobs out of another store; can corrupt what it sends, and records what it was asked.
struct FakeRemote {
    source: Store,
    corrupt: bool,
    ranges: bool,
    fetches: AtomicUsize,
    range_reads: AtomicUsize,
    started: Mutex<Vec<Digest>>,
}

impl FakeRemote {
    fn new(source: Store) -> FakeRemote {
        FakeRemote {
            source,
            corrupt: false,
            ranges: false,
            fetches: AtomicUsize::new(0),
            range_reads: AtomicUsize::new(0),
            started: Mutex::default(),
        }
    }

    fn bytes(&self, digest: &Digest, kind: BlobKind) -> Result<Vec<u8>> {
        let mut bytes = match kind {
            BlobKind::Directory => self.source.directory_bytes(digest)?,
            BlobKind::File => self.source.read_all(digest)?,
        };
        if self.corrupt {
            bytes[0] ^= 1;
        }
        Ok(bytes)
    }
}

impl Backfill for FakeRemote {
    fn fetch(&self, store: &Store, digest: &Digest, kind: BlobKind) -> Result<bool> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.bytes(digest, kind) {
            Ok(bytes) => store.put_verified(kind, digest, &bytes).map(|()| true),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn contains(&self, digest: &Digest) -> Result<bool> {
        self.source.has_file(digest)
    }

    fn serves_ranges(&self) -> bool {
        self.ranges
    }

    fn start_fetch(&self, _store: &Store, digest: &Digest) {
        self.started.lock().unwrap().push(*digest);
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.range_reads.fetch_add(1, Ordering::Relaxed);
        let blob = self.source.open_blob(digest)?;
        self.source.read_blob(&blob, offset, len)
    }
}

/// A source store holding `small.txt` and a 700 KiB `big.jar`; returns it, its tree and the
/// two file digests.
fn source() -> (tempfile::TempDir, Store, Digest, Digest, Digest) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tree");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("small.txt"), b"hello").unwrap();
    let big: Vec<u8> = (0..700 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("big.jar"), &big).unwrap();
    let store = Store::create(tmp.path().join("source")).unwrap();
    let tree = Importer::new(&store).import_path(&dir).unwrap();
    (
        tmp,
        store,
        tree,
        Digest::of_bytes(b"hello"),
        Digest::of_bytes(&big),
    )
}

#[test]
fn misses_are_fetched_verified_and_kept() {
    let (tmp, source, tree, small, big) = source();
    let remote = Arc::new(FakeRemote::new(source));
    let store = Store::create(tmp.path().join("local"))
        .unwrap()
        .with_backfill(remote.clone());
    let listing = store.load_directory(&tree).unwrap();
    assert_eq!(listing.entries.len(), 2);
    assert_eq!(store.read_all(&small).unwrap(), b"hello");
    assert_eq!(store.read_all(&big).unwrap().len(), 700 * 1024);
    assert_eq!(remote.fetches.load(Ordering::Relaxed), 3);
    // Now local: no more fetches, and a store without the backfill sees them.
    store.load_directory(&tree).unwrap();
    store.read_all(&big).unwrap();
    assert_eq!(remote.fetches.load(Ordering::Relaxed), 3);
    let local = store.local_only();
    assert!(local.has_file(&small).unwrap() && local.has_file(&big).unwrap());
    assert!(local.large_blob_path(&big).is_file());
}

#[test]
fn corrupt_bytes_are_refused_and_not_kept() {
    let (tmp, source, tree, small, big) = source();
    let mut fake = FakeRemote::new(source);
    fake.corrupt = true;
    let store = Store::create(tmp.path().join("local"))
        .unwrap()
        .with_backfill(Arc::new(fake));
    for err in [
        store.load_directory(&tree).map(drop).unwrap_err(),
        store.read_all(&small).map(drop).unwrap_err(),
        store.read_all(&big).map(drop).unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
    }
    let local = store.local_only();
    assert!(!local.has_file(&small).unwrap() && !local.has_file(&big).unwrap());
    assert!(local.directory_bytes(&tree).unwrap_err().is_missing());
}

#[test]
fn what_the_source_lacks_stays_missing_and_has_file_asks_it() {
    let (tmp, source, _tree, small, _big) = source();
    let store = Store::create(tmp.path().join("local"))
        .unwrap()
        .with_backfill(Arc::new(FakeRemote::new(source)));
    let absent = Digest::of_bytes(b"nowhere");
    assert!(store.read_all(&absent).unwrap_err().is_missing());
    assert!(!store.has_file(&absent).unwrap());
    // has_file asks without fetching.
    assert!(store.has_file(&small).unwrap());
    assert!(!store.local_only().has_file(&small).unwrap());
}

#[test]
fn ranged_reads_serve_a_large_blob_until_it_is_local() {
    let (tmp, source, _tree, _small, big) = source();
    let mut fake = FakeRemote::new(source);
    fake.ranges = true;
    let remote = Arc::new(fake);
    let store = Store::create(tmp.path().join("local"))
        .unwrap()
        .with_backfill(remote.clone());
    let blob = store.open_blob(&big).unwrap();
    assert!(matches!(blob, Blob::Fetching(_)));
    assert_eq!(remote.started.lock().unwrap()[0], big);
    let tail = store.read_blob(&blob, 700 * 1024 - 10, 100).unwrap();
    assert_eq!(tail.len(), 10, "short only at the end");
    assert_eq!(tail[9], ((700 * 1024 - 1) % 251) as u8);
    assert_eq!(remote.range_reads.load(Ordering::Relaxed), 1);
    // Once the blob is local, the same handle reads it locally.
    let bytes = remote.source.read_all(&big).unwrap();
    store.put_verified(BlobKind::File, &big, &bytes).unwrap();
    assert_eq!(store.read_blob(&blob, 0, 4).unwrap(), [0, 1, 2, 3]);
    assert_eq!(remote.range_reads.load(Ordering::Relaxed), 1);
}
