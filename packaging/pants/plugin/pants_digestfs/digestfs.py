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
  (`seam.layer_for`), so two BSP servers of one repo bind the same jars as the same layer.

This module imports nothing from Pants, so that it can be tested against a real mount without
Pants. `rules.py` splits the digests and calls it.

Nothing here may stall the engine: rules call `bind_layer` and friends on the engine's threads,
so every subprocess (doctor, mount, unmount, materialize) runs on a helper thread of this module,
socket calls to the daemon have a short timeout (`timeout`), and nothing sleeps. A rule waits
at most `start_timeout` for the mount to come up (at the start, and while a session comes back
to it after a fallback); otherwise a daemon that stops answering costs a request one `timeout`
and an unmount (see `fall_back`), never more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
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
from .commands import (
    doctor,
    fallback_owner,
    make_writable,
    on_helper_thread,
    remove_marker,
    run_command,
    write_marker,
)
from .leftover import detach
from .settings import RemoteStore, binary_from_option, mount_kwargs

logger = logging.getLogger(__name__)

# Relative to the build root.
BSP_DIR = ".pants.d/bsp"
# Relative to `BSP_DIR`: the only part of it that holds nothing but resolve jars.
RESOLVES_DIR = "jvm/resolves"
MOUNT_DIR = f"{BSP_DIR}/{RESOLVES_DIR}"

# The empty directory: a layer with nothing in a view is no layer there.
EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855-0"


