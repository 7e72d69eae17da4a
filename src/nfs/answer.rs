//! ACCESS, FSSTAT and PATHCONF, answered from the view. nfs3_server 0.11.1 answers these three
//! itself with fixed values, without asking the filesystem: ACCESS grants every bit asked for
//! within read, lookup and execute (execute on a plain file too), FSSTAT claims a TiB free and
//! a billion free files, PATHCONF says names may be 32,768 bytes long; and all three answer
//! NFS3_OK, without attributes, for a handle whose object is gone. macOS's client caches on
//! these answers (access bits per uid, the name limit), so the guard in `server` answers them
//! here instead, before the crate sees them. FSINFO the crate does ask the filesystem for
//! (`NfsFront::fsinfo`).
//!
//! Only calls the crate would serve are answered here: authorised (the owner check of
//! `NfsFront::authorize`), with a handle of this server's generation, and arguments that decode
//! exactly. Anything else goes on to the crate, whose answer then is an error of its own (AUTH
//! refused, STALE or BADHANDLE for another generation, GARBAGE_ARGS), never a fixed value.

use std::collections::HashSet;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use nfs3_server::nfs3_types::nfs3::{
    nfs_fh3, nfsstat3, post_op_attr, ACCESS3args, ACCESS3res, ACCESS3resfail, ACCESS3resok,
    FSSTAT3args, FSSTAT3res, FSSTAT3resfail, FSSTAT3resok, PATHCONF3args, PATHCONF3res,
    PATHCONF3resfail, PATHCONF3resok, ACCESS3_EXECUTE, ACCESS3_LOOKUP, ACCESS3_READ,
};
use nfs3_server::nfs3_types::xdr_codec::{Pack, Unpack};

use super::check::{Call, PROG_NFS};
use super::handle::{self, Key};
use super::{fattr, NfsFront};
use crate::fs::{Attr, DigestFs, FileKind, Namespace};
use crate::store::{walk, Digest, EntryKind};

pub const ACCESS: u32 = 4;
pub const FSSTAT: u32 = 18;
pub const PATHCONF: u32 = 20;

/// What a call answered here asks.
#[derive(Debug, PartialEq, Eq)]
pub struct Local {
    proc_: u32,
    /// `None`: a handle of our generation whose bytes name nothing (BADHANDLE).
    key: Option<Key>,
    /// The ACCESS bits asked for.
    access: u32,
}

/// Decodes exactly one `T` from `args`.
fn decode<T: Unpack>(args: &[u8]) -> Option<T> {
    let mut cur = Cursor::new(args);
    let (v, _) = T::unpack(&mut cur).ok()?;
    (cur.position() == args.len() as u64).then_some(v)
}

/// The call, if it is one of the three and the crate would serve it (see the module comment).
/// `generation` is the first 8 bytes of every handle this server made.
pub fn intercept(
    front: &NfsFront,
    call: &Call,
    record: &[u8],
    generation: &[u8; 8],
) -> Option<Local> {
    if (call.prog, call.vers) != (PROG_NFS, 3) || !front.allows(call.uid) {
        return None;
    }
    let args = record.get(call.args..)?;
    let (fh, access): (nfs_fh3, u32) = match call.proc_ {
        ACCESS => decode::<ACCESS3args>(args).map(|a| (a.object, a.access))?,
        FSSTAT => (decode::<FSSTAT3args>(args)?.fsroot, 0),
        PATHCONF => (decode::<PATHCONF3args>(args)?.object, 0),
        _ => return None,
    };
    let (gen, ours) = fh.data.split_at_checked(8)?;
    if gen != generation {
        return None;
    }
    Some(Local {
        proc_: call.proc_,
        key: Key::from_bytes(ours),
        access,
    })
}

/// The reply record (without its record mark) to `call`, whose xid is `xid`.
pub async fn answer(front: Arc<NfsFront>, xid: u32, call: Local) -> Vec<u8> {
    let Local { proc_, key, access } = call;
    let found = match key {
        None => Err(nfsstat3::NFS3ERR_BADHANDLE),
        Some(key) => {
            let cache = front.usage.clone();
            front
                .blocking(move |core, memo| {
                    let obj = handle::resolve(core, memo, &key)?;
                    let attr = core.attr_of(&obj.node).map_err(handle::status)?;
                    let usage = (proc_ == FSSTAT).then(|| cached_usage(core, &cache));
                    Ok((attr, usage))
                })
                .await
        }
    };
    let mut out = Vec::with_capacity(128);
    // xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE (flavor, empty body), SUCCESS.
    for w in [xid, 1, 0, 0, 0, 0] {
        out.extend_from_slice(&u32::to_be_bytes(w));
    }
    let packed = match (proc_, found) {
        (ACCESS, Ok((attr, _))) => ACCESS3res::Ok(ACCESS3resok {
            obj_attributes: post_op_attr::Some(fattr(&attr)),
            access: granted(&attr, access),
        })
        .pack(&mut out),
        (ACCESS, Err(stat)) => ACCESS3res::Err((stat, ACCESS3resfail::default())).pack(&mut out),
        (FSSTAT, Ok((attr, usage))) => {
            FSSTAT3res::Ok(fsstat(&attr, usage.unwrap_or_default())).pack(&mut out)
        }
        (FSSTAT, Err(stat)) => FSSTAT3res::Err((stat, FSSTAT3resfail::default())).pack(&mut out),
        (_, Ok((attr, _))) => PATHCONF3res::Ok(pathconf(&attr)).pack(&mut out),
        (_, Err(stat)) => PATHCONF3res::Err((stat, PATHCONF3resfail::default())).pack(&mut out),
    };
    if packed.is_err() {
        // Packing into a Vec cannot fail; should it, the client retransmits.
        log::error!("packing the reply to NFS procedure {proc_} failed");
    }
    out
}

