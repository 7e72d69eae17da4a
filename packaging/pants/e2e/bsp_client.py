#!/usr/bin/env python3
"""A BSP client that drives a real Pants BSP server the way IntelliJ does, and checks the jars.

It starts the server as IntelliJ does (the argv of `.bsp/pants.json`, which `pants
experimental-bsp` writes, in the build root), then `build/initialize`, `build/initialized`,
`workspace/buildTargets`, and N rounds of an IDE refresh. Each round:

1. with `--delete-lib`: removes `.pants.d/bsp/jvm/resolves/*/lib`, as the report of
   pantsbuild/pants#21532 does between refreshes, so that every refresh writes again. With the
   plugin, whose mount is read-only, the same is done by unbinding each `<resolve>/lib` view
   (every layer, whoever holds it), so that every refresh binds again from nothing;
2. sends at once, as IntelliJ does: `buildTarget/dependencyModules` for all targets,
   `buildTarget/scalacOptions` for all targets, and `buildTarget/scalacOptions` for each target;
3. as each answer arrives, an IDE-like reader opens every jar it names (modules' artifacts, and
   scalacOptions' classpath entries), hashes it against the lockfile's `file_digest` and runs
   `unzip -t -q` on it, while the other requests still run;
4. one `buildTarget/compile` for all targets (Pants writes `.pants.d/bsp/jvm/classes`);
5. records each `lib/` (names, st_dev, modes), the jars the answers named per resolve, and what
   changed under `jvm/resolves` during the round (inode/mtime/size/mode snapshots).

Then `build/shutdown` and `build/exit`. Every wait has a deadline, and the server's session
(the server and everything it started, e.g. nailgun JVMs) is killed on every path.

Failed requests are reported, not asserted: the exit status is 0 when the session ran to its
end, 1 when it could not (server died, a deadline passed) or, with `--strict`, when any request
failed or any jar was bad.

Stdlib only: the distribution's python3 runs it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

RESOLVES_DIR = ".pants.d/bsp/jvm/resolves"
CLASSES_DIR = ".pants.d/bsp/jvm/classes"
DEFAULT_LOCKFILE = "3rdparty/jvm/default.lock"


def log(msg: str) -> None:
    print(f"bsp-client: {msg}", file=sys.stderr, flush=True)


# --- the lockfile -----------------------------------------------------------------------------


def parse_lockfile(path: Path) -> dict[str, dict]:
    """Maps each entry's `file_name` to {coord, sha256, size}.

    The lockfile is TOML after a commented JSON header. Only `[[entries]]`' `file_name`,
    `[entries.coord]` and `[entries.file_digest]` are needed, so a line reader is enough (and
    runs where `tomllib`, Python 3.11+, is missing).
    """
    out: dict[str, dict] = {}
    entry: dict | None = None
    table = ""

    def finish():
        if entry and "file_name" in entry:
            out[entry["file_name"]] = entry

    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = line.strip("[]").strip()
            if line.startswith("[[") and name == "entries":
                finish()
                entry, table = {"coord": {}}, "entries"
            else:
                table = name
            continue
        if entry is None or "=" not in line:
            continue
        key, _, value = (s.strip() for s in line.partition("="))
        try:
            value = json.loads(value)  # TOML strings and integers here are JSON too
        except ValueError:
            continue
        if table == "entries" and key == "file_name":
            entry["file_name"] = value
        elif table == "entries.coord" and key in ("group", "artifact", "version"):
            entry["coord"][key] = value
        elif table == "entries.file_digest" and key == "fingerprint":
            entry["sha256"] = value
        elif table == "entries.file_digest" and key == "serialized_bytes_length":
            entry["size"] = value
    finish()
    return out


# --- the server connection --------------------------------------------------------------------


class RpcError(Exception):
    pass


class Pending:
    def __init__(self, msg_id: int, method: str, params: dict, on_done=None):
        self.id, self.method, self.params = msg_id, method, params
        self.sent = time.monotonic()
        self.done = threading.Event()
        self.response: dict | None = None
        self.elapsed: float | None = None
        self._on_done = on_done

    def finish(self, response: dict) -> None:
        self.response = response
        self.elapsed = time.monotonic() - self.sent
        self.done.set()
        if self._on_done:
            self._on_done(self)


class BspServer:
    """JSON-RPC 2.0 over the server's stdin/stdout with `Content-Length` framing."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, stderr_path: Path):
        self._stderr = open(stderr_path, "ab")
        # A session of its own, so that everything the server starts can be found and killed.
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        self._next_id = 0
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self.notifications: dict[str, int] = {}
        self.log_messages: list[str] = []
        self.error_logs: list[tuple[float, str]] = []
        self.eof = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="bsp-reader", daemon=True)
        self._reader.start()

    def _write(self, msg: dict) -> None:
        body = json.dumps(msg).encode()
        with self._lock:
            self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self.proc.stdin.flush()

    def send(self, method: str, params, on_done=None) -> Pending:
        with self._lock:
            self._next_id += 1
            p = Pending(self._next_id, method, params, on_done)
            self._pending[p.id] = p
        try:
            self._write({"jsonrpc": "2.0", "id": p.id, "method": method, "params": params})
        except (BrokenPipeError, ValueError, OSError) as e:
            self._fail(p, f"cannot write to the server: {e}")
        return p

    def notify(self, method: str, params=None) -> None:
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        try:
            self._write(msg)
        except (BrokenPipeError, ValueError, OSError):
            pass

    def _fail(self, p: Pending, message: str) -> None:
        with self._lock:
            self._pending.pop(p.id, None)
        if not p.done.is_set():
            p.finish({"id": p.id, "error": {"code": -1, "message": message}})

    def _read_message(self):
        out = self.proc.stdout
        length = None
        while True:
            line = out.readline()
            if not line:
                return None
            line = line.strip()
            if not line:
                if length is None:
                    continue
                break
            k, _, v = line.decode("ascii", "replace").partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        body = out.read(length)
        if len(body) < length:
            return None
        return json.loads(body)

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._read_message()
                if msg is None:
                    break
                if "id" in msg and "method" not in msg:
                    with self._lock:
                        p = self._pending.pop(msg["id"], None)
                    if p:
                        p.finish(msg)
                elif "method" in msg:
                    m = msg["method"]
                    self.notifications[m] = self.notifications.get(m, 0) + 1
                    if m == "build/logMessage":
                        params = msg.get("params") or {}
                        text = str(params.get("message", ""))
                        self.log_messages.append(text[:300])
                        del self.log_messages[:-50]
                        if params.get("type") == 1:  # MessageType.ERROR, e.g. a scalac error
                            self.error_logs.append((time.monotonic(), text[:2000]))
                    if "id" in msg:  # a request from the server: we serve none
                        self._write_safe(
                            {
                                "jsonrpc": "2.0",
                                "id": msg["id"],
                                "error": {"code": -32601, "message": "method not found"},
                            }
                        )
        except Exception as e:  # a broken frame ends the session like EOF does
            log(f"reader stopped: {e!r}")
        finally:
            self.eof.set()
            with self._lock:
                pending = list(self._pending.values())
            for p in pending:
                self._fail(p, f"the server closed its output (exit status {self.proc.poll()})")

    def _write_safe(self, msg: dict) -> None:
        try:
            self._write(msg)
        except (BrokenPipeError, ValueError, OSError):
            pass

    def wait(self, p: Pending, timeout: float) -> dict:
        if not p.done.wait(max(0.0, timeout)):
            raise TimeoutError(f"{p.method} (id {p.id}) got no answer in {timeout:.0f} s")
        return p.response

    def call(self, method: str, params, timeout: float):
        resp = self.wait(self.send(method, params), timeout)
        if "error" in resp:
            raise RpcError(f"{method}: {error_text(resp['error'])}")
        return resp.get("result")

    def kill(self) -> None:
        """Ends the server's whole session: the server, then what outlived it."""
        sid = self.proc.pid
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = session_pids(sid)
            if self.proc.poll() is None:
                pids.add(self.proc.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end and (self.proc.poll() is None or session_pids(sid)):
                time.sleep(0.2)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self._stderr.close()


def session_pids(sid: int) -> set[int]:
    """Live processes of session `sid` (the server's, made by start_new_session)."""
    pids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state ppid pgrp session ...; zombies need no signal.
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.add(int(d))
    return pids


def error_text(err: dict) -> str:
    """A JSON-RPC error as one line: the innermost exception Pants reports, then the rest.

    Pants sends its whole engine traceback as the message; what matters is its last line that
    names an exception, e.g. `native_engine.IntrinsicError: Error copying bytes from … to
    …/lib/x.jar: Permission denied (os error 13)`.
    """
    msg = str(err.get("message", err))
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    heads = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Failure)\b[^ ]*: ", line)]
    head = heads[-1] if heads else (lines[0] if lines else msg)
    return (head + (" | " + " / ".join(lines[:3]) if head != (lines[0] if lines else "") else ""))[:2000]


