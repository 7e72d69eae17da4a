# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The plugin's BSP handlers: Pants' own content, bound into the digestfs mount, not written.

`pants.bsp.protocol` keeps the last handler mapping registered per method name, so these
replace Pants' handlers for the methods that write jars under `jvm/resolves` (and for
`workspace/buildTargets`, to start the mount early and drop the layers of removed targets).
Each mapping has request and response types of its own, subclasses of Pants' ones: a second
rule from Pants' own types to Pants' own types would make the rule graph ambiguous.

With `[digestfs].enabled` off, or when digestfs cannot mount, every handler does what Pants' own
does: the same content rules, the same `write_digest` calls, as concurrently. (They cannot simply
ask for Pants' own handler's result: once its mapping is replaced, its rule has no query root
and is pruned from the rule graph.)
"""

from __future__ import annotations

import functools
import threading
import logging
from dataclasses import dataclass
from pathlib import Path

from pants.backend.scala.bsp.spec import (
    ScalacOptionsItem,
    ScalacOptionsParams,
    ScalacOptionsResult,
)
from pants.backend.scala.subsystems.scalac import Scalac
from pants.base.build_root import BuildRoot
from pants.bsp.protocol import BSPHandlerMapping
from pants.bsp.spec.base import BuildTargetIdentifier
from pants.bsp.spec.targets import (
    DependencyModulesItem,
    DependencyModulesParams,
    DependencyModulesResult,
    DependencySourcesItem,
    DependencySourcesParams,
    DependencySourcesResult,
    WorkspaceBuildTargetsParams,
    WorkspaceBuildTargetsResult,
)
from pants.engine.fs import Workspace
from pants.engine.internals.native_engine import EMPTY_DIGEST, Digest
from pants.engine.rules import _uncacheable_rule, collect_rules, rule
from pants.engine.unions import UnionRule
from pants.option.global_options import GlobalOptions

from . import versions
from .digestfs import (
    BSP_DIR,
    RESOLVES_DIR,
    BSPDigestfs,
    LayerKind,
    digest_string,
    layer_name,
    view_prefix,
    views_of,
)
from .subsystem import DigestfsSubsystem

logger = logging.getLogger(__name__)

# One mount per BSP server process, made on its first request (requests run concurrently).
_MOUNTS: dict[tuple, BSPDigestfs | None] = {}
_MOUNTS_LOCK = threading.Lock()


def session_mount(
    subsystem: DigestfsSubsystem, build_root: BuildRoot, global_options: GlobalOptions
) -> BSPDigestfs | None:
    """The mount of this BSP server, begun (not waited for); None when the plugin is off or the
    binary is missing (then one warning)."""
    if not subsystem.enabled:
        return None
    store_dir = str(Path(global_options.local_store_dir).expanduser().resolve())
    shards = global_options.local_store_shard_count
    key = (build_root.path, store_dir, shards, subsystem.binary, tuple(subsystem.mount_args))
    with _MOUNTS_LOCK:
        return _MOUNTS[key] if key in _MOUNTS else _new_mount(key, subsystem, global_options)


def _new_mount(key: tuple, subsystem: DigestfsSubsystem, global_options: GlobalOptions):
    build_root_path, store_dir, shards = key[:3]
    mount = BSPDigestfs.create(
        binary_option=subsystem.binary,
        build_root=build_root_path,
        store_dir=store_dir,
        remote=versions.remote_store(global_options),
        store_args=("--local-store-shard-count", str(shards)),
        mount_args=tuple(subsystem.mount_args),
        timeout=subsystem.timeout,
        start_timeout=subsystem.timeout,
        option_name="[digestfs].enabled",
    )
    if mount is not None:
        mount.begin()
    _MOUNTS[key] = mount
    return mount


def _serving(mount: BSPDigestfs | None) -> bool:
    return mount is not None and mount.wait_started()


async def write_bsp_output(
    output_digest: Digest,
    layers: list[tuple[str, Digest]],
    workspace: Workspace,
    mount: BSPDigestfs,
) -> None:
    """Writes `output_digest` under `.pants.d/bsp` as Pants would, except `jvm/resolves/**`,
    which is bound: `layers` are its parts, one per (request kind, BSP target), each bound as that
    layer of every `<resolve>/lib` and `<resolve>/plugins` view it covers. Whatever the mount
    cannot serve (it fell back) is written after all."""
    prefix = f"{RESOLVES_DIR}/"
    whole = await versions.snapshot(output_digest)
    outside = [f for f in whole.files if not f.startswith(prefix)]
    # Only files count: the empty `jvm/` left by the split is no reason to write.
    if outside:
        workspace.write_digest(await versions.subset(output_digest, outside), path_prefix=BSP_DIR)

    served = True
    snapshots = await versions.snapshots(digest for _, digest in layers)
    for (layer, _), snap in zip(layers, snapshots):
        try:
            views = views_of(snap.files, snap.dirs)
        except ValueError as e:
            mount.fall_back(str(e))
            served = False
            break
        subsets = await versions.subsets(snap.digest, ([f"{view_prefix(v)}/**"] for v in views))
        non_empty = [(v, d) for v, d in zip(views, subsets) if d != EMPTY_DIGEST]
        view_digests = await versions.remove_prefixes((d, view_prefix(v)) for v, d in non_empty)
        persist = functools.partial(
            versions.persist, workspace, view_digests, timeout=mount.timeout
        )
        served = mount.bind_layer(
            layer,
            {
                v: digest_string(d.fingerprint, d.serialized_bytes_length)
                for (v, _), d in zip(non_empty, view_digests)
            },
            persist_first=persist,
            persist_again=persist,
        )
        if not served:
            break
    if not served:
        resolves = await versions.subset(output_digest, [f"{prefix}**"])
        workspace.write_digest(resolves, path_prefix=BSP_DIR)


# --- workspace/buildTargets: start the mount, and drop the layers of targets that are gone ------


class DigestfsWorkspaceBuildTargetsParams(WorkspaceBuildTargetsParams):
    pass


class DigestfsWorkspaceBuildTargetsResult(WorkspaceBuildTargetsResult):
    pass


class DigestfsWorkspaceBuildTargetsMapping(BSPHandlerMapping):
    method_name = "workspace/buildTargets"
    request_type = DigestfsWorkspaceBuildTargetsParams
    response_type = DigestfsWorkspaceBuildTargetsResult


@_uncacheable_rule
async def digestfs_workspace_build_targets(
    request: DigestfsWorkspaceBuildTargetsParams,
    subsystem: DigestfsSubsystem,
    build_root: BuildRoot,
    global_options: GlobalOptions,
) -> DigestfsWorkspaceBuildTargetsResult:
    # Pants' own handler (it writes the Scala runtime under `jvm/scala-runtime`, as always).
    result = await versions.workspace_build_targets(WorkspaceBuildTargetsParams())
    mount = session_mount(subsystem, build_root, global_options)
    if mount is not None:
        mount.reconcile(target.id.uri for target in result.targets)
    return DigestfsWorkspaceBuildTargetsResult(targets=result.targets)


# --- buildTarget/dependencyModules ---------------------------------------------------------------


class DigestfsDependencyModulesParams(DependencyModulesParams):
    pass


class DigestfsDependencyModulesResult(DependencyModulesResult):
    pass


class DigestfsDependencyModulesMapping(BSPHandlerMapping):
    method_name = "buildTarget/dependencyModules"
    request_type = DigestfsDependencyModulesParams
    response_type = DigestfsDependencyModulesResult


@_uncacheable_rule
async def digestfs_dependency_modules(
    request: DigestfsDependencyModulesParams,
    workspace: Workspace,
    subsystem: DigestfsSubsystem,
    build_root: BuildRoot,
    global_options: GlobalOptions,
) -> DigestfsDependencyModulesResult:
    mount = session_mount(subsystem, build_root, global_options)
    responses = await versions.dependency_modules(request.targets)
    output = await versions.merge(r.digest for r in responses)
    if _serving(mount):
        layers = [(layer_name(LayerKind.MODULES, r.bsp_target_id.uri), r.digest) for r in responses]
        await write_bsp_output(output, layers, workspace, mount)
    else:  # As Pants' `bsp_dependency_modules` does.
        workspace.write_digest(output, path_prefix=BSP_DIR)
    return DigestfsDependencyModulesResult(
        tuple(DependencyModulesItem(target=r.bsp_target_id, modules=r.modules) for r in responses)
    )


# --- buildTarget/scalacOptions -------------------------------------------------------------------


class DigestfsScalacOptionsParams(ScalacOptionsParams):
    pass


class DigestfsScalacOptionsResult(ScalacOptionsResult):
    pass


class DigestfsScalacOptionsMapping(BSPHandlerMapping):
    method_name = "buildTarget/scalacOptions"
    request_type = DigestfsScalacOptionsParams
    response_type = DigestfsScalacOptionsResult


@dataclass(frozen=True)
class DigestfsScalacOptionsOneRequest:
    target: BuildTargetIdentifier


@dataclass(frozen=True)
class DigestfsScalacOptionsOneResult:
    item: ScalacOptionsItem


@_uncacheable_rule
async def digestfs_scalac_options_one(
    request: DigestfsScalacOptionsOneRequest,
    workspace: Workspace,
    subsystem: DigestfsSubsystem,
    build_root: BuildRoot,
    global_options: GlobalOptions,
    scalac: Scalac,
) -> DigestfsScalacOptionsOneResult:
    """One target, as Pants' `handle_bsp_scalac_options_request` (one write per target)."""
    mount = session_mount(subsystem, build_root, global_options)
    result, digest = await versions.scalac_options(request.target, build_root, scalac)
    if _serving(mount):
        layer = layer_name(LayerKind.SCALAC, request.target.uri)
        await write_bsp_output(digest, [(layer, digest)], workspace, mount)
    else:
        workspace.write_digest(digest, path_prefix=BSP_DIR)
    return DigestfsScalacOptionsOneResult(result.item)


