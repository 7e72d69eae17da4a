//! What is bound where: a tree of path components whose leaves are views. A view is the union
//! of one or more layers, each a `Directory` digest (one layer per BSP group, say). A
//! `Namespace` value is immutable once built; a bind builds a new one and swaps it in whole, so a
//! reader sees the old namespace or the new one, never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::inode::Node;
use crate::store::{check_name, Digest, PATH_MAX};

/// The reserved top-level name of the content-addressed area.
pub const CONTENT_DIR: &str = ".digestfs";
pub const DEFAULT_LAYER: &str = "default";
/// Layer names are opaque keys (a BSP target address such as `src/jvm:lib` is fine), bounded.
pub const LAYER_MAX: usize = 1024;

/// A bind path or layer name that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {path:?}: {reason}")]
pub struct PathError {
    pub what: &'static str,
    pub path: String,
    pub reason: String,
}

/// A change the namespace cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("{path} already holds bound views below it")]
    ViewsBelow { path: String },
    #[error("{path} is inside the view bound at {view}")]
    InsideView { path: String, view: String },
    #[error("nothing is bound at {path}")]
    NotBound { path: String },
}

impl NamespaceError {
    pub fn path(&self) -> &str {
        match self {
            NamespaceError::ViewsBelow { path }
            | NamespaceError::InsideView { path, .. }
            | NamespaceError::NotBound { path } => path,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub layers: BTreeMap<String, Digest>,
    /// Who holds each layer (absent: no one in particular). Several clients that bind the same
    /// content as the same layer each hold it; it goes when the last lets go, so that none of
    /// them unbinds what another still serves.
    pub owners: BTreeMap<String, BTreeSet<String>>,
}

impl View {
    /// The node this view shows: one distinct digest is that `Directory` itself (so it shares its
    /// inode with every other place the digest appears); several are their union.
    pub fn node(&self) -> Node {
        Node::merged(self.layers.values().copied().collect())
    }

    /// Each layer's digest, as text (`views` replies and the views file).
    pub fn layer_digests(&self) -> BTreeMap<String, String> {
        let text = |(l, d): (&String, &Digest)| (l.clone(), d.to_string());
        self.layers.iter().map(text).collect()
    }

    /// Each held layer's holders, in order (`views` replies and the views file).
    pub fn holder_lists(&self) -> BTreeMap<String, Vec<String>> {
        let list = |(l, o): (&String, &BTreeSet<String>)| (l.clone(), o.iter().cloned().collect());
        self.owners.iter().map(list).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Dir(BTreeMap<String, Entry>),
    View(View),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    root: BTreeMap<String, Entry>,
}

/// Splits and checks a bind path such as `jvm-default/lib`.
pub fn parse_path(path: &str) -> Result<Vec<String>, PathError> {
    let fail = |reason: String| PathError {
        what: "bind path",
        path: path.to_string(),
        reason,
    };
    if path.starts_with('/') {
        return Err(fail("it must be relative to the mount root".into()));
    }
    if path.len() >= PATH_MAX {
        return Err(fail(format!("it is longer than {} bytes", PATH_MAX - 1)));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(fail("it is empty".into()));
    }
    for p in &parts {
        check_name(p).map_err(|reason| fail(format!("component {p:?}: {reason}")))?;
    }
    if parts[0] == CONTENT_DIR {
        return Err(fail(format!("{CONTENT_DIR} is reserved")));
    }
    Ok(parts.into_iter().map(String::from).collect())
}

/// Checks a layer name: any non-empty text up to [`LAYER_MAX`] bytes without NUL.
pub fn check_layer(layer: &str) -> Result<(), PathError> {
    check_label("layer name", layer)
}

/// Checks the name of a layer's owner: the same rules as a layer name.
pub fn check_owner(owner: &str) -> Result<(), PathError> {
    check_label("owner", owner)
}

fn check_label(what: &'static str, text: &str) -> Result<(), PathError> {
    let reason = if text.is_empty() {
        "it is empty".to_string()
    } else if text.len() > LAYER_MAX {
        format!("it is longer than {LAYER_MAX} bytes")
    } else if text.contains('\0') {
        "it contains NUL".to_string()
    } else {
        return Ok(());
    };
    Err(PathError {
        what,
        path: text.to_string(),
        reason,
    })
}

fn join(parts: &[String]) -> String {
    parts.join("/")
}

impl Namespace {
    /// The view at `path`, if one is bound exactly there.
    pub fn view(&self, parts: &[String]) -> Option<&View> {
        let (last, dirs) = parts.split_last()?;
        let mut map = &self.root;
        for d in dirs {
            match map.get(d)? {
                Entry::Dir(m) => map = m,
                Entry::View(_) => return None,
            }
        }
        match map.get(last)? {
            Entry::View(v) => Some(v),
            Entry::Dir(_) => None,
        }
    }

    /// Returns a namespace in which `path` shows `view` (or nothing, for `None`). A view cannot
    /// sit above or below another one.
    pub fn with_view(
        &self,
        parts: &[String],
        view: Option<View>,
    ) -> Result<Namespace, NamespaceError> {
        fn go(
            map: &mut BTreeMap<String, Entry>,
            parts: &[String],
            depth: usize,
            view: Option<View>,
        ) -> Result<(), NamespaceError> {
            let name = &parts[depth];
            let not_bound = || NamespaceError::NotBound { path: join(parts) };
            if depth + 1 == parts.len() {
                match (map.get(name), view) {
                    (Some(Entry::Dir(_)), Some(_)) => {
                        Err(NamespaceError::ViewsBelow { path: join(parts) })
                    }
                    (_, Some(v)) => {
                        map.insert(name.clone(), Entry::View(v));
                        Ok(())
                    }
                    (Some(Entry::View(_)), None) => {
                        map.remove(name);
                        Ok(())
                    }
                    (_, None) => Err(not_bound()),
                }
            } else {
                let entry = match (map.get_mut(name), &view) {
                    (Some(e), _) => e,
                    (None, Some(_)) => map
                        .entry(name.clone())
                        .or_insert(Entry::Dir(BTreeMap::new())),
                    (None, None) => return Err(not_bound()),
                };
                let Entry::Dir(sub) = entry else {
                    return Err(NamespaceError::InsideView {
                        path: join(parts),
                        view: join(&parts[..=depth]),
                    });
                };
                go(sub, parts, depth + 1, view)?;
                if sub.is_empty() {
                    map.remove(name);
                }
                Ok(())
            }
        }
        let mut next = self.clone();
        go(&mut next.root, parts, 0, view)?;
        Ok(next)
    }

    /// The children of the namespace directory at `path` ("" for the root), as nodes; `None`
    /// if no namespace directory is there.
    pub fn children(&self, path: &str) -> Option<Vec<(String, Node)>> {
        let mut map = &self.root;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            match map.get(part)? {
                Entry::Dir(m) => map = m,
                Entry::View(_) => return None,
            }
        }
        Some(
            map.iter()
                .map(|(name, e)| {
                    let node = match e {
                        Entry::Dir(_) => Node::Namespace(Arc::from(if path.is_empty() {
                            name.clone()
                        } else {
                            format!("{path}/{name}")
                        })),
                        Entry::View(v) => v.node(),
                    };
                    (name.clone(), node)
                })
                .collect(),
        )
    }

    /// Every bound view with its path, in path order.
    pub fn views(&self) -> Vec<(String, &View)> {
        fn go<'a>(
            map: &'a BTreeMap<String, Entry>,
            prefix: &str,
            out: &mut Vec<(String, &'a View)>,
        ) {
            for (name, e) in map {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                match e {
                    Entry::Dir(m) => go(m, &path, out),
                    Entry::View(v) => out.push((path, v)),
                }
            }
        }
        let mut out = Vec::new();
        go(&self.root, "", &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> Digest {
        Digest::of_bytes(b)
    }

    fn view(layers: &[(&str, Digest)]) -> View {
        View {
            layers: layers.iter().map(|(n, d)| (n.to_string(), *d)).collect(),
            ..View::default()
        }
    }

    #[test]
    fn paths_are_checked() {
        assert_eq!(parse_path("jvm//lib/").unwrap(), vec!["jvm", "lib"]);
        for bad in ["", "/abs", "a/../b", "a/./b", "a\0b", ".digestfs/x"] {
            assert!(parse_path(bad).is_err(), "{bad:?}");
        }
        // Deep enough to overflow a recursive namespace, refused by length instead.
        let deep = "a/".repeat(PATH_MAX);
        let err = parse_path(&deep).unwrap_err();
        assert!(err.reason.contains("longer than 4095 bytes"), "{err}");
        assert!(parse_path(&"a/".repeat(1000)).is_ok());
        assert!(check_layer("modules.src/jvm:lib").is_ok());
        for bad in ["", "a\0b", &"x".repeat(LAYER_MAX + 1)] {
            assert!(check_layer(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn intermediate_directories_appear_and_vanish() {
        let ns = Namespace::default();
        let p = parse_path("jvm/resolves/default/lib").unwrap();
        let ns = ns.with_view(&p, Some(view(&[("g", d(b"1"))]))).unwrap();
        assert_eq!(
            ns.children("").unwrap(),
            vec![("jvm".to_string(), Node::Namespace("jvm".into()))]
        );
        assert_eq!(
            ns.children("jvm/resolves/default").unwrap(),
            vec![("lib".to_string(), Node::Tree(d(b"1")))]
        );
        assert!(ns.children("jvm/resolves/default/lib").is_none());
        let ns = ns.with_view(&p, None).unwrap();
        assert_eq!(ns, Namespace::default());
    }

    #[test]
    fn views_cannot_nest() {
        let ns = Namespace::default()
            .with_view(&parse_path("a/b").unwrap(), Some(view(&[("g", d(b"1"))])))
            .unwrap();
        assert!(ns
            .with_view(&parse_path("a/b/c").unwrap(), Some(view(&[("g", d(b"1"))])))
            .is_err());
        assert!(ns
            .with_view(&parse_path("a").unwrap(), Some(view(&[("g", d(b"1"))])))
            .is_err());
    }

    #[test]
    fn view_node_dedups_layers() {
        assert_eq!(
            view(&[("a", d(b"1")), ("b", d(b"1"))]).node(),
            Node::Tree(d(b"1"))
        );
        let Node::Merged(ds) = view(&[("a", d(b"2")), ("b", d(b"1"))]).node() else {
            panic!("expected a merged node");
        };
        assert_eq!(ds.len(), 2);
        assert!(ds[0] < ds[1]);
    }
}
