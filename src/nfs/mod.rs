//! The NFSv3 front end: a thin adapter from `nfs3_server`'s read-only filesystem trait to the
//! filesystem core, as `crate::fuse` is for FUSE. It is how macOS mounts views without a kernel
//! extension (`mount_nfs` against a server on localhost, as EdenFS does); on Linux it serves the
//! same views to any NFSv3 client.
//!
//! Why `nfs3_server` and not `nfsserve`: `nfsserve` hands the filesystem only a 64-bit fileid
//! per handle and pages READDIR by fileid. Our handles must name a node without any server-side
//! state (NFS has no FORGET; see [`handle`]), which needs more than 64 bits, and the same
//! content twice in one directory has one fileid (as through FUSE), which paging by fileid
//! cannot tell apart. `nfs3_server` lets the filesystem own up to 56 bytes of each handle and
//! pages directories by an opaque cookie. It also answers every mutating procedure with
//! NFS3ERR_ROFS for a filesystem that declares itself read-only.
//!
//! - [`handle`]: handles that resolve without state, as plain functions over the core.
//! - `record` and `check`: the RPC record reader and call checker every connection goes through
//!   before the crate sees a byte (see `server` for why).
//! - `server`: our accept loop, per-connection limits, readiness and the OS mount.
//! - [`probe`]: a tiny NFS client that says whether the server answers (readiness).

mod answer;
mod check;
pub mod handle;
pub mod probe;
mod record;
mod server;

use std::collections::VecDeque;
use std::sync::Arc;

use nfs3_server::nfs3_types::nfs3::{
    createverf3, fattr3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, post_op_attr, sattr3,
    specdata3, stable_how, FSINFO3resok, FSF3_HOMOGENEOUS, FSF3_SYMLINK,
};
use nfs3_server::nfs3_types::rpc::auth_unix;
use nfs3_server::nfs3_types::xdr_codec::Opaque;
use nfs3_server::vfs::{
    DirEntry, DirEntryPlus, FileHandle, NextResult, NfsFileSystem, NfsReadFileSystem,
    ReadDirIterator, ReadDirPlusIterator, VFSCapabilities,
};

use self::handle::{Key, Listing, Memo, Object};
use crate::fs::{Attr, DigestFs, FileKind};

pub use self::server::{serve, Listener, Options};

/// Largest READ we answer; the crate passes the client's count through unclamped.
pub const MAX_READ: u32 = 1 << 20;
/// The fsid of every attribute: one filesystem.
const FSID: u64 = 0x6469_6765_7374_6673;
/// Directory entries computed per trip to the blocking pool in READDIRPLUS.
const BATCH: usize = 32;

/// A file handle: the bytes of a [`Key`].
#[derive(Clone, PartialEq, Eq)]
pub struct Fh {
    len: u8,
    bytes: [u8; handle::MAX_LEN],
}

impl Fh {
    pub fn of(key: &Key) -> Fh {
        let b = key.to_bytes();
        let mut bytes = [0u8; handle::MAX_LEN];
        bytes[..b.len()].copy_from_slice(&b);
        Fh {
            len: b.len() as u8,
            bytes,
        }
    }

    fn key(&self) -> Result<Key, nfsstat3> {
        Key::from_bytes(self.as_bytes()).ok_or(nfsstat3::NFS3ERR_BADHANDLE)
    }
}

impl std::fmt::Debug for Fh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fh({})", hex::encode(self.as_bytes()))
    }
}

impl FileHandle for Fh {
    fn len(&self) -> usize {
        self.len as usize
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn from_bytes(bytes: &[u8]) -> Option<Fh> {
        if bytes.len() > handle::MAX_LEN {
            return None;
        }
        let mut out = [0u8; handle::MAX_LEN];
        out[..bytes.len()].copy_from_slice(bytes);
        Some(Fh {
            len: bytes.len() as u8,
            bytes: out,
        })
    }
}

fn time(t: std::time::SystemTime) -> nfstime3 {
    nfstime3::try_from(t).unwrap_or_default()
}

/// NFS attributes of a node: the core's, as FUSE shows them (fileid = FUSE's inode number).
pub fn fattr(a: &Attr) -> fattr3 {
    fattr3 {
        type_: match a.kind {
            FileKind::Dir => ftype3::NF3DIR,
            FileKind::File => ftype3::NF3REG,
            FileKind::Symlink => ftype3::NF3LNK,
        },
        mode: u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.blocks * 512,
        rdev: specdata3::default(),
        fsid: FSID,
        fileid: a.ino,
        atime: time(a.mtime),
        mtime: time(a.mtime),
        ctime: time(a.mtime),
    }
}

/// The filesystem the NFS server serves: the core, and what handles remember.
pub struct NfsFront {
    core: Arc<DigestFs>,
    memo: Arc<Memo>,
    /// Only this uid (and root) may call, unless `None` (`--allow-other`), as FUSE mounts are
    /// private to their owner. AUTH_UNIX is the client's word: this keeps other users out of the
    /// kernel's mount, not a user who speaks NFS to the port directly.
    owner: Option<u32>,
    /// What FSSTAT last counted (`answer`).
    usage: Arc<answer::UsageCache>,
}

impl NfsFront {
    pub fn new(core: Arc<DigestFs>, owner: Option<u32>) -> NfsFront {
        NfsFront {
            core,
            memo: Arc::new(Memo::default()),
            owner,
            usage: Arc::default(),
        }
    }

