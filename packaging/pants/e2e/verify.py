#!/usr/bin/env python3
"""Checks what the digestfs plugin promises, on the reports of `bsp_client.py` (scripts/pants-e2e).

    verify.py served REPORT        a session with the plugin and a working mount
    verify.py reused REPORT BEFORE AFTER LOG
                                   the next session: the same daemon (BEFORE, AFTER: its pid and
                                   views), its views there from the start and kept, no warning
    verify.py on-disk RESOLVES     after unmounting: nothing was ever written under jvm/resolves
    verify.py no-fuse REPORT LOG   the plugin on, digestfs unusable: one warning, Pants' own writes
    verify.py disabled REPORT      the plugin off: Pants' own writes, no mount, only its own race
    verify.py leftover REPORT LOG  the plugin off, a daemon's mount left over: detached, with one
                                   warning, before Pants wrote; no read-only file system met
    verify.py daemon-killed REPORT LOG
                                   the daemon killed between rounds: the rest still served, whole
    verify.py daemon-hung REPORT LOG
                                   the daemon stopped (SIGSTOP) between rounds: the mount is
                                   detached, later rounds are written to disk, nothing fails or
                                   tears, and no write waits on digestfs longer than 2 s
    verify.py two-servers REPORT1 REPORT2 LOG
                                   two BSP servers at once on one repo: both served from the one
                                   mount, neither fell back nor detached it
    verify.py two-resolves REPORT  a repo of two resolves: both served, each lib/ exactly its jars
    verify.py java-only REPORT     a Java-only repo with the plugin on: it starts, nothing fails
    verify.py race REPORT          without the plugin: the race shows (failed requests or torn
                                   reads), as it must for the comparison to mean anything
    verify.py store STORE LOCKFILE SHARDS [REPORT]
                                   digestfs reads the store this Pants wrote: its shard count, and
                                   every jar of the lockfile byte for byte (small ones from the LMDB
                                   shards, large ones from immutable/files); with REPORT, only
                                   the jars its sessions' lib/ held

Each prints what it checked, and exits 1 naming every promise broken. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def failed_requests(r: dict) -> list[str]:
    """One line per request a round saw fail."""
    return [f"round {r['round']}: {f['method']} failed: {f['message'][:300]}" for f in r["failures"]]


def served(report: dict) -> list[str]:
    """Every round: no failed request, every URI from the mount, every jar whole and right, each
    lib/ exactly the jars the answers named, compile output written."""
    broken = []
    if not report.get("rounds"):
        return ["the session ran no round"]
    for r in report["rounds"]:
        n = r["round"]
        broken += failed_requests(r)
        if r["uris_read"] == 0:
            broken.append(f"round {n}: no URI was read")
        if r["uris_from_mount"] != r["uris_read"]:
            broken.append(
                f"round {n}: {r['uris_read'] - r['uris_from_mount']} of {r['uris_read']} URIs not "
                f"served from the mount (st_devs {r['uri_st_devs']}, the mount's {r['mount_st_dev']})"
            )
        mount = r.get("mount") or {}
        if mount.get("fstype") != "fuse" or "ro" not in mount.get("options", "").split(","):
            broken.append(f"round {n}: jvm/resolves is not a read-only FUSE mount: {mount}")
        for key in ("read_errors", "hash_mismatches", "bad_reads", "unzip_failures", "not_in_lockfile"):
            if r[key]:
                broken.append(f"round {n}: {key}: {r[key][:3]}")
        if not r["libs"]:
            broken.append(f"round {n}: no lib/ at all")
        for resolve, lib in r["libs"].items():
            if lib["missing"] or lib["extra"]:
                broken.append(
                    f"round {n}: {resolve}/lib is not exactly the jars named: missing "
                    f"{lib['missing']}, extra {lib['extra']}"
                )
            if lib.get("not_lockfile_bytes"):
                broken.append(f"round {n}: {resolve}/lib: {lib['not_lockfile_bytes'][:3]}")
            devs = {f[1] for f in lib["files"]}
            if devs != {r["mount_st_dev"]}:
                broken.append(f"round {n}: {resolve}/lib files on st_devs {devs}, not the mount's")
        if r["compile_status"] != 1 or r["class_files"] == 0:
            broken.append(
                f"round {n}: compile status {r['compile_status']}, {r['class_files']} class files "
                "under jvm/classes (beside the mount, which must stay writable)"
            )
        # Matched with the session without the plugin: each refresh after the first starts with
        # no lib/ (unbound), so that it binds everything again.
        if report.get("delete_lib") and n > 1 and not r.get("deleted_libs"):
            broken.append(f"round {n}: no lib/ view was unbound before it (--delete-lib)")
    if report.get("server_exit_status") != 0:
        broken.append(f"the BSP server exited with {report.get('server_exit_status')}")
    return broken


def log_since(log: str) -> list[str]:
    """The lines of the BSP server's log after byte LOG_OFFSET (what this session logged)."""
    with open(log, "rb") as f:
        f.seek(int(os.environ.get("LOG_OFFSET", "0")))
        return f.read().decode(errors="replace").splitlines()


