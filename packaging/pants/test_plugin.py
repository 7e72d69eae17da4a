"""Checks the plugin (packaging/pants/plugin/pants_digestfs) as Pants loads it.

- Every module compiles with each Python found (3.9 for Pants 2.17–2.24, 3.11 after).
- pyproject declares the range `versions.SUPPORTED` names.
- Against the real Pants 2.17.1 that `scripts/install-pants` installs (with its compiled engine):
  `register.rules()` registers the plugin's handler, and when a probe fails or the release is
  unknown, it logs exactly one warning naming the version and what is missing, registers only
  the options, and raises nothing; and the `write_digest` wrapper sends each part of a write
  where it belongs (with Pants' own write and the mount recorded, over a real store).
  `scripts/pants-e2e` then runs it all in a real BSP session.
- Other releases are checked by `packaging/pants/check-release` against their own sources
  (docs/pants.md has the table); their sources are not kept here.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
import zipfile

from _support import HERE, TOOLS, digest_at, import_files, require_binary

PLUGIN = os.path.join(HERE, "plugin", "pants_digestfs")
MODULES = sorted(glob.glob(os.path.join(PLUGIN, "*.py")))
VENV_PYTHON = os.path.join(TOOLS, "venv", "bin", "python")


class PluginCompiles(unittest.TestCase):
    def test_every_module_compiles_with_each_python_found(self):
        pythons = [sys.executable]
        for version in ("3.9", "3.11", "3.12", "3.13", "3.14"):
            found = glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3"))
            pythons += sorted(found)[-1:]
        self.assertTrue(any("/3.9." in p for p in pythons), f"no Python 3.9 among {pythons}")
        for python in pythons:
            for path in MODULES + [os.path.join(HERE, "check-release")]:
                with tempfile.TemporaryDirectory() as out:
                    done = subprocess.run(
                        [python, "-c", "import py_compile,sys; py_compile.compile(sys.argv[1], "
                         "cfile=sys.argv[2], doraise=True)", path, os.path.join(out, "x.pyc")],
                        capture_output=True,
                        text=True,
                    )
                self.assertEqual(done.returncode, 0, f"{python}: {path}: {done.stderr}")


class SupportedRange(unittest.TestCase):
    def test_pyproject_declares_the_range_the_probes_use(self):
        with open(os.path.join(HERE, "plugin", "pyproject.toml")) as f:
            declared = re.findall(r'"pantsbuild\.pants([^"]+)"', f.read())
        with open(os.path.join(PLUGIN, "versions.py")) as f:
            supported = re.search(r'^SUPPORTED = "([^"]+)"', f.read(), re.M).group(1)
        self.assertEqual(declared, [supported])


# Run in the Pants 2.17.1 venv: logging to stdout, then what `rules()` registered.
LOAD = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
    sys.path.insert(0, sys.argv[1])
    exec(sys.argv[2])  # what the test breaks first
    from pants_digestfs import register
    for attempt in range(2):  # Pants may ask more than once; the warning comes once.
        rules = register.rules()
    kinds = sorted({type(r).__name__ for r in rules})
    print("RULES", len(rules), ",".join(kinds))
    print("HANDLER", any(type(r).__name__ == "UnionRule" for r in rules))
    print("OPTIONS", any("digestfs" in str(getattr(r, "canonical_name", "")) for r in rules))
    """
)