    /// Whether a call with this AUTH_UNIX uid (`None`: another flavor) is served; see
    /// `authorize`.
    fn allows(&self, uid: Option<u32>) -> bool {
        match (self.owner, uid) {
            (None, _) | (_, None) => true,
            (Some(owner), Some(uid)) => uid == owner || uid == 0,
        }
    }

    /// Runs `f` on the blocking pool: core calls read LMDB and store files, and may wait on a
    /// remote CAS.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DigestFs, &Memo) -> Result<T, nfsstat3> + Send + 'static,
    ) -> Result<T, nfsstat3> {
        blocking(self.core.clone(), self.memo.clone(), f).await
    }

    /// The directory behind `dirid`, its parent if known, and its listing.
    async fn open_dir(&self, dirid: &Fh) -> Result<Dir, nfsstat3> {
        let key = dirid.key()?;
        self.blocking(move |core, memo| {
            let dir = handle::resolve(core, memo, &key)?;
            let listing = handle::list(core, memo, &dir)?;
            let up = handle::parent(core, memo, &dir).ok();
            Ok(Dir {
                dir,
                up,
                listing: Arc::new(listing),
            })
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    core: Arc<DigestFs>,
    memo: Arc<Memo>,
    f: impl FnOnce(&DigestFs, &Memo) -> Result<T, nfsstat3> + Send + 'static,
) -> Result<T, nfsstat3> {
    tokio::task::spawn_blocking(move || f(&core, &memo))
        .await
        .unwrap_or(Err(nfsstat3::NFS3ERR_SERVERFAULT))
}

/// A directory being listed: positions 0 and 1 are `.` and `..`, then its entries in name
/// order; the cookie of position `p` is `p + 1`. A namespace directory that a bind changes
/// between two calls lists its new entries from the same position, as through FUSE.
struct Dir {
    dir: Object,
    up: Option<Object>,
    listing: Arc<Listing>,
}

impl Dir {
    /// Name, fileid and (with `plus`) the object at position `p`; `None` past the end,
    /// `Some(None)` for a position with nothing to show (`..` when unknown).
    fn at(
        &self,
        core: &DigestFs,
        memo: &Memo,
        p: usize,
    ) -> Option<Option<(String, u64, Option<Object>)>> {
        match p {
            0 => Some(Some((
                ".".into(),
                self.dir.node.derived_ino(),
                Some(self.dir.clone()),
            ))),
            1 => Some(
                self.up
                    .as_ref()
                    .map(|o| ("..".into(), o.node.derived_ino(), Some(o.clone()))),
            ),
            _ => {
                let i = p - 2;
                let (name, node) = self.listing.peek(i)?;
                let (name, ino) = (name.to_string(), node.derived_ino());
                let obj = self
                    .listing
                    .object(core, memo, &self.dir, i)
                    .and_then(Result::ok)
                    .map(|(_, o)| o);
                Some(Some((name, ino, obj)))
            }
        }
    }

    fn len(&self) -> usize {
        self.listing.len() + 2
    }
}

struct Entries {
    core: Arc<DigestFs>,
    memo: Arc<Memo>,
    dir: Arc<Dir>,
    next: usize,
    buffer: VecDeque<DirEntryPlus<Fh>>,
}

impl ReadDirPlusIterator<Fh> for Entries {
    async fn next(&mut self) -> NextResult<DirEntryPlus<Fh>> {
        if let Some(e) = self.buffer.pop_front() {
            return NextResult::Ok(e);
        }
        if self.next >= self.dir.len() {
            return NextResult::Eof;
        }
        let (dir, start) = (self.dir.clone(), self.next);
        let batch = blocking(self.core.clone(), self.memo.clone(), move |core, memo| {
            let mut out = Vec::new();
            let mut p = start;
            while out.len() < BATCH && p < dir.len() {
                if let Some(Some((name, fileid, obj))) = dir.at(core, memo, p) {
                    // An entry whose attributes cannot be read is still listed, without them:
                    // the client's LOOKUP of it then gets the error.
                    let attrs = obj
                        .as_ref()
                        .and_then(|o| core.attr_of(&o.node).ok())
                        .map(|a| fattr(&a));
                    out.push(DirEntryPlus {
                        fileid,
                        name: filename3::from(name.into_bytes()),
                        cookie: p as u64 + 1,
                        name_handle: attrs.as_ref().and(obj.map(|o| Fh::of(&o.key))),
                        name_attributes: attrs,
                    });
                }
                p += 1;
            }
            Ok((out, p))
        })
        .await;
        match batch {
            Ok((entries, next)) => {
                self.next = next;
                self.buffer.extend(entries);
                match self.buffer.pop_front() {
                    Some(e) => NextResult::Ok(e),
                    None => NextResult::Eof,
                }
            }
            Err(e) => NextResult::Err(e),
        }
    }
}

struct Names {
    dir: Arc<Dir>,
    next: usize,
}

impl ReadDirIterator for Names {
    async fn next(&mut self) -> NextResult<DirEntry> {
        while self.next < self.dir.len() {
            let p = self.next;
            self.next += 1;
            let entry = match p {
                0 => Some((".".to_string(), self.dir.dir.node.derived_ino())),
                1 => self
                    .dir
                    .up
                    .as_ref()
                    .map(|o| ("..".to_string(), o.node.derived_ino())),
                _ => self
                    .dir
                    .listing
                    .peek(p - 2)
                    .map(|(n, node)| (n.to_string(), node.derived_ino())),
            };
            if let Some((name, fileid)) = entry {
                return NextResult::Ok(DirEntry {
                    fileid,
                    name: filename3::from(name.into_bytes()),
                    cookie: p as u64 + 1,
                });
            }
        }
        NextResult::Eof
    }
}

fn name_of<'a>(name: &'a filename3<'_>) -> Result<&'a str, nfsstat3> {
    let name = std::str::from_utf8(name.as_ref()).map_err(|_| nfsstat3::NFS3ERR_NOENT)?;
    if name.len() > crate::store::NAME_MAX {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    Ok(name)
}

impl NfsReadFileSystem for NfsFront {
    type Handle = Fh;

    fn root_dir(&self) -> Fh {
        Fh::of(&Key::Root)
    }

    /// The owner-only check mirrors FUSE's default for the kernel's mount: another user's
    /// calls carry their uid. A call with no credential (AUTH_NONE: the kernel's NULL ping on
    /// Linux) claims no one and is let through; AUTH_UNIX is the client's own word anyway.
    fn authorize(&self, auth: Option<&auth_unix>) -> bool {
        self.allows(auth.map(|a| a.uid))
    }

    async fn lookup(&self, dirid: &Fh, filename: &filename3<'_>) -> Result<Fh, nfsstat3> {
        let key = dirid.key()?;
        let name = name_of(filename)?.to_string();
        self.blocking(move |core, memo| {
            let dir = handle::resolve(core, memo, &key)?;
            handle::child(core, memo, &dir, &name).map(|o| Fh::of(&o.key))
        })
        .await
    }

    /// MOUNT of a path below the root (libnfs mounts a URL's directory this way): walked from
    /// the root by LOOKUP. A bind between two steps makes the handle of the view being walked
    /// STALE, which MOUNT can only report as NOENT; the walk then starts again, against the
    /// views as they are now, so a path that is bound all along always mounts.
    async fn lookup_by_path(&self, path: &str) -> Result<Fh, nfsstat3> {
        let mut tries = 0;
        'walk: loop {
            tries += 1;
            let mut fh = self.root_dir();
            for part in path.split('/').filter(|p| !p.is_empty()) {
                match self.lookup(&fh, &filename3::from(part.as_bytes())).await {
                    Ok(next) => fh = next,
                    Err(nfsstat3::NFS3ERR_STALE) if tries < 8 => continue 'walk,
                    Err(e) => return Err(e),
                }
            }
            return Ok(fh);
        }
    }

    async fn getattr(&self, id: &Fh) -> Result<fattr3, nfsstat3> {
        let key = id.key()?;
        self.blocking(move |core, memo| {
            let obj = handle::resolve(core, memo, &key)?;
            core.attr_of(&obj.node)
                .map(|a| fattr(&a))
                .map_err(handle::status)
        })
        .await
    }

    async fn read(&self, id: &Fh, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        let key = id.key()?;
        self.blocking(move |core, memo| {
            let obj = handle::resolve(core, memo, &key)?;
            let size = match &obj.node {
                crate::fs::Node::File { digest, .. } => digest.size,
                crate::fs::Node::Symlink(_) => return Err(nfsstat3::NFS3ERR_INVAL),
                _ => return Err(nfsstat3::NFS3ERR_ISDIR),
            };
            let data = core
                .read_node(&obj.node, offset, count.min(MAX_READ))
                .map_err(handle::status)?;
            let eof = offset.saturating_add(data.len() as u64) >= size;
            Ok((data, eof))
        })
        .await
    }

    async fn readdir(&self, dirid: &Fh, cookie: u64) -> Result<impl ReadDirIterator, nfsstat3> {
        let dir = self.open_dir(dirid).await?;
        Ok(Names {
            dir: Arc::new(dir),
            next: usize::try_from(cookie).unwrap_or(usize::MAX),
        })
    }

    async fn readdirplus(
        &self,
        dirid: &Fh,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<Fh>, nfsstat3> {
        let dir = self.open_dir(dirid).await?;
        Ok(Entries {
            core: self.core.clone(),
            memo: self.memo.clone(),
            dir: Arc::new(dir),
            next: usize::try_from(cookie).unwrap_or(usize::MAX),
            buffer: VecDeque::new(),
        })
    }

    async fn readlink(&self, id: &Fh) -> Result<nfspath3<'_>, nfsstat3> {
        let key = id.key()?;
        let target = self
            .blocking(move |core, memo| {
                let obj = handle::resolve(core, memo, &key)?;
                crate::fs::readlink_of(&obj.node).map_err(handle::status)
            })
            .await?;
        Ok(nfspath3(Opaque::owned(target)))
    }

    /// FSINFO, from the view: reads of up to 1 MiB (what READ serves, `MAX_READ`), files as
    /// large as the protocol can say, nanosecond times, and properties that say read-only (no
    /// hard links, no settable times) and homogeneous. A handle that is gone is STALE.
    async fn fsinfo(&self, root: &Fh) -> Result<FSINFO3resok, nfsstat3> {
        let obj_attributes = post_op_attr::Some(self.getattr(root).await?);
        Ok(FSINFO3resok {
            obj_attributes,
            rtmax: MAX_READ,
            rtpref: MAX_READ,
            rtmult: 4096,
            // Nothing is ever written; these only have to be sane.
            wtmax: MAX_READ,
            wtpref: MAX_READ,
            wtmult: 4096,
            dtpref: 64 * 1024,
            maxfilesize: i64::MAX as u64,
            // Times carry nanoseconds (SEMANTICS.md, "mtime policy").
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            // No hard links, no settable times: content-addressed and read-only.
            properties: FSF3_SYMLINK | FSF3_HOMOGENEOUS,
        })
    }
}

/// Read-only: the crate answers NFS3ERR_ROFS to every mutating procedure once `capabilities`
/// says so, before any of these is called; they refuse all the same. (Not the crate's
/// `ReadOnlyAdapter`, which would mask symlinks' mode 0777 to 0555.)
impl NfsFileSystem for NfsFront {
    fn capabilities(&self) -> VFSCapabilities {
        VFSCapabilities::ReadOnly
    }

    async fn setattr(&self, _id: &Fh, _attr: sattr3) -> Result<fattr3, nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn write(
        &self,
        _id: &Fh,
        _offset: u64,
        _data: &[u8],
        _stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn create(
        &self,
        _dirid: &Fh,
        _name: &filename3<'_>,
        _attr: sattr3,
    ) -> Result<(Fh, fattr3), nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn create_exclusive(
        &self,
        _dirid: &Fh,
        _name: &filename3<'_>,
        _verf: createverf3,
    ) -> Result<Fh, nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn mkdir(&self, _dirid: &Fh, _name: &filename3<'_>) -> Result<(Fh, fattr3), nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn remove(&self, _dirid: &Fh, _name: &filename3<'_>) -> Result<(), nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn rename<'a>(
        &self,
        _from_dirid: &Fh,
        _from_name: &filename3<'a>,
        _to_dirid: &Fh,
        _to_name: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn symlink<'a>(
        &self,
        _dirid: &Fh,
        _name: &filename3<'a>,
        _target: &nfspath3<'a>,
        _attr: &sattr3,
    ) -> Result<(Fh, fattr3), nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }

    async fn commit(&self, _id: &Fh, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        Err(nfsstat3::NFS3ERR_ROFS)
    }
}
