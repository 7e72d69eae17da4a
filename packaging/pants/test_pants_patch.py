"""Checks the Pants patch without Pants (which cannot run here): it applies to the pristine files
of pantsbuild/pants 7f5db53, every file it touches compiles, its new modules are exactly the
sources kept in this folder, and the three jar-writing sites go through `write_bsp_output`."""

from __future__ import annotations

import ast
import functools
import glob
import os
import py_compile
import shutil
import subprocess
import tempfile
import unittest

from _support import HERE, PATCH, PRISTINE, patched_tree, run

PLUGIN = os.path.join(HERE, "plugin", "pants_digestfs")

NEW_FILES = {
    "src/python/pants/bsp/digestfs.py",
    "src/python/pants/bsp/digestfs_client.py",
}
CHANGED_FILES = {
    "src/python/pants/backend/scala/bsp/rules.py",
    "src/python/pants/bsp/context.py",
    "src/python/pants/bsp/goal.py",
    "src/python/pants/bsp/util_rules/targets.py",
    "src/python/pants/engine/fs.py",
}


def patched_paths() -> set[str]:
    with open(PATCH) as f:
        return {line.split(" b/", 1)[1].strip() for line in f if line.startswith("diff --git ")}


def read(root: str, rel: str) -> str:
    with open(os.path.join(root, rel)) as f:
        return f.read()


def function(tree: ast.Module, name: str) -> ast.AsyncFunctionDef | ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, (ast.AsyncFunctionDef, ast.FunctionDef)) and node.name == name:
            return node
    raise AssertionError(f"no function {name}")


def called_names(node: ast.AST) -> set[str]:
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            f = call.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


@functools.cache
def newest_python() -> str | None:
    """The newest Python 3.12+ that runs here, other than this one (None if there is none)."""
    candidates = [shutil.which(f"python3.{minor}") for minor in (14, 13, 12)]
    candidates += sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")), reverse=True
    )
    for python in filter(None, candidates):
        done = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0 and done.stdout.strip() == "True":
            return python
    return None