/// The last [`usage`] computed, and the bound roots it was computed for.
pub type UsageCache = Mutex<Option<(Vec<Digest>, Usage)>>;

/// [`usage`] of what is bound now, counted again only when the bound roots changed. The lock
/// is held while counting, so calls that arrive meanwhile wait for the one count.
fn cached_usage(core: &DigestFs, cache: &UsageCache) -> Usage {
    let ns = core.namespace();
    let roots = bound_roots(&ns);
    let mut cached = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((r, u)) = cached.as_ref() {
        if *r == roots {
            return *u;
        }
    }
    let u = usage(core, &ns);
    *cached = Some((roots, u));
    u
}

/// The ACCESS bits granted to `asked` on an object with these attributes: reading, looking up
/// in directories and executing what is executable; never modifying, extending or deleting.
/// Every caller that gets this far may read (modes are r for everyone, and other users'
/// calls are refused before, unless `--allow-other`).
pub fn granted(attr: &Attr, asked: u32) -> u32 {
    let may = match attr.kind {
        FileKind::Dir => ACCESS3_READ | ACCESS3_LOOKUP | ACCESS3_EXECUTE,
        FileKind::File if attr.perm & 0o111 != 0 => ACCESS3_READ | ACCESS3_EXECUTE,
        FileKind::File | FileKind::Symlink => ACCESS3_READ,
    };
    asked & may
}

/// The distinct content bound in the views: what FSSTAT reports as the filesystem's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// The sizes of the distinct files.
    pub bytes: u64,
    /// Distinct files and `Directory`s, and symlink entries.
    pub files: u64,
}

/// Counts the distinct content of the trees bound in `ns`, reading `Directory`s from the local
/// store only (FSSTAT must not wait on a remote CAS; a bind with `verify` fetched them all).
/// What cannot be read is left out.
pub fn usage(core: &DigestFs, ns: &Namespace) -> Usage {
    let roots = bound_roots(ns);
    let store = core.cas().store();
    let mut files = HashSet::new();
    let (mut dirs, mut links, mut bytes) = (0u64, 0u64, 0u64);
    walk::walk_directories(
        &roots,
        &mut |d| store.load_directory(d),
        &mut |_, listing| {
            dirs += 1;
            for e in &listing.entries {
                match &e.kind {
                    EntryKind::File { digest, .. } => {
                        if files.insert(*digest) {
                            bytes += digest.size;
                        }
                    }
                    EntryKind::Symlink(_) => links += 1,
                    EntryKind::Dir(_) => {}
                }
            }
        },
    );
    Usage {
        bytes,
        files: dirs + files.len() as u64 + links,
    }
}

/// The digests of every layer of every view, sorted: what [`usage`] depends on.
pub fn bound_roots(ns: &Namespace) -> Vec<Digest> {
    let mut roots: Vec<Digest> = ns
        .views()
        .iter()
        .flat_map(|(_, v)| v.layers.values().copied())
        .collect();
    roots.sort_by_key(|d| (d.hash, d.size));
    roots.dedup();
    roots
}

/// FSSTAT: the bound content's size and count; nothing free, nothing available (nothing can
/// be written); the view changes with every bind, so nothing is invariant.
fn fsstat(attr: &Attr, usage: Usage) -> FSSTAT3resok {
    FSSTAT3resok {
        obj_attributes: post_op_attr::Some(fattr(attr)),
        tbytes: usage.bytes,
        fbytes: 0,
        abytes: 0,
        tfiles: usage.files,
        ffiles: 0,
        afiles: 0,
        invarsec: 0,
    }
}

/// PATHCONF: names up to 255 bytes, refused beyond (never truncated), case-sensitive and
/// case-preserving; no hard links can be made (every file's link count is 1) and no owner
/// changed.
fn pathconf(attr: &Attr) -> PATHCONF3resok {
    PATHCONF3resok {
        obj_attributes: post_op_attr::Some(fattr(attr)),
        linkmax: 1,
        name_max: crate::store::NAME_MAX as u32,
        no_trunc: true,
        chown_restricted: true,
        case_insensitive: false,
        case_preserving: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn attr(kind: FileKind, perm: u16) -> Attr {
        Attr {
            ino: 5,
            size: 3,
            blocks: 1,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            mtime: UNIX_EPOCH,
            blksize: 4096,
        }
    }

    #[test]
    fn access_grants_read_lookup_and_execute_where_they_apply_and_never_a_change() {
        let all = 0x3f;
        assert_eq!(granted(&attr(FileKind::Dir, 0o555), all), 0x23);
        assert_eq!(granted(&attr(FileKind::File, 0o555), all), 0x21);
        assert_eq!(granted(&attr(FileKind::File, 0o444), all), 0x01);
        assert_eq!(granted(&attr(FileKind::Symlink, 0o777), all), 0x01);
        // Only what was asked is answered.
        assert_eq!(granted(&attr(FileKind::Dir, 0o555), 0x04 | 0x08 | 0x10), 0);
        assert_eq!(granted(&attr(FileKind::Dir, 0o555), ACCESS3_LOOKUP), 2);
    }
}
