//! Checks each RPC call before the server crate parses it. The crate's XDR decoder allocates
//! every variable-length field at its claimed length before reading it (`vec![0; len]` for an
//! opaque, `Vec::with_capacity(len)` for the credential's group list), so a 100-byte call could
//! make it reserve gigabytes. Here each length the crate will decode is walked first, and a call
//! that claims more than it carries is refused (the connection is closed, as the crate does for
//! an unparsable header). Anything else is left for the crate to answer (wrong program, version
//! or procedure, bad discriminants, short arguments: it replies, allocating nothing large).
//!
//! Counts the client asks replies to fill (READ, READDIR, READDIRPLUS) are clamped in place to
//! [`MAX_REPLY`], which the protocol allows (a server may always return less).

pub const PROG_PORTMAP: u32 = 100_000;
pub const PROG_NFS: u32 = 100_003;
pub const PROG_MOUNT: u32 = 100_005;
const AUTH_UNIX: u32 = 1;
/// RFC 5531: an `opaque_auth` body is at most 400 bytes.
const MAX_AUTH: usize = 400;
/// RFC 5531: the machine name of an AUTH_UNIX credential is at most 255 bytes, its groups 16.
const MAX_MACHINE_NAME: usize = 255;
const MAX_GROUPS: usize = 16;
/// The most a client may ask one reply to carry.
pub const MAX_REPLY: u32 = super::MAX_READ;

#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The call header ends early.
    Short,
    /// Not a CALL message.
    NotACall,
    /// A credential or verifier that is too long or not what it claims.
    BadAuth,
    /// An argument claims more bytes than the call carries.
    BadLength,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Malformed::Short => "a truncated call header",
            Malformed::NotACall => "a message that is not a call",
            Malformed::BadAuth => "a malformed credential",
            Malformed::BadLength => "an argument longer than the call",
        })
    }
}

/// Why walking the arguments stopped early.
enum Stop {
    /// The crate will stop here too (the data ends, or a discriminant is unknown), without
    /// decoding anything further: nothing to fear.
    Done,
    Bad(Malformed),
}

impl From<Malformed> for Stop {
    fn from(m: Malformed) -> Stop {
        Stop::Bad(m)
    }
}

struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cur<'_> {
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        if self.left() < 4 {
            return Err(Stop::Done);
        }
        let v = u32::from_be_bytes(self.b[self.pos..self.pos + 4].try_into().expect("4"));
        self.pos += 4;
        Ok(v)
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        if self.left() < n {
            return Err(Stop::Done);
        }
        self.pos += n;
        Ok(())
    }

    /// A variable-length opaque (or string): its length must fit in what is left, and in `max`.
    fn opaque(&mut self, max: usize) -> Result<&[u8], Stop> {
        let len = self.u32()? as usize;
        if len > self.left() || len > max {
            return Err(Stop::Bad(Malformed::BadLength));
        }
        let start = self.pos;
        self.pos += len;
        let pad = (4 - len % 4) % 4;
        self.skip(pad)?;
        Ok(&self.b[start..start + len])
    }

    /// An optional value of `n` bytes (`bool` discriminant).
    fn optional(&mut self, n: usize) -> Result<(), Stop> {
        match self.u32()? {
            0 => Ok(()),
            1 => self.skip(n),
            _ => Err(Stop::Done),
        }
    }

    fn sattr3(&mut self) -> Result<(), Stop> {
        for n in [4, 4, 4, 8] {
            self.optional(n)?;
        }
        for _ in 0..2 {
            match self.u32()? {
                0 | 1 => {}
                2 => self.skip(8)?,
                _ => return Err(Stop::Done),
            }
        }
        Ok(())
    }
}

/// What the guard needs of a checked call.
#[derive(Debug, PartialEq, Eq)]
pub struct Call {
    pub xid: u32,
    pub prog: u32,
    pub vers: u32,
    pub proc_: u32,
    /// The uid of an AUTH_UNIX credential; `None` for other flavors.
    pub uid: Option<u32>,
    /// Where the procedure's arguments begin in the record.
    pub args: usize,
}

