"""A client for the digestfs control socket, using only the Python standard library.

Pants' BSP server (or any build daemon) makes sure the mount is up once, then binds each
(request kind, BSP target) layer of each resolve's `lib` and `plugins` view instead of writing
jars to disk:

    pid = ensure_mounted(".pants.d/bsp/jvm/resolves", store="~/.cache/pants/lmdb_store")
    client = DigestfsClient(mountpoint=".pants.d/bsp/jvm/resolves")
    client.bind("jvm-default/lib", digest, layer="modules.pants:app")

The mount belongs at `.pants.d/bsp/jvm/resolves`, never at `.pants.d/bsp`: Pants writes compile
outputs, scripts and logs beside it. The protocol is one JSON object per line each way
(docs/PROTOCOL.md). Every refusal raises a subclass of `DigestfsError` named after the daemon's
`error_kind`; a daemon that cannot be reached raises `DigestfsUnreachable`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import struct
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

PROTOCOL_VERSION = 1


class DigestfsError(Exception):
    """The daemon refused a request, or could not be reached.

    `kind` is the daemon's `error_kind` (None from a daemon too old to send one); `digest` and
    `path` name what the refusal concerns, when the daemon says.
    """

    kind: str | None = None

    def __init__(self, message: str, *, digest: str | None = None, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.digest = digest
        self.path = path


class DigestfsMissing(DigestfsError):
    """A digest is not in the store: persist or fetch it, then retry."""

    kind = "missing"


class DigestfsConflict(DigestfsError):
    """Two layers disagree about a name, or a view would nest in another."""

    kind = "conflict"


class DigestfsBadRequest(DigestfsError):
    """A malformed digest, path or layer, an unknown op, or nothing bound where asked."""

    kind = "bad_request"


class DigestfsUnavailable(DigestfsError):
    """The remote CAS could not be reached or timed out: retry later."""

    kind = "unavailable"


class DigestfsInternal(DigestfsError):
    """The daemon failed on its side."""

    kind = "internal"


class DigestfsUnreachable(DigestfsError):
    """No daemon answered on the control socket (not running, gone, or hung up).

    `timed_out`: a daemon accepted the connection but did not answer in time (it hangs)."""

    kind = "unreachable"

    def __init__(self, message: str, *, timed_out: bool = False, **kwargs):
        super().__init__(message, **kwargs)
        self.timed_out = timed_out


class DigestfsPeerRefused(DigestfsError):
    """The control socket belongs to another user; nothing was sent to it."""

    kind = "peer_refused"


class DigestfsMountFailed(DigestfsError):
    """`digestfs mount --daemon --reuse` did not leave a usable mount."""

    kind = "mount_failed"


ERRORS_BY_KIND: Mapping[str, type] = {
    cls.kind: cls
    for cls in (
        DigestfsMissing,
        DigestfsConflict,
        DigestfsBadRequest,
        DigestfsUnavailable,
        DigestfsInternal,
    )
}


def error_from_answer(answer: Mapping[str, Any]) -> DigestfsError:
    """The exception for a refusal `{"ok": false, "error": ..., "error_kind": ...}`."""
    cls = ERRORS_BY_KIND.get(answer.get("error_kind"), DigestfsError)
    return cls(
        answer.get("error") or "the daemon refused the request",
        digest=answer.get("digest"),
        path=answer.get("path"),
    )


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


def check_peer(sock: socket.socket, socket_path: str = "") -> None:
    """Raises DigestfsPeerRefused unless the process on the other end runs as our own uid."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
    elif hasattr(socket, "LOCAL_PEERCRED"):  # macOS: SOL_LOCAL 0, struct xucred (76 bytes)
        creds = sock.getsockopt(0, socket.LOCAL_PEERCRED, 76)
        pid, uid = "?", struct.unpack_from("2I", creds)[1]
    else:  # No peer credentials: the socket's owner (its directory is the daemon's, 0700).
        pid, uid = "?", os.stat(socket_path).st_uid
    if uid != os.geteuid():
        raise DigestfsPeerRefused(
            f"refusing the control socket {socket_path}: it is served by uid {uid} (pid {pid}), "
            f"not by this user (uid {os.geteuid()}); nothing was sent",
            path=socket_path or None,
        )


class DigestfsClient:
    def __init__(
        self,
        mountpoint: str | None = None,
        socket_path: str | None = None,
        timeout: float = 600.0,
    ):
        if socket_path is None:
            if mountpoint is None:
                raise ValueError("give a mountpoint or a socket_path")
            socket_path = default_socket(mountpoint)
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, op: str, **fields: Any) -> dict:
        """Sends one request and returns the daemon's answer; raises a DigestfsError if refused."""
        request = {"v": PROTOCOL_VERSION, "op": op}
        request.update({k: v for k, v in fields.items() if v is not None})
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
                check_peer(sock, self.socket_path)
                sock.sendall(json.dumps(request).encode() + b"\n")
                with sock.makefile("rb") as answers:
                    line = answers.readline()
        except DigestfsError:
            raise
        except OSError as e:
            if isinstance(e, socket.timeout):
                raise DigestfsUnreachable(
                    f"the daemon at {self.socket_path} did not answer within {self.timeout:g}s",
                    path=self.socket_path,
                    timed_out=True,
                ) from e
            raise DigestfsUnreachable(
                f"cannot reach the daemon at {self.socket_path}: {e}", path=self.socket_path
            ) from e
        if not line:
            raise DigestfsUnreachable(
                f"the daemon at {self.socket_path} closed the connection without answering",
                path=self.socket_path,
            )
        try:
            answer = json.loads(line)
        except ValueError as e:
            raise DigestfsError(f"the daemon sent an answer that is not JSON: {line!r}") from e
        if not answer.get("ok"):
            raise error_from_answer(answer)
        return answer

    def bind(
        self,
        path: str,
        digest: str,
        layer: str = "default",
        verify: bool = True,
        owner: str | None = None,
    ) -> bool:
        """Sets one layer of the view at `path`, held by `owner` if given (beside whoever holds
        the same tree there already); returns whether the view changed."""
        fields = {"owner": owner} if owner is not None else {}
        answer = self.call("bind", path=path, digest=digest, layer=layer, verify=verify, **fields)
        return bool(answer["changed"])

    def unbind(self, path: str, layer: str | None = None, owner: str | None = None) -> bool:
        """Removes one layer, or the whole view when `layer` is None; as `owner`, lets go of
        what it holds only (the layer goes once no one holds it)."""
        fields = {"owner": owner} if owner is not None else {}
        return bool(self.call("unbind", path=path, layer=layer, **fields)["changed"])

    def views(self) -> list:
        """Every view: {"path", "layers": {layer: digest}, "owners": {layer: [owner]},
        "entries"}."""
        return self.call("views")["views"]

    def status(self) -> dict:
        return self.call("status")["status"]

    def which(self, path: str) -> dict:
        """What is at `path` (relative to the mount root): kind and digest."""
        return self.call("which", path=path)["which"]


