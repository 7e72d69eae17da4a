//! The FUSE front end (Linux, cargo feature `fuse`): the thin `fuser` adapter and the FUSE
//! session. Elsewhere only the option types below are compiled, so the command line is the same
//! on every platform; `crate::nfs` is the front end there.

#[cfg(all(feature = "fuse", target_os = "linux"))]
mod adapter;
#[cfg(all(feature = "fuse", target_os = "linux"))]
mod backing;
#[cfg(all(feature = "fuse", target_os = "linux"))]
pub mod mount;

#[cfg(all(feature = "fuse", target_os = "linux"))]
pub use adapter::FuseAdapter;

/// Whether this build has the FUSE front end.
pub const AVAILABLE: bool = cfg!(all(feature = "fuse", target_os = "linux"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Passthrough {
    /// Use passthrough for large blobs when the kernel and privileges allow it.
    Auto,
    /// Require passthrough; the mount fails without it.
    On,
    /// Serve every read through the daemon.
    Off,
}
