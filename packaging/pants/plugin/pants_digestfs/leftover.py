# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""A digestfs mount left at `.pants.d/bsp/jvm/resolves` when the plugin is off.

The daemon outlives the BSP server on purpose (the next server reuses it). If the plugin is then
disabled, or its binary is gone, Pants' own `write_digest` would meet a read-only mount and every
jar write would fail with EROFS. So a BSP server that does not use digestfs detaches such a mount
before Pants writes there (lazily: files the IDE has open keep working), or says in one line how
to remove it. Imports nothing from Pants.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mounts() -> list[tuple[str, str, str, str]] | None:
    """(mount point, `major:minor`, fs type, source) of every mount, in /proc/self/mountinfo's
    order (a later one at a path is on top); None where there is no mountinfo (macOS)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        sep = fields.index("-", 6) if "-" in fields[6:] else None
        if sep is None or sep + 2 >= len(fields):
            continue
        out.append((_unescape(fields[4]), fields[2], fields[sep + 1], fields[sep + 2]))
    return out


def _resolved(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name)


def digestfs_mount_at(path: str) -> str | None:
    """The file system type of the topmost mount at `path` if it is digestfs's, else None.

    Linux: `/proc/self/mountinfo` (a FUSE mount named digestfs). Elsewhere (macOS): `mount`
    output, an NFS mount of a loopback server, which is how digestfs serves macOS. Never a
    `stat` of `path` itself, not even to resolve it: a hung daemon would hang it."""
    path = _resolved(path)
    mounts = _mounts()
    if mounts is None:
        return _from_mount_command(path)
    found = None
    for point, _dev, fstype, source in mounts:
        if point == path:
            found = fstype if fstype == "fuse.digestfs" or source == "digestfs" else None
    return found


def fuse_connection_at(path: str) -> int | None:
    """The FUSE connection of the topmost mount at `path` if it is digestfs's (its number under
    /sys/fs/fuse/connections), else None."""
    path = _resolved(path)
    found = None
    for point, dev, fstype, source in _mounts() or []:
        if point == path:
            found = dev if fstype.startswith("fuse") and source == "digestfs" else None
    return None if found is None else _connection(found)


def _connection(dev: str) -> int:
    """The kernel's number for the FUSE connection of device `major:minor`."""
    major, _, minor = dev.partition(":")
    return (int(major) << 20) | int(minor)


def abort_connection(connection: int) -> str | None:
    """Ends every request of FUSE connection `connection`, unless a mount still uses it (that
    would be another mount's, the number being free again once ours went): readers of its
    files get an error instead of waiting on a hung daemon. Root. None once done, else why not."""
    devices = {_connection(dev) for _, dev, _, _ in _mounts() or []}
    if connection in devices:
        return f"connection {connection} belongs to a mount again"
    abort = f"/sys/fs/fuse/connections/{connection}/abort"
    if not os.path.exists(abort):  # fusectl is not always mounted (systemd mounts it).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount(b"fusectl", b"/sys/fs/fuse/connections", b"fusectl", 0, None)
    try:
        with open(abort, "w") as f:
            f.write("1")
    except OSError as e:
        return f"aborting FUSE connection {connection}: {e}"
    return None


def _from_mount_command(path: str) -> str | None:
    try:
        out = subprocess.run(
            ["mount"], capture_output=True, text=True, timeout=2, stdin=subprocess.DEVNULL
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        # macOS: `localhost:/ on /path (nfs, ...)`, digestfs's NFS server on loopback.
        head, sep, rest = line.partition(" on ")
        if sep and rest.startswith(path + " (") and head.startswith(("localhost:", "127.0.0.1:")):
            return "nfs"
    return None


def detach_command(path: str) -> list[str]:
    """What detaches the mount at `path`, busy or not, without asking its daemon (which may be
    hung or gone)."""
    if sys.platform == "darwin":
        return ["umount", "-f", path]
    fusermount = shutil.which("fusermount3") or "fusermount3"
    return [fusermount, "-u", "-z", path]


def detach(path: str, timeout: float) -> str | None:
    """Detaches the mount at `path` lazily, without asking its daemon (which may hang or be
    gone): None once done, else why not. Root on Linux makes the `umount2(MNT_DETACH)` call
    itself (no helper process to start or wait for); anyone else runs `detach_command`."""
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), 2) == 0:  # MNT_DETACH
            return None
        return f"umount2({path}, MNT_DETACH): {os.strerror(ctypes.get_errno())}"
    try:
        done = subprocess.run(
            detach_command(path), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def detach_leftover(path: str, timeout: float = 2.0) -> tuple[str, str | None] | None:
    """Detaches a digestfs mount at `path`. None if there is none; else (what was found, None
    once detached, or the one line that tells the user how to remove it)."""
    fstype = digestfs_mount_at(path)
    if fstype is None:
        return None
    error = detach(path, timeout)
    if error is None and digestfs_mount_at(path) is not None:
        error = "it is still mounted"
    if error is None:
        return fstype, None
    shown = " ".join(detach_command(path))
    return fstype, (
        f"A digestfs mount is left at {path}, and the BSP server cannot write the jars of JVM "
        f"resolves under it; remove it with `{shown}` ({error})."
    )