class PluginOnPants2_17_1(unittest.TestCase):
    def setUp(self):
        if not os.access(VENV_PYTHON, os.X_OK):
            self.skipTest(f"no Pants 2.17.1 under {TOOLS} (scripts/install-pants installs it)")

    def load(self, breaking: str = "") -> tuple[list[str], dict[str, str]]:
        done = subprocess.run(
            [VENV_PYTHON, "-c", LOAD, os.path.join(HERE, "plugin"), breaking],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        logs = [line[4:] for line in done.stdout.splitlines() if line.startswith("LOG ")]
        out = dict(
            line.split(" ", 1) for line in done.stdout.splitlines()
            if line.split(" ", 1)[0] in ("RULES", "HANDLER", "OPTIONS")
        )
        return logs, out

    def test_it_loads_and_registers_its_handler(self):
        logs, out = self.load()
        self.assertEqual(logs, [])
        self.assertEqual(out["HANDLER"], "True")
        self.assertEqual(out["OPTIONS"], "True")

    def test_a_failed_probe_is_one_warning_and_only_the_options(self):
        # As on a Pants without `Get` or call-by-name: no way to run Pants' own handler.
        # Pants' own modules are loaded (and their rules parsed) before any backend's.
        logs, out = self.load(
            "import pants.bsp.util_rules.targets, pants.bsp.protocol, pants.engine.fs\n"
            "import pants.engine.internals.selectors as s; del s.Get"
        )
        self.assertEqual(len(logs), 1, logs)
        self.assertIn("Pants 2.17.1", logs[0])
        self.assertIn("a way to call Pants' `workspace/buildTargets` rule", logs[0])
        self.assertEqual(out["HANDLER"], "False")
        self.assertEqual(out["OPTIONS"], "True")

    def test_a_changed_write_digest_is_one_warning(self):
        logs, out = self.load(
            "import pants.engine.fs as f\n"
            "f.Workspace.write_digest = lambda self, digest, path_prefix=None: None"
        )
        self.assertEqual(len(logs), 1, logs)
        self.assertIn("`Workspace.write_digest(digest, *, path_prefix", logs[0])
        self.assertEqual(out["HANDLER"], "False")

    def test_an_unknown_release_is_one_warning(self):
        logs, out = self.load("import pants.version as v; v.VERSION = '2.40.0'")
        self.assertEqual(len(logs), 1, logs)
        self.assertIn("Pants 2.40.0", logs[0])
        self.assertIn("a release the plugin knows", logs[0])
        self.assertEqual(out["HANDLER"], "False")

    def test_an_import_that_fails_is_one_warning_not_an_error(self):
        logs, out = self.load("import sys; sys.modules['pants.bsp.protocol'] = None")
        self.assertEqual(len(logs), 1, logs)
        self.assertIn("pants_digestfs is not active on Pants 2.17.1", logs[0])
        self.assertEqual(out["HANDLER"], "False")


# Run in the Pants 2.17.1 venv: the wrapper `rules._write_digest` over real `Digest`s, with
# Pants' own `write_digest` and the mount replaced by recorders (the e2e runs the real ones).
WRAP = textwrap.dedent(
    """
    import inspect, json, sys
    sys.path.insert(0, sys.argv[1])
    from pants.engine.fs import Workspace
    from pants.engine.internals.native_engine import Digest
    from pants_digestfs import rules
    binary, store, root, bound, prefixes, mnt = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
    calls = []
    text = lambda d: f"{d.fingerprint}-{d.serialized_bytes_length}"
    def original(ws, d, *, path_prefix=None, clear_paths=(), side_effecting=True):
        calls.append(["write", text(d), path_prefix])
    class Session:
        def ensure_directory_digest_persisted(self, d):
            calls.append(["persist", text(d)])
    class WS:
        _scheduler = Session()
    import contextlib
    class Mount:
        store_dir, store_args, timeout, start_timeout, mountpoint = store, (), 30, 30, mnt
        def __init__(self):
            self.binary = binary
        @contextlib.contextmanager
        def request(self):
            yield bound != "never"
        def written_to_disk(self, layer, views):
            calls.append(["on disk", views])
        def fall_back(self, reason):
            calls.append(["fall_back", reason])
        def bind_layer(self, layer, views, persist_again=None):
            calls.append(["bind", views])
            return bound == "yes"
    before = inspect.signature(Workspace.write_digest)
    rules._arm(Mount()); rules._arm(Mount())
    wrapped = Workspace.write_digest
    assert inspect.signature(wrapped) == before, inspect.signature(wrapped)
    assert not hasattr(wrapped._digestfs_original, "_digestfs_original"), "wrapped twice"
    fp, size = root.rsplit("-", 1)
    for prefix in json.loads(prefixes):
        rules._write_digest(original, WS(), Digest(fp, int(size)), path_prefix=prefix,
                            clear_paths=(), side_effecting=True)
    print(json.dumps(calls))
    """
)


class WrapperOnPants2_17_1(unittest.TestCase):
    def setUp(self):
        if not os.access(VENV_PYTHON, os.X_OK):
            self.skipTest(f"no Pants 2.17.1 under {TOOLS} (scripts/install-pants installs it)")
        self.bin = require_binary(self)
        self.tmp = tempfile.mkdtemp(prefix="digestfs-wrap-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.store = os.path.join(self.tmp, "store")
        os.makedirs(self.store)

    def tree(self, files):
        return import_files(self.store, os.path.join(self.tmp, f"src{len(os.listdir(self.tmp))}"), files)

    def at(self, digest, path):
        return digest_at(self.store, digest, path)

    def wrap(self, root, prefixes, bound="yes"):
        self.mnt = os.path.join(self.tmp, "mnt")
        done = subprocess.run(
            [VENV_PYTHON, "-c", WRAP, os.path.join(HERE, "plugin"), self.bin, self.store, root,
             bound, json.dumps(prefixes), self.mnt],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout.splitlines()[-1])

    def test_a_jar_write_is_bound_and_the_rest_written_by_pants(self):
        d = self.tree({"jvm/resolves/r/lib/a.jar": "a", "jvm/classes/t/C.class": "c"})
        lib, classes = self.at(d, "jvm/resolves/r/lib"), self.at(d, "jvm/classes")
        self.assertEqual(
            self.wrap(d, [".pants.d/bsp"]),
            [["persist", d], ["write", classes, ".pants.d/bsp/jvm/classes"],
             ["bind", {"r/lib": lib}]],
        )

    def test_a_refused_bind_writes_the_views_to_disk_by_rename(self):
        d = self.tree({"jvm/resolves/r/lib/a.jar": "a", "jvm/resolves/r/lib/b.jar": "b"})
        lib = self.at(d, "jvm/resolves/r/lib")
        os.makedirs(os.path.join(self.tmp, "mnt", "r", "lib"))
        # A jar Pants left read-only, as its copy does between its open and its chmod: a
        # rename replaces it where Pants' own open(O_TRUNC) would fail with EACCES as a user.
        old = os.path.join(self.tmp, "mnt", "r", "lib", "a.jar")
        with open(old, "w") as f:
            f.write("old")
        os.chmod(old, 0o555)
        old_ino = os.stat(old).st_ino
        self.assertEqual(
            self.wrap(d, [".pants.d/bsp"], bound="no"),
            [["persist", d], ["bind", {"r/lib": lib}], ["on disk", {"r/lib": lib}]],
        )
        for name, text in (("a.jar", "a"), ("b.jar", "b")):
            path = os.path.join(self.mnt, "r", "lib", name)
            with open(path) as f:
                self.assertEqual(f.read(), text)
            self.assertEqual(oct(os.stat(path).st_mode & 0o777), "0o644")
        self.assertNotEqual(os.stat(old).st_ino, old_ino, "rewritten in place")

    def test_without_a_mount_the_views_are_written_to_disk_by_rename(self):
        d = self.tree({"jvm/resolves/r/lib/a.jar": "a", "jvm/classes/t/C.class": "c"})
        classes = self.at(d, "jvm/classes")
        self.assertEqual(
            self.wrap(d, [".pants.d/bsp"], bound="never"),
            [["persist", d], ["write", classes, ".pants.d/bsp/jvm/classes"],
             ["on disk", {"r/lib": self.at(d, "jvm/resolves/r/lib")}]],
        )
        with open(os.path.join(self.mnt, "r", "lib", "a.jar")) as f:
            self.assertEqual(f.read(), "a")

    def test_other_writes_are_pants_own(self):
        d = self.tree({"jvm/classes/t/C.class": "c"})
        self.assertEqual(
            self.wrap(d, ["dist", ".pants.d/bsp"]),
            [["write", d, "dist"], ["persist", d], ["write", d, ".pants.d/bsp"]],
        )

    def test_what_no_view_can_serve_falls_back_and_is_written_whole(self):
        d = self.tree({"jvm/resolves/r/lib/a.jar": "a", "jvm/notes.txt": "n"})
        calls = self.wrap(d, [".pants.d/bsp"])
        self.assertEqual([c[0] for c in calls], ["persist", "fall_back", "write"])
        self.assertIn("jvm/notes.txt is a file beside the mount", calls[1][1])
        self.assertEqual(calls[2], ["write", d, ".pants.d/bsp"])


class PluginWheel(unittest.TestCase):
    def test_the_wheel_users_list_in_plugins_holds_every_module(self):
        pip = os.path.join(TOOLS, "venv", "bin", "pip")
        if not os.access(pip, os.X_OK):
            self.skipTest(f"no Pants venv under {TOOLS} (scripts/install-pants makes it)")
        with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as build:
            # As a user would: pip fetches the build backend (setuptools) from PyPI. The source is
            # copied: setuptools writes its build/ and egg-info beside it.
            src = os.path.join(build, "plugin")
            shutil.copytree(os.path.join(HERE, "plugin"), src,
                            ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
            done = subprocess.run(
                [pip, "wheel", "-q", "--no-deps", "-w", out, src],
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            (wheel,) = glob.glob(os.path.join(out, "pants_digestfs-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                names = {n for n in z.namelist() if n.startswith("pants_digestfs/")}
        self.assertEqual(
            names, {f"pants_digestfs/{os.path.basename(m)}" for m in MODULES}, "wheel contents"
        )


if __name__ == "__main__":
    unittest.main()