# Concurrently, as Pants' `bsp_scalac_options_request`. The one rule here whose body differs by
# version (see versions.py): it calls a rule of this module, by type or by name.
if versions.CALL_BY_NAME:
    from pants.engine.internals.selectors import concurrently
    from pants.engine.rules import implicitly

    @rule
    async def digestfs_scalac_options(
        request: DigestfsScalacOptionsParams,
    ) -> DigestfsScalacOptionsResult:
        results = await concurrently(
            digestfs_scalac_options_one(DigestfsScalacOptionsOneRequest(t), **implicitly())
            for t in request.targets
        )
        return DigestfsScalacOptionsResult(items=tuple(r.item for r in results))

else:
    from pants.engine.internals.selectors import Get, MultiGet

    @rule
    async def digestfs_scalac_options(
        request: DigestfsScalacOptionsParams,
    ) -> DigestfsScalacOptionsResult:
        results = await MultiGet(
            Get(DigestfsScalacOptionsOneResult, DigestfsScalacOptionsOneRequest(t))
            for t in request.targets
        )
        return DigestfsScalacOptionsResult(items=tuple(r.item for r in results))


# --- buildTarget/dependencySources (writes source jars after 2.17) ------------------------------


class DigestfsDependencySourcesParams(DependencySourcesParams):
    pass


