//! A decoded, validated `Directory`: what the filesystem and the CLI walk.

use prost::Message;

use super::digest::Digest;
use super::proto;
use super::StoreError;

/// Longest name Linux accepts for one path component.
pub const NAME_MAX: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File { digest: Digest, executable: bool },
    Dir(Digest),
    Symlink(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
}

/// The entries of one `Directory`, sorted by name (byte order), names unique and safe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<Entry>,
}

impl Listing {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_bytes().cmp(name.as_bytes()))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Decodes and validates the proto bytes of the directory `digest`.
    pub fn decode(digest: &Digest, bytes: &[u8]) -> Result<Listing, StoreError> {
        let corrupt = |reason: String| StoreError::CorruptDirectory {
            digest: *digest,
            reason,
        };
        let dir = proto::Directory::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut entries =
            Vec::with_capacity(dir.files.len() + dir.directories.len() + dir.symlinks.len());
        let node_digest = |name: &str, d: Option<proto::Digest>| {
            let d = d.ok_or_else(|| corrupt(format!("entry {name:?} has no digest")))?;
            Digest::from_parts(&d.hash, d.size_bytes)
                .map_err(|e| corrupt(format!("entry {name:?}: {e}")))
        };
        for f in dir.files {
            let digest = node_digest(&f.name, f.digest)?;
            entries.push(Entry {
                kind: EntryKind::File {
                    digest,
                    executable: f.is_executable,
                },
                name: f.name,
            });
        }
        for d in dir.directories {
            let digest = node_digest(&d.name, d.digest)?;
            entries.push(Entry {
                kind: EntryKind::Dir(digest),
                name: d.name,
            });
        }
        for s in dir.symlinks {
            if s.target.is_empty() || s.target.contains('\0') {
                return Err(corrupt(format!(
                    "symlink {:?} has an empty target or one with NUL",
                    s.name
                )));
            }
            entries.push(Entry {
                kind: EntryKind::Symlink(s.target),
                name: s.name,
            });
        }
        for e in &entries {
            check_name(&e.name).map_err(|reason| StoreError::BadName {
                digest: *digest,
                name: e.name.clone(),
                reason,
            })?;
        }
        // Pants writes each kind sorted, so merging the three lists is the usual work here.
        if !entries.is_sorted_by(|a, b| a.name.as_bytes() <= b.name.as_bytes()) {
            entries.sort_unstable_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        }
        if let Some(pair) = entries.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(StoreError::BadName {
                digest: *digest,
                name: pair[0].name.clone(),
                reason: "the name appears twice",
            });
        }
        Ok(Listing { entries })
    }

    /// The canonical proto Pants would write for these entries.
    pub fn encode(&self) -> Vec<u8> {
        let mut dir = proto::Directory::default();
        for e in &self.entries {
            match &e.kind {
                EntryKind::File { digest, executable } => dir.files.push(proto::FileNode {
                    name: e.name.clone(),
                    digest: Some(digest.into()),
                    is_executable: *executable,
                }),
                EntryKind::Dir(digest) => dir.directories.push(proto::DirectoryNode {
                    name: e.name.clone(),
                    digest: Some(digest.into()),
                }),
                EntryKind::Symlink(target) => dir.symlinks.push(proto::SymlinkNode {
                    name: e.name.clone(),
                    target: target.clone(),
                }),
            }
        }
        dir.files.sort_by(|a, b| a.name.cmp(&b.name));
        dir.directories.sort_by(|a, b| a.name.cmp(&b.name));
        dir.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
        dir.encode_to_vec()
    }
}

/// Whether `name` can be served as one path component; the error says why not.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    match name {
        "" => Err("the name is empty"),
        "." | ".." => Err("the name is . or .."),
        _ if name.contains('/') => Err("the name contains '/'"),
        _ if name.contains('\0') => Err("the name contains NUL"),
        _ if name.len() > NAME_MAX => Err("the name is longer than 255 bytes"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, content: &[u8]) -> Entry {
        Entry {
            name: name.into(),
            kind: EntryKind::File {
                digest: Digest::of_bytes(content),
                executable: false,
            },
        }
    }

    #[test]
    fn encode_decode_round_trip_sorts() {
        let l = Listing {
            entries: vec![file("b", b"1"), file("a", b"2")],
        };
        let bytes = l.encode();
        let d = Digest::of_bytes(&bytes);
        let back = Listing::decode(&d, &bytes).unwrap();
        assert_eq!(back.entries[0].name, "a");
        assert_eq!(back.get("b").unwrap(), &file("b", b"1"));
        assert!(back.get("c").is_none());
    }

    #[test]
    fn hostile_names_are_refused_with_the_digest_and_name() {
        for name in ["", ".", "..", "a/b", "nul\0", &"x".repeat(256)] {
            let l = Listing {
                entries: vec![file(name, b"x")],
            };
            let bytes = l.encode();
            let d = Digest::of_bytes(&bytes);
            let err = Listing::decode(&d, &bytes).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, StoreError::BadName { .. }), "{msg}");
            assert!(msg.contains(&d.to_string()), "{msg}");
            assert!(msg.contains(&format!("{name:?}")), "{msg}");
        }
    }

    #[test]
    fn duplicate_names_are_refused_even_across_kinds() {
        let mut l = Listing {
            entries: vec![file("same", b"x")],
        };
        l.entries.push(Entry {
            name: "same".into(),
            kind: EntryKind::Symlink("t".into()),
        });
        let bytes = l.encode();
        let err = Listing::decode(&Digest::of_bytes(&bytes), &bytes).unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = Listing::decode(&Digest::of_bytes(&bytes), &bytes);
        }

        #[test]
        fn mutated_directories_never_panic(pos in 0usize..4096, byte in proptest::prelude::any::<u8>(), cut in 0usize..4096) {
            let l = Listing {
                entries: vec![
                    file("a.jar", b"a"),
                    Entry { name: "dir".into(), kind: EntryKind::Dir(Digest::of_bytes(b"d")) },
                    Entry { name: "ln".into(), kind: EntryKind::Symlink("a.jar".into()) },
                ],
            };
            let mut bytes = l.encode();
            let i = pos % bytes.len();
            bytes[i] = byte;
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(decoded) = Listing::decode(&Digest::of_bytes(&bytes), &bytes) {
                for e in &decoded.entries {
                    proptest::prop_assert!(check_name(&e.name).is_ok());
                }
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bytes = [0x0a, 0xff, 0xff, 0xff];
        let d = Digest::of_bytes(&bytes);
        assert!(matches!(
            Listing::decode(&d, &bytes),
            Err(StoreError::CorruptDirectory { .. })
        ));
    }
}
