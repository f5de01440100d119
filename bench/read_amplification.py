"""3. Bytes read per byte of input for plan + archive, from /proc/self/io of a worker process."""

from __future__ import annotations

from typing import Any

from bench.common import WORK_DIR, drop_page_cache, run_worker
from bench.context import Context
from bench.datasets import Zone, ensure_zone
from bench.results import Result, Target, fmt

GOAL = 1.0
TOLERANCE = 0.01  # manifest, lookup and lazily imported modules also count


def one_process(zone: Zone) -> dict[str, Any]:
    """plan + archive in one task, starting from a cold page cache."""
    drop_page_cache(zone.image_paths())
    return run_worker("archive", "--root", str(zone.root), "--batch", zone.batch_id)["phases"]


def separate_tasks(zone: Zone) -> dict[str, Any]:
    """plan and archive as two tasks whose page cache does not survive in between (two workers)."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    plan_file = WORK_DIR / f"{zone.root.name}.plan.json"
    drop_page_cache(zone.image_paths())
    planned = run_worker("plan", "--root", str(zone.root), "--batch", zone.batch_id, "--out", str(plan_file))
    drop_page_cache(zone.image_paths())
    archived = run_worker("archive", "--root", str(zone.root), "--batch", zone.batch_id, "--plan", str(plan_file))
    return {"plan": planned["phases"]["plan"], "archive": archived["phases"]["archive"]}


def _rows(scenario: str, phases: dict[str, Any], zone: Zone) -> list[list[Any]]:
    rows = []
    total = {"rchar": 0, "read_bytes": 0}
    for phase, counters in phases.items():
        total = {key: total[key] + counters[key] for key in total}
        rows.append(_row(scenario, phase, counters, zone))
    rows.append(_row(scenario, "plan + archive", total, zone))
    return rows


def _row(scenario: str, phase: str, counters: dict[str, int], zone: Zone) -> list[Any]:
    return [
        scenario,
        phase,
        fmt(counters["rchar"] / zone.image_bytes, 3),
        fmt(counters["read_bytes"] / zone.image_bytes, 3),
        fmt(counters["rchar"] / zone.image_count / 1024, 1),
    ]


def run(ctx: Context) -> Result:
    zone = ensure_zone(ctx.sizes.archive_zone("ct"))
    single, split = one_process(zone), separate_tasks(zone)
    archive_rchar = single["archive"]["rchar"] / zone.image_bytes
    total_disk = (single["plan"]["read_bytes"] + single["archive"]["read_bytes"]) / zone.image_bytes
    total_rchar = (single["plan"]["rchar"] + single["archive"]["rchar"]) / zone.image_bytes
    return Result(
        name="io",
        title="3. Bytes read per byte of input (plan + archive, /proc/self/io of the task process)",
        columns=["scenario", "step", "rchar / input", "read_bytes / input", "rchar per image KiB"],
        rows=_rows("one task, cold cache", single, zone) + _rows("two tasks, cache dropped between", split, zone),
        targets=[
            Target(
                "archive step reads each file once (rchar)",
                "1.0",
                f"{archive_rchar:.3f}",
                abs(archive_rchar - GOAL) <= TOLERANCE,
            ),
            Target(
                "disk reads, plan + archive (read_bytes)",
                "1.0",
                f"{total_disk:.3f}",
                abs(total_disk - GOAL) <= TOLERANCE,
            ),
            Target(
                "bytes returned by read(), plan + archive (rchar)",
                "1.0",
                f"{total_rchar:.3f}",
                abs(total_rchar - GOAL) <= TOLERANCE,
            ),
        ],
        notes=[
            f"{zone.image_count} CT images of {zone.image_bytes / zone.image_count / 1024:.0f} KiB "
            f"({zone.image_bytes / 1e6:.0f} MB). Page cache of the images evicted with posix_fadvise(DONTNEED) "
            "before each worker, so read_bytes counts real device reads; rchar counts what read() returned "
            "(cache hits included). Counters are deltas around each step, after imports.",
        ],
        data={"one_task": single, "two_tasks": split, "input_bytes": zone.image_bytes, "images": zone.image_count},
    )
