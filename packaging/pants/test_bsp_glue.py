"""Runs the patch's engine-side glue, `write_bsp_output` as the patch adds it to
`pants/bsp/util_rules/targets.py`, over stand-ins for the engine intrinsics (see _fake_engine.py)
and against a real mount: with the option off it writes exactly what Pants writes today; with the
mount it writes only what lies outside `jvm/resolves` and binds one layer per (kind, target); when
the mount cannot serve a digest it falls back to writing everything."""

from __future__ import annotations

import asyncio
import logging
import os

from _fake_engine import FakeDigest, FakeStore, FakeWorkspace, bsp_context, glue
from _support import MountTestCase, import_dir, is_mounted, make_jar, require_binary, sha256_file

BSP = ".pants.d/bsp"


class GlueTest(MountTestCase):
    timeout = 90.0

    def setUp(self):
        super().setUp()
        self.bin = require_binary(self)
        self.glue = glue()
        self.store = self.new_store()
        scratch = os.path.join(self.tmp, "scratch")
        os.makedirs(scratch)
        self.fake_store = FakeStore(self.store, scratch)
        self.build_root = os.path.join(self.tmp, "buildroot")
        os.makedirs(self.build_root)
        self.mnt = self.track_mount(os.path.join(self.build_root, BSP, "jvm/resolves"))
        jars = os.path.join(self.tmp, "jars")
        os.makedirs(jars)
        self.jar = {}
        for name in (
            "com.example_a_1.0.jar",
            "com.example_a_1.0-sources.jar",
            "com.example_b_2.0.jar",
            "org.typelevel_kind-projector_0.13.2.jar",
        ):
            make_jar(os.path.join(jars, name), name, seed=3)
            self.jar[name] = os.path.join(jars, name)
        self.workspace = FakeWorkspace(self.build_root)
        # Pants' store exists before its BSP server starts (`digestfs doctor` checks it).
        import_dir(self.store, jars)

    def digest(self, files: dict[str, str], dirs=()) -> FakeDigest:
        return FakeDigest.of(self.fake_store, files, dirs)

    def lib(self, resolve: str, *names: str, extra=None, dirs=()) -> FakeDigest:
        files = {f"jvm/resolves/{resolve}/lib/{n}": self.jar[n] for n in names}
        files.update(extra or {})
        return self.digest(files, dirs)

    def write(self, output, layers, digestfs):
        asyncio.run(
            self.glue.write_bsp_output(output, layers, self.workspace, bsp_context(digestfs))
        )

    def start(self):
        digestfs = self.glue.digestfs.BSPDigestfs.start(
            binary_option=self.bin, build_root=self.build_root, store_dir=self.store, timeout=60
        )
        self.assertIsNotNone(digestfs)
        return digestfs

    def test_without_digestfs_it_writes_exactly_as_today(self):
        output = self.lib(
            "jvm-default",
            "com.example_a_1.0.jar",
            extra={"jvm/x.txt": self.jar["com.example_b_2.0.jar"]},
        )
        self.write(output, [("modules.pants:a", output)], None)
        self.assertEqual(self.workspace.writes, [(output, BSP)])
        self.assertEqual(self.workspace.persisted, [])
        self.assertTrue(
            os.path.isfile(
                os.path.join(
                    self.build_root, BSP, "jvm/resolves/jvm-default/lib/com.example_a_1.0.jar"
                )
            )
        )

    def test_with_digestfs_it_binds_the_resolves_and_writes_the_rest(self):
        digestfs = self.start()
        a = self.lib(
            "jvm-default",
            "com.example_a_1.0.jar",
            extra={"jvm/other/x.txt": self.jar["com.example_b_2.0.jar"]},
        )
        b = self.lib("jvm-alt", "com.example_a_1.0.jar", "com.example_b_2.0.jar")
        output = self.digest(dict(a.files + b.files))
        self.write(output, [("modules.pants:a", a), ("modules.pants:src/jvm:b", b)], digestfs)
        # Only what lies outside jvm/resolves was written; nothing tried to write into the mount.
        self.assertEqual(len(self.workspace.writes), 1)
        written, prefix = self.workspace.writes[0]
        self.assertEqual(prefix, BSP)
        self.assertEqual([p for p, _ in written.files], ["jvm/other/x.txt"])
        self.assertTrue(os.path.isfile(os.path.join(self.build_root, BSP, "jvm/other/x.txt")))
        views = {v["path"]: v["layers"] for v in digestfs.client.views()}
        self.assertEqual(set(views), {"jvm-default/lib", "jvm-alt/lib"})
        self.assertEqual(set(views["jvm-default/lib"]), {"modules.pants:a"})
        self.assertEqual(set(views["jvm-alt/lib"]), {"modules.pants:src/jvm:b"})
        self.assertEqual(len(self.workspace.persisted), 2, "each view digest is persisted")
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.mnt, "jvm-alt/lib"))),
            ["com.example_a_1.0.jar", "com.example_b_2.0.jar"],
        )
        path = os.path.join(self.mnt, "jvm-default/lib/com.example_a_1.0.jar")
        self.assertEqual(sha256_file(path), sha256_file(self.jar["com.example_a_1.0.jar"]))

        # scalacOptions: lib and plugins in one layer; an empty plugins directory is no layer.
        scalac = self.digest(
            {
                "jvm/resolves/jvm-default/lib/com.example_a_1.0.jar": self.jar[
                    "com.example_a_1.0.jar"
                ],
                "jvm/resolves/jvm-default/plugins/org.typelevel_kind-projector_0.13.2.jar": self.jar[
                    "org.typelevel_kind-projector_0.13.2.jar"
                ],
            }
        )
        no_plugins = self.lib(
            "jvm-alt", "com.example_b_2.0.jar", dirs=["jvm/resolves/jvm-alt/plugins"]
        )
        self.write(scalac, [("scalac.pants:a", scalac)], digestfs)
        self.write(no_plugins, [("scalac.pants:src/jvm:b", no_plugins)], digestfs)
        views = {v["path"]: v["layers"] for v in digestfs.client.views()}
        self.assertEqual(set(views), {"jvm-default/lib", "jvm-default/plugins", "jvm-alt/lib"})
        self.assertEqual(set(views["jvm-default/lib"]), {"modules.pants:a", "scalac.pants:a"})
        self.assertEqual(set(views["jvm-default/plugins"]), {"scalac.pants:a"})
        self.assertEqual(
            set(views["jvm-alt/lib"]), {"modules.pants:src/jvm:b", "scalac.pants:src/jvm:b"}
        )
        # dependencySources: -sources.jar files share lib/ with the binary jars.
        sources = self.lib("jvm-default", "com.example_a_1.0-sources.jar")
        self.write(sources, [("sources.pants:a", sources)], digestfs)
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.mnt, "jvm-default/lib"))),
            ["com.example_a_1.0-sources.jar", "com.example_a_1.0.jar"],
        )
        self.assertEqual(len(self.workspace.writes), 1, "nothing more was written")
        self.assertTrue(digestfs.active)

    def test_a_layer_the_mount_cannot_serve_falls_back_to_writing_everything(self):
        digestfs = self.start()
        good = self.lib("jvm-default", "com.example_a_1.0.jar")
        self.write(good, [("modules.pants:a", good)], digestfs)
        # A file directly in jvm/resolves/<resolve> belongs to no view.
        odd = self.digest({"jvm/resolves/jvm-default/stray.jar": self.jar["com.example_b_2.0.jar"]})
        output = self.digest(dict(good.files + odd.files))
        with self.assertLogs("pants.bsp.digestfs", logging.WARNING) as logs:
            self.write(output, [("modules.pants:a", good), ("modules.pants:b", odd)], digestfs)
        self.assertEqual(len(logs.records), 1, logs.output)
        self.assertIn("stray.jar", logs.output[0])
        self.assertFalse(digestfs.active)
        self.assertFalse(is_mounted(self.mnt))
        # Everything under jvm/resolves was written to disk where the mount was.
        written, prefix = self.workspace.writes[-1]
        self.assertEqual(prefix, BSP)
        self.assertEqual(sorted(p for p, _ in written.files), sorted(p for p, _ in output.files))
        for rel, _ in output.files:
            self.assertTrue(os.path.isfile(os.path.join(self.build_root, BSP, rel)), rel)
        # Later requests write as today.
        self.workspace.writes.clear()
        self.write(good, [("modules.pants:a", good)], digestfs)
        self.assertEqual(self.workspace.writes, [(good, BSP)])
