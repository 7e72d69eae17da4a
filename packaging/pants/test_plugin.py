"""Checks the plugin (packaging/pants/plugin/pants_digestfs) against the Pants versions it
supports, without running them: every module compiles, and every name it imports from Pants,
in the code path of that version, is defined where it imports it from.

- 7f5db53 against its pristine sources in ../shared/pants-upstream (Pants at that commit cannot
  run here); names from modules outside that subset are listed, and must be engine modules.
- 2.17.1 against the installed release, when `scripts/install-pants` has run (it has in
  `scripts/test`); `scripts/pants-e2e` then runs the plugin in a real BSP session.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile

from _support import HERE, PRISTINE

PLUGIN = os.path.join(HERE, "plugin", "pants_digestfs")
MODULES = sorted(glob.glob(os.path.join(PLUGIN, "*.py")))
REPO = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.environ.get("DIGESTFS_PANTS_TOOLS", os.path.join(REPO, "target", "pants-e2e", "tools"))

# Modules of 7f5db53 that the pristine subset lacks; the plugin may import from these only.
OUTSIDE_SUBSET = {
    "pants.backend.scala.compile.scalac_plugins",
    "pants.backend.scala.subsystems.scalac",
    "pants.base.build_root",
    "pants.engine.addresses",
    "pants.engine.internals.native_engine",
    "pants.engine.internals.selectors",
    "pants.engine.intrinsics",
    "pants.engine.rules",
    "pants.engine.unions",
    "pants.option.option_types",
    "pants.option.subsystem",
}


def imports_for(path: str, call_by_name: bool) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from pants… import name` on the code path of a version."""
    found: list[tuple[str, str, int]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "CALL_BY_NAME" in ast.unparse(node.test):
                visit(node.body if call_by_name else node.orelse)
            elif isinstance(node, ast.Try):
                # `try: from pants.engine.rules import implicitly`: there after 2.17 only.
                visit(node.body if call_by_name else [])
                if not call_by_name:
                    for handler in node.handlers:
                        visit(handler.body)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pants."):
                found.extend((node.module, a.name, node.lineno) for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node.body)

    with open(path) as f:
        visit(ast.parse(f.read()).body)
    return found


def defined_names(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def source_of(root: str, module: str) -> str | None:
    base = os.path.join(root, *module.split("."))
    for path in (base + ".py", base + ".pyi", os.path.join(base, "__init__.py")):
        if os.path.exists(path):
            return path
    return None


def unresolved(root: str, call_by_name: bool) -> tuple[list[str], set[str]]:
    missing, outside = [], set()
    for module_path in MODULES:
        for module, name, line in imports_for(module_path, call_by_name):
            source = source_of(root, module)
            if source is None:
                outside.add(module)
            elif name not in defined_names(source):
                missing.append(f"{os.path.basename(module_path)}:{line}: {module}.{name}")
    return missing, outside


class PluginCompiles(unittest.TestCase):
    def test_every_module_compiles_with_each_python_found(self):
        pythons = [sys.executable]
        for version in ("3.9", "3.12", "3.13", "3.14"):
            found = glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3"))
            pythons += sorted(found)[-1:]
        for python in pythons:
            for path in MODULES:
                with tempfile.TemporaryDirectory() as out:
                    done = subprocess.run(
                        [python, "-c", "import py_compile,sys; py_compile.compile(sys.argv[1], "
                         "cfile=sys.argv[2], doraise=True)", path, os.path.join(out, "x.pyc")],
                        capture_output=True,
                        text=True,
                    )
                self.assertEqual(done.returncode, 0, f"{python}: {path}: {done.stderr}")


class PluginAgainst7f5db53(unittest.TestCase):
    def test_every_name_imported_on_its_path_exists_there(self):
        root = os.path.join(PRISTINE, "src", "python")
        self.assertTrue(os.path.isdir(root), f"no pristine Pants files at {PRISTINE}")
        missing, outside = unresolved(root, call_by_name=True)
        self.assertEqual(missing, [], "names the plugin imports that 7f5db53 lacks")
        self.assertLessEqual(outside, OUTSIDE_SUBSET, "modules outside the pristine subset")

    def test_it_replaces_the_three_jar_writing_methods(self):
        with open(os.path.join(PLUGIN, "versions.py")) as f:
            text = f.read()
        for method in (
            "buildTarget/dependencyModules",
            "buildTarget/dependencySources",
            "buildTarget/scalacOptions",
        ):
            self.assertIn(f'"{method}"', text)
        # And 7f5db53's handlers of those methods are the ones that write under jvm/resolves.
        for rel, rule in (
            ("pants/bsp/util_rules/targets.py", "bsp_dependency_modules"),
            ("pants/bsp/util_rules/targets.py", "bsp_dependency_sources"),
            ("pants/backend/scala/bsp/rules.py", "handle_bsp_scalac_options_request"),
        ):
            with open(os.path.join(PRISTINE, "src", "python", rel)) as f:
                tree = ast.parse(f.read())
            (fn,) = [n for n in tree.body if getattr(n, "name", None) == rule]
            self.assertIn("write_digest", ast.unparse(fn), f"{rel}:{rule}")


class PluginAgainst2_17_1(unittest.TestCase):
    def test_every_name_imported_on_its_path_exists_there(self):
        found = glob.glob(os.path.join(TOOLS, "venv", "lib", "python3.9", "site-packages"))
        if not found:
            self.skipTest(f"no Pants 2.17.1 under {TOOLS} (scripts/install-pants installs it)")
        missing, outside = unresolved(found[0], call_by_name=False)
        self.assertEqual(missing, [], "names the plugin imports that 2.17.1 lacks")
        self.assertEqual(outside, set(), "modules 2.17.1 lacks")


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
