# Copyright 2026 Pants project contributors (see CONTRIBUTORS.md).
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Serve the JVM resolve directories of `.pants.d/bsp` from a digestfs mount.

Several BSP requests write the same jars into `.pants.d/bsp/jvm/resolves/<resolve>/lib`
concurrently, and those writes race (https://github.com/pantsbuild/pants/issues/21532). With
`[experimental-bsp].digestfs` set, the BSP server instead mounts digestfs, a read-only FUSE view
of the local store, at `.pants.d/bsp/jvm/resolves` and *binds* each request's directories into it:
nothing is written, so nothing races.

- The mount covers `jvm/resolves` only. Compile outputs, resources, the Scala runtime, scripts
  and logs are written beside it as before.
- Each `<resolve>/lib` and `<resolve>/plugins` directory is a view: the union of its layers.
- A layer is one (request kind, BSP target), named `modules.<target>`, `sources.<target>` or
  `scalac.<target>`, because several BSP targets share a resolve and each request kind sends its
  own part of it. Binary jars and `-sources.jar` files share `lib/`.

This module imports nothing from the engine, so that it can be tested against a real mount
without Pants. The rules in `pants.bsp.util_rules.targets` and `pants.backend.scala.bsp.rules`
split the digests and call it; `pants.bsp.goal` starts it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from pants.bsp.digestfs_client import (
    DigestfsBadRequest,
    DigestfsClient,
    DigestfsError,
    DigestfsMissing,
    DigestfsUnavailable,
    DigestfsUnreachable,
    ensure_mounted,
)

logger = logging.getLogger(__name__)

# Relative to the build root.
BSP_DIR = ".pants.d/bsp"
# Relative to `BSP_DIR`: the only part of it that holds nothing but resolve jars.
RESOLVES_DIR = "jvm/resolves"
MOUNT_DIR = f"{BSP_DIR}/{RESOLVES_DIR}"

# The empty directory: a layer with nothing in a view is no layer there.
EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855-0"


class LayerKind(Enum):
    """The BSP requests that put jars under `jvm/resolves`."""

    MODULES = "modules"  # buildTarget/dependencyModules: `<resolve>/lib/*.jar`
    SOURCES = "sources"  # buildTarget/dependencySources: `<resolve>/lib/*-sources.jar`
    SCALAC = "scalac"  # buildTarget/scalacOptions: `<resolve>/lib` and `<resolve>/plugins`


def layer_name(kind: LayerKind, target: str) -> str:
    """The layer of one (request kind, BSP target), e.g. `modules.pants:my-group`."""
    if not target:
        raise ValueError("a BSP target name must not be empty")
    return f"{kind.value}.{target}"


def digest_string(fingerprint: str, serialized_bytes_length: int) -> str:
    """A `Digest` as digestfs writes it: `<fingerprint>-<size>`."""
    return f"{fingerprint}-{serialized_bytes_length}"


def view_prefix(view: str) -> str:
    """Where a view's content lies in a BSP output digest, relative to `.pants.d/bsp`."""
    return f"{RESOLVES_DIR}/{view}"


def views_of(files: Iterable[str], dirs: Iterable[str] = ()) -> tuple[str, ...]:
    """The views that the paths of a BSP output digest fall into, sorted.

    Paths are relative to `.pants.d/bsp`, as in the digests the BSP rules write there. A path
    `jvm/resolves/<resolve>/<dir>/...` belongs to the view `<resolve>/<dir>` (in practice `lib` or
    `plugins`); paths outside `jvm/resolves` belong to none. A file directly in `jvm/resolves` or
    in `jvm/resolves/<resolve>` cannot be served by a view: that is a ValueError.
    """
    views: set[str] = set()
    prefix = f"{RESOLVES_DIR}/"
    for is_file, paths in ((True, files), (False, dirs)):
        for path in paths:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"unexpected path in a BSP output digest: {path!r}")
            if len(parts) < 2:
                if is_file:
                    raise ValueError(
                        f"{BSP_DIR}/{path} is a file outside any `<resolve>/<dir>` view"
                    )
                continue
            if len(parts) == 2 and is_file:
                raise ValueError(f"{BSP_DIR}/{path} is a file outside any `<resolve>/<dir>` view")
            views.add(f"{parts[0]}/{parts[1]}")
    return tuple(sorted(views))


