"""The docs and the packaging files never tell anyone to mount over `.pants.d/bsp` itself: Pants
writes compile output, resources, its launcher and logs there; the mountpoint is
`.pants.d/bsp/jvm/resolves`."""

from __future__ import annotations

import os
import re
import unittest

from _support import REPO

# A mount command (ours, or the systemd unit's escaped path) whose mountpoint is `.pants.d/bsp`.
MOUNT_OVER_BSP = re.compile(r"(digestfs\s+mount\b|\bmount\s+-|systemd-escape)[^`]*\.pants\.d/bsp(?![/\w.-])")


def documents() -> list[str]:
    paths = [os.path.join(REPO, name) for name in ("README.md", "SEMANTICS.md")]
    for folder in ("docs", "packaging", "scripts"):
        for root, dirs, names in os.walk(os.path.join(REPO, folder)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__",)]
            paths += [
                os.path.join(root, n)
                for n in names
                if not n.endswith((".pyc", ".patch")) and n != "test_docs.py"
            ]
    return sorted(paths)


class DocsTest(unittest.TestCase):
    def test_nothing_mounts_over_pants_d_bsp(self):
        found = []
        for path in documents():
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            for n, line in enumerate(lines, 1):
                if MOUNT_OVER_BSP.search(line):
                    found.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
        self.assertEqual(found, [])

    def test_the_check_catches_the_old_caveat(self):
        self.assertTrue(
            MOUNT_OVER_BSP.search(
                "digestfs mount --daemon --bind jvm/resolves/default/lib=<digest> .pants.d/bsp"
            )
        )
        self.assertFalse(MOUNT_OVER_BSP.search("digestfs mount --daemon .pants.d/bsp/jvm/resolves"))


if __name__ == "__main__":
    unittest.main()