def mount_command(
    mountpoint: str,
    store: str,
    binary: str = "digestfs",
    remote_store_address: str | None = None,
    remote_instance_name: str | None = None,
    remote_ca_certs: str | None = None,
    store_args: Sequence[str] = (),
    mount_args: Sequence[str] = (),
) -> list:
    """The `digestfs mount --daemon --reuse` command line that `ensure_mounted` runs. Remote
    headers (which may carry tokens) go in its environment instead: see `mount_env`.

    `store_args` are global options about the store (`--local-store-shard-count N`), `mount_args`
    more options of `mount` (`--frontend nfs`)."""
    cmd = [binary, "--store", store, *store_args, "mount", "--daemon", "--reuse", *mount_args]
    if remote_store_address:
        cmd += ["--remote-store-address", remote_store_address]
        if remote_instance_name:
            cmd += ["--remote-instance-name", remote_instance_name]
        if remote_ca_certs:
            cmd += ["--remote-ca-certs", remote_ca_certs]
    cmd.append(mountpoint)
    return cmd


def mount_env(remote_headers: Mapping[str, str] | None) -> dict:
    """The environment for the mount command: remote headers in `DIGESTFS_REMOTE_HEADERS` (one
    KEY=VALUE per line), where other users cannot read them, unlike a command line in `ps`."""
    env = dict(os.environ)
    env.pop("DIGESTFS_REMOTE_HEADERS", None)
    if remote_headers:
        env["DIGESTFS_REMOTE_HEADERS"] = "\n".join(f"{k}={v}" for k, v in remote_headers.items())
    return env


def ensure_mounted(
    mountpoint: str,
    store: str,
    binary: str = "digestfs",
    remote_store_address: str | None = None,
    remote_instance_name: str | None = None,
    remote_ca_certs: str | None = None,
    remote_headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    store_args: Sequence[str] = (),
    mount_args: Sequence[str] = (),
) -> int:
    """Starts a digestfs daemon serving `store` at `mountpoint`, or reuses the one already there.

    Returns the daemon's pid once the mount answers. For Pants' BSP server:

        ensure_mounted("<buildroot>/.pants.d/bsp/jvm/resolves", store="~/.cache/pants/lmdb_store")

    Runs `binary --store STORE mount --daemon --reuse [--remote-…] MOUNTPOINT`, creating the
    mountpoint directory first. That command returns only once the mount answers; it reuses a live
    mount of the same store, recovers a stale one (dead daemon) and refuses a mount of another
    store. Raises DigestfsMountFailed, with the command's stderr, if no usable mount results.
    """
    mountpoint = _absolute(mountpoint)
    store = os.path.abspath(os.path.expanduser(store))
    cmd = mount_command(
        mountpoint,
        store,
        binary,
        remote_store_address,
        remote_instance_name,
        remote_ca_certs,
        store_args=store_args,
        mount_args=mount_args,
    )
    shown = shlex.join(cmd)
    try:
        os.makedirs(mountpoint, exist_ok=True)
    except FileExistsError:
        pass  # A stale mount fails every stat; the mount command recovers it.
    except OSError as e:
        if not os.path.lexists(mountpoint):
            raise DigestfsMountFailed(
                f"cannot create the mountpoint {mountpoint}: {e}", path=mountpoint
            ) from e
    try:
        done = subprocess.run(
            cmd,
            env=mount_env(remote_headers),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout,
            text=True,
        )
    except subprocess.TimeoutExpired as e:
        raise DigestfsMountFailed(
            f"`{shown}` did not finish within {timeout:g}s", path=mountpoint
        ) from e
    except OSError as e:
        raise DigestfsMountFailed(f"cannot run `{shown}`: {e}", path=mountpoint) from e
    stderr = done.stderr.strip()
    if done.returncode != 0:
        raise DigestfsMountFailed(
            f"`{shown}` failed (exit {done.returncode}): {stderr or '(no message)'}",
            path=mountpoint,
        )
    lines = done.stdout.split()
    if not lines or not lines[-1].isdigit():
        raise DigestfsMountFailed(
            f"`{shown}` succeeded but printed no pid (stdout {done.stdout!r}, stderr {stderr!r}); "
            "is this digestfs too old for --reuse?",
            path=mountpoint,
        )
    return int(lines[-1])

