//! Real mounts for tests. Every mount is torn down on every path: `Drop` runs
//! `fusermount3 -u`, then `-u -z`, then kills the daemon; a watchdog does the same if a test
//! outlives its time limit, so a stuck mount can neither hang CI nor leak into the next test.

pub mod buildgrid;
pub mod nfs;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::*;

/// How long one mounted test may take before the watchdog tears its mount down.
const TEST_LIMIT: Duration = Duration::from_secs(300);

/// A `digestfs … mount` running in the foreground as the test's child, as `mount --daemon`
/// runs its daemon: READY (or ERROR and the reason) on stdout once it answers, the log in a
/// file. A watchdog runs `on_timeout` and kills it if the test outlives its limit; dropping it
/// stops it (SIGTERM, then SIGKILL) and shows its log if the test failed.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    done: Arc<AtomicBool>,
}

impl Daemon {
    /// Starts `digestfs --store STORE mount ARGS… MOUNTPOINT` and waits until it is ready.
    pub fn start(
        store: &Path,
        args: &[&str],
        mountpoint: &Path,
        log: PathBuf,
        limit: Duration,
        on_timeout: impl FnOnce() + Send + 'static,
    ) -> Daemon {
        Daemon::start_logging(
            store,
            args,
            mountpoint,
            log,
            limit,
            on_timeout,
            Some("digestfs=debug"),
        )
    }

    /// [`Daemon::start`] with `RUST_LOG` set to `rust_log` (`None`: unset, the default filter).
    pub fn start_logging(
        store: &Path,
        args: &[&str],
        mountpoint: &Path,
        log: PathBuf,
        limit: Duration,
        on_timeout: impl FnOnce() + Send + 'static,
        rust_log: Option<&str>,
    ) -> Daemon {
        let mut cmd = Command::new(bin());
        cmd.arg("--store")
            .arg(store)
            .arg("mount")
            .args(args)
            .arg(mountpoint);
        match rust_log {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
        cmd.env("DIGESTFS_DAEMON_CHILD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let d = Daemon {
            child: Some(child),
            log,
            done: Arc::new(AtomicBool::new(false)),
        };
        d.watchdog(limit, on_timeout);
        // The watchdog bounds this wait.
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        assert_eq!(
            line.trim_end(),
            "READY",
            "the daemon did not become ready:\n{}",
            d.log_text()
        );
        d
    }

    fn watchdog(&self, limit: Duration, on_timeout: impl FnOnce() + Send + 'static) {
        let done = self.done.clone();
        let pid = self.pid();
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("watchdog: a test outlived {limit:?}; stopping its daemon {pid}");
            on_timeout();
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for the daemon to exit on its own (after an unmount or a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = wait_until("the daemon to exit", limit, || child.try_wait().unwrap());
        self.child = None;
        status
    }

    /// Kills the daemon with SIGKILL; its watcher (`digestfs watch-mount`) then detaches the
    /// mount.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Kills the daemon's watcher, then the daemon, with SIGKILL: what no process can clean
    /// up after (a cgroup killed whole, say) leaves a stale mount.
    pub fn kill9_with_watcher(&mut self) {
        let watchers = children(self.pid());
        assert!(!watchers.is_empty(), "the daemon has no watcher");
        for pid in watchers {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        self.kill9();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = wait_until_or_not(Duration::from_secs(5), || child.try_wait().ok().flatten());
            let _ = child.kill();
            let _ = child.wait();
        }
        self.done.store(true, Ordering::Relaxed);
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log_text());
        }
    }
}

/// Polls `f` like [`wait_until`], but gives up quietly after `limit`.
fn wait_until_or_not<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Mount {
    pub tmp: tempfile::TempDir,
    pub mnt: PathBuf,
    pub store: PathBuf,
    pub daemon: Daemon,
}

/// Whether every thread of `pid` is stopped (state T in /proc).
pub fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name's closing parenthesis.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    })
}

/// The child processes of `pid` (of any of its threads).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The daemon's `status` over its control socket.
pub fn status(socket: &Path) -> digestfs::control::protocol::StatusInfo {
    digestfs::control::call(socket, &digestfs::control::protocol::Request::Status)
        .unwrap()
        .status
        .unwrap()
}

pub fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mnt.to_str().unwrap().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// statfs(2), which FUSE never answers from a cache.
pub fn statfs(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts a mount that no [`Mount`] owns (one made by `mount --daemon`, say) when dropped.
pub struct UnmountOnDrop<'a>(pub &'a Path);

impl Drop for UnmountOnDrop<'_> {
    fn drop(&mut self) {
        teardown(self.0);
    }
}

