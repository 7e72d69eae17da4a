"""Tests the stdlib client: against a real mount (needs DIGESTFS_BIN, the fixtures in
../shared/fixtures or DIGESTFS_FIXTURES, and a usable /dev/fuse), and on its own where no daemon is
needed (error kinds, the SO_PEERCRED check against a socket served by another uid)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
import time
import unittest

from _support import REPO, MountTestCase, require_binary, run
from digestfs_client import (
    DigestfsBadRequest,
    DigestfsClient,
    DigestfsConflict,
    DigestfsError,
    DigestfsInternal,
    DigestfsMissing,
    DigestfsMountFailed,
    DigestfsPeerRefused,
    DigestfsUnavailable,
    DigestfsUnreachable,
    default_socket,
    ensure_mounted,
    error_from_answer,
    mount_command,
    mount_env,
)

FIXTURES = os.environ.get("DIGESTFS_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))
LIB_TREE = "64d48ed9ebb10855020cceb60b3631ab4778a27210e5565387f119d452a5f956-6847"
SRC_FOLLOWED = "d1809efb519708d7ad9680803b5fc005e9f92f119e04e8d96937fcee03a75ee4-669"
SRC_TREE = "9d647aac3d36f1a59c80f778864ee2e8f2a00e2527f0e7d5dfd221298da279e6-634"
GUAVA = "1d4ca0e3ee66921e8cb6521b62ecce32cc62abad391bf70b2fd14d40e7681f3a-2920436"
ABSENT = "ab" * 32 + "-5"


def fixture_store(tmp: str, name: str = "store") -> str:
    store = os.path.join(tmp, name)
    shutil.copytree(os.path.join(FIXTURES, "pants-store"), store)
    subprocess.run(["chmod", "-R", "u+w", store], check=True)
    return store


class ErrorKindTest(unittest.TestCase):
    def test_each_error_kind_is_its_own_subclass(self):
        for kind, cls in (
            ("missing", DigestfsMissing),
            ("conflict", DigestfsConflict),
            ("bad_request", DigestfsBadRequest),
            ("unavailable", DigestfsUnavailable),
            ("internal", DigestfsInternal),
        ):
            e = error_from_answer(
                {
                    "v": 1,
                    "ok": False,
                    "error": f"it is {kind}",
                    "error_kind": kind,
                    "digest": ABSENT,
                    "path": "r/lib",
                }
            )
            self.assertIs(type(e), cls)
            self.assertIsInstance(e, DigestfsError)
            self.assertEqual(
                (e.kind, e.digest, e.path, str(e)), (kind, ABSENT, "r/lib", f"it is {kind}")
            )
        # A daemon without error_kind (or with a kind this client does not know): the base class.
        for answer in (
            {"ok": False, "error": "old"},
            {"ok": False, "error": "x", "error_kind": "new"},
        ):
            e = error_from_answer(answer)
            self.assertIs(type(e), DigestfsError)
            self.assertIsNone(e.kind)
        for cls in (DigestfsUnreachable, DigestfsPeerRefused, DigestfsMountFailed):
            self.assertTrue(issubclass(cls, DigestfsError))

    def test_mount_command_passes_the_remote_options(self):
        self.assertEqual(
            mount_command(
                "/b/.pants.d/bsp/jvm/resolves",
                "/s",
                "/bin/digestfs",
                remote_store_address="grpcs://cache:443",
                remote_instance_name="main",
                remote_ca_certs="/ca.pem",
            ),
            [
                "/bin/digestfs",
                "--store",
                "/s",
                "mount",
                "--daemon",
                "--reuse",
                "--remote-store-address",
                "grpcs://cache:443",
                "--remote-instance-name",
                "main",
                "--remote-ca-certs",
                "/ca.pem",
                "/b/.pants.d/bsp/jvm/resolves",
            ],
        )
        self.assertEqual(
            mount_command("/m", "/s"),
            ["digestfs", "--store", "/s", "mount", "--daemon", "--reuse", "/m"],
        )
        # Headers (tokens) travel in the environment, never on the command line.
        env = mount_env({"authorization": "Bearer t", "x-team": "jvm"})
        self.assertEqual(env["DIGESTFS_REMOTE_HEADERS"], "authorization=Bearer t\nx-team=jvm")
        self.assertNotIn("DIGESTFS_REMOTE_HEADERS", mount_env(None))

    def test_a_failing_mount_command_raises_with_its_stderr_and_no_token(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        fake = os.path.join(tmp, "digestfs")
        seen = os.path.join(tmp, "seen")
        with open(fake, "w") as f:
            f.write(
                "#!/bin/sh\n"
                f"printf '%s|%s' \"$*\" \"$DIGESTFS_REMOTE_HEADERS\" > {seen}\n"
                "echo 'error: /dev/fuse cannot be opened' >&2\nexit 1\n"
            )
        os.chmod(fake, 0o755)
        with self.assertRaises(DigestfsMountFailed) as caught:
            ensure_mounted(
                os.path.join(tmp, "mnt"),
                os.path.join(tmp, "store"),
                binary=fake,
                remote_store_address="grpc://x:1",
                remote_headers={"authorization": "Bearer sekrit"},
            )
        message = str(caught.exception)
        self.assertIn("/dev/fuse cannot be opened", message)
        self.assertIn("exit 1", message)
        self.assertNotIn("sekrit", message)
        with open(seen) as f:
            args, headers = f.read().split("|")
        self.assertNotIn("sekrit", args, "no token on the command line")
        self.assertEqual(headers, "authorization=Bearer sekrit", "the token went in the environment")
        self.assertTrue(os.path.isdir(os.path.join(tmp, "mnt")), "the mountpoint is created")
        with self.assertRaisesRegex(DigestfsMountFailed, "cannot run"):
            ensure_mounted(os.path.join(tmp, "mnt"), tmp, binary=os.path.join(tmp, "absent"))


class PeerCredentialsTest(unittest.TestCase):
    """Before sending anything, the client checks that the socket's server runs as our uid."""

    def serve(self, sock_path: str, as_nobody: bool) -> subprocess.Popen:
        # Answers one request with ok, and reports how many bytes it received in total.
        server = textwrap.dedent(
            """
            import os, socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); s.listen(1)
            print("listening", flush=True)
            conn, _ = s.accept(); conn.settimeout(10)
            got = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                got += data
                if got.endswith(b"\\n"):
                    conn.sendall(b'{"v":1,"ok":true,"views":[]}\\n')
            print(len(got), flush=True)
            """
        )
        prefix = []
        if as_nobody:
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.Popen(
            [*prefix, "/usr/bin/python3", "-c", server, sock_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(proc.kill)
        self.assertEqual(
            proc.stdout.readline().strip(), "listening", proc.stderr.read() if proc.poll() else ""
        )
        return proc

    def socket_dir(self) -> str:
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        os.chmod(tmp, 0o777)
        return tmp

    def test_a_socket_served_by_another_uid_is_refused_before_sending(self):
        if os.geteuid() != 0:
            self.skipTest("serving a socket as another uid needs root")
        sock_path = os.path.join(self.socket_dir(), "planted.sock")
        server = self.serve(sock_path, as_nobody=True)
        with self.assertRaisesRegex(DigestfsPeerRefused, "uid 65534") as caught:
            DigestfsClient(socket_path=sock_path, timeout=10).views()
        self.assertEqual(caught.exception.path, sock_path)
        out, _ = server.communicate(timeout=10)
        self.assertEqual(out.strip(), "0", "the client sent nothing to the foreign socket")

    def test_a_socket_served_by_our_own_uid_is_used(self):
        sock_path = os.path.join(self.socket_dir(), "own.sock")
        server = self.serve(sock_path, as_nobody=False)
        self.assertEqual(DigestfsClient(socket_path=sock_path, timeout=10).views(), [])
        out, _ = server.communicate(timeout=10)
        self.assertGreater(int(out.strip()), 0)

    def test_an_absent_socket_is_unreachable(self):
        client = DigestfsClient(socket_path=os.path.join(self.socket_dir(), "nothing.sock"))
        with self.assertRaisesRegex(DigestfsUnreachable, "cannot reach"):
            client.views()


class ClientTest(MountTestCase):
    timeout = 60.0

    def setUp(self):
        super().setUp()
        self.bin = require_binary(self)
        self.store = fixture_store(self.tmp)
        self.mnt = self.track_mount(os.path.join(self.tmp, "mnt"))
        os.mkdir(self.mnt)
        run(self.bin, "--store", self.store, "mount", "--daemon", self.mnt)

    def test_bind_views_which_unbind(self):
        client = DigestfsClient(mountpoint=self.mnt)
        self.assertTrue(os.path.exists(default_socket(self.mnt)))
        self.assertTrue(client.bind("jvm-default/lib", LIB_TREE, layer="modules.pants:a"))
        self.assertFalse(client.bind("jvm-default/lib", LIB_TREE, layer="modules.pants:a"))
        self.assertTrue(client.bind("jvm-default/lib", LIB_TREE, layer="sources.pants:b"))
        views = client.views()
        self.assertEqual(len(views), 1)
        self.assertEqual(views[0]["path"], "jvm-default/lib")
        self.assertEqual(
            views[0]["layers"], {"modules.pants:a": LIB_TREE, "sources.pants:b": LIB_TREE}
        )
        self.assertEqual(views[0]["entries"], 71)
        self.assertEqual(
            os.path.getsize(os.path.join(self.mnt, "jvm-default/lib/guava.jar")), 2920436
        )
        self.assertEqual(
            client.which("jvm-default/lib/guava.jar"),
            {"kind": "file", "digest": GUAVA, "executable": False},
        )
        self.assertEqual(client.status()["views"], 1)
        self.assertTrue(client.unbind("jvm-default/lib", layer="modules.pants:a"))
        self.assertTrue(client.unbind("jvm-default/lib"))
        self.assertEqual(client.views(), [])
        self.assertEqual(os.listdir(self.mnt), [])

    def test_refusals_raise_and_change_nothing(self):
        client = DigestfsClient(mountpoint=self.mnt)
        client.bind("v", SRC_TREE, layer="a")
        before = client.views()
        # The same source tree saved with symlinks followed has a file where this one has a
        # symlink: the layers conflict.
        with self.assertRaisesRegex(DigestfsError, "conflict at v/link_to_app.java"):
            client.bind("v", SRC_FOLLOWED, layer="b")
        with self.assertRaisesRegex(DigestfsError, "malformed digest"):
            client.bind("v", "nothex", layer="c")
        with self.assertRaisesRegex(DigestfsError, "is not in the store"):
            client.bind("v", ABSENT, layer="c")
        with self.assertRaisesRegex(DigestfsError, "unknown variant"):
            client.call("explode")
        self.assertEqual(client.views(), before)

    def test_refusals_carry_their_kind(self):
        client = DigestfsClient(mountpoint=self.mnt)
        client.bind("v", SRC_TREE, layer="a")
        with self.assertRaises(DigestfsConflict) as caught:
            client.bind("v", SRC_FOLLOWED, layer="b")
        self.assertEqual(caught.exception.kind, "conflict")
        self.assertIn("link_to_app.java", caught.exception.path or "")
        with self.assertRaises(DigestfsMissing) as caught:
            client.bind("v", ABSENT, layer="c")
        self.assertEqual(caught.exception.digest, ABSENT)
        with self.assertRaises(DigestfsBadRequest):
            client.bind("v", "nothex", layer="c")
        with self.assertRaises(DigestfsBadRequest):
            client.call("explode")
        with self.assertRaises(DigestfsBadRequest):
            client.unbind("nothing/bound/here")
        with self.assertRaises(DigestfsConflict):
            client.bind("v/inner", SRC_TREE, layer="a")  # a view inside another

    def test_layer_names_may_be_bsp_target_ids(self):
        client = DigestfsClient(mountpoint=self.mnt)
        for layer in ("modules.pants:src/jvm:foo", "scalac.pants:a b/c", "sources." + "x" * 1000):
            client.bind("jvm-default/lib", LIB_TREE, layer=layer)
        self.assertEqual(len(client.views()[0]["layers"]), 3)


class EnsureMountedTest(MountTestCase):
    timeout = 90.0

    def setUp(self):
        super().setUp()
        self.bin = require_binary(self)
        self.store = fixture_store(self.tmp)
        self.mnt = self.track_mount(
            os.path.join(self.tmp, "b", ".pants.d", "bsp", "jvm", "resolves")
        )

    def test_starts_then_reuses_the_same_daemon(self):
        pid = ensure_mounted(self.mnt, self.store, binary=self.bin, timeout=60)
        self.assertTrue(os.path.isdir(self.mnt))
        client = DigestfsClient(mountpoint=self.mnt)
        self.assertEqual(client.status()["pid"], pid)
        client.bind("jvm-default/lib", LIB_TREE, layer="modules.pants:a")
        self.assertEqual(ensure_mounted(self.mnt, self.store, binary=self.bin, timeout=60), pid)
        self.assertEqual(client.views()[0]["layers"], {"modules.pants:a": LIB_TREE})
        # Beside the mount, .pants.d/bsp stays writable.
        bsp = os.path.dirname(os.path.dirname(self.mnt))
        os.makedirs(os.path.join(bsp, "jvm", "classes", "pants_a"))
        with open(os.path.join(bsp, "jvm", "classes", "pants_a", "A.class"), "wb") as f:
            f.write(b"\xca\xfe\xba\xbe")

    def test_refuses_a_mount_of_another_store(self):
        ensure_mounted(self.mnt, self.store, binary=self.bin, timeout=60)
        other = fixture_store(self.tmp, "other-store")
        with self.assertRaises(DigestfsMountFailed) as caught:
            ensure_mounted(self.mnt, other, binary=self.bin, timeout=60)
        self.assertIn(self.store, str(caught.exception))
        self.assertIn(other, str(caught.exception))

    def test_recovers_after_the_daemon_is_killed(self):
        pid = ensure_mounted(self.mnt, self.store, binary=self.bin, timeout=60)
        DigestfsClient(mountpoint=self.mnt).bind(
            "jvm-default/lib", LIB_TREE, layer="modules.pants:a"
        )
        os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        new_pid = ensure_mounted(self.mnt, self.store, binary=self.bin, timeout=60)
        self.assertNotEqual(new_pid, pid)
        client = DigestfsClient(mountpoint=self.mnt)
        self.assertEqual(client.status()["pid"], new_pid)
        # The daemon restores its views from its state file.
        self.assertEqual(client.views()[0]["layers"], {"modules.pants:a": LIB_TREE})
        self.assertEqual(
            os.path.getsize(os.path.join(self.mnt, "jvm-default/lib/guava.jar")), 2920436
        )


if __name__ == "__main__":
    unittest.main()
