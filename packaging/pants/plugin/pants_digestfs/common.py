# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""What the plugin's modules share: where the mount is, and the states of a session."""

from __future__ import annotations

from enum import Enum

# Relative to the build root.
BSP_DIR = ".pants.d/bsp"
# Relative to `BSP_DIR`: the only part of it that holds nothing but resolve jars.
RESOLVES_DIR = "jvm/resolves"
MOUNT_DIR = f"{BSP_DIR}/{RESOLVES_DIR}"

# The empty directory: a layer with nothing in a view is no layer there.
EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855-0"


def digest_string(fingerprint: str, serialized_bytes_length: int) -> str:
    """A `Digest` as digestfs writes it: `<fingerprint>-<size>`."""
    return f"{fingerprint}-{serialized_bytes_length}"


class State(Enum):
    IDLE = "idle"  # not started
    STARTING = "starting"  # doctor and mount running on a helper thread
    ACTIVE = "active"  # serving the resolves
    FALLING_BACK = "falling back"  # detaching and writing the union of the bound layers
    OFF = "off"  # never mounted, or fallen back: callers write as Pants does