def digestfs_warnings(log: str) -> list[str]:
    return [line for line in log_since(log) if "[WARN]" in line and "digestfs" in line]


def reused(report: dict, before: dict, after: dict, log: str) -> list[str]:
    """The next BSP server found the first one's daemon and views, and kept them."""
    broken = served(report)
    if not before.get("pid") or before.get("pid") != after.get("pid"):
        broken.append(f"the daemon was not reused: pid {before.get('pid')} before, {after.get('pid')} after")
    if not before.get("views"):
        broken.append("the daemon had no views when the next BSP server started")
    elif before.get("views") != after.get("views"):
        broken.append(f"the views changed: {before.get('views')} before, {after.get('views')} after")
    if digestfs_warnings(log):
        broken.append(f"the next session warned: {digestfs_warnings(log)[:3]}")
    return broken


def on_disk(resolves: str) -> list[str]:
    """Under the (now unmounted) mountpoint nothing was written: Pants never wrote a jar."""
    written = []
    for root, dirs, files in os.walk(resolves):
        written += [os.path.relpath(os.path.join(root, f), resolves) for f in files]
    return [f"written on disk under jvm/resolves: {written[:10]}"] if written else []


def no_fuse(report: dict, log: str) -> list[str]:
    """One warning, and then Pants' own behaviour (its race included)."""
    warnings = digestfs_warnings(log)
    broken = []
    if len(warnings) != 1:
        broken.append(f"{len(warnings)} digestfs warnings in this session's log, not 1: {warnings[:3]}")
    return broken + pants_own(report)


def pants_own(report: dict) -> list[str]:
    """Pants' own behaviour: jars written to disk under lib/, no mount, and no failure but Pants'
    own race (`Permission denied` on a jar another target is writing)."""
    broken = []
    for r in report.get("rounds", []):
        n = r["round"]
        if r.get("mount"):
            broken.append(f"round {n}: something is mounted at jvm/resolves: {r['mount']}")
        if r["uris_from_mount"]:
            broken.append(f"round {n}: {r['uris_from_mount']} URIs from a mount")
        for f in r["failures"]:
            if "Permission denied" not in f["message"]:
                broken.append(f"round {n}: {f['method']} failed, not by Pants' own race: {f['message'][:300]}")
        if not r["libs"]:
            broken.append(f"round {n}: no jar written to lib/")
        for resolve, lib in r["libs"].items():
            if lib["missing"]:
                broken.append(f"round {n}: {resolve}/lib lacks {lib['missing']}")
    if not report.get("rounds"):
        broken.append("the session ran no round")
    return broken


def leftover(report: dict, log: str) -> list[str]:
    broken = []
    lines = log_since(log)
    detached = [line for line in lines if "Detached the digestfs mount" in line]
    if len(detached) != 1:
        broken.append(f"{len(detached)} lines say the leftover mount was detached, not 1")
    for r in report.get("rounds", []):
        for f in r["failures"]:
            if "Read-only file system" in f["message"] or "os error 30" in f["message"]:
                broken.append(f"round {r['round']}: {f['method']} met the read-only mount: {f['message'][:300]}")
        if r.get("mount"):
            broken.append(f"round {r['round']}: still mounted at jvm/resolves: {r['mount']}")
    if not report.get("rounds"):
        broken.append("the session ran no round")
    return broken


# The line the plugin logs at debug for each write it wraps (rules.py).
COST = re.compile(
    r"digestfs: a write under \S+: (.*); ([0-9.]+) s waiting on the daemon, ([0-9.]+) s in the "
    r"plugin in all"
)
# What a request may wait on digestfs with the daemon hung or killed (issue: 2 s).
BOUND_S = 2.0


def plugin_costs(log: str) -> list[tuple[str, float, float]]:
    """(what happened, s waiting on the daemon, s in the plugin) per wrapped write."""
    return [(m[1], float(m[2]), float(m[3])) for line in log_since(log) if (m := COST.search(line))]


