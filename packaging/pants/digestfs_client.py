"""A client for the digestfs control socket, using only the Python standard library.

Pants' BSP rules (or any build daemon) mount once with `digestfs mount --daemon` and then bind
each group's jars into a view instead of writing them to disk:

    client = DigestfsClient(mountpoint=".pants.d/bsp")
    client.bind("jvm/resolves/jvm-default/lib", digest, layer="group-a")

The protocol is one JSON object per line each way, described in docs/PROTOCOL.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Optional

PROTOCOL_VERSION = 1


class DigestfsError(Exception):
    """The daemon refused a request, or could not be reached."""


def runtime_dir() -> str:
    """Where control sockets live; must match the daemon's choice (src/control/mod.rs)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "digestfs")
    uid = os.geteuid()
    return "/run/digestfs" if uid == 0 else f"/tmp/digestfs-{uid}"


def _absolute(path: str) -> str:
    # Resolve the parent only: the mountpoint itself may be a dead mount that fails every stat.
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def default_socket(mountpoint: str) -> str:
    """The control socket of the mount at `mountpoint`, when mounted without --control."""
    digest = hashlib.sha256(os.fsencode(_absolute(mountpoint))).hexdigest()
    return os.path.join(runtime_dir(), digest[:16] + ".sock")


class DigestfsClient:
    def __init__(self, mountpoint: Optional[str] = None, socket_path: Optional[str] = None, timeout: float = 600.0):
        if socket_path is None:
            if mountpoint is None:
                raise ValueError("give a mountpoint or a socket_path")
            socket_path = default_socket(mountpoint)
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, op: str, **fields: Any) -> dict:
        """Sends one request and returns the daemon's answer; raises DigestfsError if refused."""
        request = {"v": PROTOCOL_VERSION, "op": op}
        request.update({k: v for k, v in fields.items() if v is not None})
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
                sock.sendall(json.dumps(request).encode() + b"\n")
                with sock.makefile("rb") as answers:
                    line = answers.readline()
        except OSError as e:
            raise DigestfsError(f"cannot reach the daemon at {self.socket_path}: {e}") from e
        if not line:
            raise DigestfsError("the daemon closed the connection without answering")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise DigestfsError(answer.get("error", "the daemon refused the request"))
        return answer

    def bind(self, path: str, digest: str, layer: str = "default", verify: bool = True) -> bool:
        """Sets one layer of the view at `path`; returns whether the view changed."""
        return bool(self.call("bind", path=path, digest=digest, layer=layer, verify=verify)["changed"])

    def unbind(self, path: str, layer: Optional[str] = None) -> bool:
        """Removes one layer, or the whole view when `layer` is None."""
        return bool(self.call("unbind", path=path, layer=layer)["changed"])

    def views(self) -> list:
        """Every view: {"path", "layers": {layer: digest}, "entries"}."""
        return self.call("views")["views"]

    def status(self) -> dict:
        return self.call("status")["status"]

    def which(self, path: str) -> dict:
        """What is at `path` (relative to the mount root): kind and digest."""
        return self.call("which", path=path)["which"]