@dataclass(frozen=True)
class RemoteStore:
    """The remote CAS that digestfs should fetch missing blobs from: Pants' own."""

    address: str
    instance_name: str | None = None
    ca_certs_path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def remote_store_from_options(
    *,
    provider: str,
    cache_read: bool,
    execution: bool,
    address: str | None,
    instance_name: str | None = None,
    headers: Mapping[str, str] | None = None,
    ca_certs_path: str | None = None,
    oauth_bearer_token: str | None = None,
) -> RemoteStore | None:
    """The remote store digestfs should read through to, from Pants' `[GLOBAL]` options.

    Only a REAPI store that Pants reads from (remote cache reads or remote execution) is passed:
    only then can blobs be remote-only, under `cache_content_behavior = "validate"` or `"defer"`.
    """
    if provider != "reapi" or not address or not (cache_read or execution):
        return None
    all_headers = dict(headers or {})
    if oauth_bearer_token:
        all_headers["authorization"] = f"Bearer {oauth_bearer_token}"
    return RemoteStore(
        address=address,
        instance_name=instance_name or None,
        ca_certs_path=ca_certs_path or None,
        headers=tuple(sorted(all_headers.items())),
    )


def binary_from_option(value: str | None) -> str | None:
    """The `[experimental-bsp].digestfs` value as a binary to run, or None when it is off."""
    if value is None:
        return None
    value = value.strip()
    if not value or value.lower() in ("false", "none", "off"):
        return None
    return value


def is_mounted(path: str) -> bool:
    """Whether `path` is a mountpoint, per /proc/self/mountinfo (never stats `path` itself)."""
    parent, name = os.path.split(os.path.abspath(path))
    path = os.path.join(os.path.realpath(parent), name)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            mountpoint = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if mountpoint == path:
                return True
    return False


