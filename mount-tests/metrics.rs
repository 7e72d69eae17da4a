//! `--metrics-listen`: a real Prometheus server (Debian's `prometheus`, installed by
//! `scripts/install-deps --tests`) scrapes the daemon on loopback, and its HTTP API answers
//! with digestfs series.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::harness::buildgrid::free_port;
use crate::harness::Mount;

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn scraping(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: digestfs\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus (scripts/install-deps --tests installs it)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The instant vector of `query`, as (labels, value) pairs.
    fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let out = run_timeout(
            Command::new("curl").args([
                "-sf",
                "-G",
                &format!("http://127.0.0.1:{}/api/v1/query", self.port),
                "--data-urlencode",
                &format!("query={query}"),
            ]),
            T,
        );
        if !out.status.success() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_daemon_on_loopback() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Every byte through the daemon, none read by the kernel itself (passthrough).
    let (m, socket) = Mount::fixture_with_control(
        &[("lib", JAR_TREE)],
        &["--metrics-listen", &addr, "--passthrough", "off"],
    );
    let status: serde_json::Value = serde_json::from_str(&dfs_ok(&[
        "status",
        "--json",
        m.mnt.to_str().unwrap(),
        "--control",
        socket.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(
        status["metrics"],
        format!("http://{addr}/metrics"),
        "{status}"
    );
    let mut read = 0u64;
    for entry in std::fs::read_dir(m.path("lib/lib")).unwrap() {
        read += std::fs::read(entry.unwrap().path()).unwrap().len() as u64;
    }
    let prom = Prometheus::scraping(&addr);
    // The bytes the daemon served, by source, as Prometheus stored them from a scrape.
    let bytes = wait_until("Prometheus to have scraped digestfs", T, || {
        let r = prom.query("sum(digestfs_read_bytes_total)");
        r.first().map(|&(_, v)| v).filter(|&v| v > 0.0)
    });
    assert_eq!(
        bytes as u64, read,
        "every byte read went through the daemon once"
    );
    let by_source = prom.query("digestfs_read_bytes_total");
    let sources: Vec<_> = by_source
        .iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(l, _)| l["source"].as_str().unwrap().to_string())
        .collect();
    // The fixture's jars are both LMDB blobs and large files.
    assert!(sources.contains(&"lmdb".to_string()), "{by_source:?}");
    assert!(sources.contains(&"file".to_string()), "{by_source:?}");
    // Latencies by opcode, for this run's transport.
    let reads = prom.query("digestfs_request_duration_seconds_count{op=\"read\"}");
    assert!(
        !reads.is_empty() && reads.iter().all(|(_, v)| *v >= 1.0),
        "{reads:?}"
    );
    let views = prom.query("digestfs_views");
    assert_eq!(views.first().map(|v| v.1), Some(1.0), "{views:?}");
}

#[test]
fn metrics_refuse_an_address_other_machines_reach_unless_asked() {
    let tmp = fixture_store();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = crate::harness::UnmountOnDrop(&mnt);
    let out = run_timeout(
        Command::new(bin())
            .arg("--store")
            .arg(tmp.path().join("store"))
            .args(["mount", "--daemon", "--metrics-listen", "0.0.0.0:0"])
            .arg(&mnt),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--metrics-allow-remote"),
        "{out:?}"
    );
    assert!(!crate::harness::is_mounted(&mnt));
}
