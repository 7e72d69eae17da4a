//! Changing views: bind and unbind. A change builds a new namespace and swaps it in whole, under
//! one lock, after checking the trees (every `Directory` present) and the layers (no two give a
//! name different content); a refused change leaves everything as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::namespace::{check_layer, check_owner, NamespaceError, View};
use super::{lock, parse_path, DigestFs, Namespace, Node, PathError, ROOT_INO};
use crate::cas::ReadError;
use crate::store::{Digest, EntryKind};

/// Why a bind or unbind was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("{path} has no layer {layer:?}")]
    NoLayer { path: String, layer: String },
    /// The layer is held by others: an owner may change or unbind only what it holds itself.
    #[error("the layer {layer:?} at {path} is held by {holders}, not by {owner:?}")]
    Held {
        path: String,
        layer: String,
        owner: String,
        holders: String,
    },
    /// A `Directory` of the tree is missing, corrupt or could not be fetched.
    #[error(transparent)]
    Tree(#[from] ReadError),
    #[error(transparent)]
    Conflict(Box<Conflict>),
    /// The mount is being handed to another daemon (a takeover), which takes the views as they
    /// are: try again in a moment, and the other daemon answers.
    #[error("the mount is being handed over to another daemon; retry in a moment")]
    Closed,
}

/// Two layers that give one name different content.
#[derive(Debug, thiserror::Error)]
#[error("conflict at {path}: tree {a} has {a_entry} but tree {b} has {b_entry}")]
pub struct Conflict {
    pub path: String,
    pub a: Digest,
    pub a_entry: String,
    pub b: Digest,
    pub b_entry: String,
}

impl BindError {
    /// The path under the mount root the refusal concerns, if one.
    pub fn path(&self) -> Option<&str> {
        match self {
            BindError::Path(e) if e.what == "bind path" => Some(&e.path),
            BindError::Namespace(e) => Some(e.path()),
            BindError::NoLayer { path, .. } | BindError::Held { path, .. } => Some(path),
            BindError::Conflict(c) => Some(&c.path),
            _ => None,
        }
    }

    /// The digest the refusal concerns, if one.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            BindError::Tree(e) => e.digest(),
            // A conflict names both trees in its message; neither alone is "the" digest.
            _ => None,
        }
    }
}

/// What a bind or unbind changed. The core tells the kernel (through the [`Invalidator`]) to
/// forget exactly these entries; the value says what was done.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Whether the namespace changed at all (a layer can change without changing content).
    pub changed: bool,
    /// `(parent inode, name)` of each directory entry that now means something else.
    pub entries: Vec<(u64, String)>,
}

/// Tells the kernel to drop a cached directory entry; the FUSE front end provides it.
pub trait Invalidator: Send + Sync {
    /// Forget `name` in `parent`, and `parent`'s cached listing and attributes.
    fn invalidate_entry(&self, parent: u64, name: &str);
}

impl DigestFs {
    /// Sets `layer` of the view at `path` to the tree `digest`. With `verify`, every `Directory`
    /// of the tree must be in the store first. Layers that disagree about a name are refused and
    /// nothing changes; binding what is already bound changes nothing.
    pub fn bind(
        &self,
        path: &str,
        layer: &str,
        digest: Digest,
        verify: bool,
    ) -> Result<Change, BindError> {
        self.bind_as(path, layer, digest, verify, None)
    }

