//! Copying a tree out of the store: the fallback where FUSE is unavailable, and the baseline the
//! benchmarks compare against. Every file and symlink is written under a temporary name and
//! renamed into place, so concurrent runs into one destination never fail on each other and
//! never expose a partial or wrongly-moded file.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{Digest, EntryKind, Store, StoreError};

fn io_err(context: String) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { context, source }
}

/// Materializes the tree `digest` into `dest`, creating it if needed. Returns the number of files
/// written.
pub fn materialize(store: &Store, digest: &Digest, dest: &Path) -> Result<u64, StoreError> {
    materialize_with_progress(store, digest, dest, &mut |_| {})
}

/// [`materialize`], calling `progress` with the size of each file once it is written.
pub fn materialize_with_progress(
    store: &Store,
    digest: &Digest,
    dest: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, StoreError> {
    make_dir(dest)?;
    let mut files = 0;
    write_dir(store, digest, dest, &mut files, progress)?;
    Ok(files)
}

fn make_dir(path: &Path) -> Result<(), StoreError> {
    match fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(io_err(format!("creating {}", path.display()))(e)),
    }
}

fn write_dir(
    store: &Store,
    digest: &Digest,
    dir: &Path,
    files: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), StoreError> {
    let listing = store.load_directory(digest)?;
    for entry in &listing.entries {
        let path = dir.join(&entry.name);
        match &entry.kind {
            EntryKind::Dir(sub) => {
                make_dir(&path)?;
                write_dir(store, sub, &path, files, progress)?;
            }
            EntryKind::File { digest, executable } => {
                write_file(store, digest, *executable, dir, &path)?;
                *files += 1;
                progress(digest.size);
            }
            EntryKind::Symlink(target) => {
                let ctx = || format!("writing {}", path.display());
                let tmp = tempfile::Builder::new()
                    .prefix(".digestfs-")
                    .make_in(dir, |p| std::os::unix::fs::symlink(target, p))
                    .map_err(io_err(ctx()))?;
                tmp.persist(&path).map_err(|e| io_err(ctx())(e.error))?;
            }
        }
    }
    Ok(())
}

fn write_file(
    store: &Store,
    digest: &Digest,
    executable: bool,
    dir: &Path,
    path: &Path,
) -> Result<(), StoreError> {
    let ctx = || format!("writing {}", path.display());
    let blob = store.open_blob(digest)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".digestfs-")
        .tempfile_in(dir)
        .map_err(io_err(ctx()))?;
    store.for_each_chunk(&blob, |chunk| tmp.write_all(chunk).map_err(io_err(ctx())))?;
    let mode = if executable { 0o555 } else { 0o444 };
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(ctx()))?;
    tmp.persist(path).map_err(|e| io_err(ctx())(e.error))?;
    Ok(())
}