def bounded(log: str, what: str, only: str = "") -> list[str]:
    """No wrapped write (whose outcome starts with `only`) waited on the daemon, or spent in the
    plugin, more than BOUND_S."""
    costs = [c for c in plugin_costs(log) if c[0].startswith(only)]
    if not costs:
        return [f"{log}: no cost line from the plugin (log_levels_by_target debug?)"]
    daemon = max(c[1] for c in costs)
    plugin = max(c[2] for c in costs)
    print(
        f"verify {what}: {len(costs)} wrapped writes; the longest waited {daemon:.2f} s on the "
        f"daemon and spent {plugin:.2f} s in the plugin in all (bound {BOUND_S:g} s)",
        file=sys.stderr,
    )
    return [
        f"a write {how} waited {d:.2f} s on the daemon and {p:.2f} s in the plugin (bound {BOUND_S:g} s)"
        for how, d, p in costs
        if d > BOUND_S or p > BOUND_S
    ][:3]


def daemon_killed(report: dict, log: str) -> list[str]:
    """The daemon killed with SIGKILL between two refreshes: every later request is still
    answered and served from a mount (a new daemon restores the views), no read fails or tears,
    and no write waits long on the new daemon."""
    return injected(report, 1) + served(report) + bounded(log, "daemon-killed")


def injected(report: dict, count: int) -> list[str]:
    """The faults injected between rounds (`--after-round`) ran, `count` of them."""
    after = report.get("after_rounds") or []
    if len(after) != count or any(a.get("status") != 0 for a in after):
        return [f"{count} injected commands should have run between rounds and succeeded: {after}"]
    return []


def daemon_hung(report: dict, log: str) -> list[str]:
    """The daemon stopped with SIGSTOP after round 1 and resumed after round 2: round 1 is served
    from the mount; in round 2 the plugin detached it, and every request is answered with the
    jars on disk, whole, within the bound; in round 3 the mount is back (a new daemon) and serves
    every jar again."""
    broken = injected(report, 2)
    rounds = report.get("rounds") or []
    if len(rounds) != 3:
        return broken + [f"{len(rounds)} rounds; the check needs 3: served, hung, back"]
    broken += served({**report, "rounds": [rounds[0], rounds[2]]})
    for r in rounds[1:2]:
        n = r["round"]
        broken += failed_requests(r)
        if (r.get("mount") or {}).get("fstype") == "fuse":
            broken.append(f"round {n}: still mounted at jvm/resolves: {r['mount']}")
        if r["uris_read"] == 0:
            broken.append(f"round {n}: no URI was read")
        for key in ("read_errors", "hash_mismatches", "bad_reads", "unzip_failures", "not_in_lockfile"):
            if r[key]:
                broken.append(f"round {n}: {key}: {r[key][:3]}")
        for resolve, lib in r["libs"].items():
            if lib["missing"]:
                broken.append(f"round {n}: {resolve}/lib lacks {lib['missing'][:3]}")
        if r["compile_status"] != 1 or r["class_files"] == 0:
            broken.append(f"round {n}: compile status {r['compile_status']}, {r['class_files']} class files")
    # The writes of the hung round: the one that met the hung daemon and those after it, all
    # written to disk (the round after, back on the mount, waits for the new mount once).
    return broken + bounded(log, "daemon-hung", only="wrote")


def two_servers(reports: list[dict], log: str) -> list[str]:
    broken = []
    spans = [(r.get("started_at", 0), r.get("ended_at", 0)) for r in reports]
    if not all(spans) or max(s for s, _ in spans) >= min(e for _, e in spans):
        broken.append(f"the two sessions did not run at the same time: {spans}")
    for i, report in enumerate(reports, 1):
        broken += [f"server {i}: {b}" for b in served(report)]
    fell = [line for line in digestfs_warnings(log) if "Writing the jars served so far" in line or "fell back" in line]
    broken += [f"a server fell back: {line[:300]}" for line in fell[:3]]
    return broken


def java_only(report: dict) -> list[str]:
    """A Java-only repo (no Scala backend) with the plugin on: the rule graph builds, the mount
    comes up, no request fails, compile writes class files beside the mount."""
    broken = []
    if not report.get("rounds"):
        return ["the session ran no round"]
    for r in report["rounds"]:
        n = r["round"]
        broken += failed_requests(r)
        mount = r.get("mount") or {}
        if mount.get("fstype") != "fuse":
            broken.append(f"round {n}: no digestfs mount at jvm/resolves (the plugin did not start): {mount}")
        for key in ("read_errors", "hash_mismatches", "unzip_failures"):
            if r[key]:
                broken.append(f"round {n}: {key}: {r[key][:3]}")
        if r["compile_status"] != 1 or r["class_files"] == 0:
            broken.append(f"round {n}: compile status {r['compile_status']}, {r['class_files']} class files")
    return broken


