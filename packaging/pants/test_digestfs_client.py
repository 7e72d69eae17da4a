"""Tests the stdlib client against a real mount. Needs DIGESTFS_BIN (the built binary), the
fixtures (../shared/fixtures or DIGESTFS_FIXTURES) and a usable /dev/fuse."""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digestfs_client import DigestfsClient, DigestfsError, default_socket  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DIGESTFS_BIN", os.path.join(REPO, "target", "debug", "digestfs"))
FIXTURES = os.environ.get("DIGESTFS_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))
LIB_TREE = "64d48ed9ebb10855020cceb60b3631ab4778a27210e5565387f119d452a5f956-6847"
SRC_FOLLOWED = "d1809efb519708d7ad9680803b5fc005e9f92f119e04e8d96937fcee03a75ee4-669"
SRC_TREE = "9d647aac3d36f1a59c80f778864ee2e8f2a00e2527f0e7d5dfd221298da279e6-634"
GUAVA = "1d4ca0e3ee66921e8cb6521b62ecce32cc62abad391bf70b2fd14d40e7681f3a-2920436"


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.store = os.path.join(self.tmp, "store")
        shutil.copytree(os.path.join(FIXTURES, "pants-store"), self.store)
        subprocess.run(["chmod", "-R", "u+w", self.store], check=True)
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        subprocess.run([BIN, "--store", self.store, "mount", "--daemon", self.mnt],
                       check=True, timeout=60, stdout=subprocess.DEVNULL)
        self.addCleanup(self.cleanup)

    def cleanup(self):
        for args in (["-u"], ["-u", "-z"]):
            subprocess.run(["fusermount3", *args, self.mnt], stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_bind_views_which_unbind(self):
        client = DigestfsClient(mountpoint=self.mnt)
        self.assertTrue(os.path.exists(default_socket(self.mnt)))
        self.assertTrue(client.bind("jvm/resolves/x/lib", LIB_TREE, layer="group-a"))
        self.assertFalse(client.bind("jvm/resolves/x/lib", LIB_TREE, layer="group-a"))
        self.assertTrue(client.bind("jvm/resolves/x/lib", LIB_TREE, layer="group-b"))
        views = client.views()
        self.assertEqual(len(views), 1)
        self.assertEqual(views[0]["path"], "jvm/resolves/x/lib")
        self.assertEqual(views[0]["layers"], {"group-a": LIB_TREE, "group-b": LIB_TREE})
        self.assertEqual(views[0]["entries"], 71)
        self.assertEqual(os.path.getsize(os.path.join(self.mnt, "jvm/resolves/x/lib/guava.jar")), 2920436)
        self.assertEqual(client.which("jvm/resolves/x/lib/guava.jar"),
                         {"kind": "file", "digest": GUAVA, "executable": False})
        self.assertEqual(client.status()["views"], 1)
        self.assertTrue(client.unbind("jvm/resolves/x/lib", layer="group-a"))
        self.assertTrue(client.unbind("jvm/resolves/x/lib"))
        self.assertEqual(client.views(), [])
        self.assertEqual(os.listdir(self.mnt), [])

    def test_refusals_raise_and_change_nothing(self):
        client = DigestfsClient(mountpoint=self.mnt)
        client.bind("v", SRC_TREE, layer="a")
        before = client.views()
        # The same source tree saved with symlinks followed has a file where this one has a
        # symlink: the layers conflict.
        with self.assertRaisesRegex(DigestfsError, "conflict at v/link_to_app.java"):
            client.bind("v", SRC_FOLLOWED, layer="b")
        with self.assertRaisesRegex(DigestfsError, "malformed digest"):
            client.bind("v", "nothex", layer="c")
        with self.assertRaisesRegex(DigestfsError, "is not in the store"):
            client.bind("v", "ab" * 32 + "-5", layer="c")
        with self.assertRaisesRegex(DigestfsError, "unknown variant"):
            client.call("explode")
        self.assertEqual(client.views(), before)

    def test_unreachable_daemon_is_an_error(self):
        client = DigestfsClient(socket_path=os.path.join(self.tmp, "nothing.sock"))
        with self.assertRaisesRegex(DigestfsError, "cannot reach"):
            client.views()


if __name__ == "__main__":
    unittest.main()
