//! Prometheus metrics for operators (`mount --metrics-listen ADDR`): `GET /metrics` answers the
//! Prometheus text format (0.0.4). Request latencies are histograms the transports feed as they
//! answer; everything else is read at scrape time from the counters `status` reports, so a
//! mount without metrics pays nothing but one atomic load per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::control::protocol::StatusInfo;
use crate::fs::{DigestFs, ReadSource};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    transport: &'static str,
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// Request latencies by opcode and transport.
#[derive(Clone, Debug)]
pub struct Latency(Histograms);

impl Default for Latency {
    fn default() -> Self {
        // 10 µs (a cached lookup) to about 2.6 s (a remote fetch), by fours.
        fn histogram() -> Histogram {
            Histogram::new(exponential_buckets(1e-5, 4.0, 10))
        }
        Latency(Family::new_with_constructor(histogram))
    }
}

impl Latency {
    pub fn observe(&self, op: &'static str, transport: &'static str, start: Instant) {
        self.0
            .get_or_create(&RequestLabels { op, transport })
            .observe(start.elapsed().as_secs_f64());
    }
}

/// Times one request until dropped, if metrics are on.
pub struct Timed<'a> {
    latency: &'a OnceLock<Latency>,
    op: &'static str,
    transport: &'static str,
    start: Option<Instant>,
}

pub fn timed<'a>(
    latency: &'a OnceLock<Latency>,
    op: &'static str,
    transport: &'static str,
) -> Timed<'a> {
    let start = latency.get().map(|_| Instant::now());
    Timed {
        latency,
        op,
        transport,
        start,
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        if let (Some(l), Some(start)) = (self.latency.get(), self.start) {
            l.observe(self.op, self.transport, start);
        }
    }
}

/// What a scrape reads besides the latencies.
pub struct Sources {
    pub core: Arc<DigestFs>,
    /// The daemon's `status`, as the control socket answers it.
    pub status: Box<dyn Fn() -> StatusInfo + Send + Sync>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
    frontend: String,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Sources {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = (self.status)();
        let e = &mut e;
        counter(
            e,
            "requests",
            "Requests that reached the filesystem core",
            s.requests,
        )?;
        counter(e, "lookups", "Lookups answered", s.lookups)?;
        counter(e, "opens", "Opens answered with a handle", s.opens)?;
        counter(e, "reads", "Reads answered", s.reads)?;
        counter(
            e,
            "errors",
            "Requests answered with a store error",
            s.errors,
        )?;
        {
            let bytes = &self.core.stats.read_bytes_by_source;
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let mut m = e.encode_descriptor(
                "read_bytes",
                "Bytes the daemon served, by where they came from",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for src in ReadSource::ALL {
                let c = ConstCounter::new(load(&bytes[src as usize]));
                c.encode(m.encode_family(&SourceLabel { source: src.name() })?)?;
            }
        }
        counter(
            e,
            "passthrough_opens",
            "Opens the kernel serves itself from the store file (their bytes never reach the daemon)",
            s.passthrough_opens.unwrap_or(0),
        )?;
        counter(
            e,
            "backing_ids",
            "Backing ids made for passthrough: one per blob, reused by its later opens",
            s.backing_ids.unwrap_or(0),
        )?;
        counter(
            e,
            "ring_requests",
            "Requests answered over the io_uring queues",
            s.ring_requests.unwrap_or(0),
        )?;
        counter(
            e,
            "dev_requests",
            "Requests answered over /dev/fuse",
            s.dev_requests.unwrap_or(0),
        )?;
        {
            let g = ConstGauge::new(1i64);
            let mut m = e.encode_descriptor(
                "transport",
                "The front end and FUSE transport serving the mount (value 1)",
                None,
                g.metric_type(),
            )?;
            let labels = TransportLabel {
                transport: s.transport.clone().unwrap_or_default(),
                frontend: s.frontend.clone(),
            };
            g.encode(m.encode_family(&labels)?)?;
        }
        let namespace = self.core.namespace();
        let views = namespace.views();
        let layers: usize = views.iter().map(|(_, v)| v.layers.len()).sum();
        gauge(e, "views", "Views bound", views.len() as u64)?;
        gauge(e, "layers", "Layers bound, over all views", layers as u64)?;
        gauge(e, "inodes", "Inodes the kernel holds", s.inodes)?;
        gauge(e, "open_handles", "Open file handles", s.open_handles)?;
        gauge(
            e,
            "cached_dir_entries",
            "Directory entries cached",
            s.cached_dir_entries,
        )?;
        gauge(
            e,
            "attached",
            "1 while the mountpoint shows this daemon's mount",
            u64::from(s.attached == Some(true)),
        )?;
        gauge(
            e,
            "uptime_seconds",
            "Seconds since the daemon started",
            s.uptime_secs,
        )?;
        counter(
            e,
            "lease_rounds",
            "Full lease renewal rounds",
            s.lease_rounds,
        )?;
        gauge(
            e,
            "lease_last_missing",
            "Blobs the last lease round found missing",
            s.lease_last_missing,
        )?;
        if let Some(r) = &s.remote {
            counter(e, "remote_calls", "Calls to the remote CAS", r.calls)?;
            counter(
                e,
                "remote_call_failures",
                "Calls to the remote CAS that failed",
                r.call_failures,
            )?;
            counter(
                e,
                "remote_retries",
                "Calls to the remote CAS retried",
                r.retries,
            )?;
            counter(
                e,
                "remote_blobs_fetched",
                "Blobs fetched from the remote, verified and stored",
                r.blobs_fetched,
            )?;
            counter(
                e,
                "remote_fetch_failures",
                "Fetches from the remote that failed",
                r.fetch_failures,
            )?;
            counter(
                e,
                "remote_refused_corrupt",
                "Blobs from the remote refused for a wrong digest",
                r.refused_corrupt,
            )?;
            counter(
                e,
                "remote_ranged_reads",
                "Reads answered by ranged remote reads (before the blob was local)",
                r.ranged_reads,
            )?;
        }
        Ok(())
    }
}

/// The registry a scrape encodes: the latencies, and everything else read from `sources`.
pub fn registry(latency: &Latency, sources: Sources) -> Registry {
    let mut r = Registry::with_prefix("digestfs");
    r.register(
        "request_duration_seconds",
        "Time to answer a request, by opcode and transport",
        latency.0.clone(),
    );
    r.register_collector(Box::new(sources));
    r
}

/// The text a scrape gets.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        log::warn!("encoding the metrics: {e}");
    }
    out
}

