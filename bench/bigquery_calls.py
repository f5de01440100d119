"""5. BigQuery jobs and HTTP calls per batch of rows, vs one streaming insert per row."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from bench.cloud import HttpCallCounter, job_count
from bench.context import Context
from bench.datasets import ensure_zone
from bench.nullstore import NullObjectStore
from bench.results import Result, Target, fmt, ratio
from dicom_archive.batch import archive_groups_spooled
from dicom_archive.bigquery_load import load_rows_exactly_once
from dicom_archive.bigquery_tables import ensure_dataset, ensure_table
from dicom_archive.landing import LocalLandingZone
from dicom_archive.ndjson import NdjsonSpool, to_ndjson
from dicom_archive.plan import plan_batch
from dicom_archive.rows import RunContext
from dicom_archive.settings import ArchiveSettings

JOBS_GOAL = 3


def template_rows(ctx: Context) -> list[dict[str, Any]]:
    """Real rows: one archived study of the CT data, built by the product code."""
    zone = ensure_zone(ctx.sizes.archive_zone("ct"))
    landing = LocalLandingZone(zone.root)
    plan = plan_batch(landing, zone.batch_id)
    context = RunContext(upload_agent="bench", dag_run_id="bench__bigquery")
    with NdjsonSpool() as rows:
        archive_groups_spooled(
            plan.groups[:1],
            landing,
            NullObjectStore(),
            rows=rows,
            deid=plan.deid,
            context=context,
            settings=ArchiveSettings(),
        )
        return list(rows)


def batch_rows(template: list[dict[str, Any]], count: int, salt: str) -> list[dict[str, Any]]:
    """`count` distinct images: the template's rows with new hashes and member names."""
    rows = []
    for index in range(count):
        row = dict(template[index % len(template)])
        row["instance_sha256"] = hashlib.sha256(f"{salt}/{index}".encode()).hexdigest()
        row["archive_member"] = f"bench/{salt}/{index:06d}.dcm"
        rows.append(row)
    return rows


def measure(client: Any, action: Any) -> dict[str, Any]:
    jobs_before = job_count(client)
    with HttpCallCounter(client) as counter:
        started = time.monotonic()
        action()
        seconds = time.monotonic() - started
    return {
        "seconds": seconds,
        "jobs": job_count(client) - jobs_before,
        "calls": counter.total,
        "routes": dict(counter.calls),
    }


def ours(client: Any, template: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """A first batch (dataset and table created) then a second one (table exists)."""
    dataset = f"bench_load_{count}"
    result = {}
    for label in ("first batch", "next batch"):
        ndjson = to_ndjson(batch_rows(template, count, f"{count}-{label}"))  # as the pipeline stages them

        def action(ndjson: bytes = ndjson, key: str = f"bench-{count}-{label}") -> None:
            loaded = load_rows_exactly_once(client, dataset_id=dataset, ndjson=ndjson, run_key=key)
            assert loaded.rows_inserted == count, loaded

        result[label] = measure(client, action)
    return result


def streaming(client: Any, template: list[dict[str, Any]], count: int) -> dict[str, Any]:
    dataset = f"bench_stream_{count}"
    ensure_dataset(client, dataset)
    ensure_table(client, dataset)
    table_id = f"{client.project}.{dataset}.dicom"
    rows = batch_rows(template, count, f"{count}-stream")

    def action() -> None:
        for row in rows:
            errors = client.insert_rows_json(table_id, [row])
            assert not errors, errors

    return measure(client, action)


def run(ctx: Context) -> Result:
    client = ctx.emulators().bigquery_client()
    template = template_rows(ctx)
    measured = {count: ours(client, template, count) for count in ctx.sizes.bigquery_rows}
    baseline = {count: streaming(client, template, count) for count in ctx.sizes.bigquery_baseline_rows}
    rows, targets = [], []
    for count, runs in measured.items():
        base = baseline.get(count)
        for label, m in runs.items():
            calls_ratio = f"{ratio(base['calls'], m['calls']):.0f}x fewer" if base else "baseline not run"
            rows.append([count, label, m["jobs"], m["calls"], fmt(m["seconds"], 2), calls_ratio])
        if base:
            rows.append([count, "baseline: insert per row", base["jobs"], base["calls"], fmt(base["seconds"], 2), "1x"])
        worst = max(m["jobs"] for m in runs.values())
        targets.append(
            Target(f"BigQuery jobs per batch, {count} images", f"<= {JOBS_GOAL}", str(worst), worst <= JOBS_GOAL)
        )
    return Result(
        name="bigquery",
        title="5. BigQuery jobs and API calls per batch",
        columns=["images", "batch", "jobs", "HTTP calls", "seconds", "calls vs baseline"],
        rows=rows,
        targets=targets,
        notes=[
            "Jobs: client.list_jobs(all_users=True) before and after. HTTP calls: every request through the "
            "client's `_http` session (JSON API calls and resumable-upload requests), counted by a wrapper.",
            "Rows are real rows of one archived CT study (product `archive_groups_spooled`), repeated with distinct "
            "instance_sha256. 'first batch' creates the dataset and table; 'next batch' finds them.",
            "Baseline: `client.insert_rows_json(table, [row])` per row (sendit style): no job, one call per row; "
            f"run for {', '.join(map(str, ctx.sizes.bigquery_baseline_rows))} rows only "
            "(tens of ms a row on the emulator: see its seconds).",
        ],
        data={"ours": {str(k): v for k, v in measured.items()}, "baseline": {str(k): v for k, v in baseline.items()}},
    )
