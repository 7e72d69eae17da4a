"""Helpers shared by the tests in this folder (not a test module itself).

Mount tests need root (or a usable /dev/fuse) and the binary in $DIGESTFS_BIN. Every mount a test
makes is unmounted on every path (`fusermount3 -u`, then `-u -z`), and each test that mounts runs
under a watchdog that detaches its mounts and kills its daemons if it overruns, so that a hung
FUSE request fails the test instead of hanging the run.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.environ.get("DIGESTFS_BIN", os.path.join(REPO, "target", "debug", "digestfs"))
TOOLS = os.environ.get("DIGESTFS_PANTS_TOOLS", os.path.join(REPO, "target", "pants-e2e", "tools"))

sys.path.insert(0, HERE)
# The plugin's Pants-free modules, as `pants_digestfs.digestfs`, `pants_digestfs.seam`…
sys.path.insert(0, os.path.join(HERE, "plugin"))
# … and the stdlib client also as `digestfs_client` (it imports nothing relative).
sys.path.insert(0, os.path.join(HERE, "plugin", "pants_digestfs"))


def require_binary(test: unittest.TestCase) -> str:
    if not os.access(BIN, os.X_OK):
        test.fail(f"no digestfs binary at {BIN}: build it, or set DIGESTFS_BIN")
    return BIN


def run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=check,
    )


def unmount(mountpoint: str) -> None:
    """`fusermount3 -u`, then `-u -z` for a mount still held or stale; errors ignored."""
    for args in (["-u"], ["-u", "-z"]):
        try:
            subprocess.run(
                ["fusermount3", *args, mountpoint],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass


def kill(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def daemon_pids(mountpoint: str) -> list[int]:
    """Pids of digestfs processes whose command line names `mountpoint` (started by our tests)."""
    pids = []
    want = os.fsencode(os.path.abspath(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]).startswith(b"digestfs") and want in args:
            pids.append(int(entry))
    return pids


class MountTestCase(unittest.TestCase):
    """A test case whose mounts are always torn down, with a watchdog per test."""

    timeout = 60.0

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="digestfs-py-")
        self.mounts: list[str] = []
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(self._teardown_mounts)
        self.watchdog_fired = threading.Event()
        timer = threading.Timer(self.timeout, self._on_timeout)
        timer.daemon = True
        timer.start()
        self.addCleanup(timer.cancel)

    def track_mount(self, mountpoint: str) -> str:
        self.mounts.append(mountpoint)
        return mountpoint

    def _on_timeout(self) -> None:
        self.watchdog_fired.set()
        sys.stderr.write(f"\n{self.id()}: watchdog after {self.timeout}s, detaching mounts\n")
        for mnt in self.mounts:
            for pid in daemon_pids(mnt):
                kill(pid)
            unmount(mnt)

    def _teardown_mounts(self) -> None:
        for mnt in self.mounts:
            unmount(mnt)
            # An unmounted daemon exits by itself, removing its socket and state file; give it
            # a moment before killing what is left.
            deadline = time.monotonic() + 3
            while daemon_pids(mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in daemon_pids(mnt):
                kill(pid)
        if self.watchdog_fired.is_set():
            self.fail(f"the test overran its {self.timeout}s watchdog")

    def new_store(self, name: str = "store") -> str:
        store = os.path.join(self.tmp, name)
        os.makedirs(store, exist_ok=True)
        return store


def import_dir(store: str, path: str) -> str:
    """`digestfs --store STORE import PATH`: the tree's digest."""
    return run(BIN, "--store", store, "import", path, timeout=120).stdout.strip().splitlines()[-1]


def import_files(store: str, root: str, files: dict[str, str]) -> str:
    """Writes `files` ({relative path: text}) under `root` and imports it: the tree's digest."""
    for path, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    return import_dir(store, root)


def digest_at(store: str, digest: str, path: str) -> str:
    """The digest of the entry at `path` (`a/b/c`) inside the tree `digest`."""
    for name in path.split("/"):
        digest = children(store, digest)[name]
    return digest


def children(store: str, digest: str) -> dict[str, str]:
    """{name: digest} of the entries of a tree, from `digestfs ls`."""
    out = {}
    for line in run(BIN, "--store", store, "ls", digest).stdout.splitlines():
        kind, _x, _size, child, name = line.split(None, 4)
        out[name.rstrip("/")] = child
    return out


def make_jar(path: str, name: str, seed: int, payload: int = 4096) -> str:
    """Writes a valid jar (zip) at `path`, distinct per (name, seed); returns its sha256."""
    rng = random.Random(f"{name}:{seed}")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as jar:
        jar.writestr(
            zipfile.ZipInfo("META-INF/MANIFEST.MF", date_time=(2026, 1, 1, 0, 0, 0)),
            f"Manifest-Version: 1.0\nImplementation-Title: {name}\nBuild: {seed}\n",
        )
        info = zipfile.ZipInfo(f"{name.replace('-', '/')}/Main.class", (2026, 1, 1, 0, 0, 0))
        jar.writestr(info, b"\xca\xfe\xba\xbe" + rng.randbytes(payload))
        stored = zipfile.ZipInfo("data.bin", (2026, 1, 1, 0, 0, 0))
        stored.compress_type = zipfile.ZIP_STORED
        jar.writestr(stored, rng.randbytes(payload))
    return sha256_file(path)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_mounted(path: str) -> bool:
    """Whether `path` is a mountpoint, per /proc/self/mountinfo (never stats `path` itself, which
    would hang on a hung daemon). The tests' view; the module under test asks the daemon."""
    import re

    parent, name = os.path.split(os.path.abspath(path))
    path = os.path.join(os.path.realpath(parent), name)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == path:
                    return True
    return False
