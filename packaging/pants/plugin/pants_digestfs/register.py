# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The `pants_digestfs` backend: list it after the JVM backends in `backend_packages`, so that
its `workspace/buildTargets` mapping is the one `pants.bsp.protocol` keeps (the last per method).

Never raises: Pants would stop at startup for every goal. If the plugin cannot work on this
Pants, one warning says why, and only its options are registered (so `[digestfs]` in pants.toml
stays valid) while Pants' own handlers and writes stay in place."""

import logging

logger = logging.getLogger(__name__)


def rules():
    try:
        from pants_digestfs import rules as digestfs_rules

        return digestfs_rules.rules()
    except Exception as e:
        from pants_digestfs import versions

        versions.warn_once(
            versions.unusable_message(versions.pants_version(), [f"what the plugin imports ({e!r})"])
        )
        try:
            from pants_digestfs.subsystem import DigestfsSubsystem

            return tuple(DigestfsSubsystem.rules())
        except Exception:
            return ()
