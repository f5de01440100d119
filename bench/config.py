"""How big each benchmark runs: the full run (`make bench`) and a quick smoke run (--quick).

Full sizes are chosen so that the whole run stays within about 20 minutes on a 2-core machine,
once the data is cached (the first run also generates about 5 GB of synthetic studies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.datasets import ZoneSpec

KINDS = ("ct", "mr", "us")  # 16-bit CT-like, 16-bit MR-like, 8-bit RGB ultrasound-like
IMAGE_KB = 512  # pixel data per image: one 512x512 16-bit slice


@dataclass(frozen=True)
class Sizes:
    archive_studies: int  # per kind, for the archive build benchmark
    archive_images: int
    archive_repeats: int
    e2e: ZoneSpec  # one batch: end to end, and the scaling benchmark's data
    memory_gb: tuple[float, ...]  # study sizes for the peak RSS benchmark
    bigquery_rows: tuple[int, ...]
    bigquery_baseline_rows: tuple[int, ...]  # streaming inserts cost ~45 ms a row on the emulator
    load_rows: tuple[int, ...]  # batch rows for the load task's peak RSS
    parse_runs: int
    plan_studies: int  # one-image studies in the scheduler-side benchmark
    plan_read_studies: tuple[int, ...]  # batch sizes for the plan bytes read per archive task
    scaling_procs: tuple[int, ...] = (1, 2, 4)
    scaling_repeats: int = 3
    levels: tuple[int, ...] = field(default=(1, 2, 3))

    def archive_zone(self, kind: str) -> ZoneSpec:
        return ZoneSpec(self.archive_studies, self.archive_images, IMAGE_KB, kind)


FULL = Sizes(
    archive_studies=4,
    archive_images=60,  # ~126 MB per kind
    archive_repeats=5,  # single builds of ~0.6 s vary by 30% here (first runs slower)
    e2e=ZoneSpec(studies=8, images_per_study=50, image_kb=IMAGE_KB),  # 400 images, ~210 MB
    memory_gb=(0.5, 1.0, 2.0, 4.0),
    bigquery_rows=(100, 1_000, 10_000),
    bigquery_baseline_rows=(100, 1_000),
    load_rows=(5_000, 40_000, 120_000),  # 13 to 306 MiB of NDJSON: past the client's 100 MiB upload chunk
    parse_runs=7,
    plan_studies=5_000,
    plan_read_studies=(50, 500, 5_000),
)

QUICK = Sizes(
    archive_studies=2,
    archive_images=20,
    archive_repeats=1,
    e2e=ZoneSpec(studies=4, images_per_study=10, image_kb=IMAGE_KB),
    memory_gb=(0.05, 0.1, 0.2),
    bigquery_rows=(100, 1_000),
    bigquery_baseline_rows=(100,),
    load_rows=(1_000, 2_000),
    parse_runs=3,
    plan_studies=500,
    plan_read_studies=(50, 500),
    scaling_repeats=1,
    levels=(1,),
)
