"""Runs the patch's engine-side glue, `write_bsp_output` from the patched
`pants/bsp/util_rules/targets.py`, without Pants (not a test module itself).

Pants' engine cannot run here, so the few intrinsics the glue awaits are stood in for:
`digest_subset_to_digest`, `digest_to_snapshot`, `remove_prefix`, `concurrently`, and a
`Workspace` whose `write_digest` copies files under the build root and whose
`ensure_directory_digest_persisted` imports the tree into the digestfs store. A `FakeDigest` is a
set of files (path in the digest -> file on disk) and empty directories; its `fingerprint` is the
real digest of that tree, got from `digestfs import`, so that binds against a real mount see the
same tree the engine would have stored. Everything else, `pants.bsp.digestfs` and the client
included, is the patched code itself.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from _support import import_dir, import_patched_module, patched_tree

EMPTY_FINGERPRINT = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class FakeStore:
    """Gives a FakeDigest its real digest by importing its tree into a digestfs store."""

    def __init__(self, store: str, scratch: str) -> None:
        self.store = store
        self.scratch = scratch
        self._lock = threading.Lock()
        self._known: dict[tuple, str] = {}
        self.imports = 0

    def real(self, digest: FakeDigest) -> str:
        key = (digest.files, digest.dirs)
        if not digest.files and not digest.dirs:
            return f"{EMPTY_FINGERPRINT}-0"
        with self._lock:
            if key not in self._known:
                tree = tempfile.mkdtemp(dir=self.scratch)
                for rel in digest.dirs:
                    os.makedirs(os.path.join(tree, rel), exist_ok=True)
                for rel, source in digest.files:
                    dest = os.path.join(tree, rel)
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    os.link(source, dest)
                self._known[key] = import_dir(self.store, tree)
                self.imports += 1
                shutil.rmtree(tree, ignore_errors=True)
            return self._known[key]


@dataclass(frozen=True)
class FakeDigest:
    files: tuple[tuple[str, str], ...] = ()
    dirs: tuple[str, ...] = ()
    store: FakeStore | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, store, files: dict[str, str], dirs: Iterable[str] = ()) -> FakeDigest:
        return cls(tuple(sorted(files.items())), tuple(sorted(set(dirs))), store)

    @property
    def fingerprint(self) -> str:
        return self.store.real(self).rsplit("-", 1)[0]

    @property
    def serialized_bytes_length(self) -> int:
        return int(self.store.real(self).rsplit("-", 1)[1])


EMPTY_DIGEST = FakeDigest()


@dataclass(frozen=True)
class PathGlobs:
    globs: Sequence[str]


@dataclass(frozen=True)
class DigestSubset:
    digest: FakeDigest
    globs: PathGlobs


@dataclass(frozen=True)
class RemovePrefix:
    digest: FakeDigest
    prefix: str


@dataclass(frozen=True)
class Snapshot:
    digest: FakeDigest
    files: tuple[str, ...]
    dirs: tuple[str, ...]


@functools.cache
def _glob(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _matches(path: str, globs: Sequence[str]) -> bool:
    include = [g for g in globs if not g.startswith("!")]
    exclude = [g[1:] for g in globs if g.startswith("!")]
    return any(_glob(g).match(path) for g in include) and not any(
        _glob(g).match(path) for g in exclude
    )


async def digest_subset_to_digest(subset: DigestSubset) -> FakeDigest:
    d, globs = subset.digest, subset.globs.globs
    files = {p: s for p, s in d.files if _matches(p, globs)}
    dirs = [p for p in d.dirs if _matches(p, globs)]
    return FakeDigest.of(d.store, files, dirs) if files or dirs else EMPTY_DIGEST


async def digest_to_snapshot(digest: FakeDigest) -> Snapshot:
    dirs = set(digest.dirs)
    for path in [p for p, _ in digest.files] + list(digest.dirs):
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return Snapshot(digest, tuple(p for p, _ in digest.files), tuple(sorted(dirs)))


async def remove_prefix(request: RemovePrefix) -> FakeDigest:
    d, prefix = request.digest, request.prefix + "/"
    files = {}
    for path, source in d.files:
        if not path.startswith(prefix):
            raise ValueError(f"cannot strip prefix {request.prefix} from {path}")
        files[path[len(prefix) :]] = source
    dirs = [p[len(prefix) :] for p in d.dirs if p.startswith(prefix)]
    return FakeDigest.of(d.store, files, dirs) if files or dirs else EMPTY_DIGEST


async def concurrently(awaitables) -> tuple:
    return tuple([await a for a in awaitables])


class FakeWorkspace:
    """`write_digest` copies files under the build root; persisting imports into the store."""

    def __init__(self, build_root: str) -> None:
        self.build_root = build_root
        self.writes: list[tuple[FakeDigest, str | None]] = []
        self.persisted: list[FakeDigest] = []
        self._lock = threading.Lock()

    def write_digest(self, digest: FakeDigest, *, path_prefix: str | None = None) -> None:
        with self._lock:
            self.writes.append((digest, path_prefix))
        root = os.path.join(self.build_root, path_prefix or "")
        for rel in digest.dirs:
            os.makedirs(os.path.join(root, rel), exist_ok=True)
        for rel, source in digest.files:
            dest = os.path.join(root, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(source, dest)

    def ensure_directory_digest_persisted(self, digest: FakeDigest) -> None:
        with self._lock:
            self.persisted.append(digest)
        if digest.store is not None:
            digest.store.real(digest)


def bsp_context(digestfs: Any) -> SimpleNamespace:
    return SimpleNamespace(digestfs=digestfs)


@functools.cache
def glue() -> SimpleNamespace:
    """`write_bsp_output` (and its helper) from the patched targets.py, over the stand-ins."""
    path = os.path.join(patched_tree(), "src/python/pants/bsp/util_rules/targets.py")
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source)
    wanted = {"write_bsp_output", "_persist_directory_digests"}
    segments = [
        ast.get_source_segment(source, node, padded=False)
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in wanted
    ]
    assert len(segments) == len(wanted), f"{path} lacks one of {wanted}"
    digestfs = import_patched_module("pants.bsp.digestfs")
    namespace = {
        "functools": functools,
        "Iterable": Iterable,
        "Sequence": Sequence,
        "Digest": FakeDigest,
        "Workspace": FakeWorkspace,
        "BSPContext": SimpleNamespace,
        "EMPTY_DIGEST": EMPTY_DIGEST,
        "DigestSubset": DigestSubset,
        "PathGlobs": PathGlobs,
        "RemovePrefix": RemovePrefix,
        "digest_subset_to_digest": digest_subset_to_digest,
        "digest_to_snapshot": digest_to_snapshot,
        "remove_prefix": remove_prefix,
        "concurrently": concurrently,
        # What targets.py imports from pants.bsp.digestfs: the real thing.
        **{
            name: getattr(digestfs, name)
            for name in (
                "BSP_DIR",
                "RESOLVES_DIR",
                "LayerKind",
                "digest_string",
                "layer_name",
                "view_prefix",
                "views_of",
            )
        },
    }
    code = compile(
        "from __future__ import annotations\n" + "\n\n".join(segments),
        f"{path} (write_bsp_output)",
        "exec",
    )
    exec(code, namespace)
    return SimpleNamespace(
        write_bsp_output=namespace["write_bsp_output"],
        digestfs=digestfs,
    )
