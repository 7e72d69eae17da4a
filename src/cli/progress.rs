//! Progress bars for long operations, drawn on stderr only when it is a terminal (indicatif
//! hides them otherwise, so piped and scripted runs stay quiet).

use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cas::{Cas, ReadError};
use crate::store::{Digest, EntryKind};

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

/// Runs `work` while a spinner on a terminal shows how far `poll` (a counter kept elsewhere, such
/// as the daemon's) has moved since it started. Nothing is polled or drawn when stderr is not a
/// terminal.
pub fn counting<T>(
    what: &str,
    unit: &str,
    poll: impl Fn() -> Option<u64> + Sync,
    work: impl FnOnce() -> T,
) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return work();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(&format!("{{spinner}} {{msg}}: {{pos}} {unit}"))
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar.tick();
    let start = poll().unwrap_or(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(n) = poll() {
                    bar.set_position(n.saturating_sub(start));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let out = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    });
    bar.finish_and_clear();
    out
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
pub fn tree_size(cas: &Cas, root: &Digest) -> Option<u64> {
    let mut total = 0;
    cas.walk_paths::<ReadError>(root, &mut |_, kind| {
        if let EntryKind::File { digest, .. } = kind {
            total += digest.size;
        }
        Ok(())
    })
    .ok()?;
    Some(total)
}
