//! `mount --daemon`: the command re-runs itself in a new session with stdout as a readiness
//! pipe, and exits 0 only once the child says the mount answers (or 1 with the child's reason).
//! Re-executing rather than forking keeps the child free of a forked multi-threaded state.
//!
//! The daemon keeps nothing of its caller's: stdin is /dev/null, stdout the readiness pipe
//! (then /dev/null), stderr the `--log-file` or /dev/null, no other descriptor is inherited,
//! it runs in a session of its own, and once it has read what it needs from relative paths it
//! moves to `/` ([`leave_cwd`]). So a caller that reads our output to its end (Python's
//! `subprocess.run(capture_output=True)`) gets the end as soon as we exit, and the daemon pins
//! no directory.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

const CHILD_ENV: &str = "DIGESTFS_DAEMON_CHILD";
const READY: &str = "READY";

static REPORTED: AtomicBool = AtomicBool::new(false);

pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some_and(|v| v == "1")
}

/// In the daemon child, tells the waiting parent how the mount went (once); elsewhere, logs it.
pub fn report_ready(res: Result<(), String>) {
    if REPORTED.swap(true, Ordering::SeqCst) {
        return;
    }
    if !is_child() {
        if res.is_ok() {
            log::info!("ready; unmount with `digestfs unmount MOUNTPOINT` (or stop with SIGTERM)");
            // Type=notify units: the mount answers.
            crate::systemd::notify(&format!("READY=1\nMAINPID={}\n", std::process::id()));
        }
        return;
    }
    let line = match &res {
        Ok(()) => READY.to_string(),
        Err(msg) => format!("ERROR {msg}"),
    };
    // Nothing else may reach the pipe once the parent has gone, and the parent may return (and
    // its caller look at our descriptors) as soon as it reads the line: so /dev/null takes fd 1
    // first, the line goes through a private copy of the pipe, and that copy is closed at once,
    // which is the end of file the parent waits for.
    let _ = std::io::stdout().lock().flush();
    let pipe = std::os::fd::AsFd::as_fd(&std::io::stdout()).try_clone_to_owned();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: both are descriptors this process owns; dup2 replaces fd 1 atomically.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1) };
    }
    if let Ok(pipe) = pipe {
        let _ = writeln!(std::fs::File::from(pipe), "{line}");
    }
}

/// In the daemon child, once every relative path it was given has been read or made absolute:
/// moves to `/`, so the daemon does not keep its caller's directory busy (or unmountable).
pub fn leave_cwd() {
    if is_child() {
        if let Err(e) = std::env::set_current_dir("/") {
            log::warn!("could not change the daemon's directory to /: {e}");
        }
    }
}

/// Starts the daemon and waits until it reports; its pid, or the reason it gave (a line of text
/// from the child, hence a `String`). Its stderr goes to `log_file` (appended), else /dev/null.
/// Only a daemon that takes a mount over (`notify`: a unit's reload) keeps systemd's notify
/// socket, and under a unit its stderr (the journal): any other is not the unit's.
pub fn spawn_and_wait(log_file: Option<&Path>, notify: bool) -> Result<u32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding our own executable: {e}"))?;
    let args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon" && a != "-d")
        .collect();
    // Panics and anything else written to stderr land in the log, if there is one; a unit's
    // reload keeps the unit's (its journal, or a file), but never a pipe, which its reader
    // would wait on to its end.
    let stderr = match log_file {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Stdio::from)
            .map_err(|e| format!("--log-file {}: {e}", path.display()))?,
        None if notify && crate::systemd::under_unit() && !crate::os::stderr_is_pipe() => {
            Stdio::inherit()
        }
        None => Stdio::null(),
    };
    // Descriptors our caller gave us (beyond stdio) must not reach the daemon.
    crate::os::cloexec_inherited_fds()
        .map_err(|e| format!("closing inherited descriptors: {e}"))?;
    let mut cmd = Command::new(exe);
    if !notify {
        cmd.env_remove("NOTIFY_SOCKET");
    }
    cmd.args(args)
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    let line = line.trim_end();
    if line == READY {
        // The child closes its last copy of the pipe right after the line; waiting for that end
        // means that when we return, the daemon holds nothing of ours. Bounded, in case a process
        // it started inherited the pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
        return Ok(child.id());
    }
    if let Some(msg) = line.strip_prefix("ERROR ") {
        let _ = child.wait();
        return Err(msg.to_string());
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    Err(format!(
        "the daemon exited ({status}) before the mount was ready"
    ))
}
