//! Progress bars for long operations, drawn on stderr only when it is a terminal (indicatif
//! hides them otherwise, so piped and scripted runs stay quiet).

use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::{Digest, EntryKind, Store};

/// A bar counting bytes towards `total()` (a spinner when the total is unknown). The total is
/// computed only when the bar will be seen.
pub fn bytes(total: impl FnOnce() -> Option<u64>, what: &'static str) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let total = total();
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}"
    } else {
        "{spinner} {msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}

/// Bytes in the regular files under `path` (or of `path` itself); `None` if it cannot be read.
pub fn disk_size(path: &Path) -> Option<u64> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_dir() {
        return Some(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path).ok()? {
        let entry = entry.ok()?;
        let kind = entry.file_type().ok()?;
        if kind.is_dir() {
            total += disk_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata().ok()?.len();
        }
    }
    Some(total)
}

/// Bytes in the files of a tree, from its `Directory` protos alone.
pub fn tree_size(store: &Store, root: &Digest) -> Option<u64> {
    let mut total = 0;
    store
        .walk(root, &mut |_, kind| {
            if let EntryKind::File { digest, .. } = kind {
                total += digest.size;
            }
            Ok(())
        })
        .ok()?;
    Some(total)
}
