"""The acceptance test: a BSP session replayed against a real mount.

12 BSP targets across 2 resolves. In each of 3 rounds every target issues, concurrently,
buildTarget/dependencyModules, buildTarget/dependencySources and buildTarget/scalacOptions, each
through the patch's own code: `write_bsp_output` from the patched targets.py (over stand-ins for the
engine intrinsics, _fake_engine.py), then `pants.bsp.digestfs` and the vendored client. Between
rounds 1 and 2 one jar's version is bumped in some of the targets that have it, and in round 3 in
the rest. Meanwhile IDE-like readers open jars by the exact `file://` URIs Pants returns, hash them
and run `unzip -t`, and compile outputs, scripts and logs are written beside the mount.

Expected: no errors; every URI gives the bytes of its digest in the store; each `lib/` and
`plugins/` is exactly the union of its targets' closures; the old version of the bumped jar is gone
once no target has it; every write beside the mount succeeds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from _fake_engine import FakeDigest, FakeStore, FakeWorkspace, bsp_context, glue
from _support import MountTestCase, import_dir, make_jar, require_binary, sha256_file

RESOLVES = ("jvm-default", "jvm-alt")
ROUNDS = 3
READERS = 4
READ_TIME_PER_ROUND = 1.0
BUMPED = ("com.example", "bumped")
PLUGINS = {
    "jvm-default": "org.typelevel_kind-projector_0.13.2.jar",
    "jvm-alt": "com.olegpy_better-monadic-for_0.3.1.jar",
}


@dataclass(frozen=True)
class Artifact:
    group: str
    artifact: str
    version: str
    has_sources: bool = True

    @property
    def jar(self) -> str:
        # `classpath_dest_filename` in pants/jvm/resolve/coursier_fetch.py: the coord with `:`
        # replaced by `_`.
        return f"{self.group}_{self.artifact}_{self.version}.jar"

    @property
    def sources_jar(self) -> str:
        # `_sources_jar_basename` in pants/jvm/bsp/dependencies.py.
        return f"{self.group}_{self.artifact}_{self.version}-sources.jar"


@dataclass
class Target:
    uri: str  # the BSP target id, `pants:<group name>`
    resolve: str
    closure: list[Artifact]
    plugins: list[str] = field(default_factory=list)


def path_safe(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", s)


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class RWLock:
    """Readers share it; a round boundary takes it alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class BSPReplayTest(MountTestCase):
    timeout = 150.0

    def setUp(self):
        super().setUp()
        self.bin = require_binary(self)
        self.glue = glue()
        self.build_root = os.path.join(self.tmp, "buildroot")
        os.makedirs(self.build_root)
        self.bsp = os.path.join(self.build_root, ".pants.d", "bsp")
        self.mnt = self.track_mount(os.path.join(self.bsp, "jvm", "resolves"))
        self.store = self.new_store()
        scratch = os.path.join(self.tmp, "scratch")
        os.makedirs(scratch)
        self.fake_store = FakeStore(self.store, scratch)
        self.jars_dir = os.path.join(self.tmp, "jars")
        os.makedirs(self.jars_dir)
        self.sha: dict[str, str] = {}  # jar file name -> sha256 of its bytes
        self.source: dict[str, str] = {}  # jar file name -> the file on disk
        self.errors: list[str] = []
        self.errors_lock = threading.Lock()
        self.warnings = Warnings()
        logging.getLogger("pants.bsp.digestfs").addHandler(self.warnings)
        self.addCleanup(logging.getLogger("pants.bsp.digestfs").removeHandler, self.warnings)

    # -- the jars ---------------------------------------------------------------------------

    def add_jar(self, name: str, source: str | None = None, seed: int = 0) -> None:
        dest = os.path.join(self.jars_dir, name)
        if source:
            shutil.copyfile(source, dest)
        else:
            make_jar(dest, name, seed=seed, payload=2048 + 97 * len(self.sha))
        self.sha[name] = sha256_file(dest)
        self.source[name] = dest

    def system_jars(self, limit: int) -> list[tuple[str, str, str]]:
        """(artifact, version, path) of real jars from /usr/share/java, if any, smallest first."""
        found = []
        if os.path.isdir("/usr/share/java"):
            for name in sorted(os.listdir("/usr/share/java")):
                path = os.path.join("/usr/share/java", name)
                m = re.fullmatch(r"([a-z][\w.-]*?)-(\d[\w.]*)\.jar", name)
                if m and not os.path.islink(path) and 2_000 < os.path.getsize(path) < 1_500_000:
                    found.append((os.path.getsize(path), m.group(1), m.group(2), path))
        found.sort()
        # Keep one jar of 512 KiB or more (stored as a large blob) among the small ones.
        large = [f for f in found if f[0] >= 524_288][:1]
        chosen = found[: limit - len(large)] + large
        return [(a, v, p) for _, a, v, p in chosen]

    def catalogue(self) -> list[Artifact]:
        pool = []
        for artifact, version, path in self.system_jars(limit=8):
            a = Artifact("org.debian", artifact, version)
            self.add_jar(a.jar, source=path)
            pool.append(a)
        i = 0
        while len(pool) < 14:
            a = Artifact("com.example", f"lib{i}", f"1.{i}.0", has_sources=(i % 4 != 3))
            self.add_jar(a.jar, seed=i)
            pool.append(a)
            i += 1
        for a in pool:
            if a.has_sources:
                self.add_jar(a.sources_jar, seed=100)
        for version in ("1.0", "2.0"):
            a = Artifact(*BUMPED, version)
            self.add_jar(a.jar, seed=int(float(version)))
            self.add_jar(a.sources_jar, seed=200 + int(float(version)))
        for plugin in PLUGINS.values():
            self.add_jar(plugin, seed=300)
        return pool

    def targets(self, pool: list[Artifact]) -> list[Target]:
        rng = random.Random(12)
        targets = []
        for i in range(12):
            resolve = RESOLVES[0] if i < 7 else RESOLVES[1]
            # BSP target ids are `pants:<group>`; group names may hold `/` and `:`.
            uri = f"pants:src/jvm/app{i}:lib" if i % 3 == 0 else f"pants:app-{i}"
            closure = rng.sample(pool, rng.randint(4, 6))
            if i < 6:  # Targets 0-5 depend on the jar whose version gets bumped.
                closure.append(Artifact(*BUMPED, "1.0"))
            plugins = [PLUGINS[resolve]] if i % 2 == 0 else []
            targets.append(Target(uri, resolve, closure, plugins))
        return targets

    @staticmethod
    def bump(target: Target) -> None:
        target.closure = [
            Artifact(*BUMPED, "2.0") if (a.group, a.artifact) == BUMPED else a
            for a in target.closure
        ]

    # -- what Pants' rules send -------------------------------------------------------------

    def uri(self, rel: str) -> str:
        # As the BSP rules build them: build_root.pathlib_path.joinpath(...).as_uri()
        return Path(self.build_root).joinpath(f".pants.d/bsp/{rel}").as_uri()

    def request(self, kind: str, target: Target) -> tuple[FakeDigest, list[str], list[str]]:
        """(output digest, jar file names, URIs or -Xplugin paths the response carries)."""
        lib = f"jvm/resolves/{target.resolve}/lib"
        plugins = f"jvm/resolves/{target.resolve}/plugins"
        files, dirs = {}, []
        if kind == "modules":
            names = [a.jar for a in target.closure]
        elif kind == "sources":
            names = [a.sources_jar for a in target.closure if a.has_sources]
        else:
            names = [a.jar for a in target.closure]
        for name in names:
            files[f"{lib}/{name}"] = self.source[name]
        uris = [self.uri(f"{lib}/{name}") for name in names]
        if kind == "scalac":
            for name in target.plugins:
                files[f"{plugins}/{name}"] = self.source[name]
            if not target.plugins:
                dirs.append(plugins)  # AddPrefix of the empty plugins digest
            # `local_plugins.args(...)`: `-Xplugin:<absolute path>` per plugin jar.
            uris += [
                "-Xplugin:" + os.path.join(self.build_root, ".pants.d/bsp", plugins, name)
                for name in target.plugins
            ]
            names = names + target.plugins
        return FakeDigest.of(self.fake_store, files, dirs), names, uris

    # -- the test ---------------------------------------------------------------------------

    def error(self, message: str) -> None:
        with self.errors_lock:
            self.errors.append(message)

    def test_bsp_session_replay(self):
        pool = self.catalogue()
        import_dir(self.store, self.jars_dir)  # Pants' store exists before the BSP server.
        targets = self.targets(pool)
        digestfs = self.glue.digestfs.BSPDigestfs.start(
            binary_option=self.bin, build_root=self.build_root, store_dir=self.store, timeout=60
        )
        self.assertIsNotNone(digestfs, "the mount should start")
        workspace = FakeWorkspace(self.build_root)
        context = bsp_context(digestfs)

        published: list[tuple[str, str]] = []  # (URI or -Xplugin:path, sha256)
        published_lock = threading.Lock()
        boundary = RWLock()
        stop = threading.Event()
        counts = {"reads": 0, "unzips": 0, "writes": 0}
        read_uris: set[str] = set()

        def to_path(ref: str) -> str:
            if ref.startswith("-Xplugin:"):
                return ref[len("-Xplugin:") :]
            parsed = urllib.parse.urlparse(ref)
            assert parsed.scheme == "file", ref
            return urllib.parse.unquote(parsed.path)

        def read_one(ref: str, sha: str, unzip: bool) -> None:
            path = to_path(ref)
            try:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != sha:
                    self.error(f"{ref}: sha256 {h.hexdigest()}, expected {sha}")
                if unzip:
                    done = subprocess.run(
                        ["unzip", "-tqq", path], capture_output=True, text=True, timeout=30
                    )
                    if done.returncode != 0:
                        self.error(f"unzip -t {path}: {done.stdout}{done.stderr}")
                    counts["unzips"] += 1
            except Exception as e:
                self.error(f"reading {ref}: {e!r}")
            counts["reads"] += 1
            read_uris.add(ref)

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                boundary.acquire_read()
                try:
                    with published_lock:
                        choice = rng.choice(published) if published else None
                    if choice:
                        read_one(*choice, unzip=rng.random() < 0.2)
                finally:
                    boundary.release_read()
                if not choice:
                    time.sleep(0.01)

        def compile_writer() -> None:
            # What compile and the BSP launcher write beside the mount, as plain files.
            i = 0
            while not stop.is_set():
                target = targets[i % len(targets)]
                try:
                    classes = os.path.join(self.bsp, "jvm", "classes", path_safe(target.uri))
                    os.makedirs(os.path.join(classes, "org", "example"), exist_ok=True)
                    tmp = os.path.join(classes, "org", "example", f".A{i}.tmp")
                    with open(tmp, "wb") as f:
                        f.write(b"\xca\xfe\xba\xbe" + i.to_bytes(4, "big"))
                    os.replace(tmp, os.path.join(classes, "org", "example", "A.class"))
                    scripts = os.path.join(self.bsp, "scripts")
                    os.makedirs(scripts, exist_ok=True)
                    with open(os.path.join(scripts, "run-bsp.sh"), "w") as f:
                        f.write("#!/bin/sh\nexec pants --no-pantsd experimental-bsp --server\n")
                    os.makedirs(os.path.join(self.bsp, "logs"), exist_ok=True)
                    with open(os.path.join(self.bsp, "logs", "stderr.log"), "a") as f:
                        f.write(f"compiled {target.uri}\n")
                    counts["writes"] += 1
                except Exception as e:
                    self.error(f"writing beside the mount: {e!r}")
                i += 1
                time.sleep(0.005)

        def serve(kind: str, target: Target) -> None:
            output, names, refs = self.request(kind, target)
            layer = f"{kind}.{target.uri}"
            asyncio.run(self.glue.write_bsp_output(output, [(layer, output)], workspace, context))
            with published_lock:
                published.extend(zip(refs, (self.sha[n] for n in names)))

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(READERS)]
        threads.append(threading.Thread(target=compile_writer, daemon=True))
        for t in threads:
            t.start()
        try:
            for round_ in range(1, ROUNDS + 1):
                if round_ == 2:
                    for t in targets[0:3]:
                        self.bump(t)
                if round_ == 3:
                    for t in targets[3:6]:
                        self.bump(t)
                boundary.acquire_write()
                published.clear()  # An IDE uses the URIs of the latest responses.
                boundary.release_write()
                with ThreadPoolExecutor(max_workers=12) as pool_:
                    futures = [
                        pool_.submit(serve, kind, t)
                        for t in targets
                        for kind in ("modules", "sources", "scalac")
                    ]
                    for f in futures:
                        try:
                            f.result(timeout=60)
                        except Exception as e:
                            self.error(f"round {round_}: a BSP request failed: {e!r}")
                time.sleep(READ_TIME_PER_ROUND)
                self.check_views(round_, targets, digestfs)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)

        self.assertTrue(digestfs.active, f"the mount fell back: {self.warnings.records}")
        self.assertEqual(self.warnings.records, [])
        self.assertEqual(
            [w for w in workspace.writes if w[0].files], [], "nothing was written with write_digest"
        )
        # Every URI of the last responses gives the right bytes, read once more now.
        for ref, sha in list(published):
            read_one(ref, sha, unzip=True)
        self.assertEqual(self.errors, [])
        self.assertGreater(counts["reads"], 100)
        self.assertGreater(counts["unzips"], 10)
        self.assertGreater(counts["writes"], 10)
        # Each jar's bytes are the file digest the store holds for it.
        for resolve in RESOLVES:
            for name in os.listdir(os.path.join(self.mnt, resolve, "lib")):
                which = digestfs.client.which(f"{resolve}/lib/{name}")
                self.assertEqual(which["kind"], "file")
                self.assertEqual(which["digest"].split("-")[0], self.sha[name], name)

    def check_views(self, round_: int, targets: list[Target], digestfs) -> None:
        where = f"after round {round_}"
        self.assertTrue(
            digestfs.active, f"the mount fell back {where}: {self.warnings.records} {self.errors}"
        )
        views = {v["path"]: v["layers"] for v in digestfs.client.views()}
        for resolve in RESOLVES:
            mine = [t for t in targets if t.resolve == resolve]
            lib = set()
            for t in mine:
                lib.update(a.jar for a in t.closure)
                lib.update(a.sources_jar for a in t.closure if a.has_sources)
            plugins = {p for t in mine for p in t.plugins}
            self.assertEqual(
                set(os.listdir(os.path.join(self.mnt, resolve, "lib"))), lib, f"{resolve} {where}"
            )
            self.assertEqual(
                set(os.listdir(os.path.join(self.mnt, resolve, "plugins"))), plugins, where
            )
            self.assertEqual(
                set(views[f"{resolve}/lib"]),
                {f"{k}.{t.uri}" for t in mine for k in ("modules", "sources", "scalac")},
                where,
            )
            self.assertEqual(
                set(views[f"{resolve}/plugins"]),
                {f"scalac.{t.uri}" for t in mine if t.plugins},
                where,
            )
        lib = set(os.listdir(os.path.join(self.mnt, "jvm-default", "lib")))
        old, new = Artifact(*BUMPED, "1.0"), Artifact(*BUMPED, "2.0")
        self.assertEqual(old.jar in lib, round_ < 3, f"{old.jar} {where}")
        self.assertEqual(old.sources_jar in lib, round_ < 3, f"{old.sources_jar} {where}")
        self.assertEqual(new.jar in lib, round_ >= 2, f"{new.jar} {where}")
        self.assertEqual(set(views), {f"{r}/{d}" for r in RESOLVES for d in ("lib", "plugins")})
        # Beside the mount, compile outputs and scripts are plain, writable files.
        self.assertTrue(os.path.isfile(os.path.join(self.bsp, "scripts", "run-bsp.sh")))
        self.assertFalse(os.path.ismount(os.path.join(self.bsp, "jvm", "classes")))
