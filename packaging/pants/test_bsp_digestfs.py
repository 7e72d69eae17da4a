"""Tests the plugin's Pants-free lifecycle module, `pants_digestfs.digestfs`: mapping a digest's
paths to views and layers, starting
the mount (and each reason not to), binding through the client against a real mount, and the
fallback decisions. Only what cannot happen here is stubbed: a machine without FUSE, and a
digestfs binary that fails to mount."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from _support import (
    MountTestCase,
    children,
    import_dir,
    is_mounted,
    sha256_file,
    make_jar,
    require_binary,
)

from pants_digestfs import digestfs as bsp_digestfs  # noqa: E402 (after _support's sys.path)
from pants_digestfs import commands, common, settings  # noqa: E402
from pants_digestfs.digestfs_client import DigestfsConflict  # noqa: E402
BSPDigestfs = bsp_digestfs.BSPDigestfs
EMPTY = common.EMPTY_DIGEST
ABSENT = "cd" * 32 + "-120"
LOGGER = "pants_digestfs.digestfs"


class SettingsTest(unittest.TestCase):
    def test_names(self):
        self.assertEqual(common.MOUNT_DIR, ".pants.d/bsp/jvm/resolves")
        self.assertEqual(common.digest_string("ab" * 32, 7), "ab" * 32 + "-7")

    def test_remote_store_from_pants_options(self):
        remote = settings.remote_store_from_options
        base = dict(provider="reapi", cache_read=True, execution=False, address="grpcs://c:443")
        self.assertEqual(
            remote(
                **base,
                instance_name="main",
                headers={"x-team": "jvm"},
                ca_certs_path="/ca.pem",
                oauth_bearer_token="tok",
            ),
            settings.RemoteStore(
                address="grpcs://c:443",
                instance_name="main",
                ca_certs_path="/ca.pem",
                headers=(("authorization", "Bearer tok"), ("x-team", "jvm")),
            ),
        )
        self.assertEqual(remote(**base), settings.RemoteStore("grpcs://c:443"))
        self.assertEqual(
            remote(**{**base, "cache_read": False, "execution": True}).address, "grpcs://c:443"
        )
        # Pants does not read from the remote store: nothing can be remote-only.
        self.assertIsNone(remote(**{**base, "cache_read": False}))
        self.assertIsNone(remote(**{**base, "address": None}))
        self.assertIsNone(remote(**{**base, "provider": "experimental-file"}))

    def test_the_option_value(self):
        for off in (None, "", "  ", "false", "False", "none", "off"):
            self.assertIsNone(settings.binary_from_option(off), off)
        self.assertEqual(settings.binary_from_option("digestfs"), "digestfs")
        self.assertEqual(settings.binary_from_option("/opt/bin/digestfs"), "/opt/bin/digestfs")


class MarkerTest(unittest.TestCase):
    """The markers that keep a session that writes to disk from being mounted over."""

    def test_only_live_sessions_of_others_hold_the_mountpoint(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        commands.write_marker(d, "a")
        self.assertEqual(commands.fallback_owner(d, "b"), os.getpid())
        self.assertIsNone(commands.fallback_owner(d, "a"), "its own marker holds no session back")
        commands.remove_marker(d, "a")
        self.assertIsNone(commands.fallback_owner(d, "b"))
        # Left by a session of this process that is no longer off, and by a process gone.
        gone = subprocess.Popen(["true"])
        gone.wait()
        for session, pid in (("z", os.getpid()), ("y", gone.pid)):
            with open(os.path.join(d, f"{commands.FALLBACK_MARKER}-{session}"), "w") as f:
                json.dump({"pid": pid, "session": session}, f)
        self.assertIsNone(commands.fallback_owner(d, "b"))
        self.assertEqual(os.listdir(d), [], "claims of sessions gone are removed")


def stub_binary(directory: str, script: str) -> str:
    path = os.path.join(directory, "digestfs")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + script)
    os.chmod(path, 0o755)
    return path


class StartDecisionTest(unittest.TestCase):
    """Each reason not to use the mount gives None and exactly one warning."""

    def setUp(self):
        import tempfile

        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def start(self, binary_option):
        return BSPDigestfs.start(
            binary_option=binary_option, build_root=self.tmp, store_dir=self.tmp, timeout=30
        )

    def one_warning(self, binary_option) -> str:
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertIsNone(self.start(binary_option))
        self.assertEqual(len(logs.records), 1, logs.output)
        return logs.records[0].getMessage()

    def test_off_means_nothing_happens(self):
        with self.assertNoLogs(LOGGER, logging.DEBUG):
            self.assertIsNone(self.start(None))
            self.assertIsNone(self.start(""))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, ".pants.d")))

    def test_a_missing_binary(self):
        message = self.one_warning(os.path.join(self.tmp, "no-such-digestfs"))
        self.assertIn("executable was found", message)
        self.assertIn("writes the jars of JVM resolves to disk", message)

    def test_no_fuse_on_this_machine(self):
        binary = stub_binary(
            self.tmp,
            'case "$*" in *doctor*)\n'
            "  echo 'ok    kernel 6.18'\n"
            "  echo 'FAIL  /dev/fuse is missing'\n"
            "  echo '      fix: load the module: sudo modprobe fuse'\n"
            "  exit 1;;\n"
            "esac\n"
            "echo 'must not be run' >&2; touch \"$0.mount-was-run\"; exit 1\n",
        )
        message = self.one_warning(binary)
        self.assertIn("digestfs cannot mount here", message)
        self.assertIn("FAIL  /dev/fuse is missing", message)
        self.assertIn("fix: load the module: sudo modprobe fuse", message)
        self.assertNotIn("kernel 6.18", message)
        self.assertFalse(os.path.exists(binary + ".mount-was-run"), "no mount is attempted")

    def test_a_failing_mount(self):
        binary = stub_binary(
            self.tmp,
            'case "$*" in *doctor*) exit 0;; esac\n'
            "echo 'error: mountpoint is mounted by something else' >&2; exit 1\n",
        )
        message = self.one_warning(binary)
        self.assertIn("could not mount digestfs", message)
        self.assertIn("mounted by something else", message)
        self.assertIn(os.path.join(self.tmp, ".pants.d/bsp/jvm/resolves"), message)


class BindTest(MountTestCase):
    """`BSPDigestfs` against a real mount, started as the BSP server starts it."""

    timeout = 90.0

    def setUp(self):
        super().setUp()
        self.bin = require_binary(self)
        self.store = self.new_store()
        self.build_root = os.path.join(self.tmp, "buildroot")
        self.mnt = self.track_mount(os.path.join(self.build_root, ".pants.d/bsp/jvm/resolves"))
        # Three small trees: two libs and a plugins directory.
        src = os.path.join(self.tmp, "trees")
        self.jars = {}
        for tree, names in (
            ("lib1", ["com.example_a_1.0.jar", "com.example_b_2.0.jar"]),
            ("lib2", ["com.example_a_1.0.jar", "com.example_c_3.0.jar"]),
            ("plugins", ["org.typelevel_kind-projector_0.13.2.jar"]),
        ):
            os.makedirs(os.path.join(src, tree))
            for name in names:
                self.jars[name] = make_jar(os.path.join(src, tree, name), name, seed=1)
        self.trees = children(self.store, import_dir(self.store, src))

    def start(self) -> BSPDigestfs:
        digestfs = BSPDigestfs.start(
            binary_option=self.bin,
            build_root=self.build_root,
            store_dir=self.store,
            timeout=60,
        )
        self.assertIsNotNone(digestfs, "the mount should start")
        return digestfs

    def layers(self, digestfs) -> dict:
        return {v["path"]: v["layers"] for v in digestfs.client.views()}

    def owners(self, digestfs, view: str = "r/lib") -> dict:
        """{layer: [owner]} of `view`."""
        return next(v.get("owners", {}) for v in digestfs.client.views() if v["path"] == view)

    def test_layers_bind_unbind_and_serve(self):
        digestfs = self.start()
        self.assertTrue(digestfs.active)
        self.assertEqual(digestfs.mountpoint, self.mnt)
        self.assertTrue(is_mounted(self.mnt))
        lib1, lib2, plugins = self.trees["lib1"], self.trees["lib2"], self.trees["plugins"]
        self.assertTrue(digestfs.bind_layer("modules.pants:a", {"jvm-default/lib": lib1}))
        self.assertTrue(
            digestfs.bind_layer(
                "scalac.pants:a", {"jvm-default/lib": lib1, "jvm-default/plugins": plugins}
            )
        )
        self.assertTrue(digestfs.bind_layer("modules.pants:b", {"jvm-default/lib": lib2}))
        # An empty directory is no layer there.
        self.assertTrue(
            digestfs.bind_layer(
                "scalac.pants:b", {"jvm-default/lib": lib2, "jvm-default/plugins": EMPTY}
            )
        )
        self.assertEqual(
            self.layers(digestfs),
            {
                "jvm-default/lib": {
                    "modules.pants:a": lib1,
                    "scalac.pants:a": lib1,
                    "modules.pants:b": lib2,
                    "scalac.pants:b": lib2,
                },
                "jvm-default/plugins": {"scalac.pants:a": plugins},
            },
        )
        lib_dir = os.path.join(self.mnt, "jvm-default", "lib")
        self.assertEqual(
            sorted(os.listdir(lib_dir)),
            ["com.example_a_1.0.jar", "com.example_b_2.0.jar", "com.example_c_3.0.jar"],
        )
        from _support import sha256_file

        for name in os.listdir(lib_dir):
            self.assertEqual(sha256_file(os.path.join(lib_dir, name)), self.jars[name])
        # A target that moves to another resolve leaves the old one; one with nothing leaves all.
        self.assertTrue(digestfs.bind_layer("scalac.pants:a", {"other/lib": lib1}))
        self.assertTrue(digestfs.bind_layer("modules.pants:b", {}))
        self.assertEqual(
            self.layers(digestfs),
            {
                "jvm-default/lib": {"modules.pants:a": lib1, "scalac.pants:b": lib2},
                "other/lib": {"scalac.pants:a": lib1},
            },
        )
        self.assertFalse(os.path.exists(os.path.join(self.mnt, "jvm-default", "plugins")))
        # The rest of .pants.d/bsp stays writable.
        bsp = os.path.join(self.build_root, ".pants.d", "bsp")
        for rel in ("jvm/classes/pants_a/A.class", "scripts/run-bsp.sh", "logs/stderr.log"):
            os.makedirs(os.path.dirname(os.path.join(bsp, rel)), exist_ok=True)
            with open(os.path.join(bsp, rel), "wb") as f:
                f.write(b"written")
        # A second server start reuses the mount and sees the same views.
        again = self.start()
        self.assertEqual(again.pid, digestfs.pid)
        self.assertEqual(self.layers(again), self.layers(digestfs))

    def test_missing_is_retried_after_persisting_again(self):
        digestfs = self.start()
        # A tree that is not in the mount's store yet: its digest, from a scratch store.
        extra = os.path.join(self.tmp, "extra")
        os.makedirs(extra)
        make_jar(os.path.join(extra, "com.example_d_4.0.jar"), "d", seed=2)
        digest = import_dir(self.new_store("scratch"), extra)
        persisted = []

        def persist_again():
            persisted.append(import_dir(self.store, extra))

        with self.assertNoLogs(LOGGER, logging.WARNING):
            self.assertTrue(
                digestfs.bind_layer("sources.pants:a", {"r/lib": digest}, persist_again)
            )
        self.assertEqual(persisted, [digest])
        self.assertTrue(digestfs.active)
        self.assertEqual(os.listdir(os.path.join(self.mnt, "r", "lib")), ["com.example_d_4.0.jar"])

    def test_still_missing_falls_back_writing_what_was_served(self):
        digestfs = self.start()
        lib1 = self.trees["lib1"]
        self.assertTrue(digestfs.bind_layer("modules.pants:a", {"r/lib": lib1}))
        self.assertTrue(digestfs.bind_layer("scalac.pants:a", {"r/plugins": self.trees["plugins"]}))
        persisted = []
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            served = digestfs.bind_layer(
                "modules.pants:b", {"r/lib": ABSENT}, lambda: persisted.append(1)
            )
        self.assertFalse(served)
        self.assertEqual(persisted, [1], "persisted again once before giving up")
        self.assertEqual(len(logs.records), 1, logs.output)
        message = logs.records[0].getMessage()
        self.assertIn("modules.pants:b", message)
        self.assertIn("written to disk", message)
        self.assertFalse(digestfs.active)
        # The mount is detached, and the jars it served are written to disk in the background,
        # so nothing handed out is lost.
        self.assertFalse(is_mounted(self.mnt))
        self.assertTrue(digestfs.wait_union_written(60))
        lib = os.path.join(self.mnt, "r", "lib")
        self.assertEqual(sorted(os.listdir(lib)), ["com.example_a_1.0.jar", "com.example_b_2.0.jar"])
        for name in os.listdir(lib):
            self.assertEqual(sha256_file(os.path.join(lib, name)), self.jars[name])
            self.assertNotEqual(os.stat(os.path.join(lib, name)).st_dev, 0)
        self.assertEqual(
            os.listdir(os.path.join(self.mnt, "r", "plugins")),
            ["org.typelevel_kind-projector_0.13.2.jar"],
        )
        # The caller's write_digest can write there too.
        with open(os.path.join(lib, "com.example_z_1.0.jar"), "wb") as f:
            f.write(b"jar")
        # From now on every caller writes, without asking the daemon, and without more warnings.
        with self.assertNoLogs(LOGGER, logging.WARNING):
            self.assertFalse(digestfs.bind_layer("modules.pants:c", {"r/lib": self.trees["lib2"]}))
        # While this server lives, another one does not mount over what it wrote.
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            second = BSPDigestfs.start(
                binary_option=self.bin, build_root=self.build_root, store_dir=self.store, timeout=60
            )
        self.assertIsNone(second)
        self.assertIn(f"pid {os.getpid()}", logs.output[0])
        self.assertIn("fell back from digestfs", logs.output[0])
        self.assertFalse(is_mounted(self.mnt))

    def test_a_hung_daemon_falls_back_within_seconds(self):
        digestfs = BSPDigestfs.create(
            binary_option=self.bin,
            build_root=self.build_root,
            store_dir=self.store,
            timeout=1.0,
            start_timeout=5.0,
            # Over io_uring a request already handed to the ring ends only once the daemon runs.
            mount_args=("--transport", "dev"),
        )
        self.assertTrue(digestfs.wait_started())
        self.assertTrue(digestfs.bind_layer("modules.pants:a", {"r/lib": self.trees["lib1"]}))
        # The IDE, another process, holds a jar open, and reads it once the daemon hangs. (Not
        # this one: a process that holds a file of a hung FUSE mount blocks in every fork+exec,
        # since closing the file in the child waits on the daemon.)
        ide = subprocess.Popen(
            [sys.executable, "-c", IDE, os.path.join(self.mnt, "r", "lib", "com.example_a_1.0.jar")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.addCleanup(ide.kill)
        self.assertEqual(ide.stdout.readline().strip(), "open")
        os.kill(digestfs.pid, signal.SIGSTOP)
        self.addCleanup(_resume, digestfs.pid)
        ide.stdin.write("read\n")
        ide.stdin.flush()
        time.sleep(0.5)
        self.assertIsNone(ide.poll(), "a read answered by a stopped daemon")
        began = time.monotonic()
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertFalse(digestfs.bind_layer("modules.pants:b", {"r/lib": self.trees["lib2"]}))
        took = time.monotonic() - began
        # As root, the fallback ended what the hung daemon held: the read fails, it does not wait.
        out, _ = ide.communicate(timeout=30)
        self.assertTrue(out.startswith("error"), out)
        self.assertEqual(len(logs.records), 1, logs.output)
        self.assertIn("did not answer", logs.output[0])
        # Not a timing assertion on speed: the bound that the options set (1 s per call, then
        # the unmount; the union is written in the background), with slack for a loaded machine.
        self.assertLess(took, 30, "a hung daemon stalls the caller only for its timeouts")
        self.assertFalse(is_mounted(self.mnt))
        self.assertTrue(digestfs.wait_union_written(60))
        lib = os.path.join(self.mnt, "r", "lib")
        self.assertEqual(sorted(os.listdir(lib)), ["com.example_a_1.0.jar", "com.example_b_2.0.jar"])

    def test_after_a_fallback_the_mount_comes_back_with_every_layer(self):
        digestfs = BSPDigestfs.create(
            binary_option=self.bin,
            build_root=self.build_root,
            store_dir=self.store,
            timeout=1.0,
            start_timeout=30.0,
            return_after=0.3,
        )
        self.assertTrue(digestfs.wait_started())
        self.assertTrue(digestfs.bind_layer("modules.pants:a", {"r/lib": self.trees["lib1"]}))
        hung = digestfs.pid
        os.kill(hung, signal.SIGSTOP)
        self.addCleanup(lambda: _resume(hung))
        with self.assertLogs(LOGGER, logging.WARNING):
            self.assertFalse(digestfs.bind_layer("modules.pants:b", {"r/lib": self.trees["lib2"]}))
        self.assertTrue(digestfs.wait_union_written(60))
        # What callers write to disk from now on is recorded (as rules.py does), to be bound
        # when the mount is back: the layer that fell back, and later ones.
        digestfs.written_to_disk("modules.pants:b", {"r/lib": self.trees["lib2"]})
        digestfs.written_to_disk("modules.pants:c", {"r/plugins": self.trees["plugins"]})
        # Due, but the daemon still hangs: the request asks once (one `timeout`) and writes.
        time.sleep(0.4)
        with digestfs.request() as active:
            self.assertFalse(active)
        self.assertFalse(is_mounted(self.mnt))
        # Resumed, it finds its mount gone and ends; the next request due mounts again.
        _resume(hung)
        time.sleep(0.4)
        with self.assertLogs(LOGGER, logging.INFO) as logs:
            with digestfs.request() as active:
                self.assertTrue(active)
        self.assertTrue(any("again" in line for line in logs.output), logs.output)
        self.assertTrue(is_mounted(self.mnt))
        self.assertNotEqual(digestfs.pid, hung)
        dev = os.stat(self.mnt).st_dev
        lib = os.path.join(self.mnt, "r", "lib")
        self.assertEqual(
            sorted(os.listdir(lib)),
            ["com.example_a_1.0.jar", "com.example_b_2.0.jar", "com.example_c_3.0.jar"],
        )
        for name in os.listdir(lib):
            self.assertEqual(os.stat(os.path.join(lib, name)).st_dev, dev)
            self.assertEqual(sha256_file(os.path.join(lib, name)), self.jars[name])
        self.assertEqual(
            os.listdir(os.path.join(self.mnt, "r", "plugins")),
            ["org.typelevel_kind-projector_0.13.2.jar"],
        )
        self.assertTrue(digestfs.bind_layer("modules.pants:d", {"r/lib": self.trees["lib2"]}))

    def test_two_servers_follow_each_other_off_the_mount_and_never_mount_over_the_other(self):
        def server() -> BSPDigestfs:
            d = BSPDigestfs.create(
                binary_option=self.bin, build_root=self.build_root, store_dir=self.store,
                timeout=5.0, start_timeout=30.0, return_after=0.2,
            )
            self.assertTrue(d.wait_started())
            return d

        a, b = server(), server()
        self.assertEqual(a.pid, b.pid, "the second server reuses the daemon")
        self.assertTrue(a.bind_layer("modules.pants:a", {"r/lib": self.trees["lib1"]}))
        self.assertTrue(b.bind_layer("modules.pants:b", {"r/lib": self.trees["lib2"]}))
        # The same write from both is one layer that both hold: neither's unbind takes it away.
        shared = {"r/lib": self.trees["lib1"]}
        self.assertTrue(b.bind_layer("modules.pants:a", shared))
        self.assertEqual(self.owners(a)["modules.pants:a"], sorted([a.owner, b.owner]))
        b.client.unbind("r/lib", layer="modules.pants:a", owner=b.owner)
        self.assertEqual(self.owners(a)["modules.pants:a"], [a.owner])
        # A falls back (a digest missing however often it is stored): the shared mount goes.
        with self.assertLogs(LOGGER, logging.WARNING):
            self.assertFalse(a.bind_layer("modules.pants:x", {"r/lib": ABSENT}, lambda: None))
        self.assertTrue(a.wait_union_written(60))
        self.assertFalse(is_mounted(self.mnt))
        # B's next bind finds the mount gone (the daemon ends with it, or, with files open,
        # answers with the mount detached), and it does not mount over A's writes: B writes to
        # disk too.
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertFalse(b.bind_layer("modules.pants:c", {"r/plugins": self.trees["plugins"]}))
        self.assertRegex("\n".join(logs.output), f"was detached|pid {os.getpid()} fell back")
        self.assertFalse(is_mounted(self.mnt))
        self.assertTrue(b.wait_union_written(60))
        lib = os.path.join(self.mnt, "r", "lib")
        self.assertEqual(
            sorted(os.listdir(lib)),
            ["com.example_a_1.0.jar", "com.example_b_2.0.jar", "com.example_c_3.0.jar"],
        )
        # Due, but each sees the other's marker: neither mounts over what the other writes.
        time.sleep(0.3)
        for d in (a, b):
            with self.assertLogs(LOGGER, logging.WARNING) as logs:
                with d.request() as active:
                    self.assertFalse(active)
            self.assertIn("fell back from digestfs", "\n".join(logs.output))
            self.assertFalse(is_mounted(self.mnt))
        # B ends (its marker goes with its process): A is back on the mount.
        commands.remove_marker(self.mnt, b._session)
        time.sleep(0.3)
        with a.request() as active:
            self.assertTrue(active)
        self.assertTrue(is_mounted(self.mnt))
        self.assertEqual(sorted(os.listdir(lib)), ["com.example_a_1.0.jar", "com.example_b_2.0.jar"])
        self.assertEqual(os.stat(os.path.join(lib, "com.example_b_2.0.jar")).st_dev, os.stat(self.mnt).st_dev)

    def test_layers_of_an_earlier_session_give_way(self):
        first = self.start()
        lib1, lib2 = self.trees["lib1"], self.trees["lib2"]
        self.assertTrue(first.bind_layer("modules.pants:a", {"r/lib": lib1}))
        self.assertTrue(first.bind_layer("modules.pants:gone", {"r/lib": lib2}))
        # Another session: `com.example_a_1.0.jar` now has other bytes (a new -SNAPSHOT, say).
        src = os.path.join(self.tmp, "snapshot")
        os.makedirs(src)
        fresh = make_jar(os.path.join(src, "com.example_a_1.0.jar"), "a", seed=9)
        snapshot = import_dir(self.store, src)
        # While the first session lives, its layers are its own: a later one does not drop them.
        later = self.start()
        self.assertNotEqual(first.owner, later.owner)
        self.assertEqual(
            {o for v in later.client.views() for h in v["owners"].values() for o in h},
            {first.owner},
        )
        self.assertEqual(later._earlier, set())
        with self.assertRaises(DigestfsConflict):
            later.client.bind("r/lib", snapshot, layer="modules.pants:b", owner=later.owner)
        first.end()
        second = self.start()
        # Both earlier layers hold the old bytes: they give way to this session's bind.
        with self.assertNoLogs(LOGGER, logging.WARNING):
            self.assertTrue(second.bind_layer("modules.pants:b", {"r/lib": snapshot}))
        self.assertTrue(second.active)
        self.assertEqual(self.layers(second), {"r/lib": {"modules.pants:b": snapshot}})
        self.assertEqual(
            sha256_file(os.path.join(self.mnt, "r", "lib", "com.example_a_1.0.jar")), fresh
        )
        # A conflict within one session is still a conflict.
        with self.assertLogs(LOGGER, logging.WARNING):
            self.assertFalse(second.bind_layer("modules.pants:a", {"r/lib": lib1}))

    def test_a_dead_daemon_is_started_again(self):
        digestfs = self.start()
        lib1, lib2 = self.trees["lib1"], self.trees["lib2"]
        self.assertTrue(digestfs.bind_layer("modules.pants:a", {"r/lib": lib1}))
        old_pid = digestfs.pid
        os.kill(old_pid, 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(old_pid, 0)
                time.sleep(0.05)
            except ProcessLookupError:
                break
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertTrue(digestfs.bind_layer("modules.pants:b", {"r/lib": lib2}))
        self.assertIn("mounting again", logs.output[0])
        self.assertTrue(digestfs.active)
        self.assertNotEqual(digestfs.pid, old_pid)
        # The new daemon restored the views the old one had, and took the new layer.
        self.assertEqual(
            self.layers(digestfs), {"r/lib": {"modules.pants:a": lib1, "modules.pants:b": lib2}}
        )


if __name__ == "__main__":
    unittest.main()


class ScriptedClient:
    """Stands in for the daemon where a condition cannot be made here (a remote CAS that times
    out, a daemon that vanishes at a given call): answers each call from a script."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.calls: list[tuple] = []

    def _next(self, call: tuple):
        self.calls.append(call)
        answer = self.script.pop(0) if self.script else None
        if isinstance(answer, Exception):
            raise answer
        return answer

    def bind(self, path, digest, layer="default", verify=True, owner=None):
        return self._next(("bind", path, digest, layer))

    def unbind(self, path, layer=None, owner=None):
        return self._next(("unbind", path, layer))

    def views(self):
        return self._next(("views",)) or []

    attached = True

    def status(self):  # Not scripted: asked after every bind, answered from `attached`.
        return {"attached": self.attached}