/// Checks an AUTH_UNIX credential's body; its uid.
fn auth_unix(body: &[u8]) -> Result<u32, Malformed> {
    let mut c = Cur { b: body, pos: 0 };
    let walk = (|| {
        c.u32()?; // stamp
        c.opaque(MAX_MACHINE_NAME)?;
        let uid = c.u32()?;
        c.u32()?; // gid
        let groups = c.u32()? as usize;
        if groups > MAX_GROUPS || groups * 4 > c.left() {
            return Err(Stop::Bad(Malformed::BadAuth));
        }
        Ok(uid)
    })();
    match walk {
        Ok(uid) => Ok(uid),
        // A credential cut short fails the crate's decoding harmlessly; still, it is garbage.
        Err(_) => Err(Malformed::BadAuth),
    }
}

/// Checks a call record and clamps the reply sizes it asks for; see the module comment.
pub fn check_call(record: &mut [u8]) -> Result<Call, Malformed> {
    let mut clamps = Vec::new();
    let call = {
        let mut c = Cur { b: record, pos: 0 };
        let header = (|| {
            let xid = c.u32()?;
            if c.u32()? != 0 {
                return Err(Stop::Bad(Malformed::NotACall));
            }
            let _rpcvers = c.u32()?;
            let (prog, vers, proc_) = (c.u32()?, c.u32()?, c.u32()?);
            let flavor = c.u32()?;
            let body = c.opaque(MAX_AUTH).map_err(|_| Malformed::BadAuth)?;
            let uid = match flavor {
                AUTH_UNIX => Some(auth_unix(body)?),
                _ => None,
            };
            let _verifier_flavor = c.u32()?;
            c.opaque(MAX_AUTH).map_err(|_| Malformed::BadAuth)?;
            Ok(Call {
                xid,
                prog,
                vers,
                proc_,
                uid,
                args: c.pos,
            })
        })();
        let call = match header {
            Ok(call) => call,
            Err(Stop::Done) => return Err(Malformed::Short),
            Err(Stop::Bad(m)) => return Err(m),
        };
        match arguments(&call, &mut c, &mut clamps) {
            Ok(()) | Err(Stop::Done) => {}
            Err(Stop::Bad(m)) => return Err(m),
        }
        call
    };
    for at in clamps {
        let v = u32::from_be_bytes(record[at..at + 4].try_into().expect("4"));
        record[at..at + 4].copy_from_slice(&v.min(MAX_REPLY).to_be_bytes());
    }
    Ok(call)
}

/// Walks the arguments of the procedures the crate decodes (others it answers without).
fn arguments(call: &Call, c: &mut Cur, clamps: &mut Vec<usize>) -> Result<(), Stop> {
    let any = usize::MAX;
    let mut clamp = |c: &mut Cur| {
        let at = c.pos;
        c.u32()?;
        // Recorded only once the four bytes are known to be there.
        clamps.push(at);
        Ok(())
    };
    match (call.prog, call.vers, call.proc_) {
        (PROG_MOUNT, 3, 1 | 3) => c.opaque(any).map(|_| ()),
        (PROG_NFS, 3, proc_) => {
            c.opaque(any)?; // the file handle every procedure starts with
            match proc_ {
                // LOOKUP, CREATE, MKDIR, REMOVE, RMDIR: a name (then fixed-size fields).
                3 | 8 | 9 | 12 | 13 => c.opaque(any).map(|_| ()),
                // READ: offset, count.
                6 => {
                    c.skip(8)?;
                    clamp(c)
                }
                // WRITE: offset, count, stable, data.
                7 => {
                    c.skip(16)?;
                    c.opaque(any).map(|_| ())
                }
                // SYMLINK: name, attributes, target.
                10 => {
                    c.opaque(any)?;
                    c.sattr3()?;
                    c.opaque(any).map(|_| ())
                }
                // RENAME: name, then a second handle and name.
                14 => {
                    c.opaque(any)?;
                    c.opaque(any)?;
                    c.opaque(any).map(|_| ())
                }
                // READDIR: cookie, verifier, count.
                16 => {
                    c.skip(16)?;
                    clamp(c)
                }
                // READDIRPLUS: cookie, verifier, dircount, maxcount.
                17 => {
                    c.skip(16)?;
                    clamp(c)?;
                    clamp(c)
                }
                _ => Ok(()),
            }
        }
        // Portmap's GETPORT carries fixed-size fields only.
        (PROG_PORTMAP, _, _) => Ok(()),
        _ => Ok(()),
    }
}

