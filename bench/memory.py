"""4. Peak RSS of one archive task for studies of growing size (a worker process per size)."""

from __future__ import annotations

import math
from typing import Any

from bench.common import WORK_DIR, run_worker
from bench.config import IMAGE_KB
from bench.context import Context
from bench.datasets import Zone, ZoneSpec, ensure_zone_at_least
from bench.results import Result, Target, fmt
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import plan_batch

PEAK_GOAL_MIB = 256
FLAT_GOAL_MIB = 32  # growth allowed from the smallest to the largest study
HEADER_BYTES = 2048  # a generous bound of one synthetic file's bytes beyond its pixel data


def big_study(sizes_gb: tuple[float, ...]) -> Zone:
    images = math.ceil(max(sizes_gb) * 1e9 / (IMAGE_KB * 1024 + HEADER_BYTES))
    return ensure_zone_at_least(ZoneSpec(studies=1, images_per_study=images, image_kb=IMAGE_KB))


def staged_plan(zone: Zone) -> str:
    """Plan the study once; every size archives the first N images of it."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    path = WORK_DIR / f"{zone.root.name}.plan.json"
    if not path.exists():
        path.write_text(plan_batch(LocalLandingZone(zone.root), zone.batch_id).to_json())
    return str(path)


def measure(zone: Zone, plan: str, size_gb: float) -> dict[str, Any]:
    images = min(zone.image_count, round(size_gb * 1e9 / (zone.image_bytes / zone.image_count)))
    args = ["--root", str(zone.root), "--batch", zone.batch_id, "--plan", plan, "--images", str(images)]
    return run_worker("archive", *args, "--sink", "task")


def run(ctx: Context) -> Result:
    sizes = ctx.sizes.memory_gb
    zone = big_study(sizes)
    plan = staged_plan(zone)
    measured = {size: measure(zone, plan, size) for size in sizes}
    rows = [
        [
            f"{m['input_bytes'] / 1e9:.2f}",
            m["images"],
            fmt(m["rss_setup_mib"]),
            fmt(m["vmhwm_mib"]),
            fmt(m["input_bytes"] / 1e6 / m["phases"]["archive"]["seconds"]),
        ]
        for m in measured.values()
    ]
    peaks = [m["vmhwm_mib"] for m in measured.values()]
    growth = peaks[-1] - peaks[0]
    return Result(
        name="memory",
        title="4. Peak RSS of one archive task vs study size",
        columns=["study GB", "images", "RSS before archiving MiB", "peak VmHWM MiB", "MB/s"],
        rows=rows,
        targets=[
            Target(
                "peak RSS of an archive task",
                f"<= {PEAK_GOAL_MIB} MiB",
                f"{max(peaks):.0f} MiB",
                max(peaks) <= PEAK_GOAL_MIB,
            ),
            Target(
                "peak RSS flat in study size",
                f"growth <= {FLAT_GOAL_MIB} MiB from {sizes[0]} to {sizes[-1]} GB",
                f"{growth:+.0f} MiB",
                growth <= FLAT_GOAL_MIB,
            ),
        ],
        notes=[
            f"One worker process per size runs what an archive task runs: `archive_groups_spooled` (publish "
            "with verification, rows for BigQuery spooled to a temporary file) of one CT study, then the rows "
            "staged from that file, into a null object store that only hashes "
            f"(no network). Studies are the first N images of one generated {zone.image_bytes / 1e9:.1f} GB study "
            f"of {IMAGE_KB} KiB images, planned once. 'RSS before archiving' is after imports and loading the plan.",
            "Peak is the worker's VmHWM. Its ru_maxrss is kept in results.json but not used: Linux carries "
            "ru_maxrss over fork + execve, so a worker started from the (larger) bench process reports the "
            "parent's size.",
        ],
        data={str(size): m for size, m in measured.items()},
    )
