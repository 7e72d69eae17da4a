"""Tests `pants_digestfs.leftover`: a BSP server that does not use digestfs detaches a digestfs
mount left at `.pants.d/bsp/jvm/resolves`, against real mounts, a hung daemon's included, and
leaves any other mount alone."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from _support import BIN, MountTestCase, is_mounted, require_binary

from pants_digestfs import leftover  # noqa: E402 (after _support's sys.path)


class LeftoverTest(MountTestCase):
    def setUp(self):
        super().setUp()
        self.bin = require_binary(self)
        self.mnt = self.track_mount(os.path.join(self.tmp, "repo", ".pants.d", "bsp", "jvm", "resolves"))
        os.makedirs(self.mnt)

    def mount(self) -> int:
        out = subprocess.run(
            [BIN, "--store", self.new_store(), "mount", "--daemon", self.mnt],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return int(out.stdout.strip().splitlines()[-1])

    def test_nothing_mounted_is_nothing_to_do(self):
        self.assertIsNone(leftover.digestfs_mount_at(self.mnt))
        self.assertIsNone(leftover.detach_leftover(self.mnt))

    def test_a_leftover_mount_is_detached_and_its_daemon_exits(self):
        pid = self.mount()
        fstype = leftover.digestfs_mount_at(self.mnt)
        self.assertIn(fstype, ("fuse", "fuse.digestfs"))  # root mounts itself; users through fusermount3
        self.assertEqual(leftover.detach_leftover(self.mnt), (fstype, None))
        self.assertFalse(is_mounted(self.mnt))
        # Pants can write there now.
        with open(os.path.join(self.mnt, "x.jar"), "w") as f:
            f.write("x")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        self.assertFalse(os.path.exists(f"/proc/{pid}"), "the daemon outlived its mount")

    def test_a_hung_daemon_is_detached_within_the_bound(self):
        pid = self.mount()
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.path.exists(f"/proc/{pid}") and os.kill(pid, signal.SIGCONT))
        started = time.monotonic()
        fstype, error = leftover.detach_leftover(self.mnt, timeout=2.0)
        self.assertIsNone(error)
        # Not a speed figure: a detach that waited on the stopped daemon would block for good.
        self.assertLess(time.monotonic() - started, 30)
        self.assertFalse(is_mounted(self.mnt))

    def test_another_file_system_is_left_alone(self):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", self.mnt], check=True, timeout=30)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mnt], timeout=30)
        self.assertIsNone(leftover.detach_leftover(self.mnt))
        self.assertTrue(is_mounted(self.mnt))

    def test_what_cannot_be_detached_is_one_line_with_the_command(self):
        self.mount()
        real = leftover.detach
        self.addCleanup(setattr, leftover, "detach", real)
        leftover.detach = lambda path, timeout: "refused"
        fstype, message = leftover.detach_leftover(self.mnt)
        self.assertIn(fstype, ("fuse", "fuse.digestfs"))
        self.assertIn(self.mnt, message)
        self.assertIn(f"`{' '.join(leftover.detach_command(self.mnt))}`", message)
        self.assertIn("refused", message)
        self.assertNotIn("\n", message)
        self.assertTrue(is_mounted(self.mnt))
