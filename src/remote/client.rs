//! A gRPC client for the REAPI CAS and ByteStream services: bounded concurrency, a deadline on
//! every call (and on every message of a stream), retries with jittered exponential backoff on
//! the codes that mean "try again". It reads and writes blobs only through the callers'
//! closures.

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::proto;
use crate::store::{Digest, StoreError};

const FIND_MISSING: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const BATCH_READ: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs";
const BATCH_UPDATE: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";
const GET_TREE: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree";
const CAPABILITIES: &str = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities";
const BYTESTREAM_READ: &str = "/google.bytestream.ByteStream/Read";
const BYTESTREAM_WRITE: &str = "/google.bytestream.ByteStream/Write";
/// ByteStream writes send the blob in messages of this size (well under gRPC's 4 MiB default).
const WRITE_CHUNK: usize = 1 << 20;

/// How to reach the remote CAS; named after Pants' own `remote_*` options.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `grpc://host:port` or `grpcs://host:port`.
    pub address: String,
    pub instance_name: String,
    /// PEM bundle to trust for `grpcs://` instead of the system's roots.
    pub ca_certs: Option<std::path::PathBuf>,
    /// Extra metadata on every request (authentication tokens).
    pub headers: Vec<(String, String)>,
    /// The deadline of one call, and the longest a stream may go without a message.
    pub timeout: Duration,
    /// Further attempts after a retryable failure.
    pub retries: u32,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Answer reads of a large blob that is still being fetched with ranged reads, before the
    /// whole blob is verified (see docs/remote.md).
    pub ranged_reads: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Config(String),
    #[error("{op}: {code:?}: {message}")]
    Rpc {
        op: &'static str,
        code: Code,
        message: String,
    },
    #[error("{op}: no answer within {secs:.1} s")]
    Timeout { op: &'static str, secs: f64 },
    /// The caller's closure failed to take or give the bytes (the local store, usually).
    #[error("{0}")]
    Sink(#[source] Arc<StoreError>),
}

impl RemoteError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            RemoteError::Rpc {
                code: Code::NotFound,
                ..
            }
        )
    }

    fn is_unimplemented(&self) -> bool {
        matches!(
            self,
            RemoteError::Rpc {
                code: Code::Unimplemented,
                ..
            }
        )
    }

    /// Whether the server could not be reached or did not answer in time.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RemoteError::Timeout { .. } => true,
            RemoteError::Rpc { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::DeadlineExceeded
                    | Code::Cancelled
            ),
            _ => false,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            RemoteError::Timeout { .. } => true,
            RemoteError::Rpc { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::DeadlineExceeded
                    | Code::Internal
                    | Code::Unknown
            ),
            _ => false,
        }
    }
}