class PatchTest(unittest.TestCase):
    def test_applies_to_a_copy_of_the_pristine_tree(self):
        self.assertTrue(os.path.isdir(PRISTINE), f"no pristine Pants files at {PRISTINE}")
        tmp = tempfile.mkdtemp(prefix="pants-apply-")
        self.addCleanup(shutil.rmtree, tmp, True)
        shutil.copytree(PRISTINE, tmp, dirs_exist_ok=True)
        run("git", "init", "-q", tmp)
        run("git", "-C", tmp, "apply", "--check", PATCH)
        run("git", "-C", tmp, "apply", PATCH)
        # Only files of the pristine subset are changed; the rest are new.
        self.assertEqual(patched_paths(), NEW_FILES | CHANGED_FILES)
        for rel in CHANGED_FILES:
            self.assertTrue(os.path.isfile(os.path.join(PRISTINE, rel)), rel)
            self.assertNotEqual(read(PRISTINE, rel), read(tmp, rel), rel)
        for rel in NEW_FILES:
            self.assertFalse(os.path.exists(os.path.join(PRISTINE, rel)), rel)
            self.assertTrue(os.path.isfile(os.path.join(tmp, rel)), rel)
        # Applying twice is refused: the patch is not already in the pristine files.
        again = run("git", "-C", tmp, "apply", "--check", PATCH, check=False)
        self.assertNotEqual(again.returncode, 0)

    def test_every_patched_file_compiles(self):
        # Pants at 7f5db53 runs on Python 3.14: compile with this interpreter and with the
        # newest other one found, if any.
        root = patched_tree()
        pythons = [newest_python()] if newest_python() else []
        out = os.path.join(tempfile.mkdtemp(prefix="pyc-"), "out.pyc")
        self.addCleanup(shutil.rmtree, os.path.dirname(out), True)
        for rel in sorted(NEW_FILES | CHANGED_FILES):
            path = os.path.join(root, rel)
            py_compile.compile(path, cfile=out, doraise=True)
            for python in pythons:
                done = subprocess.run(
                    [
                        python,
                        "-c",
                        "import py_compile, sys; py_compile.compile(sys.argv[1], "
                        "cfile=sys.argv[2], doraise=True)",
                        path,
                        out,
                    ],
                    capture_output=True,
                    text=True,
                )
                self.assertEqual(done.returncode, 0, f"{python}: {rel}: {done.stderr}")

    def test_new_modules_are_the_sources_kept_here(self):
        root = patched_tree()
        self.assertEqual(
            read(root, "src/python/pants/bsp/digestfs.py"),
            read(PLUGIN, "digestfs.py"),
        )
        client = read(root, "src/python/pants/bsp/digestfs_client.py")
        self.assertTrue(client.endswith(read(PLUGIN, "digestfs_client.py")))
        self.assertTrue(client.startswith("# Copyright 2026 Pants project contributors"))
        done = run(os.path.join(HERE, "make-patch"), "--check", check=False, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr + done.stdout)

    def test_the_pants_free_module_imports_nothing_from_pants_but_the_client(self):
        tree = ast.parse(read(patched_tree(), "src/python/pants/bsp/digestfs.py"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        pants = {m for m in imported if m.split(".")[0] in ("pants", "")}
        # Relative, so that the plugin and the patch share it as it is.
        self.assertEqual(pants, {".digestfs_client"})

    def test_the_three_jar_writing_sites_go_through_write_bsp_output(self):
        root = patched_tree()
        targets = ast.parse(read(root, "src/python/pants/bsp/util_rules/targets.py"))
        scala = ast.parse(read(root, "src/python/pants/backend/scala/bsp/rules.py"))
        for tree, rule, kind in (
            (targets, "bsp_dependency_modules", "MODULES"),
            (targets, "bsp_dependency_sources", "SOURCES"),
            (scala, "handle_bsp_scalac_options_request", "SCALAC"),
        ):
            node = function(tree, rule)
            calls = called_names(node)
            self.assertIn("write_bsp_output", calls, rule)
            self.assertIn("layer_name", calls, rule)
            self.assertNotIn("write_digest", calls, rule)
            self.assertIn(f"LayerKind.{kind}", ast.unparse(node), rule)
            self.assertIn("bsp_context", [a.arg for a in node.args.args], rule)
        # No other write under `.pants.d/bsp` was changed.
        pristine = ast.parse(read(PRISTINE, "src/python/pants/bsp/util_rules/targets.py"))
        self.assertEqual(
            ast.unparse(function(targets, "bsp_workspace_build_targets")),
            ast.unparse(function(pristine, "bsp_workspace_build_targets")),
        )

    def test_the_option_is_off_by_default_and_the_server_starts_the_mount(self):
        root = patched_tree()
        goal = ast.parse(read(root, "src/python/pants/bsp/goal.py"))
        bsp_goal = next(
            n for n in ast.walk(goal) if isinstance(n, ast.ClassDef) and n.name == "BSPGoal"
        )
        option = next(
            n.value
            for n in bsp_goal.body
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "digestfs"
        )
        self.assertEqual(option.func.id, "StrOption")
        self.assertEqual({k.arg: ast.unparse(k.value) for k in option.keywords}["default"], "None")
        start = function(goal, "_start_digestfs")
        source = ast.unparse(start)
        self.assertIn("if not binary:\n        return None", source)
        for name in (
            "remote_store_address",
            "remote_instance_name",
            "remote_store_headers",
            "remote_ca_certs_path",
        ):
            self.assertIn(name, source)
        self.assertIn("LocalStoreOptions.from_options", source)
        self.assertIn("BSPContext(digestfs=digestfs)", ast.unparse(function(goal, "_run_server")))
        fs = read(root, "src/python/pants/engine/fs.py")
        self.assertIn("self._scheduler.ensure_directory_digest_persisted(digest)", fs)


if __name__ == "__main__":
    unittest.main()