    /// [`bind`](Self::bind) on behalf of `owner`, who then holds the layer beside anyone who
    /// holds it already with the same tree. Another tree for a layer that others hold is
    /// refused: only an unbind by each of them (or one without an owner) frees it.
    pub fn bind_as(
        &self,
        path: &str,
        layer: &str,
        digest: Digest,
        verify: bool,
        owner: Option<&str>,
    ) -> Result<Change, BindError> {
        let parts = parse_path(path)?;
        check_layer(layer)?;
        if let Some(o) = owner {
            check_owner(o)?;
        }
        if verify {
            self.verify_tree(&digest)?;
        }
        let _guard = lock(&self.bind_lock);
        if self.binds_closed.load(Ordering::SeqCst) {
            return Err(BindError::Closed);
        }
        let current = self.namespace();
        let mut view = current.view(&parts).cloned().unwrap_or_default();
        let held = view.owners.get(layer).cloned().unwrap_or_default();
        if view.layers.get(layer) == Some(&digest) {
            return Ok(match owner {
                Some(o) if !held.contains(o) => {
                    view.owners
                        .entry(layer.into())
                        .or_default()
                        .insert(o.into());
                    self.keep_owners(&current, &parts, view)?
                }
                _ => Change::default(),
            });
        }
        if let Some(o) = owner {
            if view.layers.contains_key(layer) && held.iter().any(|h| h != o) {
                return Err(held_by(&parts, layer, o, &held));
            }
            view.owners.insert(layer.into(), [o.to_string()].into());
        }
        view.layers.insert(layer.to_string(), digest);
        if let Node::Merged(distinct) = view.node() {
            self.check_merge(&distinct, &parts.join("/"))?;
        }
        let next = current.with_view(&parts, Some(view))?;
        let change = self.swap(&current, next, &parts);
        for watcher in lock(&self.bind_watchers).iter() {
            let _ = watcher.try_send(digest);
        }
        Ok(change)
    }

    /// Removes one layer (or, with `None`, the whole view) at `path`.
    pub fn unbind(&self, path: &str, layer: Option<&str>) -> Result<Change, BindError> {
        self.unbind_as(path, layer, None)
    }

    /// [`unbind`](Self::unbind) on behalf of `owner`: it lets go of the layer (with `None`, of
    /// every layer of the view it holds), which goes once no one holds it. A layer without
    /// owners is anyone's to unbind; one only others hold is refused.
    pub fn unbind_as(
        &self,
        path: &str,
        layer: Option<&str>,
        owner: Option<&str>,
    ) -> Result<Change, BindError> {
        let parts = parse_path(path)?;
        let _guard = lock(&self.bind_lock);
        if self.binds_closed.load(Ordering::SeqCst) {
            return Err(BindError::Closed);
        }
        let current = self.namespace();
        let joined = parts.join("/");
        let mut view = current
            .view(&parts)
            .cloned()
            .ok_or_else(|| NamespaceError::NotBound {
                path: joined.clone(),
            })?;
        let layers: Vec<String> = match layer {
            Some(l) if !view.layers.contains_key(l) => {
                return Err(BindError::NoLayer {
                    path: joined,
                    layer: l.to_string(),
                })
            }
            Some(l) => vec![l.to_string()],
            None => view.layers.keys().cloned().collect(),
        };
        let before = view.layers.len();
        for l in layers {
            let holders = view.owners.remove(&l).unwrap_or_default();
            let rest = match owner {
                Some(o) if holders.contains(o) => holders.into_iter().filter(|h| h != o).collect(),
                // The whole view, as an owner: only what it holds.
                Some(_) if layer.is_none() => {
                    if !holders.is_empty() {
                        view.owners.insert(l, holders);
                    }
                    continue;
                }
                Some(o) if !holders.is_empty() => return Err(held_by(&parts, &l, o, &holders)),
                _ => BTreeSet::new(),
            };
            if rest.is_empty() {
                view.layers.remove(&l);
            } else {
                view.owners.insert(l, rest);
            }
        }
        if view.layers.len() == before {
            return self.keep_owners(&current, &parts, view);
        }
        let next = current.with_view(&parts, (!view.layers.is_empty()).then_some(view))?;
        Ok(self.swap(&current, next, &parts))
    }

    /// Installs a view whose owners alone changed: nothing the kernel caches changes, so nothing
    /// is invalidated; the state keeper still learns of it.
    fn keep_owners(
        &self,
        current: &Namespace,
        parts: &[String],
        view: View,
    ) -> Result<Change, BindError> {
        let next = Arc::new(current.with_view(parts, Some(view))?);
        *self.namespace.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        if let Some(on_change) = self.on_change.get() {
            on_change(&next);
        }
        Ok(Change::default())
    }

