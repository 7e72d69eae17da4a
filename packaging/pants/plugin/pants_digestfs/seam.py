# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Where a `Workspace.write_digest` lands relative to the mount, and how to split it.

Every BSP jar write of every release from 2.17 on is one `write_digest(digest,
path_prefix=".pants.d/bsp")` whose digest holds `jvm/resolves/<resolve>/{lib,plugins}/...`. This
module decides, for any write, which part is bound (the views under the mount) and which parts
are written as Pants writes them (the sibling directories along the way), reading the tree's
`Directory` entries from the store with `digestfs ls` once Pants has persisted them. It imports
nothing from Pants, so it is tested against a real store without Pants.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .common import EMPTY_DIGEST, MOUNT_DIR

MOUNT_PARTS = tuple(MOUNT_DIR.split("/"))


@dataclass(frozen=True)
class Entry:
    kind: str  # "D" directory, "F" file, "L" symlink, as `digestfs ls` prints it
    name: str
    digest: str  # `<hex>-<size>`


Lister = Callable[[str], Sequence[Entry]]


@dataclass
class Plan:
    # (path prefix relative to the build root, directory digest): written as Pants writes them.
    outside: list[tuple[str, str]] = field(default_factory=list)
    # {view `<resolve>/<dir>`: directory digest}: bound into the mount.
    views: dict[str, str] = field(default_factory=dict)


def _parts(path_prefix: str | None) -> tuple[str, ...] | None:
    """The components of a build-root-relative prefix; None if it is not one (Pants decides)."""
    if not path_prefix:
        return ()
    norm = posixpath.normpath(path_prefix)
    if norm == ".":
        return ()
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        return None
    return tuple(norm.split("/"))


def reaches_mount(path_prefix: str | None) -> bool:
    """Whether a write under `path_prefix` may put anything under the mount (no store access)."""
    parts = _parts(path_prefix)
    if parts is None:
        return False
    n = min(len(parts), len(MOUNT_PARTS))
    return parts[:n] == MOUNT_PARTS[:n]


def plan(path_prefix: str | None, digest: str, ls: Lister) -> Plan | None:
    """How to write `digest` under `path_prefix`: None if nothing of it lands under the mount
    (write it as Pants does), else a Plan. ValueError for what no view can serve: a file or
    symlink beside the path to the mount or directly in `jvm/resolves[/<resolve>]`, or a write
    into a part of a view."""
    parts = _parts(path_prefix)
    if parts is None or not reaches_mount(path_prefix) or digest == EMPTY_DIGEST:
        return None
    result = Plan()
    if len(parts) < len(MOUNT_PARTS):
        cur, here = digest, list(parts)
        for name in MOUNT_PARTS[len(parts) :]:
            entries = ls(cur)
            found = [e for e in entries if e.name == name]
            if not found:
                return None  # The mount path is not in this digest: nothing lands under it.
            for e in entries:
                path = "/".join((*here, e.name))
                if e.name == name:
                    if e.kind != "D":
                        raise ValueError(f"{path} is not a directory in the written digest")
                elif e.kind == "D":
                    result.outside.append((path, e.digest))
                else:
                    raise ValueError(f"{path} is a file beside the mount, which digestfs cannot split off")
            cur = found[0].digest
            here.append(name)
        depth, inside = 0, ()
    else:
        cur, inside = digest, parts[len(MOUNT_PARTS) :]
        depth = len(inside)
    if depth == 0:
        for resolve in _dirs(ls(cur), MOUNT_DIR):
            for view in _dirs(ls(resolve.digest), f"{MOUNT_DIR}/{resolve.name}"):
                result.views[f"{resolve.name}/{view.name}"] = view.digest
    elif depth == 1:
        for view in _dirs(ls(cur), f"{MOUNT_DIR}/{inside[0]}"):
            result.views[f"{inside[0]}/{view.name}"] = view.digest
    elif depth == 2:
        result.views["/".join(inside)] = cur
    else:
        raise ValueError(f"a write into {'/'.join(parts)}, a part of a view, cannot be bound")
    return result


def _dirs(entries: Iterable[Entry], where: str) -> list[Entry]:
    entries = list(entries)
    for e in entries:
        if e.kind != "D":
            raise ValueError(f"{where}/{e.name} is a file outside any `<resolve>/<dir>` view")
    return entries


def layer_for(views: dict[str, str]) -> str:
    """The layer of one write: named by its content, so that writing the same again binds
    nothing new, and different writes add up in a view as Pants' writes add up on disk."""
    key = json.dumps(sorted(views.items())).encode()
    return "write." + hashlib.sha256(key).hexdigest()[:20]


def store_lister(binary: str, store_dir: str, store_args: Sequence[str], timeout: float) -> Lister:
    """`digestfs ls`: the entries of one directory digest in the local store."""

    def ls(digest: str) -> list[Entry]:
        if digest == EMPTY_DIGEST:  # Pants may not store it.
            return []
        try:
            done = subprocess.run(
                [binary, "--store", store_dir, *store_args, "ls", digest],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"`digestfs ls {digest}` failed: {e}") from e
        if done.returncode != 0:
            raise RuntimeError(f"`digestfs ls {digest}` failed: {done.stderr.strip()}")
        entries = []
        for line in done.stdout.splitlines():
            kind, _exe, _size, child, name = line.split(None, 4)
            entries.append(Entry(kind, name.rstrip("/"), child))
        return entries

    return ls
