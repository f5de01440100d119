"""7. Scaling: the same studies archived by 1, 2 and 4 parallel worker processes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, WORK_DIR, parse_worker_output, subprocess_env, warm_page_cache, worker_argv
from bench.context import Context
from bench.datasets import Zone, ensure_zone
from bench.results import Result, fmt, ratio
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import plan_batch


def split(count: int, procs: int) -> list[str]:
    """Study indices, dealt round-robin to `procs` workers."""
    return [",".join(str(i) for i in range(start, count, procs)) for start in range(procs)]


def parallel_run(zone: Zone, plan: Path, studies: int, procs: int) -> tuple[float, float]:
    """Start the workers, let them import and load the plan, then release them at once; the wall
    time runs from the first start to the last finish, as each worker reports them. Returns the
    wall time and the CPU seconds of all workers' archive steps."""
    env = subprocess_env()
    argv = ["--root", str(zone.root), "--batch", zone.batch_id, "--plan", str(plan), "--wait"]
    workers = [
        subprocess.Popen(
            worker_argv("archive", *argv, "--groups", groups),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for groups in split(studies, procs)
    ]
    for worker in workers:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    results = [parse_worker_output(worker.communicate()[0]) for worker in workers]
    if any(worker.returncode for worker in workers):
        raise RuntimeError("a scaling worker failed")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return wall, sum(r["phases"]["archive"]["cpu_seconds"] for r in results)


def run(ctx: Context) -> Result:
    zone = ensure_zone(ctx.sizes.e2e)
    plan = plan_batch(LocalLandingZone(zone.root), zone.batch_id)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    plan_file = WORK_DIR / f"{zone.root.name}.plan.json"
    plan_file.write_text(plan.to_json())
    warm_page_cache(zone.image_paths())
    best: dict[int, tuple[float, float]] = {}
    for procs in ctx.sizes.scaling_procs:
        runs = [parallel_run(zone, plan_file, len(plan.groups), procs) for _ in range(ctx.sizes.scaling_repeats)]
        best[procs] = min(runs)
    one = best[ctx.sizes.scaling_procs[0]][0]
    rows: list[list[Any]] = [
        [procs, fmt(wall, 2), fmt(zone.image_bytes / 1e6 / wall), fmt(ratio(one, wall), 2) + "x", fmt(cpu, 2)]
        for procs, (wall, cpu) in best.items()
    ]
    return Result(
        name="scaling",
        title="7. Scaling: parallel archive processes on this machine",
        columns=["processes", "wall s", "MB/s total", "speedup vs 1", "CPU s, all workers"],
        rows=rows,
        notes=[
            f"The {len(plan.groups)} studies of the end-to-end batch ({zone.image_bytes / 1e6:.0f} MB) dealt "
            "round-robin to the processes; each runs write_study_archive into a hashing null sink. Wall time "
            "from the first worker's start to the last one's end, after imports "
            f"(best of {ctx.sizes.scaling_repeats}); warm page cache. CPU s is the workers' summed process "
            "time: constant CPU across process counts means the work divides without contention of its own, "
            "and the wall-time speedup is bounded by the free cores (the load average is in the line above).",
        ],
        data={
            "best": {str(k): {"wall": w, "cpu": c} for k, (w, c) in best.items()},
            "input_bytes": zone.image_bytes,
            "studies": len(plan.groups),
        },
    )
