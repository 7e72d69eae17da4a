# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""What the plugin's modules share: where the mount is, and the states of a session."""

from __future__ import annotations

import os
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


# The layers a session binds are held in its name, so that another BSP server of the repo never
# unbinds them while it lives (the daemon keeps a layer until every holder lets go).
OWNER_PREFIX = "pants-bsp"
# Sessions of this process that have ended (`BSPDigestfs.end`): their layers are earlier ones.
ENDED_SESSIONS: set[str] = set()


def owner_name(session: str) -> str:
    return f"{OWNER_PREFIX}/{os.getpid()}/{session}"


def owner_lives(owner: str) -> bool:
    """Whether the holder of a layer may still serve it: a BSP session whose process runs (and,
    in this process, that has not ended). Holders of another kind (an operator's `--owner`) are
    taken to live: their layers are never dropped."""
    prefix, _, rest = owner.partition("/")
    pid, _, session = rest.partition("/")
    if prefix != OWNER_PREFIX or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return session not in ENDED_SESSIONS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True
