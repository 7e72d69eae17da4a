# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The commands the plugin runs, each bounded by a timeout, and the marker a fallback leaves.

Rules run on the engine's threads: nothing here may block one for longer than its caller's
timeout, so a call that could (a socket call to a daemon, a mount) runs on a helper thread
(`on_helper_thread`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterable

from .digestfs_client import DigestfsError

logger = logging.getLogger(__name__)

# Written beside the views (on the disk under the mountpoint) by a fallback, naming the session
# whose BSP server now owns the written jars: no other server mounts over them while it lives.
FALLBACK_MARKER = ".digestfs-fallback"
# The sessions of this process that are off the mount: a marker with this pid and another
# session is left over (a session object gone, or the pid of an earlier process reused).
_OFF_SESSIONS: set[str] = set()


def on_helper_thread(fn: Callable[[], object], timeout: float, what: str):
    """`fn()` run on a helper thread, waited for at most `timeout`: its result, or its
    DigestfsError (any other exception becomes one)."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except Exception as e:
            result.append((False, e))

    thread = threading.Thread(target=run, name="digestfs-helper", daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise DigestfsError(f"{what} did not finish within {timeout:g}s")
    ok, value = result[0]
    if ok:
        return value
    if isinstance(value, DigestfsError):
        raise value
    raise DigestfsError(f"{what} failed: {value}")


def run_command(cmd: list[str], timeout: float) -> str | None:
    """Runs `cmd`; None if it succeeded, else what went wrong."""
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            text=True,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode != 0:
        return done.stderr.strip() or f"exit {done.returncode}"
    return None


def make_writable(dest: str) -> str | None:
    """Gives the files `materialize` wrote the modes Pants leaves (0644, 0755 if executable):
    Pants' own later writes of the same names open them for writing, which a read-only file
    refuses to anyone but root. None if done, else what went wrong."""
    try:
        for root, _dirs, files in os.walk(dest):
            for name in files:
                path = os.path.join(root, name)
                mode = os.lstat(path).st_mode
                if not os.path.islink(path):
                    os.chmod(path, 0o755 if mode & 0o111 else 0o644)
    except OSError as e:
        return str(e)
    return None


def write_marker(mountpoint: str, session: str) -> None:
    """Marks `mountpoint` (the directory under it, once detached) as written to by this
    session, one file per session: no other server mounts over it while this process lives."""
    path = os.path.join(mountpoint, f"{FALLBACK_MARKER}-{session}")
    _OFF_SESSIONS.add(session)
    try:
        os.makedirs(mountpoint, exist_ok=True)
        with open(f"{path}.tmp", "w") as f:  # Renamed: a reader never sees half of it.
            json.dump({"pid": os.getpid(), "session": session}, f)
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        logger.debug(f"digestfs: could not write {path}: {e}")


def remove_marker(mountpoint: str, session: str) -> None:
    _OFF_SESSIONS.discard(session)
    try:
        os.unlink(os.path.join(mountpoint, f"{FALLBACK_MARKER}-{session}"))
    except OSError:
        pass


def fallback_owner(mountpoint: str, session: str) -> int | None:
    """The pid of a live process with another session than `session` that fell back and writes
    under `mountpoint`, if any. The markers of processes gone are removed."""
    try:
        names = [
            n for n in os.listdir(mountpoint)
            if n.startswith(f"{FALLBACK_MARKER}-") and not n.endswith(".tmp")
        ]
    except OSError:
        return None
    for name in sorted(names):
        path = os.path.join(mountpoint, name)
        try:
            with open(path) as f:
                marker = json.load(f)
            pid = int(marker["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if marker.get("session") == session:
            continue
        try:
            if pid == os.getpid() and marker.get("session") not in _OFF_SESSIONS:
                raise ProcessLookupError
            os.kill(pid, 0)
        except ProcessLookupError:  # Its process (or session) is gone, and its claim with it.
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        except PermissionError:
            pass
        return pid
    return None


def materialize(
    binary: str, store_dir: str, store_args: Iterable[str], digest: str, dest: str, timeout: float
) -> str | None:
    """Writes the tree `digest` to `dest` with `digestfs materialize`, which writes each file
    aside and renames it into place: a reader never sees a torn jar, and concurrent writers of
    the same names never fail on each other (Pants' own copy truncates in place, then chmods).
    The files then get the modes Pants leaves, so that a later write by Pants itself can open
    them. None if done, else what went wrong."""
    cmd = [binary, "--store", store_dir, *store_args, "materialize", digest, dest]
    return run_command(cmd, timeout) or make_writable(dest)


def doctor(
    binary: str, store_dir: str, store_args: Iterable[str], timeout: float
) -> str | None:
    """None if `digestfs doctor` passes, else what it reports as failing, with its fixes."""
    try:
        done = subprocess.run(
            [binary, "--store", store_dir, *store_args, "doctor"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            text=True,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"  {e}"
    if done.returncode == 0:
        return None
    failing = [
        line for line in done.stdout.splitlines() if not line.startswith("ok ") and line.strip()
    ]
    return "\n".join(f"  {line.strip()}" for line in failing) or f"  exit {done.returncode}"
