//! The control protocol: one JSON object per line each way, versioned. Documented in
//! docs/PROTOCOL.md; keep the two in step.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const VERSION: u32 = 1;
/// A request line longer than this is refused and the connection closed.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Bind {
        path: String,
        digest: String,
        #[serde(default = "default_layer")]
        layer: String,
        #[serde(default = "yes")]
        verify: bool,
        /// Who holds the layer (see `DigestFs::bind_as`); absent: no one in particular.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    Unbind {
        path: String,
        #[serde(default)]
        layer: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    Views,
    Status,
    Which {
        path: String,
    },
    /// `mount --takeover`: the connection, inodes and views of this mount, for the daemon that
    /// asks (src/fuse/takeover.rs). Not a request and reply like the others: after it the
    /// connection carries the handover.
    Takeover {
        /// The handover format the asker takes; another than the daemon's is refused.
        format: u32,
        /// The asker's version, for the log.
        #[serde(default)]
        version: String,
        /// What the asker would serve: refused unless it is this daemon's mountpoint and
        /// store (absolute paths).
        mountpoint: std::path::PathBuf,
        store: std::path::PathBuf,
    },
}

fn default_layer() -> String {
    crate::fs::DEFAULT_LAYER.to_string()
}

fn yes() -> bool {
    true
}

/// A request as it arrives: the version beside the operation.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: serde_json::Value,
}

/// What kind of refusal an error is, so a caller can act on it without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A digest is not in the store (nor on the remote CAS): store or fetch it, then retry.
    Missing,
    /// Two layers give one name different content, or a view would sit inside another.
    Conflict,
    /// The request itself is wrong: malformed, a bad path, digest or layer, nothing bound there.
    BadRequest,
    /// The remote CAS could not be reached or did not answer in time, or the daemon is busy:
    /// retry later.
    Unavailable,
    /// Anything else: corrupt store data, I/O errors. Retrying will not help.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewInfo {
    pub path: String,
    pub layers: BTreeMap<String, String>,
    /// Who holds each layer that has owners.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<String, Vec<String>>,
    /// Entries at the top of the view (after merging layers); absent if it could not be read.
    pub entries: Option<u64>,
}

