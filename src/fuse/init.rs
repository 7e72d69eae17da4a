//! What digestfs asks of the kernel at INIT. fuser mounts and performs the INIT handshake, calling
//! [`Init`] to fill in its answer; it serves nothing else (`dev.rs` and `uring` answer every
//! request after INIT).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::{Filesystem, InitFlags, KernelConfig, Request};

use super::backing::Backings;
use super::{Passthrough, Transport};

/// Largest read request the kernel may send (256 pages).
pub const MAX_READ: u32 = 1 << 20;

/// The filesystem fuser is given: it answers INIT and nothing else, since fuser's loop never
/// runs.
pub struct Init {
    passthrough: Passthrough,
    /// Told at INIT whether passthrough is on.
    backings: Arc<Backings>,
    transport: Transport,
    /// Set at INIT when the kernel agreed to FUSE over io_uring.
    ring_granted: Arc<AtomicBool>,
}

impl Init {
    /// `transport` is what to ask the kernel for at INIT; `ring_granted` says whether it
    /// agreed, `backings` whether passthrough is on.
    pub fn new(
        passthrough: Passthrough,
        backings: Arc<Backings>,
        transport: Transport,
        ring_granted: Arc<AtomicBool>,
    ) -> Init {
        Init {
            passthrough,
            backings,
            transport,
            ring_granted,
        }
    }
}

impl Filesystem for Init {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Readdirplus for every chunk of a listing: with FUSE_READDIRPLUS_AUTO the kernel asks
        // for attributes in the first chunk only, and a `stat` of each later entry is a lookup
        // (a cold `find -exec stat` of 20,000 files: 3.1–4.7× native, against 0.8–0.9× without).
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
        ] {
            if config.add_capabilities(cap).is_err() {
                log::debug!("kernel lacks {cap:?}");
            }
        }
        if self.transport != Transport::Dev {
            let granted = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            if !granted && self.transport == Transport::IoUring {
                return Err(std::io::Error::other(
                    "--transport io-uring: the kernel does not offer FUSE over io_uring (Linux 6.14+, with /sys/module/fuse/parameters/enable_uring set to Y by root)",
                ));
            }
            self.ring_granted.store(granted, Ordering::SeqCst);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        if let Err(nearest) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_write(MAX_READ);
        if self.passthrough != Passthrough::Off {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
                && unsafe { libc::geteuid() } == 0;
            if !ok && self.passthrough == Passthrough::On {
                return Err(std::io::Error::other(
                    "--passthrough on: the kernel does not offer FUSE passthrough (Linux 6.9+) or the daemon lacks CAP_SYS_ADMIN",
                ));
            }
            self.backings.set_agreed(ok);
            log::info!(
                "FUSE passthrough for large blobs: {}",
                if ok { "on" } else { "off" }
            );
        }
        Ok(())
    }
}