def two_resolves(report: dict) -> list[str]:
    """The repo's two groups in two resolves: everything `served` checks, for both resolves'
    `lib/`."""
    broken = served(report)
    for r in report.get("rounds", []):
        resolves = sorted(res for res, lib in r["libs"].items() if lib["files"])
        if resolves != ["jvm-default", "jvm-other"]:
            broken.append(f"round {r['round']}: lib/ of {resolves}, not of jvm-default and jvm-other")
    return broken


def race(report: dict) -> list[str]:
    t = report.get("totals") or {}
    if not report.get("rounds"):
        return ["the session ran no round"]
    if t.get("failed", 0) + t.get("hash_mismatches", 0) + t.get("unzip_failures", 0) == 0:
        return ["no failed request and no torn read: the race did not show, so the comparison shows nothing"]
    return []


def store(store_dir: str, lockfile: str, shards: int, report: dict | None = None) -> list[str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bsp_client import parse_lockfile

    binary = os.environ.get("DIGESTFS_BIN", "digestfs")
    broken = []
    doctor = subprocess.run(
        [binary, "--store", store_dir, "doctor"], capture_output=True, text=True, timeout=60
    )
    line = next((ln for ln in doctor.stdout.splitlines() if f"store {store_dir}" in ln), "")
    if not line.startswith("ok") or f"{shards} shards (found from its folders" not in line:
        broken.append(f"doctor does not find {shards} shards in {store_dir}: {line or doctor.stdout}")
    entries = parse_lockfile(Path(lockfile))
    if report is not None:  # Only the jars the session served: a Java-only repo fetches no Scala.
        served_names = {f[0] for r in report.get("rounds", []) for lib in r["libs"].values() for f in lib["files"]}
        entries = {name: e for name, e in entries.items() if name in served_names}
    large = 0
    for name, e in sorted(entries.items()):
        digest = f"{e['sha256']}-{e['size']}"
        done = subprocess.run(
            [binary, "--store", store_dir, "cat", digest], capture_output=True, timeout=60
        )
        if done.returncode != 0:
            broken.append(f"{name} ({digest}): {done.stderr.decode(errors='replace').strip()}")
        elif hashlib.sha256(done.stdout).hexdigest() != e["sha256"]:
            broken.append(f"{name} ({digest}): other bytes")
        large += e["size"] >= 524288
    if not entries:
        broken.append(f"no entries in {lockfile}")
    elif not broken:
        print(
            f"verify store: {len(entries)} jars ({large} of 512 KiB or more) read byte for byte "
            f"from {store_dir} ({shards} shards)",
            file=sys.stderr,
        )
    return broken


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in (
        "served", "reused", "on-disk", "no-fuse", "disabled", "leftover", "race", "java-only", "daemon-killed",
        "daemon-hung", "two-servers", "two-resolves", "store"
    ):
        print(__doc__, file=sys.stderr)
        return 2
    what = argv[0]
    if what == "served":
        broken = served(load(argv[1]))
    elif what == "reused":
        broken = reused(load(argv[1]), load(argv[2]), load(argv[3]), argv[4])
    elif what == "on-disk":
        broken = on_disk(argv[1])
    elif what == "store":
        broken = store(argv[1], argv[2], int(argv[3]), load(argv[4]) if len(argv) > 4 else None)
    elif what == "disabled":
        broken = pants_own(load(argv[1]))
    elif what == "leftover":
        broken = leftover(load(argv[1]), argv[2])
    elif what == "race":
        broken = race(load(argv[1]))
    elif what == "java-only":
        broken = java_only(load(argv[1]))
    elif what == "daemon-killed":
        broken = daemon_killed(load(argv[1]), argv[2])
    elif what == "two-resolves":
        broken = two_resolves(load(argv[1]))
    elif what == "two-servers":
        broken = two_servers([load(argv[1]), load(argv[2])], argv[3])
    elif what == "daemon-hung":
        broken = daemon_hung(load(argv[1]), argv[2])
    else:
        broken = no_fuse(load(argv[1]), argv[2])
    for b in broken:
        print(f"verify {what}: BROKEN: {b}", file=sys.stderr)
    if not broken:
        print(f"verify {what}: ok", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
