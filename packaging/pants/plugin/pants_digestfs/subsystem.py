# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""The `[digestfs]` options."""

from __future__ import annotations

from pants.option.option_types import BoolOption, FloatOption, StrListOption, StrOption
from pants.option.subsystem import Subsystem


class DigestfsSubsystem(Subsystem):
    options_scope = "digestfs"
    help = (
        "Serve the jars of JVM resolves to the IDE from a read-only digestfs view of the local "
        "store, mounted at `.pants.d/bsp/jvm/resolves`, instead of writing them there: "
        "concurrent BSP requests that write the same jars race and fail "
        "(https://github.com/pantsbuild/pants/issues/21532); binding them writes nothing. "
        "Compile output, resources, scripts and logs are still written beside the mount. If "
        "digestfs cannot mount here (no binary, `digestfs doctor` fails), Pants logs one warning "
        "and writes the jars as without this plugin."
    )

    enabled = BoolOption(
        default=False,
        help="Serve `.pants.d/bsp/jvm/resolves` from digestfs. Off: Pants' own answers and writes.",
    )
    binary = StrOption(
        default="digestfs",
        help="The `digestfs` binary: a path, or a name to find on the `PATH`.",
    )
    timeout = FloatOption(
        default=5.0,
        advanced=True,
        help=(
            "Seconds to wait for the daemon: for one bind, and for the mount to start or fall "
            "back. A daemon that does not answer in time makes the BSP server write the jars to "
            "disk, with one warning, rather than stall."
        ),
    )
    mount_args = StrListOption(
        default=[],
        advanced=True,
        help="More arguments for `digestfs mount`, e.g. `--frontend=nfs` (macOS).",
    )
