# Copyright 2026 Pants project contributors (see CONTRIBUTORS.md).
# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Serve the JVM resolve directories of `.pants.d/bsp` from a digestfs mount.

Several BSP requests write the same jars into `.pants.d/bsp/jvm/resolves/<resolve>/lib`
concurrently, and those writes race (https://github.com/pantsbuild/pants/issues/21532). With
`[digestfs].enabled`, the BSP server instead mounts digestfs, a read-only view of the local
store, at `.pants.d/bsp/jvm/resolves` and *binds* what Pants writes there into it: nothing is
written, so nothing races.

- The mount covers `jvm/resolves` only. Compile outputs, resources, the Scala runtime, scripts
  and logs are written beside it as before.
- Each `<resolve>/lib` and `<resolve>/plugins` directory is a view: the union of its layers.
- The plugin binds one layer per `write_digest` that reaches the mount, named by its content
  (`seam.layer_for`). `LayerKind`/`layer_name` name the per-(request kind, BSP target) layers
  of the plugin before it, which `reconcile` still recognises.

This module imports nothing from Pants, so that it can be tested against a real mount without
Pants. `rules.py` splits the digests and calls it.

Nothing here may stall the engine: rules call `bind_layer` and friends on the engine's threads,
so every subprocess (doctor, mount, unmount, materialize) runs on a helper thread of this module,
socket calls to the daemon have a short timeout, and nothing sleeps. A rule waits at most
`start_timeout` for the mount to come up, or for a fallback to finish.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from .digestfs_client import (
    DigestfsBadRequest,
    DigestfsClient,
    DigestfsConflict,
    DigestfsError,
    DigestfsMissing,
    DigestfsUnreachable,
    ensure_mounted,
)
from .leftover import detach

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
    """A binary option's value as a binary to run, or None when it is off."""
    if value is None:
        return None
    value = value.strip()
    if not value or value.lower() in ("false", "none", "off"):
        return None
    return value


def target_of_layer(layer: str) -> str | None:
    """The BSP target of a layer named by `layer_name`, or None for a layer of someone else."""
    kind, sep, target = layer.partition(".")
    if not sep or kind not in {k.value for k in LayerKind} or not target:
        return None
    return target


# Written beside the views (on the disk under the mountpoint) by a fallback, naming the process
# whose BSP server now owns the written jars: no other server mounts over them while it lives.
FALLBACK_MARKER = ".digestfs-fallback"


class _State(Enum):
    IDLE = "idle"  # not started
    STARTING = "starting"  # doctor and mount running on a helper thread
    ACTIVE = "active"  # serving the resolves
    FALLING_BACK = "falling back"  # detaching and writing the union of the bound layers
    OFF = "off"  # never mounted, or fallen back: callers write as Pants does


class BSPDigestfs:
    """The BSP server's digestfs mount at `.pants.d/bsp/jvm/resolves`, and its fallback.

    `begin` starts it (doctor and mount) on a helper thread; `start` does the same and waits, for
    callers outside the engine. While `active`, `bind_layer` serves a layer's views from the
    mount. When a bind fails in a way a retry does not fix, the mount falls back, once: binds
    already made finish, new ones are held off, the union of every layer bound in this session
    is written to disk (`digestfs materialize`, which is safe against concurrent writers), the
    mount is detached lazily (files the IDE has open keep working), and one warning is logged.
    From then on `active` is False and callers write their jars as Pants does without digestfs.

    Layers bound by an earlier session (another BSP server process) are taken over: layers of
    targets that no longer exist are unbound (`reconcile`), and an earlier layer that conflicts
    with a new bind is dropped from that view, since this session will bind its target again.

    Thread-safe: the BSP server handles requests on several threads.
    """

    def __init__(
        self,
        *,
        binary: str,
        mountpoint: str,
        store_dir: str,
        remote: RemoteStore | None = None,
        store_args: Iterable[str] = (),
        mount_args: Iterable[str] = (),
        timeout: float = 5.0,
        start_timeout: float = 10.0,
        option_name: str = "[digestfs].enabled",
    ) -> None:
        self.binary = binary
        self.mountpoint = mountpoint
        self.store_dir = store_dir
        self.remote = remote
        self.store_args = tuple(store_args)
        self.mount_args = tuple(mount_args)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.option_name = option_name
        self.pid: int | None = None
        self.client = DigestfsClient(mountpoint=mountpoint, timeout=timeout)
        self._lock = threading.Condition()
        self._state = _State.IDLE
        self._settled = threading.Event()  # Set once the state is ACTIVE or OFF.
        # Set once callers may write to disk: nothing of ours is mounted over the resolves.
        self._clear = threading.Event()
        # (view, layer) that a fallback wrote to disk.
        self._written: set[tuple[str, str]] = set()
        self._inflight = 0  # Binds under way; a fallback waits for them.
        self._layer_locks: dict[str, threading.Lock] = {}
        # {(view, layer): digest} bound in this session: what a fallback writes.
        self._bound: dict[tuple[str, str], str] = {}
        # (view, layer) bound before this session, by another BSP server process.
        self._earlier: set[tuple[str, str]] = set()
        self._targets: frozenset[str] | None = None
        self._deferred: list[tuple[int, str]] = []

    # --- starting -------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        binary_option: str | None,
        build_root: str,
        store_dir: str,
        remote: RemoteStore | None = None,
        timeout: float = 120.0,
        option_name: str = "[digestfs].enabled",
    ) -> BSPDigestfs | None:
        """Mounts (or reuses) digestfs at `<build_root>/.pants.d/bsp/jvm/resolves` and waits.

        For callers outside the engine (the BSP goal, before it serves). Returns None when the
        option is off (silently), or, with one warning, when digestfs cannot be used here.
        """
        digestfs = cls.create(
            binary_option=binary_option,
            build_root=build_root,
            store_dir=store_dir,
            remote=remote,
            start_timeout=timeout,
            option_name=option_name,
        )
        if digestfs is None or not digestfs.wait_started():
            return None
        return digestfs

    @classmethod
    def create(
        cls,
        *,
        binary_option: str | None,
        build_root: str,
        store_dir: str,
        **kwargs,
    ) -> BSPDigestfs | None:
        """An unstarted mount for this build root, or None (with one warning) when the binary is
        not found; None silently when the option is off."""
        binary = binary_from_option(binary_option)
        if binary is None:
            return None
        option_name = kwargs.get("option_name", "[digestfs].enabled")
        path = shutil.which(binary)
        if path is None:
            logger.warning(
                f"{option_name} is set, but no `{binary}` executable was found, so the BSP "
                "server writes the jars of JVM resolves to disk as without it. Install digestfs "
                "or give the binary's full path."
            )
            return None
        mountpoint = os.path.join(os.path.realpath(build_root), MOUNT_DIR)
        return cls(binary=path, mountpoint=mountpoint, store_dir=store_dir, **kwargs)

    def begin(self) -> None:
        """Starts doctor and the mount on a helper thread, once; returns at once."""
        with self._lock:
            if self._state is not _State.IDLE:
                return
            self._state = _State.STARTING
        threading.Thread(target=self._start, name="digestfs-start", daemon=True).start()

    def wait_started(self) -> bool:
        """Begins if need be, and waits (at most `start_timeout`) until the mount serves or has
        fallen back. True while it serves; False once callers may write to disk (no mount of
        ours is left over the resolves: waiting for that is bounded by the unmount's timeout)."""
        self.begin()
        if not self._settled.wait(self.start_timeout):
            self._give_up(
                f"digestfs did not start within {self.start_timeout:g}s "
                f"(doctor or `{self.binary} mount` at {self.mountpoint} hangs)"
            )
        active = self.active
        if not active:
            self._wait_clear()
        self._flush()
        return active

    def _start(self) -> None:
        mounted = False
        try:
            mounted = self._mount()
        except Exception as e:  # Whatever goes wrong here, waiters must not wait in vain.
            if mounted:
                self._detach()
            self._settle_off(f"starting digestfs at {self.mountpoint} failed: {e}")

    def _mount(self) -> bool:
        """Doctor, then the mount; True once something of ours may be mounted."""
        problems = _doctor(self.binary, self.store_dir, self.store_args, self.start_timeout)
        if problems is not None:
            self._settle_off(
                f"`{self.binary} doctor` reports that digestfs cannot mount here (FUSE or the "
                f"store), so the BSP server writes the jars of JVM resolves to disk as without "
                f"{self.option_name}:\n{problems}"
            )
            return False
        owner = _fallback_owner(self.mountpoint)
        if owner is not None:
            self._settle_off(
                f"the BSP server with pid {owner} fell back from digestfs and wrote the jars of "
                f"JVM resolves under {self.mountpoint}; this one writes there too rather than "
                "mount over them. The next BSP server after it exits mounts again."
            )
            return False
        try:  # Its writer is gone: the marker is no reason not to mount any more.
            os.unlink(os.path.join(self.mountpoint, FALLBACK_MARKER))
        except OSError:
            pass
        if not self._still(_State.STARTING):
            return False
        try:
            pid = self._ensure_mounted()
        except DigestfsError as e:
            self._settle_off(
                f"could not mount digestfs at {self.mountpoint}, so the BSP server writes the jars "
                f"of JVM resolves to disk as without {self.option_name}: {e}"
            )
            return False
        # A waiter that gave up meanwhile writes to disk: do not stay mounted over its writes.
        if not self._still(_State.STARTING):
            self._detach()
            return True
        try:
            earlier = {
                (view["path"].strip("/"), layer)
                for view in self.client.views()
                for layer in view.get("layers", {})
            }
        except DigestfsError as e:
            self._detach()
            self._settle_off(f"the digestfs daemon at {self.mountpoint} does not answer: {e}")
            return True
        with self._lock:
            gave_up = self._state is not _State.STARTING
            if not gave_up:
                self.pid = pid
                self._earlier = earlier
                self._state = _State.ACTIVE
                targets = self._targets
        if gave_up:
            self._detach()
            return True
        self._log(
            logging.INFO,
            f"Serving the jars of JVM resolves from digestfs at {self.mountpoint} (pid {pid}).",
        )
        if targets is not None:
            self._reconcile(targets)
        if self._still(_State.ACTIVE):
            self._settled.set()
        return True

    def _ensure_mounted(self) -> int:
        """`mount --daemon --reuse`: the pid of the daemon serving the mountpoint."""
        return ensure_mounted(
            self.mountpoint,
            self.store_dir,
            binary=self.binary,
            timeout=self.start_timeout,
            store_args=self.store_args,
            mount_args=self.mount_args,
            **_remote_kwargs(self.remote),
        )

    def _still(self, state: _State) -> bool:
        with self._lock:
            return self._state is state

    def _settle_off(self, message: str) -> None:
        """Ends a start that never mounted (or unmounted what it mounted): callers write."""
        with self._lock:
            if self._state is not _State.STARTING:
                return
            self._state = _State.OFF
        self._log(logging.WARNING, message)
        self._clear.set()
        self._settled.set()

    def _give_up(self, reason: str) -> None:
        with self._lock:
            if self._state is not _State.STARTING:
                return
            self._state = _State.OFF
        logger.warning(
            f"{reason}; the BSP server writes the jars of JVM resolves to disk as without "
            f"{self.option_name}."
        )
        # Whatever is mounted there now (a mount that came up late, a reused one) must go for
        # writes to disk to succeed; `_start` detaches too if it mounts after this.
        threading.Thread(target=self._detach_and_clear, name="digestfs-detach", daemon=True).start()
        self._settled.set()

    def _detach_and_clear(self) -> None:
        try:
            self._detach()
        finally:
            self._clear.set()

    def _wait_clear(self) -> None:
        """Waits until no mount of ours is left over the resolves. `_detach` runs its commands
        with `timeout` each, so this ends; the bound is only a safety net."""
        if not self._clear.wait(3 * self.timeout + 5):
            logger.warning(
                f"digestfs: unmounting {self.mountpoint} did not finish; writing to disk regardless."
            )

    @property
    def active(self) -> bool:
        """Whether the mount serves the resolves; False before it started, and once it fell back."""
        with self._lock:
            return self._state is _State.ACTIVE

    # --- binding --------------------------------------------------------------------------------

    def bind_layer(
        self,
        layer: str,
        views: Mapping[str, str],
        persist_again: Callable[[], None] | None = None,
        persist_first: Callable[[], None] | None = None,
    ) -> bool:
        """Makes `layer` hold exactly `views`: {view path: directory digest `<hex>-<size>`}.

        `persist_first()`, if given, stores the digests first; its failure, like a refused bind,
        makes the mount fall back rather than fail the request.

        Binds the layer in each view (an empty digest means no layer there), and unbinds it from
        views it is no longer part of. Returns True when the views are served: by the mount, or,
        if the mount fell back while this bind was under way, written to disk with the union of
        the session's layers. False when the caller must write them to disk itself.

        Retries what a retry can fix, at once: `missing` after `persist_again()` (which should
        store the digests again), a `conflict` with a layer of an earlier session after dropping
        that layer, and an unreachable daemon after mounting again (it restores its views).
        """
        if not self.wait_started():
            return False
        wanted = {
            view.strip("/"): digest for view, digest in views.items() if digest != EMPTY_DIGEST
        }
        with self._lock:
            if self._state is not _State.ACTIVE:
                falling_back = True
            else:
                falling_back = False
                self._inflight += 1
        if falling_back:  # It began after `wait_started`: wait for it, then the caller writes.
            return self._wait_fallen_back(set())
        mine = {(view, layer) for view in wanted}
        failure: str | None = None
        try:
            if persist_first is not None:
                persist_first()
            with self._layer_lock(layer):
                for view, digest in sorted(wanted.items()):
                    self._bind(view, digest, layer, persist_again)
                self._retrying(lambda: self._drop_stale(layer, wanted), None)
        except DigestfsError as e:
            failure = f"binding the layer `{layer}` failed: {e}"
        except Exception as e:  # A failure to persist is the caller's; it must not fail the request.
            failure = f"storing the digests of the layer `{layer}` failed: {e}"
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()
        if failure is not None:
            self.fall_back(failure)
            return False
        self._flush()
        with self._lock:
            if self._state is _State.ACTIVE:
                return True
        # A fallback began meanwhile: served only if it wrote what this bind recorded.
        return self._wait_fallen_back(mine)

    def _bind(
        self, view: str, digest: str, layer: str, persist_again: Callable[[], None] | None
    ) -> None:
        dropped = False

        def bind() -> None:
            nonlocal dropped
            try:
                self.client.bind(view, digest, layer=layer)
            except DigestfsConflict:
                if dropped or not self._drop_earlier(view):
                    raise
                dropped = True
                self.client.bind(view, digest, layer=layer)

        self._retrying(bind, persist_again)
        with self._lock:
            self._bound[(view, layer)] = digest
            self._earlier.discard((view, layer))

    def _drop_earlier(self, view: str) -> bool:
        """Unbinds from `view` the layers of earlier sessions not yet bound again in this one."""
        with self._lock:
            stale = sorted(layer for v, layer in self._earlier if v == view)
        for layer in stale:
            try:
                self.client.unbind(view, layer=layer)
            except DigestfsBadRequest:
                pass  # Already gone.
            with self._lock:
                self._earlier.discard((view, layer))
        if stale:
            logger.info(f"digestfs: dropped layers of an earlier BSP session from {view}: {stale}")
        return bool(stale)

    def _drop_stale(self, layer: str, wanted: Mapping[str, str]) -> None:
        for view in self.client.views():
            path = view["path"].strip("/")
            if layer in view.get("layers", {}) and path not in wanted:
                try:
                    self.client.unbind(path, layer=layer)
                except DigestfsBadRequest:
                    pass  # Already gone.
                with self._lock:
                    self._bound.pop((path, layer), None)
                    self._earlier.discard((path, layer))

    def _layer_lock(self, layer: str) -> threading.Lock:
        with self._lock:
            return self._layer_locks.setdefault(layer, threading.Lock())

    def _retrying(self, op: Callable[[], object], persist_again: Callable[[], None] | None) -> None:
        persisted = remounted = False
        while True:
            try:
                op()
                return
            except DigestfsMissing:
                if persisted or persist_again is None:
                    raise
                persisted = True
                persist_again()
            except DigestfsUnreachable as e:
                # A daemon that is there but does not answer is hung: starting another would
                # only wait on it too. Only a dead one (no socket, or refused) is replaced.
                if remounted or e.timed_out:
                    raise
                remounted = True
                logger.warning(f"digestfs: {e}; mounting again at {self.mountpoint}.")
                self._remount()

    def _remount(self) -> None:
        # `mount --reuse` starts a new daemon, which restores its views before it answers; it
        # runs on a helper thread, so that the rule that got here only waits, and not for long.
        # Never over what another server wrote after falling back, nor once this one has: if the
        # session fell back while it ran, what it mounted is detached again.
        owner = _fallback_owner(self.mountpoint)
        if owner is not None or not self._still(_State.ACTIVE):
            raise DigestfsUnreachable(
                f"not mounting again at {self.mountpoint}"
                + (f": the BSP server with pid {owner} fell back and wrote there" if owner else "")
            )

        def mount() -> int:
            pid = self._ensure_mounted()
            if not self._still(_State.ACTIVE):
                self._detach()
            return pid

        pid = _on_helper_thread(
            mount, self.start_timeout, f"mounting digestfs again at {self.mountpoint}"
        )
        with self._lock:
            self.pid = pid

    # --- stale layers ---------------------------------------------------------------------------

    def reconcile(self, targets: Iterable[str]) -> None:
        """Unbinds the layers of BSP targets that are not among this session's `targets`.

        Called with the answer to `workspace/buildTargets`; applied once the mount serves (on a
        helper thread if it does already), so that a removed BSP group, or an old layer whose jars
        now conflict with a new one, does not linger.
        """
        targets = frozenset(targets)
        with self._lock:
            self._targets = targets
            active = self._state is _State.ACTIVE
        self.begin()
        if active:
            threading.Thread(
                target=self._reconcile, args=(targets,), name="digestfs-reconcile", daemon=True
            ).start()
        self._flush()

    def _reconcile(self, targets: frozenset[str]) -> None:
        try:
            views = self.client.views()
            dropped = []
            for view in views:
                path = view["path"].strip("/")
                for layer in view.get("layers", {}):
                    target = target_of_layer(layer)
                    if target is None or target in targets:
                        continue
                    try:
                        self.client.unbind(path, layer=layer)
                    except DigestfsBadRequest:
                        pass
                    dropped.append(f"{path}:{layer}")
                    with self._lock:
                        self._earlier.discard((path, layer))
                        self._bound.pop((path, layer), None)
        except DigestfsError as e:
            self._log(
                logging.WARNING, f"digestfs: could not drop the layers of removed BSP targets: {e}"
            )
            return
        if dropped:
            self._log(
                logging.INFO,
                f"digestfs: unbound the layers of BSP targets that no longer exist: {dropped}",
            )

    # --- falling back ---------------------------------------------------------------------------

    def fall_back(self, reason: str) -> None:
        """Stops using the mount for this session, once: detaches it, writes the union of the
        layers bound so far to disk, and lets callers write. Returns once callers may write (no
        mount left over the resolves), having waited at most `start_timeout` for the union."""
        with self._lock:
            if self._state is _State.ACTIVE:
                self._state = _State.FALLING_BACK
                self._settled.clear()
                start = True
            else:
                start = False
        if start:
            logger.warning(
                f"digestfs: {reason}. Writing the jars served so far under {self.mountpoint} "
                "and detaching the mount: for the rest of this BSP session the jars of JVM "
                f"resolves are written to disk as without {self.option_name}."
            )
            threading.Thread(target=self._fall_back, name="digestfs-fallback", daemon=True).start()
        self._wait_fallen_back(set())

    def _wait_fallen_back(self, mine: set[tuple[str, str]]) -> bool:
        """Waits for a fallback: True if it wrote every (view, layer) of `mine` to disk."""
        self._wait_clear()
        if not self._settled.wait(self.start_timeout):
            logger.warning(
                f"digestfs: writing the jars served so far under {self.mountpoint} did not finish "
                f"within {self.start_timeout:g}s; writing to disk regardless."
            )
        self._flush()
        with self._lock:
            return bool(mine) and mine <= self._written

    def _log(self, level: int, message: str) -> None:
        """Logs from a helper thread: kept until a caller's thread flushes it. Pants drops what
        threads of its own do not log (seen in 2.17.1), and the user must see these."""
        with self._lock:
            self._deferred.append((level, message))

    def _flush(self) -> None:
        with self._lock:
            deferred, self._deferred = self._deferred, []
        for level, message in deferred:
            logger.log(level, message)

    def _fall_back(self) -> None:
        with self._lock:
            # Binds under way finish first (each has its timeouts); new ones see FALLING_BACK
            # and wait. One that finishes later than this is not in the union: its caller is
            # told so (`_wait_fallen_back`) and writes itself.
            self._lock.wait_for(lambda: self._inflight == 0, timeout=self.start_timeout)
            bound = dict(self._bound)
        written: set[tuple[str, str]] = set()
        try:
            self._detach_and_clear()
            _write_marker(self.mountpoint)
            for (view, layer), digest in sorted(bound.items()):
                dest = os.path.join(self.mountpoint, view)
                done = run_command(
                    [self.binary, "--store", self.store_dir, *self.store_args, "materialize",
                     digest, dest],
                    self.start_timeout,
                )
                if done is None:
                    done = make_writable(dest)
                if done is None:
                    written.add((view, layer))
                else:
                    self._log(
                        logging.WARNING,
                        f"digestfs: could not write the layer `{layer}` ({digest}) to {dest}: "
                        f"{done}",
                    )
        finally:
            with self._lock:
                self._written = written
                self._state = _State.OFF
            self._settled.set()

    def _attached(self) -> bool | None:
        """Whether the daemon says its mount is attached; None if it does not answer (never a
        `stat` of the mountpoint: a hung daemon would hang it)."""
        try:
            status = self.client.status()
        except DigestfsError:
            return None
        return bool(status.get("attached", True))

    def _detach(self) -> None:
        """Detaches the mount lazily: files the IDE has open keep working. A FUSE mount is
        detached without asking the daemon (which may hang: `leftover.detach`), and succeeding
        is proof enough. `digestfs unmount --lazy` otherwise (macOS, the NFS front end), which
        asks the daemon. Never called with `_lock` held."""
        if "--frontend=nfs" not in self.mount_args and detach(self.mountpoint, self.timeout) is None:
            return
        if self._attached() is False:
            return
        run_command([self.binary, "unmount", "--lazy", self.mountpoint], self.timeout)
        if self._attached():
            self._log(
                logging.WARNING,
                f"digestfs: could not unmount {self.mountpoint}; writing jars under it will fail "
                f"until it is unmounted (`{self.binary} unmount --lazy {self.mountpoint}`).",
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


def _on_helper_thread(fn: Callable[[], object], timeout: float, what: str):
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


def _write_marker(mountpoint: str) -> None:
    try:
        os.makedirs(mountpoint, exist_ok=True)
        with open(os.path.join(mountpoint, FALLBACK_MARKER), "w") as f:
            json.dump({"pid": os.getpid()}, f)
    except OSError as e:
        logger.debug(f"digestfs: could not write {FALLBACK_MARKER}: {e}")


def _fallback_owner(mountpoint: str) -> int | None:
    """The pid of a live process that fell back and wrote under `mountpoint`, if any."""
    try:
        with open(os.path.join(mountpoint, FALLBACK_MARKER)) as f:
            pid = int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _doctor(
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