class BSPDigestfs:
    """The BSP server's digestfs mount at `.pants.d/bsp/jvm/resolves`, and its fallback.

    Create it with `start`. While `active`, `bind_layer` serves a layer's views from the mount.
    When a bind fails in a way a retry does not fix, the mount is detached (lazily: files the IDE
    has open keep working), one warning is logged, and from then on `active` is False and every
    caller writes its jars to disk as Pants does without digestfs. Thread-safe: the BSP server
    handles requests on several threads.
    """

    def __init__(
        self,
        *,
        binary: str,
        mountpoint: str,
        store_dir: str,
        remote: RemoteStore | None = None,
        pid: int | None = None,
        timeout: float = 120.0,
        retry_delay: float = 1.0,
    ) -> None:
        self.binary = binary
        self.mountpoint = mountpoint
        self.store_dir = store_dir
        self.remote = remote
        self.pid = pid
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.client = DigestfsClient(mountpoint=mountpoint, timeout=timeout)
        self._lock = threading.Lock()
        self._layer_locks: dict[str, threading.Lock] = {}
        self._active = True

    @classmethod
    def start(
        cls,
        *,
        binary_option: str | None,
        build_root: str,
        store_dir: str,
        remote: RemoteStore | None = None,
        timeout: float = 120.0,
    ) -> BSPDigestfs | None:
        """Mounts (or reuses) digestfs at `<build_root>/.pants.d/bsp/jvm/resolves`.

        Returns None when the option is off (silently), or, with one warning, when the binary is
        not found, `digestfs doctor` says FUSE cannot work here, or the mount fails: the caller
        then writes jars to disk as always.
        """
        binary = binary_from_option(binary_option)
        if binary is None:
            return None
        path = shutil.which(binary)
        if path is None:
            logger.warning(
                f"`[experimental-bsp].digestfs` is set to `{binary}`, but no such executable "
                "was found, so the BSP server writes the jars of JVM resolves to disk as "
                "without it. Install digestfs or set the option to its full path."
            )
            return None
        mountpoint = os.path.join(os.path.realpath(build_root), MOUNT_DIR)
        problems = _doctor(path, store_dir, timeout)
        if problems is not None:
            logger.warning(
                f"`{path} doctor` reports that digestfs cannot mount here (FUSE or the store), "
                "so the BSP server writes the jars of JVM resolves to disk as without "
                f"`[experimental-bsp].digestfs`:\n{problems}"
            )
            return None
        try:
            pid = ensure_mounted(
                mountpoint,
                store_dir,
                binary=path,
                timeout=timeout,
                **_remote_kwargs(remote),
            )
        except DigestfsError as e:
            logger.warning(
                f"Could not mount digestfs at {mountpoint}, so the BSP server writes the jars of "
                f"JVM resolves to disk as without `[experimental-bsp].digestfs`: {e}"
            )
            return None
        logger.info(f"Serving the jars of JVM resolves from digestfs at {mountpoint} (pid {pid}).")
        return cls(
            binary=path,
            mountpoint=mountpoint,
            store_dir=store_dir,
            remote=remote,
            pid=pid,
            timeout=timeout,
        )

    @property
    def active(self) -> bool:
        """Whether the mount serves the resolves; False once it has fallen back to writing."""
        with self._lock:
            return self._active

    def bind_layer(
        self,
        layer: str,
        views: Mapping[str, str],
        persist_again: Callable[[], None] | None = None,
    ) -> bool:
        """Makes `layer` hold exactly `views`: {view path: directory digest `<hex>-<size>`}.

        Binds the layer in each view (an empty digest means no layer there), and unbinds it from
        views it is no longer part of. Returns True when the mount serves them, and False when the
        caller must write them to disk: the mount has fallen back (now or before).

        Retries what a retry can fix: `missing` once after `persist_again()` (which should
        store the digests again), `unavailable` (the remote CAS) twice after a pause, and an
        unreachable daemon once after starting it again (it restores its views itself).
        """
        if not self.active:
            return False
        wanted = {
            view.strip("/"): digest for view, digest in views.items() if digest != EMPTY_DIGEST
        }
        with self._layer_lock(layer):
            try:
                for view, digest in sorted(wanted.items()):
                    self._retrying(
                        functools.partial(self.client.bind, view, digest, layer=layer),
                        persist_again,
                    )
                self._retrying(functools.partial(self._drop_stale, layer, wanted), None)
            except DigestfsError as e:
                self.fall_back(f"binding the layer `{layer}` failed: {e}")
                return False
        return self.active

    def fall_back(self, reason: str) -> None:
        """Stops using the mount for this session: detach it and let callers write to disk."""
        with self._lock:
            if not self._active:
                return
            self._active = False
        logger.warning(
            f"digestfs: {reason}. Detaching the mount at {self.mountpoint}: for the rest of this "
            "BSP session the jars of JVM resolves are written to disk as without "
            "`[experimental-bsp].digestfs` (jars served until now reappear as the IDE asks for "
            "them again)."
        )
        self._detach()

    def _layer_lock(self, layer: str) -> threading.Lock:
        with self._lock:
            return self._layer_locks.setdefault(layer, threading.Lock())

    def _drop_stale(self, layer: str, wanted: Mapping[str, str]) -> None:
        for view in self.client.views():
            path = view["path"].strip("/")
            if layer in view.get("layers", {}) and path not in wanted:
                try:
                    self.client.unbind(path, layer=layer)
                except DigestfsBadRequest:
                    pass  # Already gone.

    def _retrying(self, op: Callable[[], object], persist_again: Callable[[], None] | None) -> None:
        persisted = remounted = False
        unavailable = 0
        while True:
            try:
                op()
                return
            except DigestfsMissing:
                if persisted or persist_again is None:
                    raise
                persisted = True
                persist_again()
            except DigestfsUnavailable:
                if unavailable >= 2:
                    raise
                unavailable += 1
                time.sleep(self.retry_delay * unavailable)
            except DigestfsUnreachable as e:
                if remounted:
                    raise
                remounted = True
                logger.warning(f"digestfs: {e}; mounting again at {self.mountpoint}.")
                self._remount()

    def _remount(self) -> None:
        with self._lock:
            if not self._active:
                raise DigestfsError("the mount was detached by a fallback")
            self.pid = ensure_mounted(
                self.mountpoint,
                self.store_dir,
                binary=self.binary,
                timeout=self.timeout,
                **_remote_kwargs(self.remote),
            )

    def _detach(self) -> None:
        for cmd in (
            [self.binary, "unmount", "--lazy", self.mountpoint],
            ["fusermount3", "-u", "-z", self.mountpoint],
        ):
            if not is_mounted(self.mountpoint):
                return
            try:
                subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=30,
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
        if is_mounted(self.mountpoint):
            logger.warning(
                f"digestfs: could not unmount {self.mountpoint}; writing jars under it will fail "
                f"until it is unmounted (`fusermount3 -u -z {self.mountpoint}`)."
            )


def _remote_kwargs(remote: RemoteStore | None) -> dict:
    if remote is None:
        return {}
    return {
        "remote_store_address": remote.address,
        "remote_instance_name": remote.instance_name,
        "remote_ca_certs": remote.ca_certs_path,
        "remote_headers": dict(remote.headers),
    }


def _doctor(binary: str, store_dir: str, timeout: float) -> str | None:
    """None if `digestfs doctor` passes, else what it reports as failing, with its fixes."""
    try:
        done = subprocess.run(
            [binary, "--store", store_dir, "doctor"],
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
