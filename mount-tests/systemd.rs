//! The packaged unit (packaging/systemd/digestfs@.service) run by a real systemd user manager:
//! `systemctl restart` and `reload` keep the mount while readers read through it, a restart
//! the next daemon cannot serve as it was ends the old mount without hanging its readers, a
//! crash mounts afresh, and `stop` unmounts.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::harness::{is_mounted, shell_inside, teardown};

/// Where `systemd --user` looks to see that systemd booted the machine (sd_booted). These
/// machines boot without it, so the test makes it for as long as its manager runs.
const BOOTED: &str = "/run/systemd/system";

/// A `systemd --user` of the test's own: its runtime and config directories in `dir`, the unit
/// installed there as the package installs it (but for the binary's path), for one instance.
struct UserManager {
    manager: Child,
    dir: PathBuf,
    unit: String,
    mnt: PathBuf,
    made_booted: bool,
}

impl UserManager {
    fn start(dir: &Path, store: &Path, mnt: &Path) -> UserManager {
        let made_booted = !Path::new(BOOTED).exists();
        if made_booted {
            std::fs::create_dir_all(BOOTED).unwrap();
        }
        let run = dir.join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let units = dir.join("config/systemd/user");
        std::fs::create_dir_all(units.join("digestfs@.service.d")).unwrap();
        let packaged = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/digestfs@.service"),
        )
        .unwrap();
        let ours = packaged.replace("/usr/bin/digestfs", bin().to_str().unwrap());
        std::fs::write(units.join("digestfs@.service"), ours).unwrap();
        // As `systemctl --user edit` would: the store, and the daemons' logs kept.
        std::fs::write(
            units.join("digestfs@.service.d/test.conf"),
            format!(
                "[Service]\nEnvironment=PANTS_LOCAL_STORE_DIR={} RUST_LOG=digestfs=debug\nStandardError=append:{}\n",
                store.display(),
                dir.join("unit.log").display()
            ),
        )
        .unwrap();
        let systemd = ["/usr/lib/systemd/systemd", "/lib/systemd/systemd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("systemd is installed (scripts/install-deps --tests)");
        let log = std::fs::File::create(dir.join("manager.log")).unwrap();
        let manager = Command::new(systemd)
            .arg("--user")
            .env("XDG_RUNTIME_DIR", &run)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let escaped = run_ok(
            Command::new("systemd-escape")
                .args(["--path", "--template", "digestfs@.service"])
                .arg(mnt),
        );
        let m = UserManager {
            manager,
            dir: dir.to_path_buf(),
            unit: escaped.trim().to_string(),
            mnt: mnt.to_path_buf(),
            made_booted,
        };
        wait_until("the user manager answers", T, || {
            m.try_systemctl(&["is-system-running"])
                .status
                .code()
                .filter(|_| run.join("systemd/private").exists())
        });
        m
    }

    fn try_systemctl(&self, args: &[&str]) -> Output {
        run_timeout(
            Command::new("systemctl")
                .arg("--user")
                .args(args)
                .env("XDG_RUNTIME_DIR", self.dir.join("run")),
            T,
        )
    }

