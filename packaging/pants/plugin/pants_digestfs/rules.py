# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The plugin: one wrapped call and one wrapped handler, the same on every release.

- **The seam is `Workspace.write_digest`.** Every BSP handler that writes jars (dependency
  modules, dependency sources, scalac options, in whichever release has which) writes them with
  one `write_digest(digest, path_prefix=".pants.d/bsp")`. Once the mount serves, the plugin wraps
  that method: the part of a write that lands under `.pants.d/bsp/jvm/resolves` is bound into
  the mount as one layer (`seam.plan`), everything else is written by Pants' own `write_digest`,
  and a write that does not reach the mount is passed through untouched. Pants' handlers stay
  Pants' own: same answers, same content rules, whatever the release computes.
- **The one handler is `workspace/buildTargets`**, the IDE's first request: the plugin's
  mapping runs Pants' own rule, then reads `[digestfs]` and the store options (only a rule can),
  starts the mount and arms the wrapper. Its request and response types subclass Pants' ones (a
  second rule from Pants' own types to Pants' own types would make the rule graph ambiguous).

In every other Pants process, and with `[digestfs].enabled` off, `write_digest` is never wrapped.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

from pants.base.build_root import BuildRoot
from pants.bsp.protocol import BSPHandlerMapping
from pants.bsp.spec.targets import WorkspaceBuildTargetsParams, WorkspaceBuildTargetsResult
from pants.engine.fs import Workspace
from pants.engine.internals.native_engine import Digest
from pants.engine.rules import collect_rules, rule
from pants.engine.unions import UnionRule
from pants.option.global_options import GlobalOptions

from . import commands, leftover, seam, versions
from .common import MOUNT_DIR, digest_string
from .digestfs import BSPDigestfs
from .settings import remote_store_from_options
from .subsystem import DigestfsSubsystem

logger = logging.getLogger(__name__)

CAPS = versions.probe()

# The mount of this BSP server process, made by its first `workspace/buildTargets`.
_MOUNTS: dict = {}
_LOCK = threading.Lock()
_ARMED: list = []  # [the BSPDigestfs the wrapper serves], once armed


def session_mount(
    subsystem: DigestfsSubsystem, build_root: BuildRoot, global_options: GlobalOptions
) -> BSPDigestfs | None:
    """This server's mount, begun (not waited for); None when the plugin is off or the binary
    is missing (then one warning). Without a mount of its own, a digestfs mount left at the
    mountpoint by an earlier server is detached, so that Pants' own writes meet no read-only
    mount."""
    if not subsystem.enabled:
        _detach_leftover(build_root.path, "[digestfs].enabled is false")
        return None
    store_dir = str(Path(global_options.local_store_dir).expanduser().resolve())
    shards = global_options.local_store_shard_count
    key = (build_root.path, store_dir, shards, subsystem.binary, tuple(subsystem.mount_args))
    with _LOCK:
        if key not in _MOUNTS:
            mount = BSPDigestfs.create(
                binary_option=subsystem.binary,
                build_root=build_root.path,
                store_dir=store_dir,
                remote=remote_store_from_options(**versions.remote_options(global_options)),
                store_args=("--local-store-shard-count", str(shards)),
                mount_args=tuple(subsystem.mount_args),
                timeout=subsystem.timeout,
                start_timeout=subsystem.start_timeout,
                return_after=subsystem.return_after,
                option_name="[digestfs].enabled",
            )
            if mount is not None:
                mount.begin()
                _arm(mount)
            _MOUNTS[key] = mount
        mount = _MOUNTS[key]
    if mount is None:
        _detach_leftover(build_root.path, "digestfs cannot be used here")
    return mount


_LEFTOVERS_CHECKED: set = set()


