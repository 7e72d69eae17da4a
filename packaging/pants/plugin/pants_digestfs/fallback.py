# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Falling back to disk, and the detach it starts with: `BSPDigestfs`'s part that decides when
callers may write under the mountpoint. A mixin: the state it reads and writes is set up by
`BSPDigestfs.__init__`."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from .commands import materialize, run_command, write_marker
from .common import EMPTY_DIGEST, State
from .digestfs_client import DigestfsError, DigestfsUnreachable
from .leftover import abort_connection, detach

logger = logging.getLogger("pants_digestfs.digestfs")


class Fallback:
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

    def _give_up_detach(self) -> None:
        # The start still under way mounts, or detaches what it mounted, first: then nothing
        # of it appears once callers write.
        start = self._start_thread
        if start is not None:
            start.join(self.start_timeout)
        self._detach_and_clear(mark=True)

    def _end_what_it_holds(self) -> None:
        """A daemon that still does not answer, once its mount is detached: root ends every
        request its connection holds (found by the connection the mount had, never by path), so
        that reads of the jars the IDE has open fail at once rather than wait on it."""
        if self._connection is None or os.geteuid() != 0 or self._attached() is not None:
            return
        error = abort_connection(self._connection)
        self._log(
            logging.INFO if error is None else logging.WARNING,
            f"digestfs: the daemon at {self.mountpoint} still does not answer: "
            + ("ended what it held, so that open jars fail rather than wait." if error is None
               else f"could not end what it holds ({error}); open jars wait on it."),
        )

    def _detach_and_clear(self, mark: bool) -> None:
        """Detaches (see `_detach`), and lets callers write; `mark`ed as this session's writes
        (the directory under the mount is where the marker goes) before any caller writes."""
        try:
            self._detach()
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

    def fall_back(self, reason: str, hung: bool = False) -> None:
        """Stops using the mount for this session, once: detaches it, lets callers write, and
        writes the union of the layers bound so far to disk in the background. Returns once
        callers may write (no mount left over the resolves): the unmount, never the union, which
        a hung daemon does not slow (it is read from the store). Callers and the union write the
        same names by rename (`digestfs materialize`), so neither tears nor refuses the other.
        A `hung` daemon's requests are ended once it is detached (`_end_what_it_holds`)."""
        with self._lock:
            if self._state is State.ACTIVE:
                self._state = State.FALLING_BACK
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
                "and detaching the mount: until the mount serves again (tried every "
                f"{self.return_after:g}s), the jars of JVM resolves are written to disk as without "
                f"{self.option_name}."
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
        """Whether a fallback's union is on disk (waiting at most `timeout`): for tests."""
        return self._union_written.wait(timeout)

    def _fall_back(self, hung: bool) -> None:
        try:
            # Detached first: callers wait for nothing else. Binds under way then finish (each
            # has its timeout) before the union is taken; their callers see the fallback and
            # write their own views anyway.
            self._detach_and_clear(mark=True)
            if hung:
                self._end_what_it_holds()
            with self._lock:
                self._lock.wait_for(lambda: self._inflight == 0, timeout=self.start_timeout)
                bound = dict(self._bound)
            for (view, layer), digest in sorted(bound.items()):
                dest = os.path.join(self.mountpoint, view)
                done = materialize(
                    self.binary, self.store_dir, self.store_args, digest, dest, self.start_timeout
                )
                if done is not None:
                    self._log(
                        logging.WARNING,
                        f"digestfs: could not write the layer `{layer}` ({digest}) to {dest}: "
                        f"{done}",
                    )
        finally:
            with self._lock:
                self._state = State.OFF
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

    def _detach(self) -> None:
        """Detaches the mount lazily: files the IDE has open keep working (or, once the daemon
        hangs, see `_end_what_it_holds`). A FUSE mount is detached without asking the daemon
        (which may hang: `leftover.detach`), and succeeding is proof enough. `digestfs unmount
        --lazy` otherwise (macOS, the NFS front end), which asks the daemon. Never called with
        `_lock` held."""
        # `start_timeout`: fusermount3 does not ask the daemon, but may be slow to start.
        nfs = any(
            a == "--frontend=nfs" or (a == "nfs" and i and self.mount_args[i - 1] == "--frontend")
            for i, a in enumerate(self.mount_args)
        )
        if not nfs and detach(self.mountpoint, self.start_timeout) is None:
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
