//! An NFS server for tests: `digestfs mount --frontend nfs --nfs-no-mount` over a private copy of
//! the fixture store, with a control socket of its own, its port read from `status --json`.
//! Nothing is mounted (this kernel has no NFS client); clients are libnfs's tools and the raw
//! client in `mount-tests/nfs.rs`. `Drop` stops the daemon on every path, and a watchdog kills
//! it if a test outlives its time limit.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use super::Daemon;
use crate::common::*;

/// How long one NFS test may take before the watchdog kills its server.
const TEST_LIMIT: Duration = Duration::from_secs(120);

pub struct NfsServer {
    pub tmp: tempfile::TempDir,
    pub socket: PathBuf,
    pub mnt: PathBuf,
    pub port: u16,
    daemon: Daemon,
}

impl NfsServer {
    /// Serves a fresh copy of the fixture store with `--bind PATH=DIGEST` for each pair.
    pub fn fixture(binds: &[(&str, &str)]) -> NfsServer {
        NfsServer::fixture_logging(binds, Some("digestfs=debug"))
    }

    /// [`NfsServer::fixture`] with `RUST_LOG` set to `rust_log` (`None`: unset).
    pub fn fixture_logging(binds: &[(&str, &str)], rust_log: Option<&str>) -> NfsServer {
        let tmp = fixture_store();
        NfsServer::over(tmp, binds, rust_log)
    }

    /// Serves the store at `tmp/store` (which the caller may have added to).
    pub fn over(
        tmp: tempfile::TempDir,
        binds: &[(&str, &str)],
        rust_log: Option<&str>,
    ) -> NfsServer {
        let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
        let socket = tmp.path().join("ctl.sock");
        std::fs::create_dir_all(&mnt).unwrap();
        let bind_args: Vec<String> = binds.iter().map(|(p, d)| format!("{p}={d}")).collect();
        let mut args = vec![
            "--frontend",
            "nfs",
            "--nfs-no-mount",
            "--control",
            socket.to_str().unwrap(),
        ];
        args.extend(bind_args.iter().flat_map(|b| ["--bind", b.as_str()]));
        let daemon = Daemon::start_logging(
            &store,
            &args,
            &mnt,
            tmp.path().join("daemon.log"),
            TEST_LIMIT,
            || {},
            rust_log,
        );
        let mut s = NfsServer {
            tmp,
            socket,
            mnt,
            port: 0,
            daemon,
        };
        let status: serde_json::Value =
            serde_json::from_str(&s.dfs_ok(&["status", "--json"])).expect("status --json is JSON");
        assert_eq!(status["frontend"], "nfs");
        s.port = status["nfs_port"].as_u64().expect("an NFS port") as u16;
        s
    }

    /// A libnfs URL for `path` under the export's root.
    pub fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1//{}?nfsport={p}&mountport={p}",
            path.trim_start_matches('/'),
            p = self.port
        )
    }

    /// Runs `digestfs ARGS… MOUNTPOINT --control SOCKET` (a control command on this server).
    pub fn dfs(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .arg(&self.mnt)
            .arg("--control")
            .arg(&self.socket);
        run_timeout(&mut cmd, T)
    }

    pub fn dfs_ok(&self, args: &[&str]) -> String {
        let out = self.dfs(args);
        assert!(
            out.status.success(),
            "digestfs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Sets the default layer of the view at `path` (creating or replacing it).
    pub fn bind(&self, path: &str, digest: &str) {
        self.bind_layer(path, digest, "default");
    }

    pub fn bind_layer(&self, path: &str, digest: &str, layer: &str) {
        let mut cmd = Command::new(bin());
        cmd.arg("bind")
            .arg(&self.mnt)
            .args([path, digest, "--layer", layer])
            .arg("--control")
            .arg(&self.socket);
        stdout_ok(run_timeout(&mut cmd, T));
    }

    pub fn unbind(&self, path: &str) {
        let mut cmd = Command::new(bin());
        cmd.arg("unbind")
            .arg(&self.mnt)
            .arg(path)
            .arg("--control")
            .arg(&self.socket);
        stdout_ok(run_timeout(&mut cmd, T));
    }

    /// Removes one layer of the view at `path`.
    pub fn unbind_layer(&self, path: &str, layer: &str) {
        let mut cmd = Command::new(bin());
        cmd.arg("unbind")
            .arg(&self.mnt)
            .args([path, "--layer", layer])
            .arg("--control")
            .arg(&self.socket);
        stdout_ok(run_timeout(&mut cmd, T));
    }

    /// The daemon's anonymous resident memory (`RssAnon` of /proc/PID/status), in bytes.
    pub fn rss_anon(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("RssAnon:"))
            .expect("RssAnon in /proc/PID/status");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        self.daemon.alive()
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Waits for the daemon to exit on its own (after a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.daemon.wait_exit(limit)
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}
