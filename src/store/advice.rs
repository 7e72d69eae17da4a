//! Page-cache advice on large blobs' store files, after each read. Measured by
//! `scripts/bench --scale` (README, "At scale"); `DIGESTFS_STORE_ADVICE` picks another policy
//! for such measurements: `none`, `willneed` (ask the kernel to read the next window now, so the
//! disk works while the reader is served), `dontneed` (drop what was served from the store
//! file's cache: the FUSE page cache holds it too), or `willneed,dontneed`.

use std::fs::File;
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Advice {
    willneed: bool,
    dontneed: bool,
}

fn advice() -> Advice {
    static ADVICE: OnceLock<Advice> = OnceLock::new();
    *ADVICE.get_or_init(|| {
        let spec = std::env::var("DIGESTFS_STORE_ADVICE").unwrap_or_else(|_| "willneed".into());
        let has = |word| spec.split(',').any(|w| w.trim() == word);
        Advice {
            willneed: has("willneed"),
            dontneed: has("dontneed"),
        }
    })
}

/// After `len` bytes at `offset` of a blob of `size` bytes were read from `file`.
pub(super) fn after_read(file: &File, offset: u64, len: usize, size: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let a = advice();
        let fd = file.as_raw_fd();
        let end = offset + len as u64;
        // Advice only: failures change nothing.
        if a.willneed && end < size {
            // The next window, as large as this read and at least 1 MiB.
            let window = (len as u64).max(1 << 20).min(size - end);
            unsafe {
                libc::posix_fadvise(fd, end as i64, window as i64, libc::POSIX_FADV_WILLNEED)
            };
        }
        if a.dontneed {
            unsafe {
                libc::posix_fadvise(fd, offset as i64, len as i64, libc::POSIX_FADV_DONTNEED)
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len, size);
}
