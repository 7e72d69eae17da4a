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
        default=1.0,
        advanced=True,
        help=(
            "Seconds a BSP request waits for the daemon to answer a bind. A daemon that does "
            "not answer in time (hung, or stopped) makes the BSP server detach the mount and "
            "write the jars to disk, with one warning, rather than stall: a request then waits "
            "this long once, plus the unmount."
        ),
    )
    start_timeout = FloatOption(
        default=10.0,
        advanced=True,
        help=(
            "Seconds the first request that writes jars waits for the mount to come up (doctor "
            "and `digestfs mount`, once per BSP server), and a request waits for a killed "
            "daemon to be replaced. Past it, the jars are written to disk."
        ),
    )
    return_after = FloatOption(
        default=30.0,
        advanced=True,
        help=(
            "Seconds after falling back to disk before the BSP server tries the mount again (at "
            "the next request that writes jars, while no other is under way). A daemon that "
            "still does not answer costs that request one `timeout`."
        ),
    )
    mount_args = StrListOption(
        default=[],
        advanced=True,
        help="More arguments for `digestfs mount`, e.g. `--frontend=nfs` (macOS).",
    )
