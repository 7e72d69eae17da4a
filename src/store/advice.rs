//! Page-cache advice on large blobs' store files. Measured by `scripts/bench --scale` (README,
//! "At scale"): an IDE reads jars out of order (the central directory at the end, then a few
//! entries), and readahead on the store file then reads, and caches, much that nobody asked
//! for, on top of what FUSE itself reads ahead and caches. `DIGESTFS_STORE_ADVICE` picks
//! another policy for such measurements, a comma-separated list of: `sequential` (a larger
//! readahead window from the open), `willneed` (ask for the window after each read at once),
//! `dontneed` (drop what was served from the store file's cache: FUSE's holds it), `random`
//! (no readahead on the store file at all), or `none`.

use std::fs::File;
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Advice {
    sequential: bool,
    random: bool,
    willneed: bool,
    dontneed: bool,
}

/// The default: no readahead on the store file. The requests it serves are already as large
/// as FUSE's own readahead made them; reading ahead of them again cached a fifth more for 8 IDE
/// readers, at no gain in time, and cost a sequential reader nothing measurable.
const DEFAULT: &str = "random";

fn advice() -> Advice {
    static ADVICE: OnceLock<Advice> = OnceLock::new();
    *ADVICE.get_or_init(|| {
        let spec = std::env::var("DIGESTFS_STORE_ADVICE").unwrap_or_else(|_| DEFAULT.into());
        let has = |word| spec.split(',').any(|w| w.trim() == word);
        Advice {
            sequential: has("sequential"),
            random: has("random"),
            willneed: has("willneed"),
            dontneed: has("dontneed"),
        }
    })
}

#[cfg(target_os = "linux")]
fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // Advice only: failure changes nothing.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, advice) };
}

/// When a large blob's store file is opened.
pub(super) fn on_open(file: &File) {
    #[cfg(target_os = "linux")]
    {
        let a = advice();
        if a.sequential {
            fadvise(file, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        if a.random {
            fadvise(file, 0, 0, libc::POSIX_FADV_RANDOM);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// After `len` bytes at `offset` of a blob of `size` bytes were read from `file`.
pub(super) fn after_read(file: &File, offset: u64, len: usize, size: u64) {
    #[cfg(target_os = "linux")]
    {
        let a = advice();
        let end = offset + len as u64;
        if a.willneed && end < size {
            // The next window, as large as this read and at least 1 MiB.
            let window = (len as u64).max(1 << 20).min(size - end);
            fadvise(file, end, window, libc::POSIX_FADV_WILLNEED);
        }
        if a.dontneed {
            fadvise(file, offset, len as u64, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len, size);
}
