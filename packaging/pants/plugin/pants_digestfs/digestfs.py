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

`BSPDigestfs` is one session's mount: starting it and coming back to it here, binding in
`binding.py`, falling back to disk in `fallback.py`. None of them imports anything from Pants,
so that they can be tested against a real mount without Pants. `rules.py` splits the digests
and calls them.

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
from collections.abc import Iterable

from .binding import Binding
from .commands import doctor, fallback_owner, remove_marker, write_marker
from .common import ENDED_SESSIONS, MOUNT_DIR, State, owner_lives, owner_name
from .digestfs_client import DigestfsClient, DigestfsError, ensure_mounted
from .fallback import Fallback
from .leftover import fuse_connection_at
from .settings import RemoteStore, binary_from_option, mount_kwargs

logger = logging.getLogger(__name__)


class BSPDigestfs(Binding, Fallback):
    """The BSP server's digestfs mount at `.pants.d/bsp/jvm/resolves`, and its fallback.

    `begin` starts it (doctor and mount) on a helper thread; `start` does the same and waits, for
    callers outside the engine. While `active`, `bind_layer` serves a layer's views from the
    mount. When a bind fails in a way a retry does not fix, the mount falls back: it is detached
    lazily (files the IDE has open keep working), one warning is logged, callers write their
    own jars to disk, and the union of every layer bound in this session is written there in
    the background (`digestfs materialize`, which is safe against concurrent writers). Once
    `return_after` has passed, a `request` tries the mount again (see there).

    Each layer is held by the sessions that bound it (`owner`): a layer two live BSP servers of
    the repo bind is shared, and neither unbinds it. Layers no live session holds (of earlier
    BSP server processes) are taken over: one that conflicts with a new bind is dropped from
    that view, since this session binds what it needs again.

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
        self._state = State.IDLE
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
        self.owner = owner_name(self._session)  # Holds the layers this session binds.
        self._start_thread: threading.Thread | None = None
        # The FUSE connection of the mount, from when it came up (`_end_what_it_holds`).
        self._connection: int | None = None

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
            if self._state is not State.IDLE:
                return
            self._state = State.STARTING
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
                self._state is State.OFF
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
                    again = self._state is State.OFF and self._requests == 1
                    if again:
                        self._state = State.STARTING
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
        if not self._still(State.STARTING):
            write_marker(self.mountpoint, self._session)  # Given up meanwhile: off after all.
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
        self._connection = fuse_connection_at(self.mountpoint)
        # A waiter that gave up meanwhile writes to disk: do not stay mounted over its writes.
        if not self._still(State.STARTING):
            self._detach()
            return True
        try:
            # Layers no live session holds: a layer of this session's content-named kind that
            # another live BSP server holds is shared, never dropped.
            earlier = {
                (view["path"].strip("/"), layer)
                for view in self.client.views()
                for layer in view.get("layers", {})
                if not any(owner_lives(o) for o in view.get("owners", {}).get(layer, ()))
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
            gave_up = self._state is not State.STARTING
            if not gave_up:
                self.pid = pid
                self._state = State.ACTIVE
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

    def _still(self, state: State) -> bool:
        with self._lock:
            return self._state is state

    def _settle_off(self, message: str, retry: bool = False) -> None:
        """Ends a start that never mounted (or unmounted what it mounted): callers write, marked
        as this session's (no other session mounts over them). `retry`: a request tries the
        mount again `return_after` later (as after a fallback)."""
        with self._lock:
            if self._state is not State.STARTING:
                return
            self._state = State.OFF
            if retry:
                self._return_at = time.monotonic() + self.return_after
        write_marker(self.mountpoint, self._session)
        self._log(logging.WARNING, message)
        self._clear.set()
        self._settled.set()

    def _give_up(self, reason: str) -> None:
        with self._lock:
            if self._state is not State.STARTING:
                return
            self._state = State.OFF
        logger.warning(
            f"{reason}; the BSP server writes the jars of JVM resolves to disk as without "
            f"{self.option_name}."
        )
        # Whatever is mounted there now (a mount that came up late, a reused one) must go for
        # writes to disk to succeed; `_start` detaches too if it mounts after this.
        threading.Thread(target=self._give_up_detach, name="digestfs-detach", daemon=True).start()
        self._settled.set()

    def end(self) -> None:
        """Ends this session without unbinding anything: a later session of this process (as a
        later BSP server process would) may then take over its layers. A process that exits
        ends its sessions by itself."""
        ENDED_SESSIONS.add(self._session)

    @property
    def active(self) -> bool:
        """Whether the mount serves the resolves; False before it started, and once it fell back."""
        with self._lock:
            return self._state is State.ACTIVE

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



