# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The `pants_digestfs` backend: list it after the Scala backend in `backend_packages`, so that
its BSP handler mappings are the ones `pants.bsp.protocol` keeps (the last one per method)."""

from pants_digestfs import rules as digestfs_rules


def rules():
    return digestfs_rules.rules()
