//! Copying a tree out of the store: the fallback where no mount is possible, and the baseline the
//! benchmarks compare against. Every file and symlink is written under a temporary name and
//! renamed into place, so concurrent runs into one destination never fail on each other and
//! never expose a partial or wrongly-moded file. The walk is iterative (trees are data, and may
//! be deeper than the call stack), and a path longer than the OS accepts is one clear error.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cas::{Cas, ReadError};
use crate::store::{Digest, EntryKind, StoreError, PATH_MAX};

fn io_err(context: String) -> impl FnOnce(io::Error) -> ReadError {
    move |source| StoreError::Io { context, source }.into()
}

/// Materializes the tree `digest` into `dest`, creating it if needed, calling `progress` with
/// the size of each file once it is written. Returns the number of files written.
pub fn materialize(
    cas: &Cas,
    digest: &Digest,
    dest: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, ReadError> {
    make_dir(dest)?;
    let mut files = 0;
    // (directory digest, where it goes, its depth below `dest`)
    let mut todo: Vec<(Digest, PathBuf, usize)> = vec![(*digest, dest.to_path_buf(), 0)];
    while let Some((tree, dir, depth)) = todo.pop() {
        let listing = cas.load_directory(&tree)?;
        for entry in &listing.entries {
            let path = dir.join(&entry.name);
            if path.as_os_str().len() >= PATH_MAX {
                return Err(StoreError::TooDeep {
                    depth: depth + 1,
                    max: PATH_MAX - 1,
                }
                .into());
            }
            match &entry.kind {
                EntryKind::Dir(sub) => {
                    make_dir(&path)?;
                    todo.push((*sub, path, depth + 1));
                }
                EntryKind::File { digest, executable } => {
                    write_file(cas, digest, *executable, &dir, &path)?;
                    files += 1;
                    progress(digest.size);
                }
                EntryKind::Symlink(target) => {
                    let ctx = || format!("writing {}", path.display());
                    let tmp = tempfile::Builder::new()
                        .prefix(".digestfs-")
                        .make_in(&dir, |p| std::os::unix::fs::symlink(target, p))
                        .map_err(io_err(ctx()))?;
                    tmp.persist(&path).map_err(|e| io_err(ctx())(e.error))?;
                }
            }
        }
    }
    Ok(files)
}

fn make_dir(path: &Path) -> Result<(), ReadError> {
    match fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(io_err(format!("creating {}", path.display()))(e)),
    }
}

fn write_file(
    cas: &Cas,
    digest: &Digest,
    executable: bool,
    dir: &Path,
    path: &Path,
) -> Result<(), ReadError> {
    let ctx = || format!("writing {}", path.display());
    let blob = cas.open_blob(digest)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".digestfs-")
        .tempfile_in(dir)
        .map_err(io_err(ctx()))?;
    cas.for_each_chunk(&blob, |chunk| tmp.write_all(chunk).map_err(io_err(ctx())))?;
    let mode = if executable { 0o555 } else { 0o444 };
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(ctx()))?;
    tmp.persist(path).map_err(|e| io_err(ctx())(e.error))?;
    Ok(())
}
