# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""Everything that differs between the Pants versions the plugin supports, and nothing else.

- **2.17.1**, the last release on PyPI, run for real by `scripts/pants-e2e`: rules await
  `Get`/`MultiGet`; jars are written under `jvm/resolves` by `buildTarget/dependencyModules` and
  `buildTarget/scalacOptions` (`dependencySources` is a stub there); the remote store options are
  `remote_store_address`, `remote_oauth_bearer_token_path`, and there is no `remote_provider`.
- **7f5db53** (pantsbuild/pants main, August 2026), checked by import and compile against its
  pristine sources: rules call other rules by name; `dependencySources` writes source jars too;
  scalacOptions also writes `<resolve>/plugins` and passes scalac's options; the remote options
  add `remote_provider` and `remote_oauth_bearer_token` (a value, not a path).

Each helper below returns what Pants' own handler computes for one request, without its
`write_digest`: the plugin binds that instead (see `rules.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
import threading
from pathlib import Path

from pants.bsp.spec.base import BuildTargetIdentifier
from pants.engine.fs import AddPrefix, DigestSubset, MergeDigests, PathGlobs, RemovePrefix
from pants.engine.internals.native_engine import Digest, Snapshot

from .digestfs import RemoteStore, remote_store_from_options

try:
    from pants.engine.rules import implicitly  # noqa: F401 (call-by-name: after 2.17)

    CALL_BY_NAME = True
except ImportError:
    CALL_BY_NAME = False

# BSP methods whose Pants handlers write jars under `jvm/resolves`.
JAR_WRITING_METHODS = (
    ("buildTarget/dependencyModules", "buildTarget/dependencySources", "buildTarget/scalacOptions")
    if CALL_BY_NAME
    else ("buildTarget/dependencyModules", "buildTarget/scalacOptions")
)


def remote_store(global_options) -> RemoteStore | None:
    """The remote CAS Pants reads from, for digestfs to read through to, from `[GLOBAL]`.

    Headers that a `remote_auth_plugin` computes are not reachable from rules in either version;
    the static `remote_store_headers` and the bearer token are passed."""
    if CALL_BY_NAME:
        provider = global_options.remote_provider.value
        token = global_options.remote_oauth_bearer_token
    else:
        provider = "reapi"
        token = None
        path = global_options.remote_oauth_bearer_token_path
        if path:
            try:
                token = Path(path).read_text().strip()
            except OSError:
                token = None  # Pants itself reports an unreadable token file.
    return remote_store_from_options(
        provider=provider,
        cache_read=global_options.remote_cache_read,
        execution=global_options.remote_execution,
        address=global_options.remote_store_address,
        instance_name=global_options.remote_instance_name,
        headers=global_options.remote_store_headers,
        ca_certs_path=global_options.remote_ca_certs_path,
        oauth_bearer_token=token,
    )


if CALL_BY_NAME:
    from pants.backend.scala.bsp.rules import HandleScalacOptionsResult
    from pants.backend.scala.bsp.spec import ScalacOptionsItem
    from pants.backend.scala.compile.scalac_plugins import (
        ScalaPluginsForTargetRequest,
        ScalaPluginsRequest,
        fetch_plugins,
        resolve_scala_plugins_for_target,
    )
    from pants.bsp.spec.targets import WorkspaceBuildTargetsParams
    from pants.bsp.util_rules.queries import compute_handler_query_rules
    from pants.bsp.util_rules.targets import (
        ResolveOneDependencyModuleRequest,
        ResolveOneDependencySourcesRequest,
        bsp_workspace_build_targets,
        resolve_bsp_build_target_addresses,
        resolve_one_dependency_module,
        resolve_one_dependency_sources,
    )
    from pants.engine.addresses import Addresses
    from pants.engine.internals.selectors import concurrently
    from pants.engine.intrinsics import (
        add_prefix,
        digest_subset_to_digest,
        digest_to_snapshot,
        merge_digests,
        remove_prefix,
    )
    from pants.jvm.bsp.compile import jvm_classes_directory
    from pants.jvm.bsp.dependencies import ThirdpartyModulesRequest, collect_thirdparty_modules

    def handler_query_rules(rules) -> tuple:
        return compute_handler_query_rules(rules)

    async def workspace_build_targets(params: WorkspaceBuildTargetsParams):
        return await bsp_workspace_build_targets(params, **implicitly())

    async def dependency_modules(targets: tuple[BuildTargetIdentifier, ...]):
        return await concurrently(
            resolve_one_dependency_module(ResolveOneDependencyModuleRequest(t), **implicitly())
            for t in targets
        )

    async def dependency_sources(targets: tuple[BuildTargetIdentifier, ...]):
        return await concurrently(
            resolve_one_dependency_sources(ResolveOneDependencySourcesRequest(t), **implicitly())
            for t in targets
        )

    async def scalac_options(target: BuildTargetIdentifier, build_root, scalac):
        """Pants' `handle_bsp_scalac_options_request`, without its write: (item, digest)."""
        targets = await resolve_bsp_build_target_addresses(**implicitly(target))
        thirdparty_modules = await collect_thirdparty_modules(
            ThirdpartyModulesRequest(Addresses(tgt.address for tgt in targets)), **implicitly()
        )
        resolve = thirdparty_modules.resolve
        scalac_plugin_targets = await concurrently(
            resolve_scala_plugins_for_target(
                ScalaPluginsForTargetRequest(tgt, resolve.name), **implicitly()
            )
            for tgt in targets
        )
        local_plugins_prefix = f"jvm/resolves/{resolve.name}/plugins"
        local_plugins = await fetch_plugins(
            ScalaPluginsRequest.from_target_plugins(scalac_plugin_targets, resolve)
        )
        thirdparty_modules_prefix = f"jvm/resolves/{resolve.name}/lib"
        thirdparty_modules_digest, local_plugins_digest = await concurrently(
            add_prefix(AddPrefix(thirdparty_modules.merged_digest, thirdparty_modules_prefix)),
            add_prefix(AddPrefix(local_plugins.classpath.digest, local_plugins_prefix)),
        )
        resolve_digest = await merge_digests(
            MergeDigests([thirdparty_modules_digest, local_plugins_digest])
        )
        item = _scalac_item(
            target,
            build_root,
            thirdparty_modules,
            options=(
                *local_plugins.args(
                    str(build_root.pathlib_path.joinpath(f".pants.d/bsp/{local_plugins_prefix}"))
                ),
                *scalac.parsed_args_for_resolve(resolve.name),
            ),
        )
        return HandleScalacOptionsResult(item), resolve_digest

    async def snapshot(digest: Digest) -> Snapshot:
        return await digest_to_snapshot(digest)

    async def snapshots(digests: Iterable[Digest]) -> tuple[Snapshot, ...]:
        return await concurrently(digest_to_snapshot(d) for d in digests)

    async def subset(digest: Digest, globs: Iterable[str]) -> Digest:
        return await digest_subset_to_digest(DigestSubset(digest, PathGlobs(list(globs))))

    async def subsets(digest: Digest, globs_each: Iterable[Iterable[str]]) -> tuple[Digest, ...]:
        return await concurrently(
            digest_subset_to_digest(DigestSubset(digest, PathGlobs(list(g)))) for g in globs_each
        )

    async def remove_prefixes(pairs: Iterable[tuple[Digest, str]]) -> tuple[Digest, ...]:
        return await concurrently(remove_prefix(RemovePrefix(d, p)) for d, p in pairs)

    async def merge(digests: Iterable[Digest]) -> Digest:
        return await merge_digests(MergeDigests(digests))

else:
    from pants.backend.scala.bsp.rules import (
        HandleScalacOptionsResult,
        ThirdpartyModules,
        ThirdpartyModulesRequest,
    )
    from pants.backend.scala.bsp.spec import ScalacOptionsItem
    from pants.bsp.spec.targets import WorkspaceBuildTargetsParams, WorkspaceBuildTargetsResult
    from pants.bsp.util_rules.targets import (
        ResolveOneDependencyModuleRequest,
        ResolveOneDependencyModuleResult,
    )
    from pants.engine.addresses import Addresses
    from pants.engine.internals.selectors import Get, MultiGet
    from pants.engine.target import Targets
    from pants.jvm.bsp.compile import jvm_classes_directory

    def handler_query_rules(rules) -> tuple:
        return ()  # `engine_initializer` makes one for every BSPHandlerMapping.

    async def workspace_build_targets(
        params: WorkspaceBuildTargetsParams,
    ) -> WorkspaceBuildTargetsResult:
        return await Get(WorkspaceBuildTargetsResult, WorkspaceBuildTargetsParams, params)

    async def dependency_modules(
        targets: tuple[BuildTargetIdentifier, ...]
    ) -> tuple[ResolveOneDependencyModuleResult, ...]:
        return await MultiGet(
            Get(ResolveOneDependencyModuleResult, ResolveOneDependencyModuleRequest(t))
            for t in targets
        )

    async def dependency_sources(targets: tuple[BuildTargetIdentifier, ...]):
        raise NotImplementedError("buildTarget/dependencySources writes nothing in Pants 2.17")

    async def scalac_options(target: BuildTargetIdentifier, build_root, scalac):
        """Pants' `handle_bsp_scalac_options_request`, without its write: (result, digest)."""
        targets = await Get(Targets, BuildTargetIdentifier, target)
        thirdparty_modules = await Get(
            ThirdpartyModules,
            ThirdpartyModulesRequest(Addresses(tgt.address for tgt in targets)),
        )
        resolve = thirdparty_modules.resolve
        resolve_digest = await Get(
            Digest,
            AddPrefix(thirdparty_modules.merged_digest, f"jvm/resolves/{resolve.name}/lib"),
        )
        item = _scalac_item(target, build_root, thirdparty_modules, options=())
        return HandleScalacOptionsResult(item), resolve_digest

    async def snapshot(digest: Digest) -> Snapshot:
        return await Get(Snapshot, Digest, digest)

    async def snapshots(digests: Iterable[Digest]) -> tuple[Snapshot, ...]:
        return await MultiGet(Get(Snapshot, Digest, d) for d in digests)

    async def subset(digest: Digest, globs: Iterable[str]) -> Digest:
        return await Get(Digest, DigestSubset(digest, PathGlobs(list(globs))))

    async def subsets(digest: Digest, globs_each: Iterable[Iterable[str]]) -> tuple[Digest, ...]:
        return await MultiGet(
            Get(Digest, DigestSubset(digest, PathGlobs(list(g)))) for g in globs_each
        )

    async def remove_prefixes(pairs: Iterable[tuple[Digest, str]]) -> tuple[Digest, ...]:
        return await MultiGet(Get(Digest, RemovePrefix(d, p)) for d, p in pairs)

    async def merge(digests: Iterable[Digest]) -> Digest:
        return await Get(Digest, MergeDigests(digests))


def _scalac_item(target, build_root, thirdparty_modules, options: tuple) -> ScalacOptionsItem:
    """The scalacOptions item both versions build alike: the resolve's jars under `lib/` as
    URIs, and the target's class directory beside the mount."""
    resolve = thirdparty_modules.resolve.name
    return ScalacOptionsItem(
        target=target,
        options=options,
        classpath=tuple(
            build_root.pathlib_path.joinpath(
                f".pants.d/bsp/jvm/resolves/{resolve}/lib/{filename}"
            ).as_uri()
            for cp_entry in thirdparty_modules.entries.values()
            for filename in cp_entry.filenames
        ),
        class_directory=build_root.pathlib_path.joinpath(
            f".pants.d/bsp/{jvm_classes_directory(target)}"
        ).as_uri(),
    )


def persist(workspace, digests: Iterable[Digest], timeout: float) -> None:
    """Stores the `Directory` entries of `digests` in the local store, where the mount reads them:
    digests made by `AddPrefix`, `MergeDigests` or `RemovePrefix` may exist only in memory.

    Both versions have `SchedulerSession.ensure_directory_digest_persisted`, which a rule reaches
    through the `Workspace` it was given (there is no rule API for it). It blocks on the store with
    the engine's `block_on`, which panics on the engine's own threads, where rules run ("Cannot
    start a runtime from within a runtime", seen in 2.17.1), so it runs on a helper thread, and
    the rule waits for that store write. A failure, the engine's panic included (a BaseException),
    comes back as a RuntimeError, which the caller treats like a refused bind."""
    digests = list(digests)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            for digest in digests:
                workspace._scheduler.ensure_directory_digest_persisted(digest)
        except BaseException as e:  # noqa: B036: pyo3's PanicException is a BaseException.
            failure.append(e)

    thread = threading.Thread(target=run, name="digestfs-persist", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RuntimeError(f"storing {len(digests)} directory digests took over {timeout:g}s")
    if failure:
        raise RuntimeError(f"storing the directory digests failed: {failure[0]}") from failure[0]