/// Counters for `digestfs status`; every field only grows, but `last_*`.
#[derive(Default)]
pub struct Counters {
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pub retries: AtomicU64,
    pub find_missing: AtomicU64,
    pub batch_reads: AtomicU64,
    pub bytestream_reads: AtomicU64,
    pub get_trees: AtomicU64,
    pub uploads: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Seconds since the epoch of the last call that got an answer, and of the last failure.
    pub last_ok_unix: AtomicU64,
    pub last_failure_unix: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct Client {
    channel: Channel,
    instance_name: String,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    timeout: Duration,
    retries: u32,
    limit: Semaphore,
    pub counters: Arc<Counters>,
}

/// Turns `grpc://` and `grpcs://` into the `http://`/`https://` URIs tonic expects.
fn endpoint_uri(address: &str) -> Result<(String, bool), RemoteError> {
    let bad = |why: &str| RemoteError::Config(format!("remote store address {address:?}: {why}"));
    let (scheme, rest) = address
        .split_once("://")
        .ok_or_else(|| bad("expected grpc://HOST:PORT or grpcs://HOST:PORT"))?;
    let tls = match scheme {
        "grpc" | "http" => false,
        "grpcs" | "https" => true,
        _ => return Err(bad("the scheme must be grpc:// or grpcs://")),
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(bad("expected HOST:PORT after the scheme, with no path"));
    }
    Ok((
        format!("{}://{host}", if tls { "https" } else { "http" }),
        tls,
    ))
}

impl Client {
    /// Sets up a channel that connects on first use, so a mount starts while the remote is down.
    /// Must run inside a tokio runtime.
    pub fn new(cfg: &RemoteConfig) -> Result<Client, RemoteError> {
        let (uri, tls) = endpoint_uri(&cfg.address)?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| RemoteError::Config(format!("remote store address {uri}: {e}")))?
            .connect_timeout(cfg.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(cfg.timeout);
        if tls {
            let mut tls_cfg = ClientTlsConfig::new();
            tls_cfg = match &cfg.ca_certs {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        RemoteError::Config(format!("--remote-ca-certs {}: {e}", path.display()))
                    })?;
                    tls_cfg.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls_cfg.with_native_roots(),
            };
            endpoint = endpoint
                .tls_config(tls_cfg)
                .map_err(|e| RemoteError::Config(format!("TLS for {}: {e}", cfg.address)))?;
        } else if cfg.ca_certs.is_some() {
            return Err(RemoteError::Config(
                "--remote-ca-certs needs a grpcs:// remote store address".into(),
            ));
        }
        let mut headers = Vec::new();
        for (k, v) in &cfg.headers {
            let key = AsciiMetadataKey::from_str(&k.to_ascii_lowercase())
                .map_err(|_| RemoteError::Config(format!("--remote-header {k:?}: bad name")))?;
            let value = AsciiMetadataValue::from_str(v)
                .map_err(|_| RemoteError::Config(format!("--remote-header {k}: bad value")))?;
            headers.push((key, value));
        }
        Ok(Client {
            channel: endpoint.connect_lazy(),
            instance_name: cfg.instance_name.clone(),
            headers,
            timeout: cfg.timeout,
            retries: cfg.retries,
            limit: Semaphore::new(cfg.concurrency.max(1)),
            counters: Arc::default(),
        })
    }

    /// tonic reports a call that outlived its deadline as CANCELLED "Timeout expired": that is
    /// our timeout, and worth a retry, unlike a real cancellation.
    fn deadline_as_timeout(&self, e: RemoteError) -> RemoteError {
        match e {
            RemoteError::Rpc {
                op,
                code: Code::Cancelled,
                message,
            } if message == "Timeout expired" => RemoteError::Timeout {
                op,
                secs: self.timeout.as_secs_f64(),
            },
            e => e,
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.timeout);
        for (k, v) in &self.headers {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        req
    }

    fn record<T>(&self, res: &Result<T, RemoteError>) {
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(_) => c.last_ok_unix.store(now_unix(), Ordering::Relaxed),
            // NotFound is an answer, not a fault of the remote.
            Err(e) if e.is_not_found() => c.last_ok_unix.store(now_unix(), Ordering::Relaxed),
            Err(e) => {
                c.failures.fetch_add(1, Ordering::Relaxed);
                c.last_failure_unix.store(now_unix(), Ordering::Relaxed);
                *c.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are spent.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut attempt: F) -> Result<T, RemoteError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RemoteError>>,
    {
        let mut tries = 0;
        loop {
            let res = {
                let _permit = self.limit.acquire().await.expect("semaphore never closed");
                match tokio::time::timeout(self.timeout, attempt()).await {
                    Ok(r) => r,
                    Err(_) => Err(RemoteError::Timeout {
                        op,
                        secs: self.timeout.as_secs_f64(),
                    }),
                }
            };
            let res = res.map_err(|e| self.deadline_as_timeout(e));
            self.record(&res);
            match res {
                Err(e) if e.retryable() && tries < self.retries => {
                    tries += 1;
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    log::debug!("{e}; retry {tries} of {}", self.retries);
                    tokio::time::sleep(backoff(tries)).await;
                }
                other => return other,
            }
        }
    }

    async fn unary<Req, Resp>(
        &self,
        op: &'static str,
        path: &'static str,
        msg: Req,
    ) -> Result<Resp, RemoteError>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.retrying(op, || {
            let req = self.request(msg.clone());
            let channel = self.channel.clone();
            async move {
                let mut grpc = ready(channel, op).await?;
                let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
                grpc.unary(req, PathAndQuery::from_static(path), codec)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| rpc_error(op, s))
            }
        })
        .await
    }

    pub async fn capabilities(&self) -> Result<proto::ServerCapabilities, RemoteError> {
        let req = proto::GetCapabilitiesRequest {
            instance_name: self.instance_name.clone(),
        };
        self.unary("GetCapabilities", CAPABILITIES, req).await
    }

    /// The digests among `digests` that the remote lacks.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, RemoteError> {
        self.counters.find_missing.fetch_add(1, Ordering::Relaxed);
        let req = proto::FindMissingBlobsRequest {
            instance_name: self.instance_name.clone(),
            blob_digests: digests.iter().map(proto::Digest::from).collect(),
            digest_function: proto::SHA256,
        };
        let resp: proto::FindMissingBlobsResponse =
            self.unary("FindMissingBlobs", FIND_MISSING, req).await?;
        resp.missing_blob_digests
            .iter()
            .map(|d| {
                Digest::from_parts(&d.hash, d.size_bytes).map_err(|e| RemoteError::Rpc {
                    op: "FindMissingBlobs",
                    code: Code::Internal,
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Reads small blobs in one call: each is `Some(bytes)`, or `None` if the remote lacks it.
    /// The bytes are as the server sent them: callers verify.
    pub async fn batch_read(
        &self,
        digests: &[Digest],
    ) -> Result<Vec<(Digest, Option<Vec<u8>>)>, RemoteError> {
        self.counters.batch_reads.fetch_add(1, Ordering::Relaxed);
        let req = proto::BatchReadBlobsRequest {
            instance_name: self.instance_name.clone(),
            digests: digests.iter().map(proto::Digest::from).collect(),
            digest_function: proto::SHA256,
        };
        let resp: proto::BatchReadBlobsResponse =
            self.unary("BatchReadBlobs", BATCH_READ, req).await?;
        let mut out = Vec::with_capacity(digests.len());
        for r in resp.responses {
            let Some(d) = r.digest.as_ref().and_then(|d| d.try_into().ok()) else {
                continue;
            };
            let code = r.status.as_ref().map_or(0, |s| s.code);
            match Code::from_i32(code) {
                Code::Ok => {
                    self.counters
                        .bytes_received
                        .fetch_add(r.data.len() as u64, Ordering::Relaxed);
                    out.push((d, Some(r.data)));
                }
                Code::NotFound => out.push((d, None)),
                code => {
                    return Err(RemoteError::Rpc {
                        op: "BatchReadBlobs",
                        code,
                        message: format!(
                            "{d}: {}",
                            r.status.map(|s| s.message).unwrap_or_default()
                        ),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Every `Directory` under `root`, as the bytes the server sent, all pages. `Ok(None)` when
    /// the server does not implement `GetTree`.
    /// `progress` grows by the bytes of each page as it arrives, so a caller waiting on a large
    /// tree can tell a slow stream from a stalled one.
    pub async fn get_tree(
        &self,
        root: &Digest,
        progress: &AtomicU64,
    ) -> Result<Option<Vec<Vec<u8>>>, RemoteError> {
        self.counters.get_trees.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = proto::GetTreeRequest {
                instance_name: self.instance_name.clone(),
                root_digest: Some(root.into()),
                page_size: 0,
                page_token: page_token.clone(),
                digest_function: proto::SHA256,
            };
            let res = self
                .retrying("GetTree", || {
                    let req = self.request(req.clone());
                    let channel = self.channel.clone();
                    async move {
                        let mut grpc = ready(channel, "GetTree").await?;
                        let codec = tonic_prost::ProstCodec::<_, proto::GetTreeResponse>::default();
                        let mut stream = grpc
                            .server_streaming(req, PathAndQuery::from_static(GET_TREE), codec)
                            .await
                            .map_err(|s| rpc_error("GetTree", s))?
                            .into_inner();
                        let mut pages = Vec::new();
                        while let Some(page) = stream
                            .message()
                            .await
                            .map_err(|s| rpc_error("GetTree", s))?
                        {
                            let bytes: usize = page.directories.iter().map(|d| d.len()).sum();
                            progress.fetch_add(bytes as u64, Ordering::Relaxed);
                            pages.push(page);
                        }
                        Ok(pages)
                    }
                })
                .await;
            let pages = match res {
                Err(e) if e.is_unimplemented() => return Ok(None),
                other => other?,
            };
            let mut next = String::new();
            for page in pages {
                for d in page.directories {
                    self.counters
                        .bytes_received
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                    out.push(d);
                }
                next = page.next_page_token;
            }
            if next.is_empty() {
                return Ok(Some(out));
            }
            page_token = next;
        }
    }

    fn resource(&self, digest: &Digest) -> String {
        let tail = format!("blobs/{}/{}", digest.hex(), digest.size);
        if self.instance_name.is_empty() {
            tail
        } else {
            format!("{}/{tail}", self.instance_name)
        }
    }

    /// Streams a blob from `offset` into `sink` by `ByteStream.Read`. A stream that breaks is
    /// resumed from the last byte received, so a retry never re-sends what arrived. No message
    /// may take longer than the timeout. Returns false if the remote lacks the blob.
    pub async fn read_blob(
        &self,
        digest: &Digest,
        offset: u64,
        limit: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<(), StoreError> + Send),
    ) -> Result<bool, RemoteError> {
        self.counters
            .bytestream_reads
            .fetch_add(1, Ordering::Relaxed);
        let end = if limit == 0 {
            digest.size
        } else {
            (offset + limit).min(digest.size)
        };
        let mut got = offset;
        let mut tries = 0;
        loop {
            let _permit = self.limit.acquire().await.expect("semaphore never closed");
            let res = self.read_once(digest, &mut got, end, sink).await;
            let res = res.map_err(|e| self.deadline_as_timeout(e));
            drop(_permit);
            self.record(&res);
            match res {
                Ok(()) => return Ok(true),
                Err(e) if e.is_not_found() => return Ok(false),
                Err(e) if e.retryable() && tries < self.retries => {
                    tries += 1;
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    log::debug!("{e}; resuming {digest} at byte {got}, retry {tries}");
                    tokio::time::sleep(backoff(tries)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_once(
        &self,
        digest: &Digest,
        got: &mut u64,
        end: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<(), StoreError> + Send),
    ) -> Result<(), RemoteError> {
        const OP: &str = "ByteStream.Read";
        let timeout = |_| RemoteError::Timeout {
            op: OP,
            secs: self.timeout.as_secs_f64(),
        };
        let req = self.request(proto::ReadRequest {
            resource_name: self.resource(digest),
            read_offset: *got as i64,
            read_limit: (end - *got) as i64,
        });
        let mut grpc = tokio::time::timeout(self.timeout, ready(self.channel.clone(), OP))
            .await
            .map_err(timeout)??;
        let codec = tonic_prost::ProstCodec::<_, proto::ReadResponse>::default();
        let call = grpc.server_streaming(req, PathAndQuery::from_static(BYTESTREAM_READ), codec);
        let mut stream = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(timeout)?
            .map_err(|s| rpc_error(OP, s))?
            .into_inner();
        while *got < end {
            let msg = tokio::time::timeout(self.timeout, stream.message())
                .await
                .map_err(timeout)?
                .map_err(|s| rpc_error(OP, s))?;
            let Some(msg) = msg else {
                return Err(RemoteError::Rpc {
                    op: OP,
                    code: Code::DataLoss,
                    message: format!("{digest}: the stream ended at byte {got} of {end}"),
                });
            };
            self.counters
                .bytes_received
                .fetch_add(msg.data.len() as u64, Ordering::Relaxed);
            // Some servers (BuildGrid's in-memory storage) send past read_limit: keep only what
            // was asked for. Bytes past the end of a whole blob fail its verification anyway.
            let room = (end - *got) as usize;
            let data = &msg.data[..msg.data.len().min(room)];
            sink(data).map_err(|e| RemoteError::Sink(Arc::new(e)))?;
            *got += data.len() as u64;
        }
        Ok(())
    }

    /// Uploads blobs that fit in one call.
    pub async fn batch_update(&self, blobs: Vec<(Digest, Vec<u8>)>) -> Result<(), RemoteError> {
        self.counters.uploads.fetch_add(1, Ordering::Relaxed);
        let bytes: u64 = blobs.iter().map(|(_, b)| b.len() as u64).sum();
        let req = proto::BatchUpdateBlobsRequest {
            instance_name: self.instance_name.clone(),
            requests: blobs
                .into_iter()
                .map(|(d, data)| proto::BatchUpdateRequest {
                    digest: Some((&d).into()),
                    data,
                })
                .collect(),
            digest_function: proto::SHA256,
        };
        let resp: proto::BatchUpdateBlobsResponse =
            self.unary("BatchUpdateBlobs", BATCH_UPDATE, req).await?;
        for r in resp.responses {
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                let d = r.digest.map(|d| d.hash).unwrap_or_default();
                return Err(RemoteError::Rpc {
                    op: "BatchUpdateBlobs",
                    code: Code::from_i32(s.code),
                    message: format!("{d}: {}", s.message),
                });
            }
        }
        self.counters.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Uploads one blob by `ByteStream.Write`, reading it through `chunk(offset, len)`.
    pub async fn write_blob(
        &self,
        digest: &Digest,
        chunk: &(dyn Fn(u64, usize) -> Result<Vec<u8>, StoreError> + Sync),
    ) -> Result<(), RemoteError> {
        self.counters.uploads.fetch_add(1, Ordering::Relaxed);
        const OP: &str = "ByteStream.Write";
        let resource = format!(
            "{}uploads/{:016x}/{}",
            if self.instance_name.is_empty() {
                String::new()
            } else {
                format!("{}/", self.instance_name)
            },
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ std::process::id() as u64,
            self.resource(digest)
        );
        let mut messages = Vec::new();
        let mut offset = 0u64;
        loop {
            let len = ((digest.size - offset) as usize).min(WRITE_CHUNK);
            let data = chunk(offset, len).map_err(|e| RemoteError::Sink(Arc::new(e)))?;
            let finish = offset + len as u64 == digest.size;
            messages.push(proto::WriteRequest {
                resource_name: if offset == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: offset as i64,
                finish_write: finish,
                data,
            });
            offset += len as u64;
            if finish {
                break;
            }
        }
        self.retrying(OP, || {
            let req = self.request(tokio_stream::iter(messages.clone()));
            let channel = self.channel.clone();
            async move {
                let mut grpc = ready(channel, OP).await?;
                let codec = tonic_prost::ProstCodec::<_, proto::WriteResponse>::default();
                grpc.client_streaming(req, PathAndQuery::from_static(BYTESTREAM_WRITE), codec)
                    .await
                    .map_err(|s| rpc_error(OP, s))
            }
        })
        .await?;
        self.counters
            .bytes_sent
            .fetch_add(digest.size, Ordering::Relaxed);
        Ok(())
    }
}

impl TryFrom<&proto::Digest> for Digest {
    type Error = crate::store::DigestParseError;
    fn try_from(d: &proto::Digest) -> Result<Digest, Self::Error> {
        Digest::from_parts(&d.hash, d.size_bytes)
    }
}

/// A client on the shared channel, once the channel can take a call.
async fn ready(channel: Channel, op: &'static str) -> Result<Grpc<Channel>, RemoteError> {
    let mut grpc = Grpc::new(channel);
    grpc.ready().await.map_err(|e| RemoteError::Rpc {
        op,
        code: Code::Unavailable,
        message: e.to_string(),
    })?;
    Ok(grpc)
}

fn rpc_error(op: &'static str, s: Status) -> RemoteError {
    RemoteError::Rpc {
        op,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// 100 ms, 200 ms, 400 ms ... up to 5 s, each with up to 50% random jitter so that many
/// waiting clients do not retry in step.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100u64 << attempt.min(6).saturating_sub(1))
        .min(Duration::from_secs(5));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64((nanos % 1000) as f64 / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_and_mapped() {
        assert_eq!(
            endpoint_uri("grpc://localhost:9092").unwrap(),
            ("http://localhost:9092".into(), false)
        );
        assert_eq!(
            endpoint_uri("grpcs://cache.example.com:443/").unwrap(),
            ("https://cache.example.com:443".into(), true)
        );
        for bad in ["localhost:9092", "ftp://x:1", "grpc://", "grpc://h:1/path"] {
            let e = endpoint_uri(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(
            backoff(1) >= Duration::from_millis(100) && backoff(1) < Duration::from_millis(151)
        );
        assert!(backoff(3) >= Duration::from_millis(400));
        assert!(backoff(30) <= Duration::from_millis(7500));
    }
}