# --- the IDE-like reader ----------------------------------------------------------------------


def uri_path(uri: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlparse(uri).path)


def jar_uris(method: str, result) -> list[tuple[str, str]]:
    """(target uri, jar uri) for every jar an answer names."""
    out = []
    for item in (result or {}).get("items", []):
        target = item.get("target", {}).get("uri", "")
        if method == "buildTarget/dependencyModules":
            for m in item.get("modules", []):
                for a in (m.get("data") or {}).get("artifacts", []):
                    if a.get("uri", "").endswith(".jar"):
                        out.append((target, a["uri"]))
        elif method in ("buildTarget/scalacOptions", "buildTarget/javacOptions"):
            for u in item.get("classpath", []):
                if u.endswith(".jar"):
                    out.append((target, u))
    return out


class JarReader:
    """Reads jars the way an IDE indexing them would, and remembers what it saw."""

    def __init__(self, lockfile: dict[str, dict], workers: int = 2):
        self.lockfile = lockfile
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jar-reader")
        # (path, st_ino, size, mtime_ns, sha256) -> None if `unzip -t` passed, else why. A file
        # that is rewritten gets a new mtime (or inode), so only unchanged bytes reuse a verdict.
        self._unzip: dict[tuple, str | None] = {}
        self._lock = threading.Lock()

    def submit(self, uri: str):
        return self.pool.submit(self.read, uri)

    def read(self, uri: str) -> dict:
        path = uri_path(uri)
        rec: dict = {"uri": uri, "name": os.path.basename(path), "bytes": 0}
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                    rec["bytes"] += len(chunk)
        except OSError as e:
            rec["error"] = f"{type(e).__name__}: {e.strerror or e}"
            return rec
        rec.update(
            sha256=h.hexdigest(),
            size=st.st_size,
            st_dev=st.st_dev,
            st_ino=st.st_ino,
            mode=oct(stat.S_IMODE(st.st_mode)),
        )
        if stat_key(path) != stat_key_of(st):
            rec["changed_while_reading"] = True
        exp = self.lockfile.get(rec["name"])
        if exp and "sha256" in exp:
            rec["expected_size"] = exp.get("size")
            rec["hash_ok"] = exp["sha256"] == rec["sha256"] and exp.get("size", rec["bytes"]) == rec["bytes"]
        key = (path, *stat_key_of(st), rec["sha256"])
        with self._lock:
            known = key in self._unzip
            verdict = self._unzip.get(key)
        if not known:
            verdict = unzip_test(path)
            if stat_key(path) == stat_key_of(st):  # still the bytes that were hashed
                with self._lock:
                    self._unzip[key] = verdict
        if verdict is not None:
            rec["unzip_error"] = verdict
        return rec

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def stat_key_of(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def stat_key(path: str) -> tuple | None:
    try:
        return stat_key_of(os.stat(path))
    except OSError:
        return None


def unzip_test(path: str) -> str | None:
    try:
        r = subprocess.run(
            ["unzip", "-t", "-q", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "unzip -t timed out"
    except OSError as e:
        return f"cannot run unzip: {e}"
    if r.returncode == 0:
        return None
    return f"exit {r.returncode}: " + r.stdout.decode("utf-8", "replace").strip()[-300:]


# --- snapshots of the jvm/resolves tree -----------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (kind, st_dev, st_ino, mtime_ns, size, mode) of everything under root."""
    out: dict[str, tuple] = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        # The mount's own namespace (`.digestfs/…`: any digest by name) is not Pants' output.
        dirnames[:] = [d for d in dirnames if not (dirpath == str(root) and d == ".digestfs")]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
            out[os.path.relpath(p, root)] = (
                kind,
                st.st_dev,
                st.st_ino,
                st.st_mtime_ns,
                st.st_size,
                stat.S_IMODE(st.st_mode),
            )
    return out


def file_keys(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """relative path -> (st_dev, st_ino, size, mtime_ns, ctime_ns) of every regular file under
    root on root's own file system (a mount serves files, nobody writes them), but under `skip`
    (Pants' logs, which grow as it logs)."""
    out: dict[str, tuple] = {}
    try:
        dev = os.stat(root).st_dev
    except OSError:
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if d != skip.name]
        dirnames[:] = [d for d in dirnames if _same_dev(os.path.join(dirpath, d), dev)]
        for n in filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(p, root)] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def _same_dev(path: str, dev: int) -> bool:
    try:
        return os.lstat(path).st_dev == dev
    except OSError:  # Gone, or a dead mount (ENOTCONN): nothing written there to count.
        return False


def bytes_written(before: dict, after: dict, under: str = "") -> int:
    """Bytes of the files new or written since `before` (a file written twice counts once, so
    this is a lower bound), of those whose path starts with `under`."""
    return sum(k[2] for p, k in after.items() if p.startswith(under) and before.get(p) != k)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by the nearest rank."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def diff_snapshots(before: dict, after: dict) -> dict:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    return {"added": added, "removed": removed, "changed": changed}


def unbind_libs(resolves_root: Path) -> tuple[list[str], str | None]:
    """The mount's `rm -r */lib`: unbinds each `<resolve>/lib` view through the daemon's control
    socket (the plugin's stdlib client). The views unbound (as paths relative to the repo), and
    what failed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugin" / "pants_digestfs"))
    try:
        from digestfs_client import DigestfsClient, DigestfsError
    finally:
        del sys.path[0]
    gone: list[str] = []
    if mount_of(resolves_root) is None:
        return gone, None  # Not mounted yet (the first refresh): no lib/ to remove.
    try:
        client = DigestfsClient(mountpoint=str(resolves_root), timeout=10)
        for view in client.views():
            path = view["path"].strip("/")
            if path.count("/") == 1 and path.endswith("/lib"):
                client.unbind(path)
                gone.append(f"{RESOLVES_DIR}/{path}")
    except DigestfsError as e:
        return gone, str(e)
    return gone, None


def lib_dirs(repo: Path) -> list[Path]:
    root = repo / RESOLVES_DIR
    if not root.is_dir():
        return []
    return sorted(p / "lib" for p in root.iterdir() if (p / "lib").is_dir())


def lib_state(lib: Path, lockfile: dict[str, dict]) -> dict:
    """The files of one lib/: (name, st_dev, mode), and those whose bytes are not the lockfile's."""
    files, bad = [], []
    for n in sorted(os.listdir(lib)):
        p = lib / n
        try:
            st = os.lstat(p)
        except OSError as e:  # Listed, yet not there: as wrong as a torn jar.
            bad.append(f"{n} (lstat: {e.strerror})")
            continue
        files.append([n, st.st_dev, oct(stat.S_IMODE(st.st_mode)), st.st_ino])
        exp = lockfile.get(n)
        if exp and "sha256" in exp and stat.S_ISREG(st.st_mode):
            try:
                if file_sha256(p) != exp["sha256"]:
                    bad.append(n)
            except OSError as e:
                bad.append(f"{n} ({e.strerror})")
    return {"files": files, "not_lockfile_bytes": bad}


def file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mount_of(path: Path) -> dict | None:
    """The /proc/self/mountinfo entry whose mount point is exactly `path`, if any."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve()) if path.exists() else str(path)
    for line in lines:
        f = line.split()
        sep = f.index("-")
        mnt = f[4].encode().decode("unicode_escape")
        if mnt == target:
            return {"mount_point": mnt, "fstype": f[sep + 1], "source": f[sep + 2], "options": f[5]}
    return None


# --- the session ------------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        return max(0.0, min(cap, self.end - time.monotonic()))


def abbreviate(method: str, result) -> dict:
    """One answer, cut short, for the report: the shape matters, not the 20 jars."""
    r = json.loads(json.dumps(result))
    items = r.get("items", [])[:1]
    for it in items:
        if "modules" in it:
            n = len(it["modules"])
            it["modules"] = it["modules"][:2] + ([f"... {n - 2} more"] if n > 2 else [])
        if "classpath" in it:
            n = len(it["classpath"])
            it["classpath"] = it["classpath"][:2] + ([f"... {n - 2} more"] if n > 2 else [])
    more = len(r.get("items", [])) - len(items)
    return {"items": items + ([f"... {more} more items"] if more > 0 else [])}


def run_session(a) -> dict:
    repo: Path = a.repo.resolve()
    lockfile = {}
    for path in a.lockfile or [DEFAULT_LOCKFILE]:  # One per resolve; the same jar, the same bytes.
        lockfile.update(parse_lockfile(repo / path))
    report: dict = {
        "repo": str(repo), "mode": a.mode, "delete_lib": a.delete_lib, "rounds": [], "phases": {},
        "samples": {},
    }
    env = dict(os.environ)
    env["PATH"] = f"{Path(a.pants).parent}{os.pathsep}{env.get('PATH', '')}"
    deadline = Deadline(a.session_timeout)

    t0 = time.monotonic()
    conn_file = repo / ".bsp/pants.json"
    if not conn_file.exists():
        # What a user runs once: it writes .bsp/pants.json and .pants.d/bsp/scripts/run-bsp.sh.
        r = subprocess.run(
            [a.pants, "experimental-bsp"],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=deadline.left(a.request_timeout),
        )
        if r.returncode != 0:
            raise RuntimeError(f"pants experimental-bsp failed:\n{r.stdout.decode()[-3000:]}")
    report["phases"]["experimental_bsp_s"] = round(time.monotonic() - t0, 1)
    argv = json.loads(conn_file.read_text())["argv"]
    (repo / ".pants.d/bsp/logs").mkdir(parents=True, exist_ok=True)
    stderr_path = repo / ".pants.d/bsp/logs/client-stderr.log"
    report["server_log"] = str(repo / ".pants.d/bsp/logs/stderr.log")

    t0 = time.monotonic()
    server = BspServer(argv, repo, env, stderr_path)
    reader = JarReader(lockfile, workers=a.readers)
    try:
        init = server.call(
            "build/initialize",
            {
                "displayName": "IntelliJ-BSP (digestfs e2e)",
                "version": "2024.2",
                "bspVersion": "2.1.0",
                "rootUri": repo.as_uri(),
                "capabilities": {"languageIds": ["java"] if a.java else ["scala", "java"]},
                "data": {},
            },
            deadline.left(a.request_timeout),
        )
        server.notify("build/initialized")
        report["server"] = {k: init.get(k) for k in ("displayName", "version", "bspVersion")}
        report["phases"]["initialize_s"] = round(time.monotonic() - t0, 1)

        t0 = time.monotonic()
        bt = server.call("workspace/buildTargets", {}, deadline.left(a.request_timeout))
        targets = [t["id"] for t in bt["targets"]]
        report["targets"] = [t["uri"] for t in targets]
        report["phases"]["build_targets_s"] = round(time.monotonic() - t0, 1)
        report["samples"]["workspace/buildTargets"] = {"targets": bt["targets"][:1]}
        log(f"{len(targets)} targets: {', '.join(report['targets'])}")
        if not targets:
            raise RuntimeError("workspace/buildTargets returned no targets")

        resolves_root = repo / RESOLVES_DIR
        session_before = snapshot(resolves_root)
        if a.together:  # Two sessions at once: both start their rounds at the same time.
            meet(Path(a.together[0]), int(a.together[1]), deadline)
        report["started_at"] = time.time()  # Wall clock, so that two sessions can be compared.
        for n in range(1, a.rounds + 1):
            rnd = run_round(n, a, repo, server, reader, targets, lockfile, deadline, report)
            report["rounds"].append(rnd)
            log(round_line(rnd))
            for after, command in a.after_round or ():
                if int(after) != n:
                    continue
                # A fault the test injects between two refreshes (`kill -9` of the daemon, say).
                done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
                report.setdefault("after_rounds", []).append(
                    {"round": n, "command": command, "status": done.returncode,
                     "output": (done.stdout + done.stderr)[-2000:]}
                )
                log(f"after round {n}: `{command}` exited {done.returncode}")
        report["ended_at"] = time.time()
        report["resolves_changed_in_session"] = diff_snapshots(session_before, snapshot(resolves_root))

        t0 = time.monotonic()
        try:
            server.call("build/shutdown", None, deadline.left(60))
        except (RpcError, TimeoutError) as e:
            report["shutdown_error"] = str(e)
        server.notify("build/exit")
        try:
            server.proc.wait(timeout=deadline.left(30))
            report["server_exit_status"] = server.proc.returncode
        except subprocess.TimeoutExpired:
            report["server_exit_status"] = "did not exit after build/exit"
        report["phases"]["shutdown_s"] = round(time.monotonic() - t0, 1)
    finally:
        server.kill()
        reader.close()
        report["notifications"] = server.notifications
        report["last_log_messages"] = server.log_messages[-10:]
    return report


def meet(prefix: Path, count: int, deadline) -> None:
    """Waits until `count` sessions (this one included) have reached here: each leaves a file
    `<prefix>.<pid>`."""
    Path(f"{prefix}.{os.getpid()}").touch()
    while len(list(prefix.parent.glob(f"{prefix.name}.*"))) < count:
        if deadline.left(1) <= 0:
            raise TimeoutError(f"the other sessions never reached {prefix}")
        time.sleep(0.05)


def run_round(n, a, repo, server, reader, targets, lockfile, deadline, report) -> dict:
    t_round = time.monotonic()
    resolves_root = repo / RESOLVES_DIR
    rnd: dict = {"round": n, "deleted_libs": [], "failures": []}
    if a.delete_lib and a.mode == "with":
        rnd["deleted_libs"], failure = unbind_libs(resolves_root)
        if failure:
            rnd["failures"].append({"method": "digestfs unbind lib", "message": failure})
    elif a.delete_lib:
        for lib in lib_dirs(repo):
            try:
                shutil.rmtree(lib)
                rnd["deleted_libs"].append(str(lib.relative_to(repo)))
            except OSError as e:
                rnd["failures"].append({"method": "rm -r lib", "message": str(e)})
    before = snapshot(resolves_root)
    pants_d = repo / ".pants.d"
    logs = pants_d / "bsp" / "logs"
    files_before = file_keys(pants_d, skip=logs)

    # The refresh: everything at once, as IntelliJ sends it.
    done: "queue.Queue[Pending]" = queue.Queue()
    options = "buildTarget/javacOptions" if a.java else "buildTarget/scalacOptions"
    batch = [("buildTarget/dependencyModules", targets), (options, targets)]
    batch += [(options, [t]) for t in targets]
    pendings = [server.send(m, {"targets": ts}, on_done=done.put) for m, ts in batch]
    reads = []  # (target, uri, future)
    answered = 0
    while answered < len(pendings):
        try:
            p = done.get(timeout=deadline.left(a.request_timeout))
        except queue.Empty:
            raise TimeoutError(f"round {n}: {len(pendings) - answered} requests got no answer")
        answered += 1
        if "error" in p.response:
            rnd["failures"].append(
                {
                    "method": p.method,
                    "targets": [t["uri"] for t in p.params["targets"]],
                    "message": error_text(p.response["error"]),
                    "detail": str(p.response["error"].get("message", ""))[-6000:],
                }
            )
            continue
        result = p.response.get("result")
        report["samples"].setdefault(p.method, abbreviate(p.method, result))
        for target, uri in jar_uris(p.method, result):
            reads.append((p.method, target, uri, reader.submit(uri)))
    rnd["requests"] = len(pendings)
    rnd["latencies_s"] = {f"{p.id}:{p.method}": round(p.elapsed or -1, 3) for p in pendings}

    # One compile per round, so that Pants writes class files beside the resolves.
    origin = f"e2e-compile-{n}"
    t0 = time.monotonic()
    pc = server.send("buildTarget/compile", {"targets": targets, "originId": origin})
    try:
        resp = server.wait(pc, deadline.left(a.request_timeout))
    except TimeoutError:
        raise TimeoutError(f"round {n}: buildTarget/compile got no answer")
    rnd["requests"] += 1
    rnd["compile_s"] = round(time.monotonic() - t0, 1)
    if "error" in resp:
        rnd["failures"].append({"method": "buildTarget/compile", "message": error_text(resp["error"])})
    else:
        rnd["compile_status"] = resp["result"].get("statusCode")
        if rnd["compile_status"] != 1:  # 1 = ok, 2 = error, 3 = cancelled
            errors = [text for t, text in server.error_logs if t >= t0]
            rnd["failures"].append(
                {
                    "method": "buildTarget/compile",
                    "message": f"statusCode {rnd['compile_status']}: " + " | ".join(errors)[:2000],
                }
            )
    classes = repo / CLASSES_DIR
    rnd["class_files"] = sum(1 for _ in classes.rglob("*.class")) if classes.is_dir() else 0

    # What the reader saw.
    bsp_dev = os.stat(repo / ".pants.d/bsp").st_dev
    mount_dev = None
    if resolves_root.is_dir() and os.stat(resolves_root).st_dev != bsp_dev:
        mount_dev = os.stat(resolves_root).st_dev
    recs = []
    for method, target, uri, fut in reads:
        try:
            rec = fut.result(timeout=deadline.left(300))
        except concurrent.futures.TimeoutError:
            rec = {"uri": uri, "name": os.path.basename(uri), "error": "read timed out"}
        rec["method"], rec["target"] = method, target
        recs.append(rec)
    rnd["uris_read"] = len(recs)
    rnd["read_errors"] = [f"{r['name']}: {r['error']}" for r in recs if "error" in r]
    rnd["hash_mismatches"] = sorted({r["name"] for r in recs if r.get("hash_ok") is False})
    rnd["hash_mismatch_reads"] = sum(1 for r in recs if r.get("hash_ok") is False)
    rnd["bad_reads"] = [
        {
            k: r[k]
            for k in ("name", "method", "bytes", "expected_size", "changed_while_reading", "unzip_error")
            if k in r
        }
        for r in recs
        if r.get("hash_ok") is False or "unzip_error" in r
    ][:20]
    rnd["not_in_lockfile"] = sorted({r["name"] for r in recs if "error" not in r and "hash_ok" not in r})
    rnd["unzip_failures"] = sorted({f"{r['name']}: {r['unzip_error']}" for r in recs if "unzip_error" in r})
    # Rewritten in place (truncate and write) keeps an inode; replaced (write aside and rename),
    # or deleted and written anew, gives a new one.
    inodes: dict[str, set] = {}
    for r in recs:
        if "st_ino" in r:
            inodes.setdefault(r["name"], set()).add(r["st_ino"])
    rnd["jars_seen_with_several_inodes"] = sorted(n for n, s in inodes.items() if len(s) > 1)
    rnd["uri_st_devs"] = sorted({r["st_dev"] for r in recs if "st_dev" in r})
    rnd["bsp_dir_st_dev"] = bsp_dev
    rnd["mount_st_dev"] = mount_dev
    rnd["uris_from_mount"] = sum(1 for r in recs if mount_dev is not None and r.get("st_dev") == mount_dev)
    rnd["mount"] = mount_of(resolves_root)

    # Each lib/ against the jars the answers named for its resolve.
    named: dict[str, set] = {}
    for r in recs:
        parts = Path(uri_path(r["uri"])).parts
        if "resolves" in parts and len(parts) > parts.index("resolves") + 2:
            resolve = parts[parts.index("resolves") + 1]
            named.setdefault(resolve, set()).add(r["name"])
    rnd["libs"] = {}
    for lib in lib_dirs(repo):
        resolve = lib.parent.name
        state = lib_state(lib, lockfile)
        present = {f[0] for f in state["files"]}
        want = named.get(resolve, set())
        state["named_by_answers"] = len(want)
        state["missing"] = sorted(want - present)
        state["extra"] = sorted(present - want)
        state["modes"] = sorted({f[2] for f in state["files"]})
        rnd["libs"][resolve] = state
    for resolve in sorted(set(named) - set(rnd["libs"])):
        rnd["libs"][resolve] = {"files": [], "missing": sorted(named[resolve]), "extra": [], "modes": []}

    rnd["resolves_changed"] = {k: len(v) for k, v in diff_snapshots(before, snapshot(resolves_root)).items()}
    files_after = file_keys(pants_d, skip=logs)
    rnd["bytes_written_pants_d"] = bytes_written(files_before, files_after)
    rnd["bytes_written_resolves"] = bytes_written(files_before, files_after, "bsp/jvm/resolves/")
    rnd["seconds"] = round(time.monotonic() - t_round, 1)
    return rnd


def round_line(r: dict) -> str:
    libs = "; ".join(
        f"{k}/lib: {len(v['files'])} files, modes {','.join(v['modes']) or '-'}"
        + (f", missing {len(v['missing'])}" if v["missing"] else "")
        + (f", not lockfile bytes {len(v['not_lockfile_bytes'])}" if v.get("not_lockfile_bytes") else "")
        for k, v in r["libs"].items()
    )
    return (
        f"round {r['round']} ({r['seconds']} s): {r['requests']} requests, {len(r['failures'])} failed; "
        f"{r['uris_read']} URIs read, {r['hash_mismatch_reads']} hash mismatches, "
        f"{len(r['unzip_failures'])} unzip failures, {len(r['read_errors'])} read errors, "
        f"{r['uris_from_mount']} from a mount; {libs}"
    )


def totals(report: dict) -> dict:
    rs = report["rounds"]
    return {
        "rounds": len(rs),
        "requests": sum(r["requests"] for r in rs),
        "failed": sum(len(r["failures"]) for r in rs),
        "uris_read": sum(r["uris_read"] for r in rs),
        "hash_mismatches": sum(r["hash_mismatch_reads"] for r in rs),
        "unzip_failures": sum(len(r["unzip_failures"]) for r in rs),
        "read_errors": sum(len(r["read_errors"]) for r in rs),
        "uris_from_mount": sum(r["uris_from_mount"] for r in rs),
        "lib_modes": sorted({m for r in rs for v in r["libs"].values() for m in v["modes"]}),
        "final_lib_modes": sorted({m for v in (rs[-1]["libs"].values() if rs else []) for m in v["modes"]}),
        "bytes_written_pants_d": sum(r.get("bytes_written_pants_d", 0) for r in rs),
        "bytes_written_resolves": sum(r.get("bytes_written_resolves", 0) for r in rs),
        # Times of the warm rounds: the first one downloads, compiles Pants' Scala parser, starts
        # nailgun (a minute, whatever the plugin does).
        "first_round_s": rs[0]["seconds"] if rs else None,
        "round_s_p50": percentile([r["seconds"] for r in rs[1:]], 50),
        "request_s_p50": percentile([v for r in rs[1:] for v in r["latencies_s"].values() if v >= 0], 50),
        "request_s_p95": percentile([v for r in rs[1:] for v in r["latencies_s"].values() if v >= 0], 95),
        "jars_with_new_inodes": sorted({n for r in rs for n in r["jars_seen_with_several_inodes"]}),
        "lib_jars_new_inode_between_rounds": sum(
            1
            for prev, cur in zip(rs, rs[1:])
            for resolve, lib in cur["libs"].items()
            for name, ino in ((f[0], f[3]) for f in lib["files"])
            if (old := lib_inode(prev, resolve, name)) is not None and old != ino
        ),
    }


def lib_inode(rnd: dict, resolve: str, name: str):
    for f in rnd["libs"].get(resolve, {}).get("files", []):
        if f[0] == name:
            return f[3]
    return None


def server_errors(path: Path, keep: int = 5) -> list[str]:
    """The last distinct error lines of the server's log, to say why a session got stuck."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    seen: list[str] = []
    for line in lines:
        if "[ERROR]" in line or line.startswith("Exception message:"):
            line = line.strip()[:300]
            if line[:2].isdigit() and line[2:3] == ":":  # drop the time, so repeats are one line
                line = line.partition(" ")[2]
            if line in seen:
                seen.remove(line)
            seen.append(line)
    return seen[-keep:]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description="Drive a real Pants BSP server like IntelliJ and check the jars it hands out."
    )
    ap.add_argument("--repo", type=Path, required=True, help="the build root")
    ap.add_argument("--pants", required=True, help="the pants executable (its dir goes first on PATH)")
    ap.add_argument("--mode", choices=("without", "with"), default="without", help="for the report")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--delete-lib",
        action="store_true",
        help="remove jvm/resolves/*/lib before each round (with the plugin: unbind those views)",
    )
    ap.add_argument("--lockfile", action="append", help=f"relative to the repo, repeatable (default {DEFAULT_LOCKFILE})")
    ap.add_argument("--java", action="store_true", help="a Java-only repo: javacOptions, not scalacOptions")
    ap.add_argument("--after-round", nargs=2, metavar=("N", "CMD"), action="append",
                    help="run CMD (sh -c) after round N (repeatable)")
    ap.add_argument("--together", nargs=2, metavar=("PREFIX", "N"),
                    help="start the rounds only once N sessions given this PREFIX got there")
    ap.add_argument("--readers", type=int, default=2, help="jar reader threads")
    ap.add_argument("--request-timeout", type=float, default=480.0, help="seconds, per answer")
    ap.add_argument("--session-timeout", type=float, default=900.0, help="seconds, whole session")
    ap.add_argument("--report", type=Path, help="write the full report here (JSON)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any request failed or jar was bad")
    a = ap.parse_args(argv)
    if os.sep in a.pants:
        a.pants = os.path.abspath(a.pants)  # not resolved: a symlink named `pants` must stay one

    # A TERM or INT (e.g. from `timeout`) still runs the finally blocks that kill the server.
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    t0 = time.monotonic()
    status = 0
    try:
        report = run_session(a)
    except (RuntimeError, TimeoutError, RpcError, OSError, subprocess.TimeoutExpired) as e:
        log(f"session failed: {e}")
        report = {"mode": a.mode, "rounds": [], "error": str(e)}
        report["server_errors"] = server_errors(a.repo.resolve() / ".pants.d/bsp/logs/stderr.log")
        for line in report["server_errors"]:
            log(f"server: {line}")
        status = 1
    report["totals"] = totals(report) if report.get("rounds") is not None else {}
    report["seconds"] = round(time.monotonic() - t0, 1)
    if a.report:
        a.report.write_text(json.dumps(report, indent=1) + "\n")
    t = report["totals"]
    print(
        f"bsp-client ({a.mode} plugin): rounds {t['rounds']}; {t['requests']} requests, "
        f"{t['failed']} failed; {t['uris_read']} URIs read, {t['hash_mismatches']} hash mismatches, "
        f"{t['unzip_failures']} unzip failures, {t['uris_from_mount']} from a mount; "
        f"lib modes {','.join(t['lib_modes']) or '-'}; {report['seconds']} s",
        flush=True,
    )
    if status == 0 and a.strict and (t["failed"] or t["hash_mismatches"] or t["unzip_failures"] or t["read_errors"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
