# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""What the running Pants offers the plugin, probed one capability at a time.

No version number stands for a set of features: each probe asks for the one thing the plugin
uses. Checked against the sources of every release from 2.17 to 2.33 and main (docs/pants.md):

- `write_digest`: `Workspace.write_digest(digest, *, path_prefix, clear_paths, side_effecting)`,
  the one call through which every BSP jar write goes (the seam, see rules.py).
- `persist`: `SchedulerSession.ensure_directory_digest_persisted`, to store in-memory trees.
- `build_targets`: `pants.bsp.spec.targets.WorkspaceBuildTargets{Params,Result}` and
  `pants.bsp.protocol.BSPHandlerMapping`, for the one handler the plugin wraps.
- `call`: how that handler runs Pants' own: by name (`implicitly` and
  `pants.bsp.util_rules.targets.bsp_workspace_build_targets`, 2.19 on), else `Get` (2.17, 2.18;
  deprecated from 2.30, gone from 2.32).
- `queries`: who installs the query of a handler mapping: `pants.bsp.util_rules.queries` (2.23
  on), the engine initializer (until 2.22), else the plugin builds the same `QueryRule`.
- `uncacheable`: `_uncacheable_rule`, so the handler runs on every request (else `rule`).
- The remote options are read at run time, each with its own `getattr` (`remote_options`).

No probe raises. A missing capability, or a release outside `SUPPORTED`, is one warning that
names the Pants version and what is missing; the plugin then registers only its options, and
Pants' own handlers and writes stay as they are.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

logger = logging.getLogger(__name__)

# Keep in step with pyproject.toml's `pants` extra (test_plugin.py checks it).
SUPPORTED = ">=2.17.0,<2.35"
_LOWEST, _BELOW = "2.17.0", "2.35.0.dev0"


def _attr(module: str, name: str) -> Any:
    """`module.name`, or None if either is missing (or importing it fails in any way)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # A probe must never raise: Pants would stop at startup.
        return None


def _method(module: str, cls: str, name: str) -> Any:
    return getattr(_attr(module, cls), name, None)


def pants_version() -> str:
    return str(_attr("pants.version", "VERSION") or "unknown")


def _known_release(version: str) -> bool:
    try:
        from packaging.version import Version  # Pants depends on it in every release.

        return Version(_LOWEST) <= Version(version) < Version(_BELOW)
    except Exception:
        return False


@dataclass(frozen=True)
class Capabilities:
    version: str
    call: Optional[str]  # "get" or "call-by-name"
    queries: Optional[str]  # "queries", "engine" or "own"
    uncacheable: bool
    missing: Tuple[str, ...]

    @property
    def usable(self) -> bool:
        return not self.missing


def _write_digest_ok() -> bool:
    workspace = _attr("pants.engine.fs", "Workspace")
    fn = getattr(workspace, "write_digest", None)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    names = list(params)
    kw = inspect.Parameter.KEYWORD_ONLY
    return (
        names[:2] == ["self", "digest"]
        and all(params.get(n) is not None and params[n].kind is kw
                for n in ("path_prefix", "clear_paths", "side_effecting"))
    )


def probe() -> Capabilities:
    version = pants_version()
    missing = []
    if not _known_release(version):
        missing.append(f"a release the plugin knows ({SUPPORTED})")
    if not _write_digest_ok():
        missing.append(
            "`Workspace.write_digest(digest, *, path_prefix, clear_paths, side_effecting)`"
        )
    if _method("pants.engine.internals.scheduler", "SchedulerSession",
               "ensure_directory_digest_persisted") is None:
        missing.append("`SchedulerSession.ensure_directory_digest_persisted`")
    for module, name in (
        ("pants.bsp.protocol", "BSPHandlerMapping"),
        ("pants.bsp.spec.targets", "WorkspaceBuildTargetsParams"),
        ("pants.bsp.spec.targets", "WorkspaceBuildTargetsResult"),
    ):
        if _attr(module, name) is None:
            missing.append(f"`{module}.{name}`")

    # Call-by-name where it exists (2.19 on): `Get` warns from 2.30 and is gone from 2.32.
    call = None
    if (
        _attr("pants.engine.rules", "implicitly") is not None
        and _attr("pants.bsp.util_rules.targets", "bsp_workspace_build_targets") is not None
    ):
        call = "call-by-name"
    elif _attr("pants.engine.internals.selectors", "Get") is not None:
        call = "get"
    else:
        missing.append(
            "a way to call Pants' `workspace/buildTargets` rule (`Get`, or `implicitly` and "
            "`bsp_workspace_build_targets`)"
        )

    queries = None
    if _attr("pants.bsp.util_rules.queries", "compute_handler_query_rules") is not None:
        queries = "queries"
    elif _attr("pants.init.engine_initializer", "BSPHandlerMapping") is not None:
        queries = "engine"  # It makes a query for every BSPHandlerMapping itself.
    elif (
        _attr("pants.engine.rules", "QueryRule") is not None
        and _attr("pants.engine.environment", "EnvironmentName") is not None
    ):
        queries = "own"
    else:
        missing.append("a way to install a BSP handler's query (`QueryRule`)")

    uncacheable = _attr("pants.engine.rules", "_uncacheable_rule") is not None
    return Capabilities(version, call, queries, uncacheable, tuple(missing))


_warned = False


def warn_once(message: str) -> None:
    """One warning per process: `rules()` may be asked more than once."""
    global _warned
    if not _warned:
        _warned = True
        logger.warning(message)


def unusable_message(version: str, missing) -> str:
    return (
        f"pants_digestfs is not active on Pants {version}: it lacks "
        + "; ".join(missing)
        + ". Pants' own BSP handlers write the jars of JVM resolves, as without the plugin."
    )


def handler_query_rules(caps: Capabilities, rules) -> tuple:
    """The queries that let the BSP server request the plugin's handler mapping."""
    if caps.queries == "queries":
        from pants.bsp.util_rules.queries import compute_handler_query_rules

        return tuple(compute_handler_query_rules(rules))
    if caps.queries == "own":
        from pants.bsp.protocol import BSPHandlerMapping
        from pants.engine.environment import EnvironmentName
        from pants.engine.fs import Workspace
        from pants.engine.rules import QueryRule
        from pants.engine.unions import UnionRule

        return tuple(
            QueryRule(r.union_member.response_type,
                      (r.union_member.request_type, Workspace, EnvironmentName))
            for r in rules
            if isinstance(r, UnionRule) and r.union_base is BSPHandlerMapping
        )
    return ()  # "engine": `engine_initializer` makes one for every BSPHandlerMapping.


