"""Tests `pants_digestfs.seam`, which splits a `Workspace.write_digest` into what is bound under
the mount and what is written as Pants writes it, against trees in a real store (made with
`digestfs import`, read back with `digestfs ls`, as the plugin reads what Pants persisted)."""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest

from _support import digest_at, import_files, require_binary

from pants_digestfs import seam  # noqa: E402 (after _support's sys.path)


def never(digest):
    raise AssertionError(f"the store was read ({digest}) for a write that cannot reach the mount")


class SeamTest(unittest.TestCase):
    def setUp(self):
        self.bin = require_binary(self)
        self.tmp = tempfile.mkdtemp(prefix="digestfs-seam-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.store = os.path.join(self.tmp, "store")
        os.makedirs(self.store)
        self.ls = seam.store_lister(self.bin, self.store, (), timeout=30)
        self.n = 0

    def tree(self, files: dict[str, str]) -> str:
        self.n += 1
        return import_files(self.store, os.path.join(self.tmp, f"src{self.n}"), files)

    def at(self, digest: str, path: str) -> str:
        return digest_at(self.store, digest, path)

    def test_a_bsp_write_is_split_into_views_and_the_rest(self):
        d = self.tree({
            "jvm/resolves/r/lib/a.jar": "a",
            "jvm/resolves/r/plugins/p.jar": "p",
            "jvm/resolves/s/lib/b.jar": "b",
            "jvm/classes/t/C.class": "c",
            "scripts/x.sh": "x",
        })
        plan = seam.plan(".pants.d/bsp", d, self.ls)
        self.assertEqual(
            plan.views,
            {
                "r/lib": self.at(d, "jvm/resolves/r/lib"),
                "r/plugins": self.at(d, "jvm/resolves/r/plugins"),
                "s/lib": self.at(d, "jvm/resolves/s/lib"),
            },
        )
        self.assertEqual(
            sorted(plan.outside),
            [(".pants.d/bsp/jvm/classes", self.at(d, "jvm/classes")),
             (".pants.d/bsp/scripts", self.at(d, "scripts"))],
        )

    def test_a_write_that_holds_no_resolves_is_left_to_pants(self):
        d = self.tree({"jvm/classes/t/C.class": "c"})
        self.assertIsNone(seam.plan(".pants.d/bsp", d, self.ls))
        self.assertIsNone(seam.plan("./.pants.d/bsp/", d, self.ls))

    def test_a_write_elsewhere_never_reads_the_store(self):
        for prefix in ("dist", ".pants.d/other", ".pants.d/bsp/jvm/classes", "/abs", "../up"):
            self.assertFalse(seam.reaches_mount(prefix), prefix)
            self.assertIsNone(seam.plan(prefix, "ab" * 32 + "-1", never), prefix)
        for prefix in (None, "", ".", ".pants.d", ".pants.d/bsp", ".pants.d/bsp/jvm/resolves/r"):
            self.assertTrue(seam.reaches_mount(prefix), prefix)

    def test_a_write_at_the_build_root(self):
        d = self.tree({".pants.d/bsp/jvm/resolves/r/lib/a.jar": "a", "src/A.java": "j"})
        plan = seam.plan(None, d, self.ls)
        self.assertEqual(plan.views, {"r/lib": self.at(d, ".pants.d/bsp/jvm/resolves/r/lib")})
        self.assertEqual(plan.outside, [("src", self.at(d, "src"))])

    def test_writes_inside_the_mount(self):
        d = self.tree({"lib/a.jar": "a", "plugins/p.jar": "p"})
        plan = seam.plan(".pants.d/bsp/jvm/resolves/r", d, self.ls)
        self.assertEqual(
            plan.views, {"r/lib": self.at(d, "lib"), "r/plugins": self.at(d, "plugins")}
        )
        self.assertEqual(plan.outside, [])
        lib = self.tree({"a.jar": "a"})
        self.assertEqual(
            seam.plan(".pants.d/bsp/jvm/resolves/r/lib", lib, self.ls).views, {"r/lib": lib}
        )
        with self.assertRaisesRegex(ValueError, "a part of a view"):
            seam.plan(".pants.d/bsp/jvm/resolves/r/lib/sub", lib, self.ls)

    def test_what_no_view_can_serve_is_refused(self):
        beside = self.tree({"jvm/resolves/r/lib/a.jar": "a", "jvm/notes.txt": "n"})
        with self.assertRaisesRegex(ValueError, "jvm/notes.txt is a file beside the mount"):
            seam.plan(".pants.d/bsp", beside, self.ls)
        in_resolve = self.tree({"jvm/resolves/r/lib/a.jar": "a", "jvm/resolves/r/x.txt": "x"})
        with self.assertRaisesRegex(ValueError, "r/x.txt is a file outside any"):
            seam.plan(".pants.d/bsp", in_resolve, self.ls)
        not_dir = self.tree({"jvm/resolves": "a file"})
        with self.assertRaisesRegex(ValueError, "not a directory"):
            seam.plan(".pants.d/bsp", not_dir, self.ls)

    def test_the_empty_digest_is_left_to_pants(self):
        self.assertIsNone(seam.plan(".pants.d/bsp", seam.EMPTY_DIGEST, never))

    def test_a_digest_not_in_the_store_is_an_error(self):
        with self.assertRaises(RuntimeError):
            seam.plan(".pants.d/bsp", "cd" * 32 + "-120", self.ls)

    def test_layers_are_named_by_content(self):
        a = {"r/lib": "ab" * 32 + "-10"}
        self.assertEqual(seam.layer_for(a), seam.layer_for(dict(a)))
        self.assertNotEqual(seam.layer_for(a), seam.layer_for({"r/lib": "ab" * 32 + "-11"}))
        self.assertTrue(seam.layer_for(a).startswith("write."))


if __name__ == "__main__":
    unittest.main()
