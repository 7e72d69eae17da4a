//! digestfs: a read-only FUSE view over the Pants local store.
//!
//! - [`store`]: the Pants store format, read and written; no FUSE types.
//! - [`fs`]: the filesystem core (namespace, views, inodes, attributes, reads) as plain functions.
//! - [`fuse`]: the thin `fuser` adapter and the mount lifecycle.
//! - [`lease`]: keeping bound trees alive against Pants' garbage collection.
//! - [`remote`]: fetching blobs the local store lacks from a remote REAPI CAS.
//! - [`control`]: the control socket the build daemon binds views through.
//! - [`cli`]: the command line.

pub mod cli;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod lease;
pub mod remote;
pub mod store;