/// `mount_state`: the control socket answers, the mount is not ready yet.
pub const MOUNT_STARTING: &str = "starting";
/// `mount_state`: the mountpoint shows this daemon's mount.
pub const MOUNT_ATTACHED: &str = "attached";
/// `mount_state`: the mount was made and is gone from the mountpoint (unmounted, lazily
/// detached, or covered by another mount), though the daemon still runs.
pub const MOUNT_DETACHED: &str = "detached";
/// `mount_state`: serving without a mount (`--frontend nfs --nfs-no-mount`).
pub const MOUNT_NONE: &str = "none";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingInfo {
    pub queues: usize,
    pub entries_per_queue: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub pid: u32,
    /// The daemon's digestfs version; absent from daemons that predate it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
    pub mountpoint: String,
    /// The store's absolute path.
    pub store: String,
    /// How many LMDB shards the daemon reads the store as (Pants' `--local-store-shard-count`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shard_count: Option<u32>,
    /// `fuse` or `nfs`.
    #[serde(default)]
    pub frontend: String,
    /// FUSE: `dev` (/dev/fuse) or `io-uring`, once the session is up.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub transport: Option<String>,
    /// FUSE: how many requests were answered over the io_uring queues (0 on `dev`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ring_requests: Option<u64>,
    /// FUSE over io-uring: its queues (one per possible CPU) and the entries each lends.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ring: Option<RingInfo>,
    /// FUSE: opens answered with a backing id (passthrough), on either transport.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub passthrough_opens: Option<u64>,
    /// FUSE: backing ids made (one per blob, reused by every later open of it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backing_ids: Option<u64>,
    /// FUSE: how many requests were answered over /dev/fuse (forgets and interrupts aside).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dev_requests: Option<u64>,
    /// Whether the mountpoint shows this daemon's own mount now: false before it is ready, once
    /// it was unmounted or lazily detached (the daemon may live on while files are held open),
    /// and when serving NFS without a mount. Absent from daemons that predate it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attached: Option<bool>,
    /// One of [`MOUNT_STARTING`], [`MOUNT_ATTACHED`], [`MOUNT_DETACHED`], [`MOUNT_NONE`];
    /// empty from daemons that predate it.
    #[serde(default)]
    pub mount_state: String,
    /// The port the NFS front end listens on (`--frontend nfs`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nfs_port: Option<u16>,
    /// The Prometheus endpoint (`--metrics-listen`), as a URL.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub metrics: Option<String>,
    pub uptime_secs: u64,
    pub requests: u64,
    pub lookups: u64,
    pub opens: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub errors: u64,
    pub open_handles: u64,
    pub inodes: u64,
    pub cached_dir_entries: u64,
    pub views: u64,
    /// Full lease rounds (everything bound); the `lease_last_*` fields describe the last one.
    pub lease_rounds: u64,
    /// Trees renewed on their own as they were bound.
    #[serde(default)]
    pub lease_tree_renewals: u64,
    /// Seconds since the epoch of the last lease renewal (0: none yet).
    pub lease_last_unix: u64,
    pub lease_last_renewed: u64,
    pub lease_last_missing: u64,
    /// How long the last renewal took, and the longest LMDB write lock it held.
    #[serde(default)]
    pub lease_last_duration_ms: u64,
    #[serde(default)]
    pub lease_last_longest_txn_us: u64,
    /// `Directory`s checked by binds since the mount started.
    #[serde(default)]
    pub verified_dirs: u64,
    /// Present when the mount reads through to a remote CAS.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub remote: Option<crate::remote::RemoteStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WhichInfo {
    File {
        digest: String,
        executable: bool,
    },
    Tree {
        digest: String,
    },
    /// A view or subdirectory that is the union of several trees.
    Merged {
        digests: Vec<String>,
    },
    Symlink {
        target: String,
    },
    /// A directory of the mount itself (the root, a directory above a view, `.digestfs`).
    Mount,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// With `error`: what kind of refusal it is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_kind: Option<ErrorKind>,
    /// With `error`: the digest it concerns, if one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub digest: Option<String>,
    /// With `error`: the path under the mount root it concerns, if one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    /// For bind and unbind: whether the view changed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub changed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub views: Option<Vec<ViewInfo>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<StatusInfo>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub which: Option<WhichInfo>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            v: VERSION,
            ok: true,
            error: None,
            error_kind: None,
            digest: None,
            path: None,
            changed: None,
            views: None,
            status: None,
            which: None,
        }
    }

    /// A refusal of `kind`, with the message a person reads.
    pub fn refused(kind: ErrorKind, msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            error_kind: Some(kind),
            ..Response::ok()
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> Response {
        Response::refused(ErrorKind::BadRequest, msg)
    }

    pub fn about_digest(mut self, digest: Option<String>) -> Response {
        self.digest = digest;
        self
    }

    pub fn about_path(mut self, path: Option<String>) -> Response {
        self.path = path;
        self
    }
}

/// Parses one request line; the error is the message that goes back to the client as a
/// `bad_request` refusal, so it is text.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let env: Envelope =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    if env.v != VERSION {
        return Err(format!(
            "unsupported protocol version {} (this daemon speaks {VERSION})",
            env.v
        ));
    }
    serde_json::from_value(env.request).map_err(|e| format!("bad request: {e}"))
}

/// Serialises a request with its version, as one line (without the newline).
pub fn encode_request(req: &Request) -> String {
    let mut value = serde_json::to_value(req).expect("requests serialise");
    value["v"] = VERSION.into();
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_defaults() {
        let req = parse_request(br#"{"v":1,"op":"bind","path":"a/b","digest":"x"}"#).unwrap();
        assert_eq!(
            req,
            Request::Bind {
                path: "a/b".into(),
                digest: "x".into(),
                layer: "default".into(),
                verify: true,
                owner: None,
            }
        );
        assert_eq!(parse_request(encode_request(&req).as_bytes()).unwrap(), req);
    }

    #[test]
    fn bad_requests_are_errors() {
        for line in [
            &b"not json"[..],
            br#"{"op":"views"}"#,
            br#"{"v":2,"op":"views"}"#,
            br#"{"v":1,"op":"frobnicate"}"#,
            br#"{"v":1,"op":"bind","path":"a"}"#,
            b"",
        ] {
            assert!(
                parse_request(line).is_err(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn mutated_requests_never_panic(pos in 0usize..64, byte in any::<u8>()) {
            let mut line = encode_request(&Request::Bind {
                path: "jvm/resolves/x/lib".into(),
                digest: "ab-1".into(),
                layer: "g".into(),
                verify: false,
                owner: Some("pants-bsp/1/s".into()),
            }).into_bytes();
            let i = pos % line.len();
            line[i] = byte;
            let _ = parse_request(&line);
        }
    }
}
