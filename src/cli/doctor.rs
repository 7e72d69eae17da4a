//! `digestfs doctor`: checks what a mount needs, each failure with a one-line fix.

use std::path::{Path, PathBuf};

use super::{outln, Failure};
use crate::os::{self as mount, MountState};
use crate::remote::{Remote, RemoteConfig};
use crate::store::{self, ShardCount, Store};

/// One check's outcome.
struct Check {
    ok: bool,
    what: String,
    fix: Option<String>,
}

fn pass(what: impl Into<String>) -> Check {
    Check {
        ok: true,
        what: what.into(),
        fix: None,
    }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        ok: false,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

fn dev_fuse() -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => pass("/dev/fuse is present and usable"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(
            "/dev/fuse is missing",
            "load the module: sudo modprobe fuse",
        ),
        Err(e) => fail(
            format!("/dev/fuse cannot be opened: {e}"),
            "sudo chmod 0666 /dev/fuse (most distributions ship it so)",
        ),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn fusermount() -> Check {
    match find_in_path("fusermount3") {
        Some(p) => pass(format!("fusermount3 is at {}", p.display())),
        None => fail("fusermount3 is missing", "sudo apt-get install fuse3"),
    }
}

fn nfs_client() -> Check {
    let tool = if cfg!(target_os = "macos") {
        "mount_nfs"
    } else {
        "mount.nfs"
    };
    let found = find_in_path(tool).or_else(|| {
        ["/sbin", "/usr/sbin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => pass(format!(
            "{tool} is at {} (the NFS front end mounts with it)",
            p.display()
        )),
        None => fail(
            format!("{tool} is missing: the NFS front end cannot mount"),
            "install the system's NFS client (Debian: sudo apt-get install nfs-common), or serve \
             with --nfs-no-mount and mount by hand",
        ),
    }
}

fn allow_other() -> Check {
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let enabled = conf.lines().any(|l| l.trim() == "user_allow_other");
    if enabled || unsafe { libc::geteuid() } == 0 {
        pass("--allow-other is permitted")
    } else {
        fail(
            "--allow-other needs user_allow_other in /etc/fuse.conf",
            "echo user_allow_other | sudo tee -a /etc/fuse.conf",
        )
    }
}

fn kernel() -> Vec<Check> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let root = unsafe { libc::geteuid() } == 0;
    let passthrough = if version < (6, 9) {
        format!("FUSE passthrough is unavailable (needs Linux 6.9+, this is {release})")
    } else if root {
        "FUSE passthrough is usable (--passthrough on)".to_string()
    } else {
        "FUSE passthrough needs CAP_SYS_ADMIN; as this user the ordinary read path is used"
            .to_string()
    };
    vec![pass(format!("kernel {release}")), pass(passthrough)]
}

fn store_check(dir: &Path, asked: Option<ShardCount>) -> Check {
    if !dir.is_dir() {
        return fail(
            format!("no store at {}", dir.display()),
            "run a Pants build first, or pass --store DIR",
        );
    }
    let store =
        match Store::open_with(dir, asked) {
            Ok(s) => s,
            Err(e) => return fail(
                format!("store {}: {e}", dir.display()),
                "pass the shard count Pants writes this store with (--local-store-shard-count N, \
                 or DIGESTFS_LOCAL_STORE_SHARD_COUNT), or leave it out to follow the store",
            ),
        };
    let count = store.shard_count();
    let envs = ["files", "directories"]
        .iter()
        .flat_map(|kind| {
            (0..count.get())
                .map(move |i| dir.join(kind).join(ShardCount::folder(i)).join("data.mdb"))
        })
        .filter(|p| p.exists())
        .count();
    let last = ShardCount::folder(count.get() - 1);
    let how = if asked.is_some() {
        "as --local-store-shard-count says"
    } else {
        "found from its folders"
    };
    if envs == 0 {
        return fail(
            format!(
                "{} holds no LMDB shards (files/0…files/{last}, directories/0…directories/{last} \
                 for its {count} shards, {how})",
                dir.display()
            ),
            "point --store at Pants' lmdb_store directory",
        );
    }
    match store.schema_check() {
        Ok(n) => pass(format!(
            "store {} is readable: {count} shards ({how}: files/0…files/{last}), {envs} LMDB \
             environments, schema version 2 ({n} keys checked)",
            dir.display(),
        )),
        Err(e @ store::StoreError::Shards { .. }) => fail(
            format!("store {}: {e}", dir.display()),
            "pass the shard count Pants writes this store with: --local-store-shard-count N \
             (or DIGESTFS_LOCAL_STORE_SHARD_COUNT)",
        ),
        Err(e) => fail(
            format!("store {}: {e}", dir.display()),
            "check the path and its permissions",
        ),
    }
}

fn mountpoint_check(mp: &Path) -> Check {
    match mount::mount_state(mp) {
        Ok(MountState::Free) if mp.is_dir() => pass(format!("{} is free", mp.display())),
        Ok(MountState::Free) => fail(
            format!("{} is not a directory", mp.display()),
            format!("mkdir -p {}", mp.display()),
        ),
        Ok(MountState::Live) => {
            match mount::find_digestfs_mount(&mount::absolute(mp).unwrap_or_default()) {
                Ok(Some((m, _))) if m == mount::absolute(mp).unwrap_or_default() => {
                    // Its metrics endpoint, if the daemon serves one (and its socket answers).
                    let socket = crate::control::default_socket(&m);
                    let metrics =
                        crate::control::call(&socket, &crate::control::protocol::Request::Status)
                            .ok()
                            .and_then(|r| r.status)
                            .and_then(|s| s.metrics)
                            .map(|url| format!("; metrics at {url}"))
                            .unwrap_or_default();
                    pass(format!(
                        "{} is a live digestfs mount{metrics}",
                        mp.display()
                    ))
                }
                _ => fail(
                    format!("{} is mounted by something else", mp.display()),
                    "choose another mountpoint",
                ),
            }
        }
        Ok(MountState::Stale) => fail(
            format!("{} is a stale mount (its daemon died)", mp.display()),
            format!(
                "fusermount3 -u -z {}  (or just mount again: digestfs recovers it)",
                mp.display()
            ),
        ),
        Err(e) => fail(format!("{}: {e}", mp.display()), "check the path"),
    }
}

fn remote_check(cfg: RemoteConfig) -> Check {
    let what = format!("remote CAS {}", cfg.address);
    let fix = "check the address and port; grpcs:// needs --remote-ca-certs unless the system \
               trusts the server, and a cache that wants a token needs --remote-header";
    match Remote::new(cfg)
        .map_err(|e| e.to_string())
        .and_then(|r| r.check())
    {
        Ok(summary) => pass(format!("{what} {summary}")),
        Err(e) => fail(format!("{what}: {e}"), fix),
    }
}

/// Runs every check, prints one line each, and returns whether all passed.
pub fn run(
    store_dir: PathBuf,
    shard_count: Option<ShardCount>,
    mountpoint: Option<&Path>,
    want_allow_other: bool,
    remote: Option<RemoteConfig>,
) -> Result<bool, Failure> {
    // Where the binary has no FUSE front end (macOS, or built without it), mounts go through
    // the system's NFS client instead.
    let mut checks = if crate::fuse::AVAILABLE {
        vec![dev_fuse(), fusermount()]
    } else {
        vec![nfs_client()]
    };
    if want_allow_other && crate::fuse::AVAILABLE {
        checks.push(allow_other());
    }
    if crate::fuse::AVAILABLE {
        checks.extend(kernel());
    }
    checks.push(store_check(&store_dir, shard_count));
    if let Some(mp) = mountpoint {
        checks.push(mountpoint_check(mp));
    }
    if let Some(cfg) = remote {
        checks.push(remote_check(cfg));
    }
    for c in &checks {
        match &c.fix {
            None => outln!("ok    {}", c.what),
            Some(fix) => outln!("FAIL  {}\n      fix: {fix}", c.what),
        }
    }
    Ok(checks.iter().all(|c| c.ok))
}