/// The xid of a record (its first word): a call's or a reply's.
pub fn xid(record: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(record.get(..4)?.try_into().ok()?))
}

/// Sets the xid of a record (its first word), which must hold one.
pub fn set_xid(record: &mut [u8], xid: u32) {
    record[..4].copy_from_slice(&xid.to_be_bytes());
}

/// The reply to a mutating call the crate does not answer with NFS3ERR_ROFS (it answers MKNOD
/// and LINK with PROC_UNAVAIL): an accepted call whose result is NFS3ERR_ROFS and empty
/// attributes. `None` for every other call.
pub fn rofs_reply(call: &Call) -> Option<Vec<u8>> {
    const REPLY: u32 = 1;
    const NFS3ERR_ROFS: u32 = 30;
    // After the status: MKNOD3resfail is a wcc_data (pre_op_attr, post_op_attr: both absent);
    // LINK3resfail a post_op_attr and a wcc_data.
    let absent = match (call.prog, call.vers, call.proc_) {
        (PROG_NFS, 3, 11) => 2,
        (PROG_NFS, 3, 15) => 3,
        _ => return None,
    };
    // xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE (flavor, empty body), SUCCESS, the result.
    let words = [call.xid, REPLY, 0, 0, 0, 0, NFS3ERR_ROFS]
        .into_iter()
        .chain(std::iter::repeat_n(0, absent));
    Some(words.flat_map(u32::to_be_bytes).collect())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An RPC call with an AUTH_UNIX credential.
    pub fn call(xid: u32, prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
        let mut cred = Vec::new();
        for w in [0u32, 8] {
            cred.extend_from_slice(&w.to_be_bytes());
        }
        cred.extend_from_slice(b"digestfs");
        for w in [0u32, 0, 1, 0] {
            cred.extend_from_slice(&w.to_be_bytes());
        }
        let mut out = Vec::new();
        for w in [xid, 0, 2, prog, vers, proc_, AUTH_UNIX, cred.len() as u32] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend_from_slice(&cred);
        out.extend_from_slice(&[0; 8]); // AUTH_NULL verifier
        out.extend_from_slice(args);
        out
    }

    fn opaque(b: &[u8]) -> Vec<u8> {
        let mut out = (b.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(b);
        out.resize(out.len() + (4 - b.len() % 4) % 4, 0);
        out
    }

    #[test]
    fn good_calls_pass_and_counts_are_clamped() {
        let mut read = opaque(&[1; 9]);
        read.extend_from_slice(&7u64.to_be_bytes());
        read.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut rec = call(42, PROG_NFS, 3, 6, &read);
        let c = check_call(&mut rec).unwrap();
        assert_eq!((c.xid, c.proc_, c.uid), (42, 6, Some(0)));
        assert_eq!(
            &rec[c.args..c.args + 4],
            &9u32.to_be_bytes(),
            "the handle's length"
        );
        assert_eq!(&rec[rec.len() - 4..], &MAX_REPLY.to_be_bytes());

        let mut lookup = opaque(&[1; 9]);
        lookup.extend(opaque(b"guava.jar"));
        assert!(check_call(&mut call(1, PROG_NFS, 3, 3, &lookup)).is_ok());
        assert!(check_call(&mut call(1, PROG_MOUNT, 3, 1, &opaque(b"/"))).is_ok());
        // Unknown programs, versions and procedures are the crate's to answer.
        assert!(check_call(&mut call(1, 99, 1, 0, &[])).is_ok());
        assert!(check_call(&mut call(1, PROG_NFS, 4, 1, &[0xff; 4])).is_ok());
    }

    #[test]
    fn clamped_calls_cut_anywhere_never_panic() {
        // READ, READDIR and READDIRPLUS with their counts, cut at every length: a count that is
        // not there is not clamped (the crate refuses the short call itself).
        for (proc_, fixed) in [(6u32, 12usize), (16, 24), (17, 24)] {
            let mut args = opaque(&[1; 9]);
            args.extend(std::iter::repeat_n(0xff, fixed));
            let whole = call(5, PROG_NFS, 3, proc_, &args);
            for cut in 0..=whole.len() {
                let _ = check_call(&mut whole[..cut].to_vec());
            }
        }
    }

    #[test]
    fn the_writes_the_crate_does_not_refuse_are_answered_rofs() {
        for (proc_, words) in [(11u32, 9usize), (15, 10)] {
            let c = Call {
                xid: 77,
                prog: PROG_NFS,
                vers: 3,
                proc_,
                uid: None,
                args: 0,
            };
            let reply = rofs_reply(&c).unwrap();
            assert_eq!(reply.len(), words * 4, "proc {proc_}");
            assert_eq!(xid(&reply), Some(77));
            assert_eq!(&reply[24..28], &30u32.to_be_bytes(), "NFS3ERR_ROFS");
        }
        for proc_ in [0, 6, 7] {
            let c = Call {
                xid: 1,
                prog: PROG_NFS,
                vers: 3,
                proc_,
                uid: None,
                args: 0,
            };
            assert!(rofs_reply(&c).is_none());
        }
    }

    #[test]
    fn lengths_past_the_call_are_refused() {
        // A handle claiming 4 GiB in a call of a few dozen bytes.
        let mut rec = call(1, PROG_NFS, 3, 1, &u32::MAX.to_be_bytes());
        assert_eq!(check_call(&mut rec), Err(Malformed::BadLength));
        // A WRITE whose data claims more than is there.
        let mut write = opaque(&[1; 9]);
        write.extend_from_slice(&[0; 16]);
        write.extend_from_slice(&1000u32.to_be_bytes());
        write.extend_from_slice(&[0; 10]);
        assert_eq!(
            check_call(&mut call(1, PROG_NFS, 3, 7, &write)),
            Err(Malformed::BadLength)
        );
        // A credential whose group list claims 2^30 entries.
        let mut rec = call(1, PROG_NFS, 3, 0, &[]);
        let groups_at = 32 + 4 + 4 + 8 + 8;
        rec[groups_at..groups_at + 4].copy_from_slice(&(1u32 << 30).to_be_bytes());
        assert_eq!(check_call(&mut rec), Err(Malformed::BadAuth));
        // Truncated headers and replies.
        let whole = call(1, PROG_NFS, 3, 0, &[]);
        for cut in 0..whole.len() {
            assert!(check_call(&mut whole[..cut].to_vec()).is_err(), "cut {cut}");
        }
        let mut reply = whole.clone();
        reply[7] = 1;
        assert_eq!(check_call(&mut reply), Err(Malformed::NotACall));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(mut b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = check_call(&mut b);
        }

        #[test]
        fn calls_with_random_arguments_never_panic_and_keep_lengths_honest(
            prog in prop_oneof![Just(PROG_NFS), Just(PROG_MOUNT), Just(PROG_PORTMAP), any::<u32>()],
            vers in prop_oneof![Just(3u32), Just(2u32), any::<u32>()],
            proc_ in 0u32..24,
            args in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut rec = call(7, prog, vers, proc_, &args);
            if let Ok(c) = check_call(&mut rec) {
                prop_assert_eq!((c.prog, c.vers, c.proc_), (prog, vers, proc_));
            }
        }
    }
}