/// The metrics listener, bound before the daemon serves so that `status` can name its address.
pub struct Listener {
    server: tiny_http::Server,
    pub addr: SocketAddr,
}

/// Binds `addr` (port 0: any free port).
pub fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("the metrics listener has no IP address"))?;
    Ok(Listener { server, addr })
}

impl Listener {
    /// Answers `GET /metrics` from a thread of its own, for the life of the process.
    pub fn spawn(self, registry: Registry) -> std::io::Result<()> {
        let server = self.server;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in server.incoming_requests() {
                    let path = req.url().split('?').next().unwrap_or("").to_string();
                    let res = if *req.method() != tiny_http::Method::Get {
                        req.respond(tiny_http::Response::empty(405))
                    } else if path == "/metrics" {
                        let header = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"text/plain; version=0.0.4; charset=utf-8"[..],
                        )
                        .expect("a valid header");
                        let body = tiny_http::Response::from_string(render(&registry));
                        req.respond(body.with_header(header))
                    } else {
                        let body = tiny_http::Response::from_string("see /metrics\n");
                        req.respond(body.with_status_code(404))
                    };
                    if let Err(e) = res {
                        log::debug!("metrics: answering a scrape: {e}");
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_timed_only_once_metrics_are_on() {
        let latency = OnceLock::new();
        drop(timed(&latency, "lookup", "dev"));
        latency.set(Latency::default()).unwrap();
        drop(timed(&latency, "lookup", "io-uring"));
        let mut r = Registry::with_prefix("digestfs");
        r.register(
            "request_duration_seconds",
            "t",
            latency.get().unwrap().0.clone(),
        );
        let text = render(&r);
        assert!(
            text.contains(
                r#"digestfs_request_duration_seconds_count{op="lookup",transport="io-uring"} 1"#
            ),
            "{text}"
        );
        assert!(
            !text.contains(r#"transport="dev""#),
            "timed before metrics were on: {text}"
        );
    }
}
