//! Writing trees from disk into the store exactly as Pants does: blobs below 512 KiB into LMDB
//! with a lease, larger ones as 0555 files renamed into place after an fsync, canonical
//! `Directory` protos, symlinks kept as `SymlinkNode`s.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::error::io_err;
use super::{check_name, Digest, Entry, EntryKind, Listing, Store, StoreError};

/// Pending LMDB writes are flushed once they hold this many bytes.
const FLUSH_BYTES: usize = 64 << 20;

pub struct Importer<'a> {
    store: &'a Store,
    files: Vec<Vec<(Digest, Vec<u8>)>>,
    directories: Vec<Vec<(Digest, Vec<u8>)>>,
    pending_bytes: usize,
    /// Files with several links, by (device, inode): one content, hashed once.
    linked: std::collections::HashMap<(u64, u64), Digest>,
    /// Told the size of each file once it is stored.
    progress: Option<Box<dyn FnMut(u64) + 'a>>,
}

impl<'a> Importer<'a> {
    pub fn new(store: &'a Store) -> Importer<'a> {
        Importer {
            store,
            files: vec![Vec::new(); store.shard_count().get()],
            directories: vec![Vec::new(); store.shard_count().get()],
            pending_bytes: 0,
            linked: std::collections::HashMap::new(),
            progress: None,
        }
    }

    /// Calls `f` with the size of each file as it is imported (for a progress bar).
    pub fn with_progress(mut self, f: impl FnMut(u64) + 'a) -> Importer<'a> {
        self.progress = Some(Box::new(f));
        self
    }

    /// Imports a directory (giving its tree digest) or a single file (giving its file digest).
    /// Everything is in the store once this returns.
    pub fn import_path(mut self, path: &Path) -> Result<Digest, StoreError> {
        let meta = fs::metadata(path).map_err(io_err(format!("reading {}", path.display())))?;
        let digest = if meta.is_dir() {
            self.import_dir(path)?
        } else {
            self.import_file(path, &meta)?
        };
        self.flush()?;
        Ok(digest)
    }

    fn import_dir(&mut self, dir: &Path) -> Result<Digest, StoreError> {
        let mut entries = Vec::new();
        let read = fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
        for item in read {
            let item = item.map_err(io_err(format!("listing {}", dir.display())))?;
            let path = item.path();
            let unimportable = |reason: String| StoreError::Unimportable {
                path: path.clone(),
                reason,
            };
            let name = item
                .file_name()
                .into_string()
                .map_err(|n| unimportable(format!("the name {n:?} is not UTF-8")))?;
            check_name(&name).map_err(|reason| unimportable(reason.to_string()))?;
            let meta = fs::symlink_metadata(&path)
                .map_err(io_err(format!("reading {}", path.display())))?;
            let kind = if meta.file_type().is_symlink() {
                let target =
                    fs::read_link(&path).map_err(io_err(format!("reading {}", path.display())))?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|t| unimportable(format!("the link target {t:?} is not UTF-8")))?;
                EntryKind::Symlink(target)
            } else if meta.is_dir() {
                EntryKind::Dir(self.import_dir(&path)?)
            } else if meta.is_file() {
                let digest = match self.linked.get(&(meta.dev(), meta.ino())) {
                    Some(d) if d.size == meta.len() => *d,
                    _ => {
                        let d = self.import_file(&path, &meta)?;
                        if meta.nlink() > 1 {
                            self.linked.insert((meta.dev(), meta.ino()), d);
                        }
                        d
                    }
                };
                if let Some(progress) = self.progress.as_mut() {
                    progress(meta.len());
                }
                EntryKind::File {
                    digest,
                    executable: meta.mode() & 0o100 != 0,
                }
            } else {
                return Err(unimportable(
                    "only files, directories and symlinks can be imported".into(),
                ));
            };
            entries.push(Entry { name, kind });
        }
        entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        self.put_directory(&Listing { entries })
    }

    /// Writes whatever [`Importer::put_directory`] and [`Importer::put_bytes`] left pending.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.flush()
    }

    /// Stores a `Directory` and returns its digest (written by the next flush).
    pub fn put_directory(&mut self, listing: &Listing) -> Result<Digest, StoreError> {
        let bytes = listing.encode();
        let digest = Digest::of_bytes(&bytes);
        if digest != Digest::EMPTY {
            self.pending_bytes += bytes.len();
            self.directories[self.store.shard_of(&digest)].push((digest, bytes));
        }
        self.maybe_flush()?;
        Ok(digest)
    }

    /// Stores raw bytes as a file blob (any size) and returns the digest.
    pub fn put_bytes(&mut self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of_bytes(bytes);
        if digest.is_large() {
            self.write_large(&digest, &mut io::Cursor::new(bytes))?;
        } else if !digest.is_empty() {
            self.pending_bytes += bytes.len();
            self.files[self.store.shard_of(&digest)].push((digest, bytes.to_vec()));
            self.maybe_flush()?;
        }
        Ok(digest)
    }

