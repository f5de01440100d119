"""BigQuery jobs under deterministic ids, so that a retried task re-attaches to the job it started.

A series of ids ends in the attempt number: attempt 0 first, the next only after one failed
(BigQuery never reuses an id). An id already taken (409) belongs to an earlier try: if that job is
running or succeeded, it is awaited and used instead of starting another one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import bigquery

Job = bigquery.LoadJob | bigquery.QueryJob
MAX_JOB_ATTEMPTS = 20  # each failed attempt burns an id; more than this is a real problem


class BigQueryJobError(RuntimeError):
    """A load or query job failed; the message carries BigQuery's own errors."""


def slug(key: str) -> str:
    """The readable part of an id made from a key (a digest beside it keeps apart keys that sanitize alike)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", key).strip("_")[:100] or "run"


def succeeded(job: Job) -> bool:
    """Wait for a job and tell whether it ended without error."""
    try:
        job.result()
    except gexc.GoogleAPICallError:
        return False
    return job.error_result is None


def run_job(
    client: bigquery.Client,
    job_id: Callable[[int], str],
    location: str | None,
    step: str,
    submit: Callable[[str], Job],
    usable: Callable[[Job], bool] = lambda job: True,
) -> Job:
    """`submit(job_id(attempt))` under the first free attempt id, awaited; a taken id whose job
    succeeded (and is still `usable`) is that job, one whose job failed is burnt."""
    for attempt in range(MAX_JOB_ATTEMPTS):
        try:
            job = submit(job_id(attempt))
        except gexc.Conflict:
            job = client.get_job(job_id(attempt), location=location)
            if succeeded(job) and usable(job):
                return job
            continue
        error = None
        try:
            job.result()
        except gexc.GoogleAPICallError as exc:
            error = exc
        if error is not None or job.error_result is not None:
            details = json.dumps({"error_result": job.error_result, "errors": job.errors}, default=str)
            raise BigQueryJobError(f"{step} job {job.job_id} failed: {details} ({error})") from error
        return job
    raise BigQueryJobError(f"{step}: {MAX_JOB_ATTEMPTS} attempts of {job_id(0)} all used")


def run_query(
    client: bigquery.Client,
    step: str,
    sql: str,
    params: Sequence[Any],
    job_id: Callable[[int], str],
    location: str | None,
) -> bigquery.QueryJob:
    """A parameterized statement under `run_job`'s deterministic ids."""
    config = bigquery.QueryJobConfig(query_parameters=list(params))

    def submit(this_id: str) -> bigquery.QueryJob:
        # job_retry=None: a retried query would need a new id, which defeats re-attaching.
        return client.query(sql, job_id=this_id, location=location, job_retry=None, job_config=config)

    return run_job(client, job_id, location, step, submit)


def dml_counts(job: bigquery.QueryJob) -> tuple[int, int, int]:
    """(inserted, updated, deleted) rows of a DML job; all as inserted where the backend reports only the total."""
    if (stats := getattr(job, "dml_stats", None)) is not None:
        return int(stats.inserted_row_count or 0), int(stats.updated_row_count or 0), int(stats.deleted_row_count or 0)
    return int(job.num_dml_affected_rows or 0), 0, 0
