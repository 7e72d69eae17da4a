//! Keeping the mount across `systemctl restart` of its unit, which stops the daemon before it
//! starts the next one, so [`super::takeover`]'s conversation has nobody to talk to. Instead:
//! - while it serves, the daemon keeps its /dev/fuse connection in the unit's fd store
//!   ([`keep_connection`]): the connection lives as long as systemd holds it;
//! - told to stop (SIGTERM) while a restart job runs for its unit, it stops between requests
//!   as for a takeover, leaves the [`Handover`] (inodes, views digest) in the store too
//!   ([`park`]), and exits without unmounting. Requests made meanwhile wait in the kernel;
//! - the next daemon finds both among the fds systemd gives it ([`unpark`]), checks that they
//!   are this mount's, and serves the connection as a taken-over one. A connection without a
//!   handover (the daemon before crashed) is let go, so the kernel ends it, and the new daemon
//!   mounts afresh.
//!
//! A plain stop (no restart job) unmounts, as before.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::takeover::{freeze, Handover, Kept, Serves, Taken, FORMAT};
use crate::fs::DigestFs;
use crate::os::{self, MountId};
use crate::systemd;

/// The names the fds go by in the store (`FDNAME`).
const CONNECTION: &str = "digestfs-fuse";
const HANDOVER: &str = "digestfs-handover";

/// What the stopping daemon leaves beside the connection.
#[derive(Serialize, Deserialize)]
struct Parked {
    serves: Serves,
    handover: Handover,
}

/// Under a unit, puts the connection in its fd store, so that it outlives this process.
pub fn keep_connection(fuse: BorrowedFd<'_>) {
    if !systemd::under_unit() {
        log::warn!("--fd-store: systemd does not run this daemon (no NOTIFY_SOCKET); ignored");
        return;
    }
    match systemd::store_fd(CONNECTION, fuse) {
        Ok(()) => log::debug!("the FUSE connection is in systemd's fd store"),
        Err(e) => log::warn!(
            "could not keep the FUSE connection in systemd's fd store ({e}): a restart of the unit will unmount"
        ),
    }
}

/// Takes the connection out of the unit's store: the daemon that kept it there died without
/// leaving it to the next one (its watcher calls this), and only then does the kernel end it
/// for the readers still waiting on it.
pub fn forget_connection() {
    systemd::remove_stored(CONNECTION);
}

/// Leaves the mount served by `dev` on `fuse` to the unit's next daemon. `Ok` once the
/// handover is in the store: the caller exits at once without unmounting.
pub fn park(
    dev: &super::dev::DevLoop,
    fuse: BorrowedFd<'_>,
    core: &DigestFs,
    serves: &Serves,
    max_payload: usize,
) -> Result<(), Kept> {
    let handover = freeze(dev, core, &serves.mountpoint, max_payload)?;
    let stored = (|| {
        let parked = Parked {
            serves: serves.clone(),
            handover,
        };
        let mut file = memfd(HANDOVER)?;
        // One write: the readers wait meanwhile.
        file.write_all(&serde_json::to_vec(&parked).map_err(std::io::Error::other)?)?;
        // Stored again in case it did not take at the start; systemd keeps one copy.
        systemd::store_fd(CONNECTION, fuse)?;
        systemd::store_fd(HANDOVER, file.as_fd())
    })();
    stored.map_err(|e| {
        core.close_binds(false);
        Kept::Stopped(format!("leaving the mount in systemd's fd store: {e}"))
    })
}

/// The mount the unit's daemon before this one left ([`park`]), if it is `serves`' and still
/// mounted. Anything else systemd kept is let go.
pub fn unpark(serves: &Serves) -> Option<Taken> {
    let mut fuse = None;
    let mut handover = None;
    for (name, fd) in systemd::take_listen_fds() {
        match name.as_str() {
            CONNECTION => fuse = Some(fd),
            HANDOVER => handover = Some(fd),
            // Not ours, or a later version's: out of the store, which has room for ours only.
            _ => {
                log::warn!("ignoring the fd {name:?} systemd passed");
                systemd::remove_stored(&name);
            }
        }
    }
    if handover.is_some() {
        // Good for this start only: a later one (after a crash) must not find it.
        systemd::remove_stored(HANDOVER);
    }
    let fuse = fuse?;
    let why_not = match handover.map(|fd| read_parked(fd, serves)) {
        Some(Ok(handover)) => return Some(Taken::stored(fuse, handover)),
        Some(Err(why)) => why,
        None => "the daemon before this one ended without leaving a handover (it crashed, or \
                 was killed)"
            .to_string(),
    };
    log::warn!(
        "not taking the FUSE connection systemd kept for {}: {why_not}; mounting afresh",
        serves.mountpoint.display()
    );
    // Once systemd lets go of its copy too, the kernel ends the connection: whatever still
    // waits on it gets an error, not a hang.
    systemd::remove_stored(CONNECTION);
    None
}

/// Ends the mount with device `dev` that [`unpark`] found, which this daemon could not serve
/// after all: aborted (its readers get errors) and detached, so that it can be mounted afresh.
pub fn let_go(dev: u64, mountpoint: &Path) {
    log::warn!("ending the mount systemd kept at {}", mountpoint.display());
    if let Err(e) = os::abort_fuse_device(dev) {
        log::warn!(
            "aborting the FUSE connection of {}: {e}",
            mountpoint.display()
        );
    }
    if os::is_attached(mountpoint, MountId::Device(dev)).unwrap_or(false) {
        if let Err(e) = os::unmount(mountpoint, true) {
            log::error!("detaching {}: {e}", mountpoint.display());
        }
    }
    systemd::remove_stored(CONNECTION);
}

fn read_parked(fd: OwnedFd, serves: &Serves) -> Result<Handover, String> {
    let mut file = std::fs::File::from(fd);
    let mut text = String::new();
    file.rewind()
        .and_then(|_| file.read_to_string(&mut text))
        .map_err(|e| format!("reading its handover: {e}"))?;
    let parked: Parked =
        serde_json::from_str(&text).map_err(|e| format!("its handover is unreadable: {e}"))?;
    let h = parked.handover;
    if h.format != FORMAT {
        return Err(format!(
            "digestfs {} left it in format {}, not {FORMAT}",
            h.version, h.format
        ));
    }
    if parked.serves != *serves {
        return Err(format!(
            "it served {} from the store {}, not {} from {}",
            parked.serves.mountpoint.display(),
            parked.serves.store.display(),
            serves.mountpoint.display(),
            serves.store.display()
        ));
    }
    match os::fuse_device_at(&serves.mountpoint) {
        Ok(dev) if dev == h.device => Ok(h),
        _ => Err(format!(
            "its mount is no longer at {}",
            serves.mountpoint.display()
        )),
    }
}

/// An anonymous file in memory, which the store can hold past this process.
fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a valid C string; the fd returned is new and owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}
