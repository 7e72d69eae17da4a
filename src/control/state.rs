//! The daemon's views, kept in a file beside its control socket (`<socket stem>.views.json`) so
//! that a daemon started again for the same mountpoint, after a crash or `kill -9`, restores
//! them before it answers. Rewritten atomically (a temporary file renamed over it) on every bind
//! and unbind; removed when the daemon exits cleanly, since an unmount ends the views too.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs::{DigestFs, Namespace};
use crate::store::Digest;

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    v: u32,
    mountpoint: PathBuf,
    store: PathBuf,
    views: Vec<SavedView>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedView {
    path: String,
    layers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    owners: BTreeMap<String, Vec<String>>,
}

/// The views of `ns` as the file keeps them, in path order.
fn saved_views(ns: &Namespace) -> Vec<SavedView> {
    ns.views()
        .into_iter()
        .map(|(path, view)| SavedView {
            path,
            layers: view.layer_digests(),
            owners: view.holder_lists(),
        })
        .collect()
}

/// A digest of the views of `ns` (paths, layers, trees and holders): two daemons that serve the
/// same views give the same text, which a takeover checks.
pub fn views_digest(ns: &Namespace) -> String {
    use sha2::Digest as _;
    let json = serde_json::to_vec(&saved_views(ns)).expect("views serialise");
    hex::encode(sha2::Sha256::digest(json))
}

/// Where the views of the daemon behind `socket` are kept.
pub fn state_path(socket: &Path) -> PathBuf {
    socket.with_extension("views.json")
}

/// Keeps the views of one mount on disk.
pub struct StateKeeper {
    path: PathBuf,
    mountpoint: PathBuf,
    store: PathBuf,
}

/// What a restore did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub views: usize,
    pub dropped: usize,
}

impl StateKeeper {
    pub fn new(path: PathBuf, mountpoint: PathBuf, store: PathBuf) -> StateKeeper {
        StateKeeper {
            path,
            mountpoint,
            store,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the views of `ns`, atomically.
    pub fn save(&self, ns: &Namespace) -> io::Result<()> {
        let state = StateFile {
            v: VERSION,
            mountpoint: self.mountpoint.clone(),
            store: self.store.clone(),
            views: saved_views(ns),
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".views-")
            .tempfile_in(dir)?;
        serde_json::to_writer(&mut tmp, &state)?;
        tmp.as_file_mut().write_all(b"\n")?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Binds the views a previous daemon of this mountpoint and store left, each checked as any
    /// bind is. A view that can no longer be bound (a tree gone from the store, say) is dropped
    /// and logged; nothing here is fatal.
    pub fn restore(&self, core: &DigestFs) -> Restored {
        self.restore_checked(core, true)
    }

    /// [`StateKeeper::restore`], checking every tree is in the store only with `verify` (a
    /// takeover's views were checked by the daemon that bound them, and the mount waits).
    pub fn restore_checked(&self, core: &DigestFs, verify: bool) -> Restored {
        let mut done = Restored::default();
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return done,
            Err(e) => {
                log::warn!("not restoring views: reading {}: {e}", self.path.display());
                return done;
            }
        };
        let state: StateFile = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                log::warn!(
                    "not restoring views: {} is unreadable: {e}",
                    self.path.display()
                );
                return done;
            }
        };
        if state.v != VERSION || state.mountpoint != self.mountpoint || state.store != self.store {
            log::warn!(
                "not restoring views from {}: they were for {} over the store {}",
                self.path.display(),
                state.mountpoint.display(),
                state.store.display()
            );
            return done;
        }
        for view in state.views {
            let bound = view.layers.iter().try_for_each(|(layer, digest)| {
                let d: Digest = digest.parse().map_err(|e| format!("layer {layer}: {e}"))?;
                let owners = view
                    .owners
                    .get(layer)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let bind = |owner: Option<&str>| {
                    core.bind_as(&view.path, layer, d, verify, owner)
                        .map(drop)
                        .map_err(|e| format!("layer {layer}: {e}"))
                };
                match owners {
                    [] => bind(None),
                    _ => owners.iter().try_for_each(|o| bind(Some(o))),
                }
            });
            match bound {
                Ok(()) => done.views += 1,
                Err(e) => {
                    let _ = core.unbind(&view.path, None);
                    log::warn!("dropped the view at {} on restoring it: {e}", view.path);
                    done.dropped += 1;
                }
            }
        }
        if done.views + done.dropped > 0 {
            log::info!(
                "restored {} views from {} ({} dropped)",
                done.views,
                self.path.display(),
                done.dropped
            );
        }
        done
    }

    /// Forgets the views (on a clean exit).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("removing {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cas::Cas;
    use crate::fs::FsConfig;
    use crate::store::{Importer, Store};

    #[test]
    fn views_round_trip_and_unbindable_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path().join("store")).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.jar"), b"a").unwrap();
        let tree = Importer::new(&store).import_path(&src).unwrap();
        let core =
            |store: &Store| DigestFs::new(Arc::new(Cas::local(store.clone())), FsConfig::default());
        let keeper = StateKeeper::new(
            dir.path().join("x.views.json"),
            "/mnt".into(),
            store.root().to_path_buf(),
        );
        let first = core(&store);
        first.bind("r/lib", "modules.a", tree, true).unwrap();
        first.bind("r/lib", "sources.a", tree, true).unwrap();
        for owner in ["bsp-1", "bsp-2"] {
            first
                .bind_as("r/lib", "write.x", tree, true, Some(owner))
                .unwrap();
        }
        let gone = Digest::of_bytes(b"a tree nobody stored");
        first.bind("r/plugins", "scalac.a", gone, false).unwrap();
        keeper.save(&first.namespace()).unwrap();

        let second = core(&store);
        assert_eq!(
            keeper.restore(&second),
            Restored {
                views: 1,
                dropped: 1
            }
        );
        // What a takeover compares: the same views give the same digest, whoever serves them.
        // Restored unchecked (as a takeover does), the view of a missing tree stays.
        let digest = |core: &DigestFs| views_digest(&core.namespace());
        let kept = core(&store);
        keeper.restore_checked(&kept, false);
        assert_eq!(digest(&kept), digest(&first));
        assert_ne!(digest(&second), digest(&first));
        kept.unbind_as("r/lib", Some("write.x"), Some("bsp-1"))
            .unwrap();
        assert_ne!(digest(&kept), digest(&first));
        let views = second.namespace();
        let views = views.views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].0, "r/lib");
        assert_eq!(views[0].1.layers.len(), 3);
        assert_eq!(
            views[0].1.owners["write.x"],
            ["bsp-1".to_string(), "bsp-2".to_string()].into()
        );

        // Another store's views are not restored.
        let other = StateKeeper::new(
            keeper.path().to_path_buf(),
            "/mnt".into(),
            "/elsewhere".into(),
        );
        assert_eq!(other.restore(&core(&store)), Restored::default());
        keeper.remove();
        assert_eq!(keeper.restore(&core(&store)), Restored::default());
    }
}