    /// `systemctl --user VERB` of the unit, which must succeed.
    fn unit(&self, verb: &str) {
        let out = self.try_systemctl(&[verb, &self.unit]);
        assert!(
            out.status.success(),
            "systemctl --user {verb} {}: {}\n{}",
            self.unit,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    fn show(&self, property: &str) -> String {
        let out = self.try_systemctl(&["show", "-p", property, "--value", &self.unit]);
        stdout_ok(out).trim().to_string()
    }

    fn main_pid(&self) -> u32 {
        self.show("MainPID").parse().unwrap()
    }

    /// Runs `digestfs ARGS…` as the unit's user, finding its control socket.
    fn digestfs(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(bin())
                .args(args)
                .env("XDG_RUNTIME_DIR", self.dir.join("run")),
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("unit.log")).unwrap_or_default()
    }

    /// [`wait_until`], failing with the unit's log and systemd's.
    fn wait<V>(&self, what: &str, mut f: impl FnMut() -> Option<V>) -> V {
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if std::time::Instant::now() > deadline {
                let manager = std::fs::read_to_string(self.dir.join("manager.log"));
                panic!(
                    "timed out: {what}\n--- unit log\n{}\n--- systemd\n{}",
                    self.log(),
                    manager.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        let _ = self.try_systemctl(&["stop", &self.unit]);
        // SIGTERM: the manager stops what it runs, then exits.
        let pgid = -(self.manager.id() as i32);
        unsafe { libc::kill(pgid, libc::SIGTERM) };
        for _ in 0..750 {
            if self.manager.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        let _ = self.manager.wait();
        teardown(&self.mnt);
        if self.made_booted {
            let _ = std::fs::remove_dir(BOOTED);
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

/// The files of JAR_TREE under `root`: path → sha256.
fn jars(root: &Path) -> BTreeMap<PathBuf, String> {
    manifest()[JAR_TREE]
        .iter()
        .filter_map(|(path, kind)| match kind {
            Kind::File { digest, .. } => Some((
                root.join(path),
                digest.split('-').next().unwrap().to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// Reads `f` whole, its page cache dropped first so that the read reaches the daemon.
fn read_uncached(f: &std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; f.metadata()?.len() as usize];
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

#[test]
fn the_units_restart_and_reload_keep_the_mount_and_its_stop_ends_it() {
    let tmp = fixture_store();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("a-b").join("mnt");
    let sd = UserManager::start(tmp.path(), &store, &mnt);
    // The unit makes the mountpoint (and its parent) itself.
    sd.unit("start");
    let mp = mnt.to_str().unwrap();
    sd.digestfs(&["bind", mp, "v", JAR_TREE]);
    let device = std::fs::metadata(&mnt).unwrap().dev();
    let jars = jars(&mnt.join("v"));
    let inos: Vec<u64> = jars
        .keys()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect();
    let (held_path, held_sha) = jars
        .iter()
        .max_by_key(|(p, _)| std::fs::metadata(p).unwrap().len())
        .map(|(p, s)| (p.clone(), s.clone()))
        .unwrap();
    let held = std::fs::File::open(&held_path).unwrap();

    // Readers all along: the held jar through its descriptor, and every jar by path, each read
    // reaching the daemon of the moment (or waiting in the kernel for the next one).
    let stop = Arc::new(AtomicBool::new(false));
    let (errors, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let held = Arc::new(held);
    let mut readers = vec![];
    {
        let (stop, errors, reads, held) =
            (stop.clone(), errors.clone(), reads.clone(), held.clone());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match read_uncached(&held) {
                    Ok(b) if sha256_hex(&b) == held_sha => {}
                    other => {
                        eprintln!("held jar: {:?}", other.map(|b| b.len()));
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (stop, errors, reads, jars) =
            (stop.clone(), errors.clone(), reads.clone(), jars.clone());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (p, sha) in &jars {
                    let read = std::fs::File::open(p).and_then(|f| read_uncached(&f));
                    match read {
                        Ok(b) if sha256_hex(&b) == *sha => {}
                        other => {
                            eprintln!("{}: {:?}", p.display(), other.map(|b| b.len()));
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let stop_file = tmp.path().join("stop");
    let mut shell = shell_inside(&held_path, &stop_file);

    let mut pid = sd.main_pid();
    // Six starts in a row, which systemd's default start limit (5 in 10 s) refuses when they
    // come as quickly as they do here.
    let verbs = [
        "restart", "restart", "reload", "restart", "restart", "restart",
    ];
    for verb in verbs {
        let before = reads.load(Ordering::Relaxed);
        sd.wait("readers read in between", || {
            (reads.load(Ordering::Relaxed) > before + 2).then_some(())
        });
        sd.unit(verb);
        let new = sd.wait("a new main process", || {
            Some(sd.main_pid()).filter(|p| *p != pid && *p != 0)
        });
        sd.wait("the old daemon exits", || (!alive(pid)).then_some(()));
        assert_eq!(sd.show("ActiveState"), "active", "after {verb}");
        assert_eq!(
            std::fs::metadata(&mnt).unwrap().dev(),
            device,
            "{verb} mounted afresh\n{}",
            sd.log()
        );
        pid = new;
    }
    let before = reads.load(Ordering::Relaxed);
    sd.wait("readers read after the last restart", || {
        (reads.load(Ordering::Relaxed) > before + 2).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    std::fs::write(&stop_file, b"").unwrap();
    assert!(shell.wait().unwrap().success(), "the shell inside failed");
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "reads that failed or differed\n{}",
        sd.log()
    );
    let after: Vec<u64> = jars
        .keys()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect();
    assert_eq!(after, inos, "inode numbers changed");
    let log = sd.log();
    assert_eq!(
        log.matches("left it in systemd's fd store for the restart")
            .count(),
        verbs.iter().filter(|v| **v == "restart").count(),
        "{log}"
    );
    assert!(log.contains("handed it over"), "{log}");

    // The unit's store changed meanwhile: the next daemon does not serve the old mount, which
    // ends (its readers get an error, not a wait), and it mounts afresh.
    let other = tmp.path().join("store-2");
    run_ok(Command::new("cp").arg("-a").arg(&store).arg(&other));
    let conf = tmp
        .path()
        .join("config/systemd/user/digestfs@.service.d/test.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace(store.to_str().unwrap(), other.to_str().unwrap()),
    )
    .unwrap();
    stdout_ok(sd.try_systemctl(&["daemon-reload"]));
    sd.unit("restart");
    sd.wait("a fresh mount", || {
        std::fs::metadata(&mnt)
            .ok()
            .filter(|m| m.dev() != device && m.ino() == 1)
    });
    let log = sd.log();
    assert!(
        log.contains("not taking the FUSE connection systemd kept"),
        "{log}"
    );
    assert!(read_uncached(&held).is_err(), "the old mount still reads");
    // Views are restored only over the store they were bound in.
    assert!(!mnt.join("v").exists());
    sd.digestfs(&["bind", mp, "v", JAR_TREE]);
    let jar = std::fs::read(&held_path).unwrap();
    assert_eq!(sha256_hex(&jar), jars[&held_path]);

    // A next daemon that fails after it took the mount from the store (its views file was
    // spoiled before it started, so its views are not the ones handed over) ends that mount
    // before it exits: a file held open fails instead of waiting. The unit then starts again.
    let views_file = std::fs::read_dir(tmp.path().join("run/digestfs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".views.json"))
        .expect("the daemon's views file");
    let spoil = tmp
        .path()
        .join("config/systemd/user/digestfs@.service.d/spoil.conf");
    std::fs::write(
        &spoil,
        format!(
            "[Service]\nExecStartPre=/bin/sh -c 'echo spoiled > {}'\n",
            views_file.display()
        ),
    )
    .unwrap();
    stdout_ok(sd.try_systemctl(&["daemon-reload"]));
    let held = std::fs::File::open(&held_path).unwrap();
    let pid = sd.main_pid();
    // The restart job fails with that start.
    let _ = sd.try_systemctl(&["restart", &sd.unit]);
    sd.wait("the unit is back after the failed start", || {
        let new = sd.main_pid();
        (new != pid && new != 0 && sd.show("ActiveState") == "active").then_some(())
    });
    assert!(
        sd.log().contains("ending the mount systemd kept"),
        "{}",
        sd.log()
    );
    assert!(
        read_uncached(&held).is_err(),
        "the mount handed over still reads"
    );
    std::fs::remove_file(&spoil).unwrap();
    stdout_ok(sd.try_systemctl(&["daemon-reload"]));
    sd.digestfs(&["bind", mp, "v", JAR_TREE]);

    // One that fails before it opened the store (moved away meanwhile) ends it too: it takes
    // the mount from systemd before anything else. Its starts fail until the store is back.
    let away = tmp.path().join("store-away");
    let mv = tmp
        .path()
        .join("config/systemd/user/digestfs@.service.d/mv.conf");
    let mv_store = format!(
        "[Service]\nExecStartPre=-/bin/mv {} {}\n",
        other.display(),
        away.display()
    );
    std::fs::write(&mv, mv_store).unwrap();
    stdout_ok(sd.try_systemctl(&["daemon-reload"]));
    let held = std::fs::File::open(&held_path).unwrap();
    let _ = sd.try_systemctl(&["restart", &sd.unit]);
    sd.wait("the failed start ends the mount it was left", || {
        (sd.log().matches("ending the mount systemd kept").count() == 2).then_some(())
    });
    sd.wait("the held file fails", || {
        read_uncached(&held).is_err().then_some(())
    });
    std::fs::remove_file(&mv).unwrap();
    stdout_ok(sd.try_systemctl(&["daemon-reload"]));
    std::fs::rename(&away, &other).unwrap();
    let _ = sd.try_systemctl(&["reset-failed", &sd.unit]);
    sd.unit("start");
    sd.digestfs(&["bind", mp, "v", JAR_TREE]);

    // A crash: the unit restarts on failure, onto a fresh mount with the views restored.
    // (Device numbers are reused once a mount is gone: what shows the mount is new is that a
    // file held open on the old one no longer reads.)
    let held = std::fs::File::open(&held_path).unwrap();
    let pid = sd.main_pid();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    sd.wait("the unit restarts after the crash, and is ready", || {
        let new = sd.main_pid();
        (new != pid && new != 0 && sd.show("ActiveState") == "active").then_some(())
    });
    assert!(
        read_uncached(&held).is_err(),
        "the crashed mount still reads"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&held_path).unwrap()),
        jars[&held_path]
    );

    // A stop unmounts, and leaves no daemon.
    let pid = sd.main_pid();
    sd.unit("stop");
    assert!(!is_mounted(&mnt), "still mounted after stop\n{}", sd.log());
    sd.wait("the daemon exits", || (!alive(pid)).then_some(()));
}
