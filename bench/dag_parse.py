"""6. DAG parse time beyond `import airflow`, and the scheduler-side cost of a 5 000-study batch.

Also the plan bytes each mapped archive task reads, before (every task downloaded the batch's
whole staged plan and sliced it) and after (each task reads its own chunk plan), both measured
on the same staged data in the same run."""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from bench.common import BENCH_DIR, REPO_ROOT, WORK_DIR, median, run_worker, subprocess_env
from bench.context import Context
from bench.datasets import ZoneSpec, ensure_zone
from bench.end_to_end import studies_per_task
from bench.results import Result, Target, fmt, ratio
from dicom_archive.batch import Staging, chunk_id, run_key, studies_per_chunk
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import plan_batch
from dicom_archive.settings import Settings
from dicom_archive.stores import LocalObjectStore

PARSE_GOAL_MS = 150
TINY_IMAGE_KB = 1
PLAN_READ_GOAL = 1.1  # the plan bytes all archive tasks of a batch read, over the size of its plan


def airflow_env() -> dict[str, str]:
    return subprocess_env(
        AIRFLOW_HOME=str(BENCH_DIR / "airflow-home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO_ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO_ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
    )


def parse_times(runs: int, via: str) -> list[dict[str, Any]]:
    """`runs` fresh interpreters, after one discarded warm-up run."""
    return [run_worker("dag-parse", "--via", via, env=airflow_env()) for _ in range(runs + 1)][1:]


def plan_cost(studies: int) -> dict[str, Any]:
    """What the plan task does for a batch of `studies` one-image studies, and what it hands on."""
    zone = ensure_zone(ZoneSpec(studies=studies, images_per_study=1, image_kb=TINY_IMAGE_KB))
    staging_root = WORK_DIR / "plan-staging"
    shutil.rmtree(staging_root, ignore_errors=True)
    started = time.monotonic()
    plan = plan_batch(LocalLandingZone(zone.root), zone.batch_id)
    planned = time.monotonic()
    staging = Staging(LocalObjectStore(staging_root), zone.batch_id, run_key("bench__plan"))
    refs = staging.stage_plan(plan, studies_per_task())
    staged = time.monotonic()
    xcom = json.dumps(
        [{"batch_id": plan.batch_id, "chunk_ids": [chunk_id(ref["start"]) for ref in refs], "chunks": refs}]
    )
    shutil.rmtree(staging_root, ignore_errors=True)
    return {
        "studies": len(plan.groups),
        "plan_batch_s": planned - started,
        "stage_plan_s": staged - planned,
        "plan_json_bytes": len(plan.to_json()),
        "xcom_bytes": len(xcom),
        "mapped_tasks": len(refs),
        "studies_per_task": studies_per_task(),
    }


class ReadCountingStore(LocalObjectStore):
    """The local object store, counting the bytes its reads return."""

    bytes_read = 0

    def read_bytes(self, name: str) -> bytes | None:
        data = super().read_bytes(name)
        self.bytes_read += len(data or b"")
        return data


def plan_bytes_per_task(studies: int) -> dict[str, Any]:
    """Plan bytes each archive task of a `studies`-study batch reads: before, the batch's whole
    staged plan (`Staging.read_plan()`, then the task's slice); after, its own chunk plan
    (`Staging.read_chunk_plan()`, what the archive operator calls). Same staged data, same chunks
    (the chunk size the plan step picks for a run of this one batch)."""
    zone = ensure_zone(ZoneSpec(studies=studies, images_per_study=1, image_kb=TINY_IMAGE_KB))
    plan = plan_batch(LocalLandingZone(zone.root), zone.batch_id)
    staging_root = WORK_DIR / "plan-read-staging"
    shutil.rmtree(staging_root, ignore_errors=True)
    store = ReadCountingStore(staging_root)
    staging = Staging(store, zone.batch_id, run_key("bench__plan_read"))
    max_archive_tasks = Settings.load({"DICOM_LANDING_ROOT": "-"}.get).max_archive_tasks  # the default
    size = studies_per_chunk([len(plan.groups)], studies_per_task(), max_archive_tasks)
    refs = staging.stage_plan(plan, size)
    before, after = [], []
    for ref in refs:
        store.bytes_read = 0
        whole = staging.read_plan()
        sliced = whole.groups[ref["start"] : ref["stop"]]
        before.append(store.bytes_read)
        store.bytes_read = 0
        chunk = staging.read_chunk_plan(ref)
        after.append(store.bytes_read)
        if [g.to_dict() for g in chunk.groups] != [g.to_dict() for g in sliced] or chunk.deid != whole.deid:
            raise RuntimeError(f"chunk {chunk.chunk_id} differs from its slice of the whole plan")
    plan_bytes = len(store.read_bytes(staging.plan_name) or b"")
    shutil.rmtree(staging_root, ignore_errors=True)
    return {
        "studies": len(plan.groups),
        "tasks": len(refs),
        "studies_per_task": size,
        "plan_json_bytes": plan_bytes,
        "before_per_task": before,
        "after_per_task": after,
        "before_total": sum(before),
        "after_total": sum(after),
    }


def _mean_kb(values: list[int]) -> float:
    return sum(values) / len(values) / 1000 if values else 0.0


def run(ctx: Context) -> Result:
    runs = ctx.sizes.parse_runs
    direct, dagbag = parse_times(runs, "importlib"), parse_times(runs, "dagbag")
    airflow_ms = median([r["import_airflow_s"] for r in direct + dagbag]) * 1000
    dag_ms = median([r["dag_s"] for r in direct]) * 1000
    bag_ms = median([r["dag_s"] for r in dagbag]) * 1000
    bag_import_ms = median([r["dagbag_import_s"] for r in dagbag]) * 1000
    cost = plan_cost(ctx.sizes.plan_studies)
    reads = [plan_bytes_per_task(n) for n in ctx.sizes.plan_read_studies]
    per_study = cost["studies"]  # one task per study, the naive mapping
    rows = [
        ["`import airflow`", fmt(airflow_ms, 0) + " ms", "median of all runs"],
        ["exec dags/dicom_storage.py after `import airflow` (importlib)", fmt(dag_ms, 0) + " ms", f"median of {runs}"],
        [
            "DagBag(dag_folder=the file) after importing DagBag",
            fmt(bag_ms, 0) + " ms",
            f"median of {runs}; importing DagBag itself: {bag_import_ms:.0f} ms",
        ],
        [
            f"plan_batch, {cost['studies']} one-image studies",
            fmt(cost["plan_batch_s"], 2) + " s",
            f"{cost['plan_batch_s'] / cost['studies'] * 1000:.2f} ms a study",
        ],
        [
            "stage_plan (local store: one chunk plan per task, then plan.json)",
            fmt(cost["stage_plan_s"] * 1000, 0) + " ms",
            f"plan.json {cost['plan_json_bytes'] / 1e6:.2f} MB",
        ],
        [
            "archive_studies mapped tasks",
            str(cost["mapped_tasks"]),
            f"DICOM_STUDIES_PER_TASK={cost['studies_per_task']}; "
            f"{ratio(per_study, cost['mapped_tasks']):.0f}x fewer than one task per study",
        ],
        ["plan task XCom", f"{cost['xcom_bytes'] / 1000:.1f} kB", "the batch's chunk references"],
    ]
    for read in reads:
        worst_after = max(read["after_per_task"], default=0)
        rows.append(
            [
                f"plan bytes read per archive task, {read['studies']:,}-study batch "
                f"({read['tasks']} tasks of {read['studies_per_task']})",
                f"before {_mean_kb(read['before_per_task']):,.1f} kB, after {_mean_kb(read['after_per_task']):,.1f} kB",
                f"largest chunk plan {worst_after / 1000:,.1f} kB; all tasks of the batch: before "
                f"{read['before_total'] / 1e6:,.2f} MB, after {read['after_total'] / 1e6:,.3f} MB "
                f"({ratio(read['before_total'], read['after_total']):,.0f}x less) for a plan.json of "
                f"{read['plan_json_bytes'] / 1e6:,.3f} MB",
            ]
        )
    largest = max(reads, key=lambda r: r["studies"])
    read_factor = largest["after_total"] / largest["plan_json_bytes"]
    return Result(
        name="dag",
        title="6. DAG parse time and scheduler-side cost of a 5 000-study batch",
        columns=["what", "figure", "detail"],
        rows=rows,
        targets=[
            Target(
                "DAG parse beyond `import airflow`",
                f"<= {PARSE_GOAL_MS} ms",
                f"{dag_ms:.0f} ms",
                dag_ms <= PARSE_GOAL_MS,
            ),
            Target(
                f"plan bytes read by all archive tasks of a {largest['studies']:,}-study batch",
                f"<= {PLAN_READ_GOAL}x its plan.json",
                f"{read_factor:.2f}x (before: {largest['before_total'] / largest['plan_json_bytes']:.0f}x)",
                read_factor <= PLAN_READ_GOAL,
            ),
        ],
        notes=[
            "Each run is a fresh interpreter (`python -m bench.worker dag-parse`) with plugins/ on sys.path and a "
            "throwaway AIRFLOW_HOME; times are measured inside it with perf_counter, one warm-up run discarded.",
            f"The plan figures come from a landing zone of {cost['studies']} studies of one {TINY_IMAGE_KB} KiB image "
            "each, warm page cache.",
            "Plan bytes read per archive task: each batch is planned and staged once (`Staging.stage_plan`), then "
            "for each of its chunk references the bytes read from the store are counted for the way every task "
            "read before (`Staging.read_plan()`: the whole plan.json, then its slice) and for the way it reads "
            "now (`Staging.read_chunk_plan()`: its own `plans/<chunk_id>.json`), and the two are checked equal. "
            "The chunk size is the one the plan step picks (DICOM_STUDIES_PER_TASK, grown to stay under "
            "DICOM_MAX_ARCHIVE_TASKS). One-image studies: a study of many images has a larger plan, in both.",
        ],
        data={"parse_importlib": direct, "parse_dagbag": dagbag, "plan": cost, "plan_reads": reads},
    )
