"""6. DAG parse time beyond `import airflow`, and the scheduler-side cost of a 5 000-study batch."""

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
from dicom_archive.batch import Staging, chunk_id, chunk_refs, run_key
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import plan_batch
from dicom_archive.stores import LocalObjectStore

PARSE_GOAL_MS = 150
TINY_IMAGE_KB = 1


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
    refs = chunk_refs(plan, staging, studies_per_task())
    chunked = time.monotonic()
    staging.write_plan(plan)
    staged = time.monotonic()
    xcom = json.dumps(
        [{"batch_id": plan.batch_id, "chunk_ids": [chunk_id(ref["start"]) for ref in refs], "chunks": refs}]
    )
    shutil.rmtree(staging_root, ignore_errors=True)
    return {
        "studies": len(plan.groups),
        "plan_batch_s": planned - started,
        "chunk_refs_s": chunked - planned,
        "write_plan_s": staged - chunked,
        "plan_json_bytes": len(plan.to_json()),
        "xcom_bytes": len(xcom),
        "mapped_tasks": len(refs),
        "studies_per_task": studies_per_task(),
    }


def run(ctx: Context) -> Result:
    runs = ctx.sizes.parse_runs
    direct, dagbag = parse_times(runs, "importlib"), parse_times(runs, "dagbag")
    airflow_ms = median([r["import_airflow_s"] for r in direct + dagbag]) * 1000
    dag_ms = median([r["dag_s"] for r in direct]) * 1000
    bag_ms = median([r["dag_s"] for r in dagbag]) * 1000
    bag_import_ms = median([r["dagbag_import_s"] for r in dagbag]) * 1000
    cost = plan_cost(ctx.sizes.plan_studies)
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
        ["chunk_refs", fmt(cost["chunk_refs_s"] * 1000, 2) + " ms", ""],
        [
            "write_plan (local store)",
            fmt(cost["write_plan_s"] * 1000, 0) + " ms",
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
            )
        ],
        notes=[
            "Each run is a fresh interpreter (`python -m bench.worker dag-parse`) with plugins/ on sys.path and a "
            "throwaway AIRFLOW_HOME; times are measured inside it with perf_counter, one warm-up run discarded.",
            f"The plan figures come from a landing zone of {cost['studies']} studies of one {TINY_IMAGE_KB} KiB image "
            "each, warm page cache.",
        ],
        data={"parse_importlib": direct, "parse_dagbag": dagbag, "plan": cost},
    )