def digest_string(fingerprint: str, serialized_bytes_length: int) -> str:
    """A `Digest` as digestfs writes it: `<fingerprint>-<size>`."""
    return f"{fingerprint}-{serialized_bytes_length}"




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
    mount. When a bind fails in a way a retry does not fix, the mount falls back: it is detached
    lazily (files the IDE has open keep working), one warning is logged, callers write their
    own jars to disk, and the union of every layer bound in this session is written there in
    the background (`digestfs materialize`, which is safe against concurrent writers). Once
    `return_after` has passed, a `request` tries the mount again (see there).

    Layers bound by an earlier session (another BSP server process) are taken over: an earlier
    layer that conflicts with a new bind is dropped from that view, since this session binds
    what it needs again.

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
        return_after: float = 30.0,
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
        self.return_after = return_after
        self.option_name = option_name
        self.pid: int | None = None
        self.client = DigestfsClient(mountpoint=mountpoint, timeout=timeout)
        self._lock = threading.Condition()
        self._state = _State.IDLE
        self._settled = threading.Event()  # Set once the state is past STARTING.
        # Set once callers may write to disk: nothing of ours is mounted over the resolves.
        self._clear = threading.Event()
        # Set once a fallback has written the union of the bound layers (or given up on it).
        self._union_written = threading.Event()
        self._inflight = 0  # Binds under way; a fallback waits for them.
        self._layer_locks: dict[str, threading.Lock] = {}
        # {(view, layer): digest} bound in this session: what a fallback writes.
        self._bound: dict[tuple[str, str], str] = {}
        # (view, layer) bound before this session, by another BSP server process.
        self._earlier: set[tuple[str, str]] = set()
        self._deferred: list[tuple[int, str]] = []
        # After a fallback: when to try the mount again (see `request`); None before one.
        self._return_at: float | None = None
        self._requests = 0  # Wrapped writes under way; the mount comes back only between them.
        self._session = uuid.uuid4().hex  # Names this session's fallback marker.
        self._start_thread: threading.Thread | None = None

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
        self._begin_start()

    def _begin_start(self) -> None:
        self._start_thread = threading.Thread(target=self._start, name="digestfs-start", daemon=True)
        self._start_thread.start()

    @contextlib.contextmanager
    def request(self):
        """One write that may reach the mount: yields `wait_started()`, True while the mount
        serves, else the caller writes to disk. After a fallback, the first request once
        `return_after` has passed, and no other is under way (none is writing to disk, where
        the mount would appear), tries the mount again: a daemon that still does not answer
        costs it one `timeout`; one that answers, or is gone, is reused or replaced (`mount
        --reuse`), every layer of the session is bound again, and the mount serves again."""
        probe = False
        with self._lock:
            if (
                self._state is _State.OFF
                and self._return_at is not None
                and time.monotonic() >= self._return_at
                and self._requests == 0
                and self._clear.is_set()  # No detach still under way.
            ):
                self._return_at = time.monotonic() + self.return_after
                probe = True
            self._requests += 1
        try:
            if probe and self._answers_or_gone():
                with self._lock:
                    again = self._state is _State.OFF and self._requests == 1
                    if again:
                        self._state = _State.STARTING
                        self._settled.clear()
                        self._clear.clear()
                if again:
                    self._log(
                        logging.INFO, f"digestfs: trying the mount at {self.mountpoint} again."
                    )
                    self._begin_start()
            yield self.wait_started()
        finally:
            with self._lock:
                self._requests -= 1

    def _answers_or_gone(self) -> bool:
        """Whether the daemon at the mountpoint answers, or is gone (so that another can start),
        rather than hung: at most one `timeout`."""
        try:
            self.client.status()
        except DigestfsUnreachable as e:
            return not e.timed_out
        except DigestfsError:
            return True
        return True

    def written_to_disk(self, layer: str, views: Mapping[str, str]) -> None:
        """Records a layer a caller wrote to disk after a fallback: the mount binds it when it
        comes back."""
        with self._lock:
            if self._return_at is not None:
                for view, digest in views.items():
                    if digest != EMPTY_DIGEST:
                        self._bound[(view.strip("/"), layer)] = digest

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
        try:
            self._mount()
        except Exception as e:  # Whatever goes wrong here, waiters must not wait in vain.
            self._detach()  # Whatever of ours may be mounted.
            self._settle_off(f"starting digestfs at {self.mountpoint} failed: {e}")

    def _mount(self) -> bool:
        """Doctor, then the mount; True once something of ours may be mounted."""
        # Once per session: coming back after a fallback, it passed already.
        problems = None
        if self._return_at is None:
            problems = doctor(self.binary, self.store_dir, self.store_args, self.start_timeout)
        if problems is not None:
            self._settle_off(
                f"`{self.binary} doctor` reports that digestfs cannot mount here (FUSE or the "
                f"store), so the BSP server writes the jars of JVM resolves to disk as without "
                f"{self.option_name}:\n{problems}"
            )
            return False
        owner = fallback_owner(self.mountpoint, self._session)
        if owner is not None:
            self._settle_off(
                f"the BSP server with pid {owner} fell back from digestfs and wrote the jars of "
                f"JVM resolves under {self.mountpoint}; this one writes there too rather than "
                "mount over them, and mounts once that server has exited.",
                retry=True,
            )
            return False
        remove_marker(self.mountpoint, self._session)  # Back on the mount, if it was off it.
        if not self._still(_State.STARTING):
            return False
        try:
            pid = self._ensure_mounted()
        except DigestfsError as e:
            if isinstance(e.__cause__, subprocess.TimeoutExpired):
                self._detach()  # Its daemon may have mounted meanwhile.
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
            self._earlier = earlier
            again = sorted(self._bound.items())
        try:  # Back after a fallback: what the session wrote to disk meanwhile is bound too.
            for (view, layer), digest in again:
                self._bind(view, digest, layer, None)
        except DigestfsError as e:
            self._detach()
            self._settle_off(f"binding the session's layers at {self.mountpoint} again failed: {e}")
            return True
        with self._lock:
            gave_up = self._state is not _State.STARTING
            if not gave_up:
                self.pid = pid
                self._state = _State.ACTIVE
        if gave_up:
            self._detach()
            return True
        self._log(
            logging.INFO,
            f"Serving the jars of JVM resolves from digestfs at {self.mountpoint} (pid {pid}).",
        )
        self._settled.set()  # Even if it fell back meanwhile: waiters then see it is off.
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
            **mount_kwargs(self.remote),
        )

    def _still(self, state: _State) -> bool:
        with self._lock:
            return self._state is state

    def _settle_off(self, message: str, retry: bool = False) -> None:
        """Ends a start that never mounted (or unmounted what it mounted): callers write, marked
        as this session's (no other session mounts over them). `retry`: a request tries the
        mount again `return_after` later (as after a fallback)."""
        with self._lock:
            if self._state is not _State.STARTING:
                return
            self._state = _State.OFF
            if retry:
                self._return_at = time.monotonic() + self.return_after
        write_marker(self.mountpoint, self._session)
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
        threading.Thread(target=self._give_up_detach, name="digestfs-detach", daemon=True).start()
        self._settled.set()

    def _give_up_detach(self) -> None:
        # The start still under way mounts, or detaches what it mounted, first: then nothing
        # of it appears once callers write.
        start = self._start_thread
        if start is not None:
            start.join(self.start_timeout)
        self._detach_and_clear(mark=True)

    def _detach_and_clear(self, mark: bool, abort: bool = False) -> None:
        """Detaches (see `_detach`), and lets callers write; `mark`ed as this session's writes
        (the directory under the mount is where the marker goes) before any caller writes."""
        try:
            self._detach(abort)
            if mark:
                write_marker(self.mountpoint, self._session)
        finally:
            self._clear.set()

    def _wait_clear(self) -> None:
        """Waits until no mount of ours is left over the resolves. What it waits for is bounded
        (a start under way, then `_detach`'s commands), so this ends; the bound is only a safety
        net above theirs."""
        if not self._clear.wait(3 * self.start_timeout + 3 * self.timeout + 5):
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
        views it is no longer part of. Returns True when the mount serves the views; False when
        the caller must write them to disk itself (the mount is then detached): no mount, or it
        fell back, before or during this bind.

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
        if falling_back:  # It began after `wait_started`: once unmounted, the caller writes.
            return self._caller_writes()
        failure: str | None = None
        hung = False
        try:
            if persist_first is not None:
                persist_first()
            with self._layer_lock(layer):
                for view, digest in sorted(wanted.items()):
                    self._bind(view, digest, layer, persist_again)
                self._retrying(lambda: self._drop_stale(layer, wanted), None)
            # Bound, but served only if the mount is still there: another BSP server of this
            # repo that fell back detaches it (the daemon, shared, goes on answering).
            if self._attached() is False:
                raise DigestfsError(f"the mount at {self.mountpoint} was detached")
        except DigestfsError as e:
            failure = f"binding the layer `{layer}` failed: {e}"
            hung = isinstance(e, DigestfsUnreachable) and e.timed_out
        except Exception as e:  # A failure to persist is the caller's; it must not fail the request.
            failure = f"storing the digests of the layer `{layer}` failed: {e}"
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()
        if failure is not None:
            self.fall_back(failure, hung=hung)
            return False
        self._flush()
        with self._lock:
            if self._state is _State.ACTIVE:
                return True
        # A fallback began meanwhile, and may have taken its union before this bind was recorded.
        return self._caller_writes()

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
        owner = fallback_owner(self.mountpoint, self._session)
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

        pid = on_helper_thread(
            mount, self.start_timeout, f"mounting digestfs again at {self.mountpoint}"
        )
        with self._lock:
            self.pid = pid

    # --- falling back ---------------------------------------------------------------------------

    def fall_back(self, reason: str, hung: bool = False) -> None:
        """Stops using the mount for this session, once: detaches it, lets callers write, and
        writes the union of the layers bound so far to disk in the background. Returns once
        callers may write (no mount left over the resolves): the unmount, never the union, which
        a hung daemon does not slow (it is read from the store). Callers and the union write the
        same names by rename (`digestfs materialize`), so neither tears nor refuses the other.
        A `hung` daemon's requests are ended as it is detached (`_detach`)."""
        with self._lock:
            if self._state is _State.ACTIVE:
                self._state = _State.FALLING_BACK
                self._clear.clear()
                self._union_written.clear()
                # From now on what callers write to disk is recorded (`written_to_disk`).
                self._return_at = time.monotonic() + self.return_after
                start = True
            else:
                start = False
        if start:
            logger.warning(
                f"digestfs: {reason}. Writing the jars served so far under {self.mountpoint} "
                "and detaching the mount: for the rest of this BSP session the jars of JVM "
                f"resolves are written to disk as without {self.option_name}."
            )
            threading.Thread(
                target=self._fall_back, args=(hung,), name="digestfs-fallback", daemon=True
            ).start()
        self._caller_writes()

    def _caller_writes(self) -> bool:
        """Waits until callers may write (no mount of ours over the resolves): False, so that a
        caller writes its own views."""
        self._wait_clear()
        self._flush()
        return False

    def wait_union_written(self, timeout: float) -> bool:
        """Whether a fallback's union is on disk (waiting at most `timeout`): for tests and for
        a server that shuts down."""
        return self._union_written.wait(timeout)

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

    def _fall_back(self, hung: bool) -> None:
        try:
            # Detached first: callers wait for nothing else. Binds under way then finish (each
            # has its timeout) before the union is taken; their callers see the fallback and
            # write their own views anyway.
            self._detach_and_clear(mark=True, abort=hung)
            with self._lock:
                self._lock.wait_for(lambda: self._inflight == 0, timeout=self.start_timeout)
                bound = dict(self._bound)
            for (view, layer), digest in sorted(bound.items()):
                dest = os.path.join(self.mountpoint, view)
                done = run_command(
                    [self.binary, "--store", self.store_dir, *self.store_args, "materialize",
                     digest, dest],
                    self.start_timeout,
                )
                if done is None:
                    done = make_writable(dest)
                if done is not None:
                    self._log(
                        logging.WARNING,
                        f"digestfs: could not write the layer `{layer}` ({digest}) to {dest}: "
                        f"{done}",
                    )
        finally:
            with self._lock:
                self._state = _State.OFF
                self._return_at = time.monotonic() + self.return_after
            self._union_written.set()

    def _attached(self) -> bool | None:
        """Whether the daemon says its mount is attached; None if it does not answer (never a
        `stat` of the mountpoint: a hung daemon would hang it)."""
        try:
            status = self.client.status()
        except DigestfsError:
            return None
        return bool(status.get("attached", True))

    def _detach(self, abort: bool = False) -> None:
        """Detaches the mount lazily: files the IDE has open keep working. A FUSE mount is
        detached without asking the daemon (which may hang: `leftover.detach`), and succeeding
        is proof enough. `digestfs unmount --lazy` otherwise (macOS, the NFS front end), which
        asks the daemon. With `abort` (the daemon does not answer), root first ends every
        request the mount holds (`digestfs unmount --abort`), so that reads of the jars the IDE
        has open fail at once rather than wait on the hung daemon. Never called with `_lock`
        held."""
        # `start_timeout`: neither asks the daemon, but a process may be slow to start.
        fuse = "--frontend=nfs" not in self.mount_args
        if fuse and abort and os.geteuid() == 0:
            cmd = [self.binary, "unmount", "--abort", self.mountpoint]
            if run_command(cmd, self.start_timeout) is None:
                return
        if fuse and detach(self.mountpoint, self.start_timeout) is None:
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