    /// Installs `next`, tells the kernel to forget the highest component of `parts` whose
    /// meaning changed, and hands the new namespace to the state keeper.
    fn swap(&self, current: &Namespace, next: Namespace, parts: &[String]) -> Change {
        let mut change = Change {
            changed: true,
            entries: Vec::new(),
        };
        let mut parent_path = String::new();
        let mut parent_ino = ROOT_INO;
        for (depth, name) in parts.iter().enumerate() {
            let old = current
                .children(&parent_path)
                .and_then(|c| c.into_iter().find(|(n, _)| n == name));
            let new = next
                .children(&parent_path)
                .and_then(|c| c.into_iter().find(|(n, _)| n == name));
            if old != new || depth + 1 == parts.len() {
                if old != new {
                    change.entries.push((parent_ino, name.clone()));
                }
                break;
            }
            parent_path = parts[..=depth].join("/");
            parent_ino = lock(&self.inodes).ino_of(&Node::Namespace(parent_path.as_str().into()));
        }
        let next = Arc::new(next);
        *self.namespace.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        if let Some(inv) = self.invalidator.get() {
            for (parent, name) in &change.entries {
                inv.invalidate_entry(*parent, name);
            }
        }
        if let Some(on_change) = self.on_change.get() {
            on_change(&next);
        }
        change
    }

    /// Checks that every `Directory` of the tree is present and valid (fetching what is
    /// missing from a remote CAS).
    pub fn verify_tree(&self, root: &Digest) -> Result<(), ReadError> {
        let errors = self.cas.walk_directories(&[*root], &mut |_, _| {
            self.stats.verified_dirs.fetch_add(1, Ordering::Relaxed);
        });
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Refuses layers that give one name different content, naming the path and both digests.
    /// Iterative: directories present in several layers are compared level by level, each
    /// remembered as (parent, name) so a deep merge costs one entry per directory.
    fn check_merge(&self, layers: &[Digest], path: &str) -> Result<(), BindError> {
        let mut names: Vec<(usize, String)> = vec![(usize::MAX, path.to_string())];
        let full_path = |names: &[(usize, String)], mut at: usize| {
            let mut parts = Vec::new();
            while at != usize::MAX {
                parts.push(names[at].1.as_str());
                at = names[at].0;
            }
            parts.reverse();
            parts.join("/")
        };
        let mut todo: Vec<(usize, Vec<Digest>)> = vec![(0, layers.to_vec())];
        while let Some((at, layers)) = todo.pop() {
            let mut seen: BTreeMap<String, (Digest, EntryKind)> = BTreeMap::new();
            let mut subdirs: BTreeMap<String, Vec<Digest>> = BTreeMap::new();
            for layer in &layers {
                for e in self.cas.load_directory(layer)?.entries {
                    match seen.get(&e.name) {
                        None => {
                            if let EntryKind::Dir(d) = e.kind {
                                subdirs.entry(e.name.clone()).or_default().push(d);
                            }
                            seen.insert(e.name, (*layer, e.kind));
                        }
                        Some((_, kind)) if *kind == e.kind => {}
                        Some((_, EntryKind::Dir(_))) if matches!(e.kind, EntryKind::Dir(_)) => {
                            if let EntryKind::Dir(d) = e.kind {
                                subdirs.entry(e.name).or_default().push(d);
                            }
                        }
                        Some((other, kind)) => {
                            return Err(BindError::Conflict(Box::new(Conflict {
                                path: format!("{}/{}", full_path(&names, at), e.name),
                                a: *other,
                                a_entry: describe(kind),
                                b: *layer,
                                b_entry: describe(&e.kind),
                            })));
                        }
                    }
                }
            }
            for (name, mut ds) in subdirs {
                ds.sort();
                ds.dedup();
                if ds.len() > 1 {
                    names.push((at, name));
                    todo.push((names.len() - 1, ds));
                }
            }
        }
        Ok(())
    }
}

fn held_by(parts: &[String], layer: &str, owner: &str, holders: &BTreeSet<String>) -> BindError {
    BindError::Held {
        path: parts.join("/"),
        layer: layer.to_string(),
        owner: owner.to_string(),
        holders: holders
            .iter()
            .map(|h| format!("{h:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn describe(kind: &EntryKind) -> String {
    match kind {
        EntryKind::File {
            digest,
            executable: true,
        } => format!("executable file {digest}"),
        EntryKind::File { digest, .. } => format!("file {digest}"),
        EntryKind::Dir(d) => format!("directory {d}"),
        EntryKind::Symlink(t) => format!("symlink to {t:?}"),
    }
}