def remote_options(global_options) -> dict:
    """Pants' remote store options, each read on its own (names changed across releases):
    2.17–2.22 have `remote_oauth_bearer_token_path`, 2.20 on `remote_oauth_bearer_token` and
    `remote_provider` (from 2.29 declared on `BootstrapOptions`, which `GlobalOptions` extends).
    An option a release lacks is None."""

    def get(name: str):
        try:
            value = getattr(global_options, name)
        except Exception:
            return None
        return getattr(value, "value", value)  # `remote_provider` is an enum.

    token = get("remote_oauth_bearer_token")
    path = get("remote_oauth_bearer_token_path")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = None  # Pants itself reports an unreadable token file.
    return dict(
        provider=get("remote_provider") or "reapi",
        cache_read=bool(get("remote_cache_read")),
        execution=bool(get("remote_execution")),
        address=get("remote_store_address"),
        instance_name=get("remote_instance_name"),
        headers=get("remote_store_headers") or {},
        ca_certs_path=get("remote_ca_certs_path"),
        oauth_bearer_token=token,
    )


def persist(workspace, digests, timeout: float) -> None:
    """Stores the `Directory` entries of `digests` in the local store, where digestfs reads them:
    digests made by `AddPrefix` or `MergeDigests` may exist only in memory.

    `SchedulerSession.ensure_directory_digest_persisted` is reached through the `Workspace`'s
    session (no rule API has it). It blocks with the engine's `block_on`, which panics on the
    threads that run rules ("Cannot start a runtime from within a runtime", seen in 2.17.1), so
    it runs on a helper thread, waited for at most `timeout`. Any failure, the engine's panic
    included (a BaseException), comes back as a RuntimeError."""
    import threading

    digests = list(digests)
    failure: list = []
    session = getattr(workspace, "_scheduler", None)
    ensure = getattr(session, "ensure_directory_digest_persisted", None)
    if ensure is None:
        raise RuntimeError("this Pants' Workspace has no session to store digests with")

    def run() -> None:
        try:
            for digest in digests:
                ensure(digest)
        except BaseException as e:  # noqa: B036: pyo3's PanicException is a BaseException.
            failure.append(e)

    thread = threading.Thread(target=run, name="digestfs-persist", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RuntimeError(f"storing {len(digests)} directory digests took over {timeout:g}s")
    if failure:
        raise RuntimeError(f"storing the directory digests failed: {failure[0]}") from failure[0]