class RetryDecisionTest(unittest.TestCase):
    def setUp(self):
        import tempfile

        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.remounts = []
        original = bsp_digestfs.ensure_mounted

        def ensure_mounted(mountpoint, store, **kwargs):
            self.remounts.append((mountpoint, store))
            return 4242

        bsp_digestfs.ensure_mounted = ensure_mounted
        self.addCleanup(setattr, bsp_digestfs, "ensure_mounted", original)

    def digestfs(self, *script) -> tuple:
        d = BSPDigestfs(
            binary="digestfs", mountpoint=os.path.join(self.tmp, "mnt"), store_dir=self.tmp
        )
        d.client = ScriptedClient(list(script))
        # As if it had started; a fallback here has no mount to detach.
        d._state = bsp_digestfs.State.ACTIVE
        d._settled.set()
        d._detach = lambda abort=False: None
        return d, d.client

    def test_unavailable_falls_back_without_waiting(self):
        from pants_digestfs.digestfs_client import DigestfsUnavailable

        d, client = self.digestfs(DigestfsUnavailable("remote timed out"))
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertFalse(d.bind_layer("modules.t", {"r/lib": ABSENT}))
        self.assertEqual(len(logs.records), 1)
        self.assertIn("remote timed out", logs.output[0])
        self.assertEqual([c[0] for c in client.calls], ["bind"])
        self.assertFalse(d.active)

    def test_a_failure_to_persist_falls_back(self):
        d, client = self.digestfs()

        def persist():
            raise RuntimeError("the store is full")

        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertFalse(d.bind_layer("modules.t", {"r/lib": ABSENT}, persist_first=persist))
        self.assertIn("the store is full", logs.output[0])
        self.assertEqual(client.calls, [])
        self.assertFalse(d.active)

    def test_a_hung_daemon_is_not_mounted_again(self):
        from pants_digestfs.digestfs_client import DigestfsUnreachable

        d, client = self.digestfs(DigestfsUnreachable("no answer", timed_out=True))
        with self.assertLogs(LOGGER, logging.WARNING):
            self.assertFalse(d.bind_layer("modules.t", {"r/lib": ABSENT}))
        self.assertEqual(self.remounts, [])
        self.assertFalse(d.active)

    def test_a_conflict_falls_back_at_once(self):
        from pants_digestfs.digestfs_client import DigestfsConflict

        d, client = self.digestfs(DigestfsConflict("conflict at r/lib/a.jar", path="r/lib/a.jar"))
        with self.assertLogs(LOGGER, logging.WARNING):
            self.assertFalse(d.bind_layer("modules.t", {"r/lib": ABSENT}, lambda: self.fail()))
        self.assertEqual(len(client.calls), 1)
        self.assertFalse(d.active)

    def test_a_mount_detached_by_another_server_falls_back(self):
        d, client = self.digestfs(True)
        client.attached = False
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertFalse(d.bind_layer("modules.t", {"r/lib": ABSENT}))
        self.assertIn("was detached", logs.output[0])
        self.assertFalse(d.active)

    def test_a_vanished_daemon_is_mounted_again_once(self):
        from pants_digestfs.digestfs_client import DigestfsUnreachable

        d, client = self.digestfs(DigestfsUnreachable("gone"), True)
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            self.assertTrue(d.bind_layer("modules.t", {"r/lib": ABSENT}))
        self.assertIn("mounting again", logs.output[0])
        self.assertEqual(self.remounts, [(d.mountpoint, self.tmp)])
        self.assertEqual(d.pid, 4242)
        self.assertTrue(d.active)
        d, client = self.digestfs(DigestfsUnreachable("gone"), DigestfsUnreachable("still gone"))
        with self.assertLogs(LOGGER, logging.WARNING):
            self.assertFalse(d.bind_layer("modules.t", {"r/lib": ABSENT}))
        self.assertFalse(d.active)
        # Once fallen back, nothing is mounted again and the daemon is not asked.
        self.remounts.clear()
        self.assertFalse(d.bind_layer("modules.t", {"r/lib": ABSENT}))
        self.assertEqual(self.remounts, [])

    def test_stale_layers_are_dropped_and_a_vanished_one_is_fine(self):
        from pants_digestfs.digestfs_client import DigestfsBadRequest

        views = [
            {"path": "r/lib", "layers": {"modules.t": ABSENT, "modules.u": ABSENT}},
            {"path": "old/lib", "layers": {"modules.t": ABSENT}},
            {"path": "gone/lib", "layers": {"modules.t": ABSENT}},
            {"path": "other/lib", "layers": {"modules.u": ABSENT}},
        ]
        d, client = self.digestfs(
            True, views, True, DigestfsBadRequest("nothing bound at gone/lib")
        )
        self.assertTrue(d.bind_layer("modules.t", {"r/lib": ABSENT, "r/plugins": EMPTY}))
        self.assertEqual(
            client.calls,
            [
                ("bind", "r/lib", ABSENT, "modules.t"),
                ("views",),
                ("unbind", "old/lib", "modules.t"),
                ("unbind", "gone/lib", "modules.t"),
            ],
        )
        self.assertTrue(d.active)


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


# The IDE of the hung-daemon test: opens a jar, and reads it when told; says how that went.
IDE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
sys.stdin.readline()
try:
    os.pread(fd, 4096, 0)
    print("read", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""