def _detach_leftover(build_root: str, why: str) -> None:
    """Once per build root and process: detaches a digestfs mount at the mountpoint (at most
    2 s), or says in one warning how to remove it."""
    with _LOCK:
        if build_root in _LEFTOVERS_CHECKED:
            return
        _LEFTOVERS_CHECKED.add(build_root)
    path = str(Path(build_root) / MOUNT_DIR)
    found = leftover.detach_leftover(path)
    if found is None:
        return
    _fstype, error = found
    if error is None:
        logger.warning(
            f"Detached the digestfs mount an earlier BSP server left at {path} ({why}): "
            "the jars of JVM resolves are written there as without the plugin."
        )
    else:
        logger.warning(error)


def _arm(mount: BSPDigestfs) -> None:
    """Wraps `Workspace.write_digest`, once per process, for `mount`. Called with `_LOCK`."""
    _ARMED[:] = [mount]
    if getattr(Workspace.write_digest, "_digestfs_original", None) is None:
        original = Workspace.write_digest

        def write_digest(self, digest, *, path_prefix=None, clear_paths=(), side_effecting=True):
            return _write_digest(original, self, digest, path_prefix=path_prefix,
                                 clear_paths=clear_paths, side_effecting=side_effecting)

        functools.update_wrapper(write_digest, original)
        write_digest._digestfs_original = original  # type: ignore[attr-defined]
        Workspace.write_digest = write_digest  # type: ignore[method-assign]


def _write_digest(original, workspace, digest, *, path_prefix, clear_paths, side_effecting):
    mount = _ARMED[0] if _ARMED else None
    if mount is None or not seam.reaches_mount(path_prefix):
        return original(workspace, digest, path_prefix=path_prefix, clear_paths=clear_paths,
                        side_effecting=side_effecting)
    clock = _Clock()
    try:
        began = time.monotonic()
        with mount.request() as active:
            clock.daemon += time.monotonic() - began
            how = _write_through(original, workspace, mount, clock, active, digest, path_prefix,
                                 clear_paths, side_effecting)
    finally:
        clock.stop()
    # What the plugin cost this request, Pants' own writes left out: the e2e bounds it.
    logger.debug(
        f"digestfs: a write under {path_prefix}: {how}; {clock.daemon:.3f} s waiting on the "
        f"daemon, {clock.plugin:.3f} s in the plugin in all"
    )
    return None


