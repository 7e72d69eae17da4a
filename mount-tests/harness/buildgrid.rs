//! A real REAPI server for the remote-CAS tests: BuildGrid (installed into target/buildgrid by
//! `scripts/install-deps --tests`), one per test, on a free loopback port.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// The instance whose storage is a directory the tests can tamper with.
pub const CORRUPT: &str = "corrupt";

/// A BuildGrid server on a free loopback port: instance "" keeps blobs in memory, instance
/// "corrupt" on disk. Killed with its whole process group when dropped.
pub struct BuildGrid {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub address: String,
}

fn bgd() -> PathBuf {
    let path = std::env::var_os("DIGESTFS_BGD")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/buildgrid/bin/bgd"));
    assert!(
        path.exists(),
        "BuildGrid's bgd not found at {} (run scripts/install-deps --tests, or set DIGESTFS_BGD)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl BuildGrid {
    pub fn start() -> BuildGrid {
        BuildGrid::start_with(
            tempfile::tempdir().unwrap(),
            "insecure-mode: true",
            "grpc",
            "method: none",
        )
    }

    /// Serves TLS with a certificate for localhost signed by a throwaway CA; returns the CA.
    pub fn start_tls() -> (BuildGrid, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let out = run_timeout(
                Command::new("openssl").args(args).current_dir(dir.path()),
                T,
            );
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            ]
            .iter()
            .chain(&[
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=digestfs test CA",
            ])
            .copied()
            .collect::<Vec<_>>(),
        );
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let channel = format!(
            "insecure-mode: false\n    credentials:\n      tls-server-key: {}\n      tls-server-cert: {}",
            p("server.key").display(),
            p("server.pem").display()
        );
        let ca = p("ca.pem");
        (
            BuildGrid::start_with(dir, &channel, "grpcs", "method: none"),
            ca,
        )
    }

    /// Requires a JWT signed with `secret` (HS256) on every call; returns such a token.
    pub fn start_jwt(secret: &str) -> (BuildGrid, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt-secret");
        std::fs::write(&path, secret).unwrap();
        let auth = format!(
            "method: jwt\n  secret: {}\n  algorithm: hs256",
            path.display()
        );
        // PyJWT comes with BuildGrid.
        let python = bgd().with_file_name("python");
        let out = run_timeout(
            Command::new(python).args([
                "-c",
                "import jwt, sys, time; print(jwt.encode({'exp': int(time.time()) + 3600, 'sub': 'digestfs-test'}, sys.argv[1], algorithm='HS256'))",
                secret,
            ]),
            T,
        );
        assert!(out.status.success(), "{out:?}");
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        (
            BuildGrid::start_with(dir, "insecure-mode: true", "grpc", &auth),
            token,
        )
    }

    fn start_with(dir: tempfile::TempDir, channel: &str, scheme: &str, auth: &str) -> BuildGrid {
        let port = free_port();
        let config = format!(
            r#"server:
  - !channel
    address: "127.0.0.1:{port}"
    {channel}
authorization:
  {auth}
storages:
  - !lru-storage &memory
    size: 512MB
  - !disk-storage &disk
    path: {disk}
instances:
  - name: ""
    services:
      - !cas
        storage: *memory
      - !bytestream
        storage: *memory
  - name: {CORRUPT}
    services:
      - !cas
        storage: *disk
      - !bytestream
        storage: *disk
"#,
            disk = dir.path().join("disk").display()
        );
        std::fs::write(dir.path().join("bgd.yml"), config).unwrap();
        let child = Command::new(bgd())
            .args(["server", "start"])
            .arg(dir.path().join("bgd.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("bgd.log")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut bg = BuildGrid {
            child: Some(child),
            dir,
            address: format!("{scheme}://127.0.0.1:{port}"),
        };
        wait_until("bgd listening", Duration::from_secs(60), || {
            if let Some(status) = bg.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("bgd exited ({status}):\n{}", bg.log());
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        bg
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bgd.log")).unwrap_or_default()
    }

    /// Where the disk instance keeps a blob.
    pub fn disk_object(&self, digest: &str) -> PathBuf {
        let hex = digest.split('-').next().unwrap();
        self.dir
            .path()
            .join("disk/cas/objects")
            .join(&hex[..2])
            .join(&hex[2..])
    }

    /// Stops the server (SIGSTOP to its process group): calls to it wait, unanswered, until
    /// [`BuildGrid::resume`]. A stopped server is still killed on drop.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGSTOP) };
        }
    }

    pub fn resume(&self) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGCONT) };
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for BuildGrid {
    fn drop(&mut self) {
        self.stop();
    }
}
