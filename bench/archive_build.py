"""1. Archive build: check + tar + gzip into a hashing null sink, against GNU `tar -czf`."""

from __future__ import annotations

import resource
import subprocess
import tempfile
import time
from typing import Any, NamedTuple

from bench.common import MB, warm_page_cache
from bench.config import KINDS
from bench.context import Context
from bench.datasets import Zone, ensure_zone
from bench.results import Result, Target, fmt, ratio
from dicom_archive.archive import write_study_archive
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import BatchPlan, plan_batch

SPEEDUP_GOAL = 8.0
SIZE_GOAL = 1.05
DEFAULT_LEVEL = 1


class Run(NamedTuple):
    wall: float  # seconds
    cpu: float  # user + system seconds of every process involved
    size: int  # compressed bytes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def gnu_tar_gz(zone: Zone, plan: BatchPlan) -> Run:
    """`tar -czf -` of the plan's files (gzip's default level 6), bytes counted from the pipe.
    Its CPU time is tar's plus gzip's (gzip is tar's child, waited for by tar).

    Not `-f /dev/null`: GNU tar then skips reading the files at all."""
    relpaths = [image.relpath for group in plan.groups for image in group.images]
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listing:
        listing.write("\n".join(relpaths) + "\n")
        listing.flush()
        cpu, started = _children_cpu(), time.monotonic()
        argv = ["tar", "-czf", "-", "-C", str(zone.root / plan.batch_id), "-T", listing.name]
        with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            size = 0
            while chunk := proc.stdout.read(1 << 20):
                size += len(chunk)
        run = Run(time.monotonic() - started, _children_cpu() - cpu, size)
    if proc.returncode != 0:
        raise RuntimeError(f"tar failed with status {proc.returncode}")
    return run


def ours(zone: Zone, plan: BatchPlan, level: int) -> Run:
    landing = LocalLandingZone(zone.root)
    cpu, started = time.process_time(), time.monotonic()
    size = sum(write_study_archive(group, landing, None, compresslevel=level)[0].size for group in plan.groups)
    return Run(time.monotonic() - started, time.process_time() - cpu, size)


def measure_kind(kind: str, ctx: Context) -> dict[str, Any]:
    zone = ensure_zone(ctx.sizes.archive_zone(kind))
    plan = plan_batch(LocalLandingZone(zone.root), zone.batch_id)
    warm_page_cache(zone.image_paths())
    runs: dict[str, list[Run]] = {"tar": []}
    for _ in range(ctx.sizes.archive_repeats):
        runs["tar"].append(gnu_tar_gz(zone, plan))
        for level in ctx.sizes.levels:
            runs.setdefault(f"L{level}", []).append(ours(zone, plan, level))
    return {
        "input_bytes": zone.image_bytes,
        "images": zone.image_count,
        "seconds": {name: min(run.wall for run in values) for name, values in runs.items()},
        "cpu_seconds": {name: min(run.cpu for run in values) for name, values in runs.items()},
        "output_bytes": {name: values[0].size for name, values in runs.items()},
        "runs": {name: [run._asdict() for run in values] for name, values in runs.items()},
    }


def _row(kind: str, level: int, m: dict[str, Any]) -> list[Any]:
    mbs = {name: m["input_bytes"] / MB / seconds for name, seconds in m["seconds"].items()}
    out, cpu = m["output_bytes"], m["cpu_seconds"]
    return [
        kind,
        level,
        fmt(m["input_bytes"] / MB, 0),
        fmt(mbs["tar"]),
        fmt(mbs[f"L{level}"]),
        fmt(ratio(m["seconds"]["tar"], m["seconds"][f"L{level}"]), 1) + "x",
        fmt(ratio(cpu["tar"], cpu[f"L{level}"]), 1) + "x",
        fmt(out["tar"] / m["input_bytes"], 3),
        fmt(out[f"L{level}"] / m["input_bytes"], 3),
        f"{(out[f'L{level}'] / out['tar'] - 1) * 100:+.1f}%",
    ]


def _targets(measured: dict[str, dict[str, Any]]) -> list[Target]:
    targets = []
    for kind, m in measured.items():
        speedup = ratio(m["seconds"]["tar"], m["seconds"][f"L{DEFAULT_LEVEL}"]) or 0.0
        size = m["output_bytes"][f"L{DEFAULT_LEVEL}"] / m["output_bytes"]["tar"]
        targets.append(
            Target(
                f"archive build speed, {kind}",
                f">= {SPEEDUP_GOAL:.0f}x tar -czf",
                f"{speedup:.1f}x",
                speedup >= SPEEDUP_GOAL,
            )
        )
        targets.append(
            Target(f"archive size, {kind}", "<= +5% vs tar -czf", f"{(size - 1) * 100:+.1f}%", size <= SIZE_GOAL)
        )
    return targets


def run(ctx: Context) -> Result:
    measured = {kind: measure_kind(kind, ctx) for kind in KINDS}
    rows = [_row(kind, level, m) for kind, m in measured.items() for level in ctx.sizes.levels]
    return Result(
        name="archive",
        title="1. Archive build (check + tar + gzip into a hashing null sink) vs GNU tar -czf",
        columns=[
            "kind",
            "isal level",
            "input MB",
            "tar -czf MB/s",
            "ours MB/s",
            "speedup (wall)",
            "CPU-time ratio",
            "tar out/in",
            "ours out/in",
            "size vs tar",
        ],
        rows=rows,
        targets=_targets(measured),
        notes=[
            f"Best of {ctx.sizes.archive_repeats} runs each (the machine is shared: noise only adds time), "
            "warm page cache, in-process "
            "`write_study_archive(group, zone, None)` "
            "(re-check of each header, PAX tar, python-isal gzip, sha256 per image, md5 + crc32c of the output). "
            "Baseline: `tar -czf - -C batch -T list` (GNU tar piping to gzip -6), output counted from the pipe.",
            f"The product default is isal level {DEFAULT_LEVEL} (DICOM_GZIP_LEVEL); the targets apply to it, "
            "other levels are shown for the trade-off. The verdict uses wall time; the CPU-time ratio (tar + gzip "
            "CPU seconds over ours) is the load-insensitive cross-check on a shared machine.",
        ],
        data=measured,
    )