    fn import_file(&mut self, path: &Path, meta: &fs::Metadata) -> Result<Digest, StoreError> {
        let ctx = || format!("reading {}", path.display());
        if meta.len() < super::LARGE_BLOB_THRESHOLD {
            let bytes = fs::read(path).map_err(io_err(ctx()))?;
            if (bytes.len() as u64) < super::LARGE_BLOB_THRESHOLD {
                return self.put_bytes(&bytes);
            }
        }
        // Hash first, so the blob is written under its final name; the copy re-hashes what it
        // writes, so a file that changes in between is caught rather than stored wrongly.
        let mut f = File::open(path).map_err(io_err(ctx()))?;
        let digest = hash_reader(&mut f).map_err(io_err(ctx()))?;
        let mut f = File::open(path).map_err(io_err(ctx()))?;
        self.write_large(&digest, &mut f)?;
        Ok(digest)
    }

    fn write_large(&self, digest: &Digest, src: &mut dyn Read) -> Result<(), StoreError> {
        let Some(mut w) = self.store.large_blob_writer(digest)? else {
            return Ok(());
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => w.write(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(format!("reading the content of {digest}"))(e)),
            }
        }
        w.commit().map_err(|e| match e {
            StoreError::HashMismatch { .. } | StoreError::SizeMismatch { .. } => {
                StoreError::ChangedWhileImported { digest: *digest }
            }
            e => e,
        })
    }

    fn maybe_flush(&mut self) -> Result<(), StoreError> {
        if self.pending_bytes >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes pending blobs: files first, then directories, so a reader that sees a `Directory`
    /// also finds what it names.
    fn flush(&mut self) -> Result<(), StoreError> {
        for (shard, batch) in self.files.iter_mut().enumerate() {
            if !batch.is_empty() {
                let refs: Vec<_> = batch.iter().map(|(d, b)| (*d, b.as_slice())).collect();
                self.store.put_small_files(shard, &refs)?;
                batch.clear();
            }
        }
        for (shard, batch) in self.directories.iter_mut().enumerate() {
            if !batch.is_empty() {
                let refs: Vec<_> = batch.iter().map(|(d, b)| (*d, b.as_slice())).collect();
                self.store.put_directories(shard, &refs)?;
                batch.clear();
            }
        }
        self.pending_bytes = 0;
        Ok(())
    }
}

/// Writes one large file blob as Pants does: a temporary file beside its final name, hashed as it
/// is written, then fsynced, made 0555, given its lease as mtime and renamed into place, only if
/// its bytes match the digest.
pub struct LargeBlobWriter {
    digest: Digest,
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
}

impl LargeBlobWriter {
    pub(super) fn new(
        dest: PathBuf,
        digest: Digest,
    ) -> Result<Option<LargeBlobWriter>, StoreError> {
        if let Ok(existing) = fs::metadata(&dest) {
            if existing.len() == digest.size {
                // Already stored: renew its lease, which for large blobs is the mtime.
                let _ = super::set_lease_mtime(&dest, super::lease_until());
                return Ok(None);
            }
        }
        let dir = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}.", digest.hex()))
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(io_err(format!("writing {}", dest.display())))?;
        Ok(Some(LargeBlobWriter {
            digest,
            dest,
            tmp,
            hasher: Sha256::new(),
            written: 0,
        }))
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.written += data.len() as u64;
        if self.written > self.digest.size {
            return Err(StoreError::SizeMismatch {
                digest: self.digest,
                actual: self.written,
            });
        }
        self.hasher.update(data);
        self.tmp
            .as_file_mut()
            .write_all(data)
            .map_err(io_err(format!("writing {}", self.dest.display())))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks the bytes against the digest and, if they match, puts the blob in place.
    pub fn commit(self) -> Result<(), StoreError> {
        let digest = self.digest;
        if self.written != digest.size {
            return Err(StoreError::SizeMismatch {
                digest,
                actual: self.written,
            });
        }
        if <[u8; 32]>::from(self.hasher.finalize()) != digest.hash {
            return Err(StoreError::HashMismatch { digest });
        }
        let ctx = || format!("writing {}", self.dest.display());
        let file = self.tmp.as_file();
        file.sync_all().map_err(io_err(ctx()))?;
        file.set_permissions(fs::Permissions::from_mode(0o555))
            .map_err(io_err(ctx()))?;
        file.set_modified(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(super::lease_until()),
        )
        .map_err(io_err(ctx()))?;
        self.tmp
            .persist(&self.dest)
            .map_err(|e| io_err(ctx())(e.error))?;
        Ok(())
    }
}

fn hash_reader(r: &mut dyn Read) -> io::Result<Digest> {
    copy_hashing(r, &mut io::sink())
}

fn copy_hashing(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok(Digest {
        hash: hasher.finalize().into(),
        size,
    })
}
