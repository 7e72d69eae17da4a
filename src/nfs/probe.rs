//! A tiny NFSv3 client: enough to tell that the server answers (an NFS NULL call, then the
//! MOUNT protocol's MNT of `/`), which is what `mount --daemon` waits for before it reports
//! the mount ready.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const PROG_NFS: u32 = 100_003;
const PROG_MOUNT: u32 = 100_005;
const AUTH_UNIX: u32 = 1;

fn word(out: &mut Vec<u8>, w: u32) {
    out.extend_from_slice(&w.to_be_bytes());
}

fn opaque(out: &mut Vec<u8>, b: &[u8]) {
    word(out, b.len() as u32);
    out.extend_from_slice(b);
    out.resize(out.len() + (4 - b.len() % 4) % 4, 0);
}

/// One call with an AUTH_UNIX credential of our own uid; the accepted reply's result bytes.
fn call(s: &mut TcpStream, xid: u32, prog: u32, proc_: u32, args: &[u8]) -> io::Result<Vec<u8>> {
    let mut cred = Vec::new();
    word(&mut cred, 0);
    opaque(&mut cred, b"digestfs");
    word(&mut cred, unsafe { libc::geteuid() });
    word(&mut cred, unsafe { libc::getegid() });
    word(&mut cred, 0);
    let mut msg = Vec::new();
    for w in [xid, 0, 2, prog, 3, proc_, AUTH_UNIX] {
        word(&mut msg, w);
    }
    opaque(&mut msg, &cred);
    word(&mut msg, 0);
    word(&mut msg, 0);
    msg.extend_from_slice(args);
    let mut framed = (msg.len() as u32 | 0x8000_0000).to_be_bytes().to_vec();
    framed.extend_from_slice(&msg);
    s.write_all(&framed)?;

    let mut reply = Vec::new();
    loop {
        let mut h = [0u8; 4];
        s.read_exact(&mut h)?;
        let h = u32::from_be_bytes(h);
        let len = (h & 0x7fff_ffff) as usize;
        if reply.len() + len > 1 << 20 {
            return Err(io::Error::other("reply too large"));
        }
        let start = reply.len();
        reply.resize(start + len, 0);
        s.read_exact(&mut reply[start..])?;
        if h & 0x8000_0000 != 0 {
            break;
        }
    }
    let bad = |what: &str| io::Error::other(format!("{what} in the reply to a probe"));
    let w = |i: usize| -> io::Result<u32> {
        reply
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4")))
            .ok_or_else(|| bad("a short reply"))
    };
    // xid, REPLY, MSG_ACCEPTED, verifier (flavor, length, body), accept_stat.
    if w(0)? != xid || w(1)? != 1 || w(2)? != 0 {
        return Err(bad("a refusal"));
    }
    let verf_len = w(4)? as usize;
    let at = 5 * 4 + verf_len.div_ceil(4) * 4;
    let stat = reply
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4")))
        .ok_or_else(|| bad("a short reply"))?;
    if stat != 0 {
        return Err(bad(&format!("accept status {stat}")));
    }
    Ok(reply[at + 4..].to_vec())
}

/// Whether the server at `addr` answers an NFS NULL call and a MOUNT of `/`.
pub fn probe(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    call(&mut s, 1, PROG_NFS, 0, &[])?;
    let mut path = Vec::new();
    opaque(&mut path, b"/");
    let res = call(&mut s, 2, PROG_MOUNT, 1, &path)?;
    match res.get(..4) {
        Some([0, 0, 0, 0]) => Ok(()),
        _ => Err(io::Error::other("MOUNT of / was refused")),
    }
}

/// Probes until the server answers, or fails with the last reason after `limit` (a line for
/// the readiness pipe, hence text).
pub fn wait_until_answering(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        match probe(addr, Duration::from_secs(5)) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "the NFS server on {addr} did not answer within {limit:?}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