class _Clock:
    """Where a wrapped write spent its time: waiting on the daemon, and in the plugin in all
    (everything but Pants' own `write_digest`)."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.daemon = self.pants = self.plugin = 0.0

    def waiting(self, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.daemon += time.monotonic() - t0

    def pants_writes(self, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.pants += time.monotonic() - t0

    def stop(self) -> None:
        self.plugin = time.monotonic() - self.began - self.pants


def _write_through(original, workspace, mount, clock, active, digest, path_prefix, clear_paths,
                   side_effecting) -> str:
    """The wrapped write, `active` when the mount serves: what happened, in a few words."""
    def write(d, prefix, clear=()):
        clock.pants_writes(original, workspace, d, path_prefix=prefix, clear_paths=clear,
                           side_effecting=side_effecting)
    if clear_paths:  # No Pants release passes them here; they would clear under the mount.
        if active:
            clock.waiting(mount.fall_back,
                          f"a write_digest under {path_prefix} with clear_paths={clear_paths!r}")
        write(digest, path_prefix, clear_paths)
        return "written by Pants (clear_paths)"
    root = digest_string(digest.fingerprint, digest.serialized_bytes_length)
    again = functools.partial(versions.persist, workspace, [digest], timeout=mount.start_timeout)
    try:
        again()
        ls = seam.store_lister(mount.binary, mount.store_dir, mount.store_args, mount.start_timeout)
        plan = seam.plan(path_prefix, root, ls)
    except Exception as e:  # Unsplittable, unstored or unreadable: Pants writes it all.
        if active:
            clock.waiting(
                mount.fall_back, f"cannot bind the write of {root} under {path_prefix}: {e}"
            )
        write(digest, path_prefix)
        return "written by Pants (not splittable)"
    if plan is None:
        write(digest, path_prefix)
        return "written by Pants (no view)"
    for prefix, d in plan.outside:
        write(_digest(d), prefix)
    if not plan.views:
        return "written by Pants (no view)"
    layer = seam.layer_for(plan.views)
    if active and clock.waiting(mount.bind_layer, layer, plan.views, persist_again=again):
        return f"bound {len(plan.views)} views as `{layer}`"
    # No mount serves them (it never came up, or fell back): on disk, but each jar replaced by
    # rename, never truncated in place under a reader or another writer.
    mount.written_to_disk(layer, plan.views)
    for view, d in sorted(plan.views.items()):
        dest = str(Path(mount.mountpoint) / view)
        error = commands.materialize(
            mount.binary, mount.store_dir, mount.store_args, d, dest, mount.start_timeout
        )
        if error is not None:
            logger.warning(f"digestfs: writing {d} to {dest} failed ({error}); Pants writes it.")
            write(_digest(d), f"{MOUNT_DIR}/{view}")
    return f"wrote {len(plan.views)} views to disk"


def _digest(text: str) -> Digest:
    fingerprint, _, size = text.rpartition("-")
    return Digest(fingerprint, int(size))


class DigestfsWorkspaceBuildTargetsParams(WorkspaceBuildTargetsParams):
    pass


class DigestfsWorkspaceBuildTargetsResult(WorkspaceBuildTargetsResult):
    pass


class DigestfsWorkspaceBuildTargetsMapping(BSPHandlerMapping):
    method_name = "workspace/buildTargets"
    request_type = DigestfsWorkspaceBuildTargetsParams
    response_type = DigestfsWorkspaceBuildTargetsResult


if CAPS.uncacheable:  # So that it runs on every request, as Pants' own handler does.
    from pants.engine.rules import _uncacheable_rule as _handler_rule
else:
    _handler_rule = rule

# Pants' own `bsp_workspace_build_targets`, by type where `Get` exists, else by name.
if CAPS.call == "get":
    from pants.engine.internals.selectors import Get

    @_handler_rule
    async def digestfs_workspace_build_targets(
        request: DigestfsWorkspaceBuildTargetsParams,
        subsystem: DigestfsSubsystem,
        build_root: BuildRoot,
        global_options: GlobalOptions,
    ) -> DigestfsWorkspaceBuildTargetsResult:
        result = await Get(
            WorkspaceBuildTargetsResult, WorkspaceBuildTargetsParams, WorkspaceBuildTargetsParams()
        )
        session_mount(subsystem, build_root, global_options)
        return DigestfsWorkspaceBuildTargetsResult(targets=result.targets)

elif CAPS.call == "call-by-name":
    from pants.bsp.util_rules.targets import bsp_workspace_build_targets
    from pants.engine.rules import implicitly

    @_handler_rule
    async def digestfs_workspace_build_targets(
        request: DigestfsWorkspaceBuildTargetsParams,
        subsystem: DigestfsSubsystem,
        build_root: BuildRoot,
        global_options: GlobalOptions,
    ) -> DigestfsWorkspaceBuildTargetsResult:
        # The params inside `implicitly`: 2.19's call-by-name takes no positional argument.
        result = await bsp_workspace_build_targets(**implicitly(WorkspaceBuildTargetsParams()))
        session_mount(subsystem, build_root, global_options)
        return DigestfsWorkspaceBuildTargetsResult(targets=result.targets)


def rules():
    if not CAPS.usable:
        versions.warn_once(versions.unusable_message(CAPS.version, CAPS.missing))
        return tuple(DigestfsSubsystem.rules())
    base = (
        *collect_rules({"digestfs_workspace_build_targets": digestfs_workspace_build_targets}),
        UnionRule(BSPHandlerMapping, DigestfsWorkspaceBuildTargetsMapping),
    )
    return (*base, *versions.handler_query_rules(CAPS, base))
