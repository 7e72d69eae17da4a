//! digestfs: read-only views over the Pants local store, served by FUSE (or NFS).
//!
//! - [`store`]: the Pants store format, read and written; nothing else.
//! - [`remote`]: a REAPI CAS client, fetching what the local store lacks into it, verified.
//! - [`cas`]: what the core reads: the local store, with the remote behind it.
//! - [`fs`]: the filesystem core (namespace, views, inodes, attributes, reads) as plain functions.
//! - [`fuse`]: the FUSE front end (Linux, feature `fuse`): mounting and INIT through `fuser`,
//!   the requests a view answers, the /dev/fuse and io_uring transports, takeover.
//! - [`nfs`]: the NFSv3 front end (macOS's way in; any NFSv3 client).
//! - [`lease`]: keeping bound trees alive against Pants' garbage collection.
//! - [`control`]: the control socket the build daemon binds views through, and the state file.
//! - [`materialize`]: copying a tree out, where no mount is possible.
//! - [`os`]: what differs between operating systems.
//! - [`systemd`]: what a daemon says to systemd and asks of it, when a unit runs it.
//! - [`cli`]: the command line.

pub mod cas;
pub mod cli;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod lease;
pub mod materialize;
pub mod metrics;
pub mod nfs;
pub mod os;
pub mod remote;
pub mod store;
pub mod systemd;
