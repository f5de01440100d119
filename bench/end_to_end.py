"""2. End to end per batch: plan + archive + upload + BigQuery load/merge, vs the sendit style."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import MB
from bench.context import Context
from bench.datasets import Zone, ensure_zone
from bench.results import Result, Target, fmt, ratio
from bench.sendit import ensure_table, sendit_batch
from dicom_archive.batch import Staging, archive_groups_spooled, chunk_id, run_key
from dicom_archive.bigquery_load import load_rows_exactly_once
from dicom_archive.landing import LocalLandingZone
from dicom_archive.ndjson import NdjsonSpool
from dicom_archive.plan import plan_batch
from dicom_archive.rows import RunContext
from dicom_archive.settings import ArchiveSettings, Settings
from dicom_archive.stores import GCSObjectStore
from tools.landing_zone import DEFAULT_COLLECTION

SPEEDUP_GOAL = 5.0
RUN_ID = "bench__end_to_end"


def studies_per_task() -> int:
    """What the DAG uses: DICOM_STUDIES_PER_TASK, or the setting's default."""
    given = {"DICOM_LANDING_ROOT": "-", "DICOM_STUDIES_PER_TASK": os.environ.get("DICOM_STUDIES_PER_TASK")}
    return Settings.load(given.get).studies_per_task


def ours_batch(zone: Zone, store: GCSObjectStore, client: Any) -> dict[str, float]:
    """The DAG's domain calls without Airflow: plan and stage it, archive each mapped chunk (each
    task reads its own chunk plan and stages its rows), then one exactly-once load of the rows."""
    landing = LocalLandingZone(zone.root)
    phases: dict[str, float] = {}
    started = time.monotonic()
    plan = plan_batch(landing, zone.batch_id)
    staging = Staging(store, zone.batch_id, run_key(RUN_ID))
    refs = staging.stage_plan(plan, studies_per_task())
    phases["plan + stage"] = time.monotonic() - started

    started = time.monotonic()
    context = RunContext(upload_agent="bench", dag_run_id=RUN_ID)
    for ref in refs:
        chunk = staging.read_chunk_plan(ref)
        with NdjsonSpool() as rows:  # as the archive task does
            summaries = archive_groups_spooled(
                chunk.groups, landing, store, rows=rows, deid=chunk.deid, context=context, settings=ArchiveSettings()
            )
            staging.write_chunk(chunk_id(ref["start"]), summaries, rows)
    phases["archive + upload"] = time.monotonic() - started

    started = time.monotonic()
    ndjson = staging.read_rows(chunk_id(ref["start"]) for ref in refs)
    loaded = load_rows_exactly_once(client, dataset_id=plan.collection or "", ndjson=ndjson, run_key=staging.run_key)
    phases["BigQuery load + MERGE"] = time.monotonic() - started
    if loaded.rows_inserted != zone.image_count:
        raise RuntimeError(f"loaded {loaded.rows_inserted} rows, expected {zone.image_count}")
    return phases


def run(ctx: Context) -> Result:
    zone = ensure_zone(ctx.sizes.e2e)
    emulators = ctx.emulators()
    storage, bigquery = emulators.storage_client(), emulators.bigquery_client()

    baseline_bucket = storage.create_bucket("bench-sendit")
    table_id = ensure_table(bigquery, "sendit_baseline")
    baseline = sendit_batch(zone.root / zone.batch_id, baseline_bucket, bigquery, table_id, DEFAULT_COLLECTION)

    store = GCSObjectStore(storage.create_bucket("bench-archive"))
    ours = ours_batch(zone, store, bigquery)

    total_base, total_ours = sum(baseline.values()), sum(ours.values())
    speedup = ratio(total_base, total_ours) or 0.0
    rows = [["sendit-style", phase, fmt(seconds, 2)] for phase, seconds in baseline.items()]
    rows += [["ours", phase, fmt(seconds, 2)] for phase, seconds in ours.items()]
    rows += [
        ["sendit-style", "total", f"{total_base:.2f} ({zone.image_bytes / MB / total_base:.1f} MB/s)"],
        ["ours", "total", f"{total_ours:.2f} ({zone.image_bytes / MB / total_ours:.1f} MB/s)"],
        ["ratio", "sendit / ours", f"{speedup:.1f}x"],
    ]
    return Result(
        name="e2e",
        title="2. End to end per batch (plan + archive + upload + BigQuery) vs sendit-style",
        columns=["pipeline", "phase", "seconds"],
        rows=rows,
        targets=[
            Target(
                "end to end per batch",
                f">= {SPEEDUP_GOAL:.0f}x sendit-style",
                f"{speedup:.1f}x",
                speedup >= SPEEDUP_GOAL,
            )
        ],
        notes=[
            f"One batch of {zone.spec.studies} CT studies x {zone.spec.images_per_study} images "
            f"({zone.image_count} images, {zone.image_bytes / MB:.0f} MB), warm page cache, one run each, "
            "against the Cloud Storage emulator (in memory) and the BigQuery emulator (local-bigquery) on loopback.",
            f"Ours: plan_batch + staged plan + archive_groups_spooled per mapped chunk of {studies_per_task()} studies "
            "(GCSObjectStore: streamed resumable upload, md5/crc32c verified) + staged rows + load_rows_exactly_once.",
            "Baseline: per study, pydicom header read per image, tarfile w:gz (level 9) to a temp file, "
            "upload_from_filename, then client.insert_rows_json(table, [row]) per image.",
        ],
        data={"baseline": baseline, "ours": ours, "input_bytes": zone.image_bytes, "images": zone.image_count},
    )