pub fn teardown(mnt: &Path) {
    for args in [&["-u"][..], &["-u", "-z"][..]] {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new("fusermount3")
            .args(args)
            .arg(mnt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Mount {
    /// Mounts a fresh copy of the fixture store with `--bind PATH=DIGEST` for each pair.
    pub fn fixture(binds: &[(&str, &str)], extra: &[&str]) -> Mount {
        let tmp = fixture_store();
        Mount::over(tmp, binds, extra)
    }

    /// Like [`Mount::fixture`], with the control socket at a path of the test's choosing
    /// (`<tmp>/ctl/ctl.sock`, returned) instead of the default under the runtime directory.
    pub fn fixture_with_control(binds: &[(&str, &str)], extra: &[&str]) -> (Mount, PathBuf) {
        let tmp = fixture_store();
        let socket = tmp.path().join("ctl").join("ctl.sock");
        std::fs::create_dir(socket.parent().unwrap()).unwrap();
        let mut args = extra.to_vec();
        args.extend(["--control", socket.to_str().unwrap()]);
        (Mount::over(tmp, binds, &args), socket)
    }

    /// Mounts the store at `tmp/store` on `tmp/mnt`, in the foreground as a child process.
    pub fn over(tmp: tempfile::TempDir, binds: &[(&str, &str)], extra: &[&str]) -> Mount {
        let mnt = tmp.path().join("mnt");
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&mnt).unwrap();
        let bind_args: Vec<String> = binds.iter().map(|(p, d)| format!("{p}={d}")).collect();
        let mut args: Vec<&str> = bind_args
            .iter()
            .flat_map(|b| ["--bind", b.as_str()])
            .collect();
        args.extend(extra);
        let torn = mnt.clone();
        let daemon = Daemon::start(
            &store,
            &args,
            &mnt,
            tmp.path().join("daemon.log"),
            TEST_LIMIT,
            move || teardown(&torn),
        );
        assert!(is_mounted(&mnt) && statfs(&mnt).is_ok());
        Mount {
            tmp,
            mnt,
            store,
            daemon,
        }
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// `digestfs bind` of `digest` at `path`, through the mount's own control socket `socket`.
    pub fn bind(&self, socket: &Path, path: &str, digest: &str) {
        dfs_ok(&[
            "bind",
            "--control",
            socket.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
            path,
            digest,
        ]);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Waits for the daemon to exit on its own (after an unmount or a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.daemon.wait_exit(limit)
    }

    /// Kills the daemon with SIGKILL; its watcher detaches the mount.
    pub fn kill9(&mut self) {
        self.daemon.kill9()
    }

    /// Kills the daemon and its watcher with SIGKILL, leaving a stale mount behind.
    pub fn kill9_with_watcher(&mut self) {
        self.daemon.kill9_with_watcher()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Unmounted first, so the daemon (dropped next) exits on its own.
        teardown(&self.mnt);
    }
}

/// The distribution's Python, which any user can run (a root-only pyenv may come first on the
/// PATH); `scripts/install-deps --tests` installs it.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// A throwaway user, removed again however the test ends.
pub struct TempUser {
    name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TempUser {
    pub fn create() -> TempUser {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("dfs{}x{n}", std::process::id());
        // useradd locks /etc/passwd: one at a time within this test process.
        let _serial = USERADD.lock().unwrap_or_else(|p| p.into_inner());
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .output()
            .expect("useradd (package passwd) is needed");
        assert!(
            out.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = |flag: &str| -> u32 {
            let o = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8(o.stdout).unwrap().trim().parse().unwrap()
        };
        TempUser {
            uid: id("-u"),
            gid: id("-g"),
            name,
        }
    }
}

impl TempUser {
    /// Runs `program args…` as this user, with a time limit.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        run_timeout(
            Command::new("setpriv")
                .arg(format!("--reuid={}", self.uid))
                .arg(format!("--regid={}", self.gid))
                .arg("--clear-groups")
                .arg(program)
                .args(args),
            Duration::from_secs(60),
        )
    }
}

static USERADD: Mutex<()> = Mutex::new(());

impl Drop for TempUser {
    fn drop(&mut self) {
        let _serial = USERADD.lock().unwrap_or_else(|p| p.into_inner());
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// A shell whose working directory is `file`'s: it lists it, and hashes `file`, until
/// `stop_file` exists; any failure ends it with status 1.
pub fn shell_inside(file: &Path, stop_file: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e '{}' ]; do ls . >/dev/null && sha256sum '{}' >/dev/null || exit 1; done",
            stop_file.display(),
            file.file_name().unwrap().to_str().unwrap()
        ))
        .current_dir(file.parent().unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}
