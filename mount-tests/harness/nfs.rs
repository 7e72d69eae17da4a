//! An NFS server for tests: `digestfs mount --frontend nfs --nfs-no-mount` over a private copy of
//! the fixture store, with a control socket of its own, its port read from `status --json`.
//! Nothing is mounted (this kernel has no NFS client); clients are libnfs's tools and the raw
//! client in `mount-tests/nfs.rs`. `Drop` stops the daemon on every path, and a watchdog kills
//! it if a test outlives its time limit.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

/// How long one NFS test may take before the watchdog kills its server.
const TEST_LIMIT: Duration = Duration::from_secs(120);

pub struct NfsServer {
    pub tmp: tempfile::TempDir,
    pub socket: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    child: Option<Child>,
    done: Arc<AtomicBool>,
}

impl NfsServer {
    /// Serves a fresh copy of the fixture store with `--bind PATH=DIGEST` for each pair.
    pub fn fixture(binds: &[(&str, &str)]) -> NfsServer {
        let tmp = fixture_store();
        let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));

        let (socket, log) = (tmp.path().join("ctl.sock"), tmp.path().join("daemon.log"));
        std::fs::create_dir_all(&mnt).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("--store").arg(&store).arg("mount");
        cmd.args(["--frontend", "nfs", "--nfs-no-mount", "--control"])
            .arg(&socket);
        for (path, digest) in binds {
            cmd.arg("--bind").arg(format!("{path}={digest}"));
        }
        cmd.arg(&mnt)
            .env("RUST_LOG", "digestfs=debug")
            .env("DIGESTFS_DAEMON_CHILD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let mut s = NfsServer {
            tmp,
            socket,
            mnt,
            log,
            port: 0,
            child: Some(child),
            done: Arc::new(AtomicBool::new(false)),
        };
        s.watchdog();
        let stdout = s.child.as_mut().unwrap().stdout.take().unwrap();
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        assert_eq!(
            line.trim_end(),
            "READY",
            "the NFS server did not become ready:\n{}",
            s.log_text()
        );
        let status: serde_json::Value =
            serde_json::from_str(&s.dfs_ok(&["status", "--json"])).expect("status --json is JSON");
        assert_eq!(status["frontend"], "nfs");
        s.port = status["nfs_port"].as_u64().expect("an NFS port") as u16;
        s
    }

    fn watchdog(&self) {
        let done = self.done.clone();
        let pid = self.child.as_ref().map(|c| c.id());
        std::thread::spawn(move || {
            let deadline = Instant::now() + TEST_LIMIT;
            while Instant::now() < deadline {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("watchdog: an NFS test outlived {TEST_LIMIT:?}; killing its server");
            if let Some(pid) = pid {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
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

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the daemon to exit on its own (after a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = wait_until("the NFS server to exit", limit, || {
            child.try_wait().unwrap()
        });
        self.child = None;
        status
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NfsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.done.store(true, Ordering::Relaxed);
        if std::thread::panicking() {
            eprintln!("--- NFS server log ---\n{}", self.log_text());
        }
    }
}
