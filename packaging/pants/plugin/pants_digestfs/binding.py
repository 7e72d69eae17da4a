# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Binding layers into the mount through the daemon, and the retries that can fix a refused
bind: `BSPDigestfs`'s part that serves. A mixin: the state it reads and writes is set up by
`BSPDigestfs.__init__`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from .commands import fallback_owner, on_helper_thread
from .common import EMPTY_DIGEST, State
from .digestfs_client import (
    DigestfsBadRequest,
    DigestfsConflict,
    DigestfsError,
    DigestfsMissing,
    DigestfsUnreachable,
)
from .leftover import fuse_connection_at

logger = logging.getLogger("pants_digestfs.digestfs")


class Binding:
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
            if self._state is not State.ACTIVE:
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
            if self._state is State.ACTIVE:
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
                self.client.bind(view, digest, layer=layer, owner=self.owner)
            except DigestfsConflict:
                if dropped or not self._drop_earlier(view):
                    raise
                dropped = True
                self.client.bind(view, digest, layer=layer, owner=self.owner)

        self._retrying(bind, persist_again)
        with self._lock:
            self._bound[(view, layer)] = digest
            self._earlier.discard((view, layer))

    def _drop_earlier(self, view: str) -> bool:
        """Unbinds from `view` the layers of earlier sessions not yet bound again in this one:
        only those no live session holds (see `_mount`)."""
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
                try:  # As this session: a layer another still holds stays.
                    self.client.unbind(path, layer=layer, owner=self.owner)
                except (DigestfsBadRequest, DigestfsConflict):
                    pass  # Already gone, or not this session's.
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
        if owner is not None or not self._still(State.ACTIVE):
            raise DigestfsUnreachable(
                f"not mounting again at {self.mountpoint}"
                + (f": the BSP server with pid {owner} fell back and wrote there" if owner else "")
            )

        def mount() -> int:
            pid = self._ensure_mounted()
            self._connection = fuse_connection_at(self.mountpoint)
            if not self._still(State.ACTIVE):
                self._detach()
            return pid

        pid = on_helper_thread(
            mount, self.start_timeout, f"mounting digestfs again at {self.mountpoint}"
        )
        with self._lock:
            self.pid = pid
