//! The tree walks, iterative with an explicit stack: a tree is data from the store, and a chain of
//! 100,000 nested `Directory`s must not overflow the call stack. Each walk takes the loader of a
//! `Directory` as a closure, so the local store and readers that fetch from a remote CAS share
//! one walk and one error policy.

use std::collections::HashSet;

use super::{Digest, EntryKind, Listing, StoreError};

/// Longest path an OS accepts (Linux `PATH_MAX`, with its NUL).
pub const PATH_MAX: usize = 4096;

/// Visits every distinct `Directory` of the trees at `roots` once, calling `on_dir` with each.
/// The policy: everything readable is visited; a `Directory` that cannot be loaded is skipped
/// (with what is below it) and its error returned, in the order met. Callers decide whether an
/// error is fatal (a bind) or worth only a log line (a lease round).
pub fn walk_directories<E>(
    roots: &[Digest],
    load: &mut dyn FnMut(&Digest) -> Result<Listing, E>,
    on_dir: &mut dyn FnMut(&Digest, &Listing),
) -> Vec<E> {
    let mut seen = HashSet::new();
    let mut todo = roots.to_vec();
    let mut errors = Vec::new();
    while let Some(d) = todo.pop() {
        if !seen.insert(d) {
            continue;
        }
        match load(&d) {
            Ok(listing) => {
                on_dir(&d, &listing);
                todo.extend(listing.entries.iter().filter_map(|e| match e.kind {
                    EntryKind::Dir(sub) => Some(sub),
                    _ => None,
                }));
            }
            Err(e) => errors.push(e),
        }
    }
    errors
}

/// The distinct file and `Directory` digests of the trees at `roots` (the empty blob left out),
/// and what could not be read, as [`walk_directories`] finds them.
pub struct TreeBlobs<E> {
    pub files: Vec<Digest>,
    pub dirs: Vec<Digest>,
    pub errors: Vec<E>,
}

pub fn tree_blobs<E>(
    roots: &[Digest],
    load: &mut dyn FnMut(&Digest) -> Result<Listing, E>,
) -> TreeBlobs<E> {
    let mut dirs = Vec::new();
    let mut files = HashSet::new();
    let errors = walk_directories(roots, load, &mut |d, listing| {
        dirs.push(*d);
        files.extend(listing.entries.iter().filter_map(|e| match e.kind {
            EntryKind::File { digest, .. } if !digest.is_empty() => Some(digest),
            _ => None,
        }));
    });
    TreeBlobs {
        files: files.into_iter().collect(),
        dirs,
        errors,
    }
}

/// Walks the tree at `root` depth-first, calling `f` with each entry's path (relative,
/// '/'-separated) and kind; a directory comes before its contents, entries in name order. One
/// path buffer is grown and cut as the walk goes down and up, so memory stays linear in depth.
/// A path longer than any OS path ends the walk with [`StoreError::TooDeep`].
pub fn walk_paths<E: From<StoreError>>(
    root: &Digest,
    load: &mut dyn FnMut(&Digest) -> Result<Listing, E>,
    f: &mut dyn FnMut(&str, &EntryKind) -> Result<(), E>,
) -> Result<(), E> {
    struct Level {
        listing: Listing,
        next: usize,
        /// Length of the path buffer before this level's names.
        base: usize,
    }
    let mut path = String::new();
    let mut stack = vec![Level {
        listing: load(root)?,
        next: 0,
        base: 0,
    }];
    while let Some(level) = stack.last_mut() {
        let Some(entry) = level.listing.entries.get(level.next) else {
            stack.pop();
            continue;
        };
        level.next += 1;
        path.truncate(level.base);
        if level.base > 0 {
            path.push('/');
        }
        path.push_str(&entry.name);
        if path.len() >= PATH_MAX {
            return Err(StoreError::TooDeep {
                depth: stack.len(),
                max: PATH_MAX - 1,
            }
            .into());
        }
        f(&path, &entry.kind)?;
        if let EntryKind::Dir(sub) = &entry.kind {
            let sub = *sub;
            let base = path.len();
            let listing = load(&sub)?;
            stack.push(Level {
                listing,
                next: 0,
                base,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::store::Entry;

    /// A chain `d/d/d/…` of `depth` directories ending in one file, as an in-memory "store".
    fn chain(depth: usize) -> (Digest, HashMap<Digest, Listing>) {
        let mut dirs = HashMap::new();
        let mut below = Listing {
            entries: vec![Entry {
                name: "leaf.txt".into(),
                kind: EntryKind::File {
                    digest: Digest::of_bytes(b"leaf"),
                    executable: false,
                },
            }],
        };
        let mut digest = Digest::of_bytes(&below.encode());
        dirs.insert(digest, below);
        for _ in 0..depth {
            below = Listing {
                entries: vec![Entry {
                    name: "d".into(),
                    kind: EntryKind::Dir(digest),
                }],
            };
            digest = Digest::of_bytes(&below.encode());
            dirs.insert(digest, below);
        }
        (digest, dirs)
    }

    fn loader(
        dirs: &HashMap<Digest, Listing>,
    ) -> impl FnMut(&Digest) -> Result<Listing, StoreError> + '_ {
        |d| {
            dirs.get(d).cloned().ok_or(StoreError::Missing {
                digest: *d,
                kind: crate::store::BlobKind::Directory,
            })
        }
    }

    #[test]
    fn a_chain_of_100k_directories_does_not_overflow_the_stack() {
        let (root, dirs) = chain(100_000);
        let mut load = loader(&dirs);
        let walked = tree_blobs(&[root], &mut load);
        assert_eq!(walked.dirs.len(), 100_001);
        assert_eq!(walked.files, vec![Digest::of_bytes(b"leaf")]);
        assert!(walked.errors.is_empty());

        let mut seen = 0;
        let err = walk_paths(&root, &mut load, &mut |_, _| {
            seen += 1;
            Ok(())
        })
        .unwrap_err();
        // "d/" per level: at depth 2049 the path is 4097 bytes, past PATH_MAX.
        assert!(
            matches!(err, StoreError::TooDeep { depth: 2049, .. }),
            "{err}"
        );
        assert_eq!(seen, 2048);
    }

    #[test]
    fn paths_come_in_preorder_and_errors_are_collected() {
        let (root, mut dirs) = chain(2);
        let mut paths = Vec::new();
        walk_paths(&root, &mut loader(&dirs), &mut |p, _| {
            paths.push(p.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(paths, ["d", "d/d", "d/d/leaf.txt"]);

        // Remove the middle directory: the walk reports it and visits the rest.
        let middle = match dirs[&root].entries[0].kind {
            EntryKind::Dir(d) => d,
            _ => unreachable!(),
        };
        dirs.remove(&middle);
        let walked = tree_blobs(&[root], &mut loader(&dirs));
        assert_eq!(walked.dirs, vec![root]);
        assert_eq!(walked.errors.len(), 1);
        assert_eq!(walked.errors[0].digest(), Some(middle));
    }
}
