#!/usr/bin/env python3
"""Writes the test repository of the Pants BSP end-to-end test.

Its layout is that of the repro of pantsbuild/pants#21532 (github.com/jgranstrom/pants-repro-bsp-race):
two BSP groups (`jvm/bsp-groups.toml`, `jvm2/bsp-groups.toml`), each a `scala_sources` target,
one resolve `jvm-default` in which `org.scala-lang:scala-library` is declared twice under two
target names, and ZIO. To that it adds jars of 512 KiB and more (guava, commons-lang3,
commons-math3) so that Pants keeps them as large blobs under `immutable/files/`, and Scala files
that use every jar, so that compile has real work.

Differences from the repro, forced by Pants 2.17.1 and by what this machine reaches:
- 2.17.1 has no `scala_artifact` target: ZIO is a `jvm_artifact` named `zio_2.13`.
- ZIO 2.1.12, not 2.1.11: Maven Central as reached here does not serve 2.1.11.

Everything Pants caches lives beside the repository (store, named caches), so that runs do not
depend on ~/.cache: `WORK/repo` (the build root), `WORK/store`, `WORK/named_caches`, `WORK/sandboxes`, `WORK/tmp`.

Stdlib only: the distribution's python3 runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

RESOLVE = "jvm-default"
LOCKFILE = "3rdparty/jvm/default.lock"
# With --two-resolves, `jvm2/` is in a resolve of its own, of the same artifacts.
OTHER_RESOLVE = "jvm-other"
OTHER_LOCKFILE = "3rdparty/jvm/other.lock"
SCALA_VERSION = "2.13.12"
GROUPS = ("jvm", "jvm2")
# The backend the plugin must come after (its workspace/buildTargets mapping must be the last).
SCALA_BACKEND = "pants.backend.experimental.scala"
PLUGIN_BACKEND = "pants_digestfs"
# What scripts/install-pants installs; `--pants-version` names another (a Pants built by hand).
PANTS_VERSION = "2.17.1"
# From 2.24 on, without these `experimental-bsp` serves no JVM targets.
BSP_BACKENDS = [
    "pants.backend.experimental.bsp",
    "pants.backend.experimental.java.bsp",
    "pants.backend.experimental.scala.bsp",
]


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)

# (target name, group, artifact, version, packages). Sizes of the jars on Maven Central:
# scala-library 2.13.12 5.9 MB, zio_2.13 2.1.12 about 4 MB, guava 33.5.0-jre 3.0 MB,
# commons-math3 3.6.1 2.2 MB, commons-lang3 3.17.0 0.67 MB (all >= 524288 bytes).
ARTIFACTS = (
    ("org.scala-lang_scala-library", "org.scala-lang", "scala-library", SCALA_VERSION, ("scala.**",)),
    ("org.scala-lang_scala-library2", "org.scala-lang", "scala-library", SCALA_VERSION, ("scala.**",)),
    ("zio", "dev.zio", "zio_2.13", "2.1.12", ("zio.**",)),
    ("guava", "com.google.guava", "guava", "33.5.0-jre", ("com.google.common.**",)),
    ("commons-lang3", "org.apache.commons", "commons-lang3", "3.17.0", ("org.apache.commons.lang3.**",)),
    ("commons-math3", "org.apache.commons", "commons-math3", "3.6.1", ("org.apache.commons.math3.**",)),
)

SOURCES = {
    "jvm/Hello1.scala": """\
        package jvm

        import zio._
        import com.google.common.collect.ImmutableList
        import org.apache.commons.lang3.StringUtils

        object Main extends ZIOAppDefault {
          val names: ImmutableList[String] = ImmutableList.of("a", "b", "c")

          def run = Console.printLine(StringUtils.join(names, ",") + " " + Util1.shout("hello"))
        }
        """,
    "jvm/Util1.scala": """\
        package jvm

        import scala.jdk.CollectionConverters._
        import org.apache.commons.lang3.StringUtils
        import com.google.common.base.Joiner

        object Util1 {
          def shout(s: String): String = StringUtils.upperCase(s) + "!"
          def joined(xs: Seq[String]): String = Joiner.on('-').join(xs.asJava)
        }
        """,
    "jvm2/Hello2.scala": """\
        package jvm2

        import zio._
        import org.apache.commons.math3.stat.descriptive.DescriptiveStatistics

        object Main extends ZIOAppDefault {
          def mean(xs: Seq[Double]): Double = {
            val stats = new DescriptiveStatistics()
            xs.foreach(stats.addValue)
            stats.getMean
          }

          def run = Console.printLine(s"hello2 ${mean(Seq(1.0, 2.0, 3.0))}")
        }
        """,
    "jvm2/Util2.scala": """\
        package jvm2

        import com.google.common.collect.ImmutableMap
        import org.apache.commons.math3.util.FastMath

        object Util2 {
          val table: ImmutableMap[String, Double] = ImmutableMap.of("pi", FastMath.PI)
        }
        """,
}


# `--java-only`: the same groups and jars, Java sources, no Scala backend at all (the plugin must
# not need it).
JAVA_SOURCES = {
    "jvm/Hello1.java": """\
        package jvm;

        import com.google.common.collect.ImmutableList;
        import org.apache.commons.lang3.StringUtils;

        public class Hello1 {
          public static void main(String[] args) {
            System.out.println(StringUtils.join(ImmutableList.of("a", "b", "c"), ","));
          }
        }
        """,
    "jvm2/Hello2.java": """\
        package jvm2;

        import org.apache.commons.math3.stat.descriptive.DescriptiveStatistics;

        public class Hello2 {
          public static void main(String[] args) {
            DescriptiveStatistics stats = new DescriptiveStatistics();
            stats.addValue(1.0);
            stats.addValue(2.0);
            System.out.println(stats.getMean());
          }
        }
        """,
}


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def toml_list(items) -> str:
    return "[" + ", ".join(toml_str(i) for i in items) + "]"


def pants_toml(
    work: Path,
    tools: dict,
    shards: int,
    plugin_dir: Path | None,
    digestfs_bin: Path | None,
    pants_version: str = PANTS_VERSION,
    java_only: bool = False,
    two_resolves: bool = False,
) -> str:
    resolves = [(RESOLVE, LOCKFILE)] + ([(OTHER_RESOLVE, OTHER_LOCKFILE)] if two_resolves else [])
    backends = ["pants.backend.experimental.java"] + ([] if java_only else [SCALA_BACKEND])
    if _release(pants_version) >= (2, 24):  # The BSP rules became backends of their own.
        backends += [b for b in BSP_BACKENDS if not (java_only and ".scala." in b)]
    lines = [
        "[GLOBAL]",
        f"pants_version = {toml_str(pants_version)}",
        "pantsd = false",
        "print_stacktrace = true",
        f"local_store_dir = {toml_str(str(work / 'store'))}",
        f"local_store_shard_count = {shards}",
        f"named_caches_dir = {toml_str(str(work / 'named_caches'))}",
        # Sandboxes beside the store too: cleaned with the work dir, even after a kill.
        f"local_execution_root_dir = {toml_str(str(work / 'sandboxes'))}",
    ]
    if plugin_dir is not None:
        lines.append(f"pythonpath = {toml_list([str(plugin_dir)])}")
        # Each wrapped write logs what it cost at debug: the e2e bounds it.
        lines.append('log_levels_by_target = {"pants_digestfs.rules" = "debug"}')
        backends.append(PLUGIN_BACKEND)
    lines.append(f"backend_packages = {toml_list(backends)}")
    lines += ["", "[anonymous-telemetry]", "enabled = false"]

    c = tools["coursier"]
    lines += [
        "",
        "[coursier]",
        f"version = {toml_str(c['version'])}",
        f"url_template = {toml_str(c['url_template'])}",
        "known_versions = [",
        *(f"  {toml_str(k)}," for k in c["known_versions"]),
        "]",
        f"repos = {toml_list(c['repos'])}",
        "",
        "[jvm]",
        f"jdk = {toml_str(tools['jvm']['jdk'])}",
        f"tool_jdk = {toml_str(tools['jvm']['tool_jdk'])}",
        "",
        "[jvm.resolves]",
        *(f"{r} = {toml_str(lock)}" for r, lock in resolves),
        *([] if java_only else ["", "[scala.version_for_resolve]",
                                *(f"{r} = {toml_str(SCALA_VERSION)}" for r, _ in resolves)]),
        "",
        "[experimental-bsp]",
        f"groups_config_files = {toml_list(f'{g}/bsp-groups.toml' for g in GROUPS)}",
    ]
    if plugin_dir is not None:
        # Back on the mount soon after a fallback: the daemon-hung scenario resumes it between
        # two rounds.
        lines += ["", "[digestfs]", "enabled = true", "return_after = 1"]
        if digestfs_bin is not None:
            lines.append(f"binary = {toml_str(str(digestfs_bin))}")
    return "\n".join(lines) + "\n"


def root_build(two_resolves: bool = False) -> str:
    out = []
    for resolve, suffix in [(RESOLVE, "")] + ([(OTHER_RESOLVE, "-other")] if two_resolves else []):
        for name, group, artifact, version, packages in ARTIFACTS:
            out.append(
                textwrap.dedent(
                    f"""\
                    jvm_artifact(
                        name={toml_str(name + suffix)},
                        group={toml_str(group)},
                        artifact={toml_str(artifact)},
                        version={toml_str(version)},
                        packages={json.dumps(list(packages))},
                        resolve={toml_str(resolve)},
                    )
                    """
                )
            )
    return "\n".join(out)


def write_repo(
    work: Path,
    tools_dir: Path,
    shards: int = 16,
    plugin_dir: Path | None = None,
    digestfs_bin: Path | None = None,
    lockfile: Path | None = None,
    pants_version: str = PANTS_VERSION,
    java_only: bool = False,
    two_resolves: bool = False,
) -> Path:
    """Writes WORK/repo afresh (removing WORK first) and returns the build root."""
    tools = json.loads((tools_dir / "coursier.json").read_text())
    work = work.resolve()
    if work.exists():
        shutil.rmtree(work)
    repo = work / "repo"
    repo.mkdir(parents=True)

    files = {
        "pants.toml": pants_toml(
            work, tools, shards, plugin_dir, digestfs_bin, pants_version, java_only, two_resolves
        ),
        "BUILD": root_build(two_resolves),
        ".gitignore": ".pants.d\n.bsp\n",
    }
    for g in GROUPS:
        kind = "java_sources" if java_only else "scala_sources"
        resolve = f'resolve="{OTHER_RESOLVE}"' if two_resolves and g == GROUPS[1] else ""
        files[f"{g}/BUILD"] = f"{kind}({resolve})\n"
        files[f"{g}/bsp-groups.toml"] = textwrap.dedent(
            f"""\
            [groups.{g}]
            addresses = [
              "{g}/::",
            ]
            base_directory = "{g}"
            """
        )
    for path, text in (JAVA_SOURCES if java_only else SOURCES).items():
        files[path] = textwrap.dedent(text)
    for path, text in files.items():
        p = repo / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    # Pants' own caches: named caches hold coursier's download cache, the store every digest.
    # TMPDIR for Pants (scripts/pants-e2e sets it): the BSP context's and the engine's temp dirs.
    for d in ("store", "named_caches", "sandboxes", "tmp"):
        (work / d).mkdir()
    if lockfile is not None:
        dest = repo / LOCKFILE
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lockfile, dest)
    return repo


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description="Write the Pants BSP e2e test repository into WORK/repo (WORK is emptied first)."
    )
    ap.add_argument("work", type=Path, help="work dir: gets repo/, store/, named_caches/, sandboxes/, tmp/")
    ap.add_argument("--tools", type=Path, required=True, help="the DIR of scripts/install-pants")
    ap.add_argument("--shards", type=int, default=16, help="[GLOBAL].local_store_shard_count")
    ap.add_argument("--plugin-dir", type=Path, help="enable the digestfs plugin from this dir")
    ap.add_argument("--digestfs-bin", type=Path, help="[digestfs].binary (with --plugin-dir)")
    ap.add_argument("--lockfile", type=Path, help=f"copy this lockfile to {LOCKFILE}")
    ap.add_argument("--pants-version", default=PANTS_VERSION, help="[GLOBAL].pants_version")
    ap.add_argument("--java-only", action="store_true", help="Java sources, no Scala backend")
    ap.add_argument(
        "--two-resolves", action="store_true",
        help=f"jvm2/ in a resolve of its own, {OTHER_RESOLVE} ({OTHER_LOCKFILE}: generate it)",
    )
    a = ap.parse_args(argv)
    try:
        _release(a.pants_version)
    except ValueError:
        ap.error(f"--pants-version {a.pants_version!r} is not a Pants version (2.24.3, say)")
    if a.shards < 1 or a.shards > 128 or a.shards & (a.shards - 1):
        ap.error("--shards must be a power of two from 1 to 128")
    repo = write_repo(
        a.work,
        a.tools.resolve(),
        a.shards,
        a.plugin_dir.resolve() if a.plugin_dir else None,
        a.digestfs_bin.resolve() if a.digestfs_bin else None,
        a.lockfile,
        a.pants_version,
        a.java_only,
        a.two_resolves,
    )
    print(repo)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