class DigestfsDependencySourcesResult(DependencySourcesResult):
    pass


class DigestfsDependencySourcesMapping(BSPHandlerMapping):
    method_name = "buildTarget/dependencySources"
    request_type = DigestfsDependencySourcesParams
    response_type = DigestfsDependencySourcesResult


@_uncacheable_rule
async def digestfs_dependency_sources(
    request: DigestfsDependencySourcesParams,
    workspace: Workspace,
    subsystem: DigestfsSubsystem,
    build_root: BuildRoot,
    global_options: GlobalOptions,
) -> DigestfsDependencySourcesResult:
    mount = session_mount(subsystem, build_root, global_options)
    responses = await versions.dependency_sources(request.targets)
    output = await versions.merge(r.digest for r in responses)
    if _serving(mount):
        layers = [(layer_name(LayerKind.SOURCES, r.bsp_target_id.uri), r.digest) for r in responses]
        await write_bsp_output(output, layers, workspace, mount)
    else:  # As Pants' `bsp_dependency_sources` does.
        workspace.write_digest(output, path_prefix=BSP_DIR)
    return DigestfsDependencySourcesResult(
        tuple(DependencySourcesItem(target=r.bsp_target_id, sources=r.sources) for r in responses)
    )


_MAPPINGS = {
    "workspace/buildTargets": DigestfsWorkspaceBuildTargetsMapping,
    "buildTarget/dependencyModules": DigestfsDependencyModulesMapping,
    "buildTarget/scalacOptions": DigestfsScalacOptionsMapping,
    "buildTarget/dependencySources": DigestfsDependencySourcesMapping,
}
_RULES = {
    "workspace/buildTargets": (digestfs_workspace_build_targets,),
    "buildTarget/dependencyModules": (digestfs_dependency_modules,),
    "buildTarget/scalacOptions": (digestfs_scalac_options, digestfs_scalac_options_one),
    "buildTarget/dependencySources": (digestfs_dependency_sources,),
}


def rules():
    methods = ("workspace/buildTargets", *versions.JAR_WRITING_METHODS)
    base = (
        *collect_rules({fn.__name__: fn for m in methods for fn in _RULES[m]}),
        *(UnionRule(BSPHandlerMapping, _MAPPINGS[m]) for m in methods),
    )
    # 2.17.1 installs a query for every BSP handler mapping itself; after it, each backend adds
    # the queries of its own mappings.
    return (*base, *versions.handler_query_rules(base))
