"""Exactly-once loading of a landing batch's image rows into the BigQuery table `dicom`.

Plain Python on `google.cloud.bigquery.Client` (production gets one from `BigQueryHook`), so it runs
the same against BigQuery and an emulator. A batch costs at most two jobs: a load into a scratch
table (expiring after a day) and one MERGE, which makes reruns and backfills no-ops. The MERGE names
the entity ids it may touch on the table's clustered column, so it reads only their blocks.

Every job runs under a deterministic id ending in the attempt number; the next attempt only after
one failed (BigQuery never reuses an id). A taken id (409) whose job succeeded is that job, awaited.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import bigquery

from dicom_archive import bigquery_tables as tables
from dicom_archive.bigquery_rows import check_rows
from dicom_archive.ndjson import DEDUPE_ORDER, ROW_KEY, NdjsonSpool

MAX_JOB_ATTEMPTS = 20  # each failed attempt burns an id; more than this is a real problem
Job = bigquery.LoadJob | bigquery.QueryJob


class BigQueryJobError(RuntimeError):
    """A load or query job failed; the message carries BigQuery's own errors. `code` and `errors`
    are the failure's HTTP status and reasons, kept so that the task can tell a refusal no retry
    can change (403 accessDenied, 404) from an outage or a rate limit (google_errors)."""

    def __init__(self, message: str, *, code: int | None = None, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.errors = errors or []


def job_key(kind: str, run_key: str, content: bytes) -> str:
    """`<kind>_<run key made readable>_<digest>`, the start of deterministic job ids: the digest of the
    run key and `content` (what the jobs do) keeps apart run keys that read alike, and other work."""
    digest = hashlib.sha256(run_key.encode() + b"\0" + content).hexdigest()[:24]
    readable = re.sub(r"[^A-Za-z0-9_]+", "_", run_key).strip("_")[:100] or "run"
    return f"{kind}_{readable}_{digest}"


def succeeded(job: Job) -> bool:
    try:
        job.result()  # waits; raises when the job ended with an error_result
    except gexc.GoogleAPICallError:
        return False
    return True


def run_job(
    client: bigquery.Client,
    key: str,
    location: str,
    submit: Callable[..., Job],
    usable: Callable[[Job], bool] = lambda job: True,
) -> Job:
    """`submit(job_id=...)` under `<key>_<attempt>`, the first free attempt, awaited; a taken id whose
    job succeeded (and is still `usable`) is that job, one whose job failed is burnt."""
    for attempt in range(MAX_JOB_ATTEMPTS):
        job_id = f"{key}_{attempt}"
        try:
            job = submit(job_id=job_id)
        except gexc.Conflict:
            job = client.get_job(job_id, location=location)
            if succeeded(job) and usable(job):
                return job
            continue
        try:
            job.result()
        except gexc.GoogleAPICallError as exc:
            details = {"error_result": job.error_result, "errors": job.errors}
            raise BigQueryJobError(f"job {job_id} failed: {details} ({exc})", code=exc.code, errors=exc.errors) from exc
        return job
    raise BigQueryJobError(f"{MAX_JOB_ATTEMPTS} attempts of job {key} all used")


def run_query(client: bigquery.Client, sql: str, params: Sequence[Any], key: str, location: str) -> bigquery.QueryJob:
    config = bigquery.QueryJobConfig(query_parameters=list(params))
    # job_retry=None: a retried query would need a new id, which defeats re-attaching.
    submit = functools.partial(client.query, sql, job_config=config, location=location, job_retry=None)
    return run_job(client, key, location, submit)


@dataclass(frozen=True)
class PreparedLoad:
    """Checked rows of one run of a batch (in a temporary file), and the deterministic names of all
    that loading them creates."""

    table_id: str
    scratch_table_id: str
    job_key: str  # jobs are <job_key>_<step>_<attempt>
    rows: NdjsonSpool
    row_count: int
    location: str
    columns_added: list[str]
    entity_ids: list[str]  # of the rows: what the MERGE may touch
    archive_uris: list[str]  # of the rows: the archives whose rows they define


@dataclass(frozen=True)
class LoadResult:
    table_id: str
    rows_in_batch: int
    columns_added: list[str]
    rows_inserted: int = 0
    rows_updated: int = 0  # rows moved to a replaced archive's new object
    rows_deleted: int = 0  # rows of images a replaced archive no longer holds
    load_job_id: str | None = None
    merge_job_id: str | None = None


def prepare_load(
    client: bigquery.Client, *, dataset_id: str, ndjson: bytes | Iterable[bytes], run_key: str, location: str = "US"
) -> PreparedLoad:
    """Check the rows first (a bad row leaves BigQuery untouched), then ensure the dataset and table.
    `ndjson`: the rows, or their parts in turn (each chunk's staged rows)."""
    if not run_key:
        raise ValueError("run_key must not be empty")
    table_id = tables.table_ref(client.project, dataset_id, tables.DEFAULT_TABLE)
    rows, entity_ids, archive_uris = NdjsonSpool(), set(), set()
    try:
        for row in check_rows([ndjson] if isinstance(ndjson, bytes) else ndjson, tables.load_schema()):
            rows.write(row)
            entity_ids.add(row["entity_id"])
            archive_uris.add(row["storage_uri"])
        with rows.stream() as checked:
            digest = hashlib.file_digest(checked, "sha256").digest()
        added = tables.ensure_table(client, dataset_id, location=location)
    except BaseException:
        rows.close()
        raise
    key = job_key(tables.DEFAULT_TABLE, run_key, table_id.encode() + b"\0" + digest)
    return PreparedLoad(
        table_id=table_id,
        scratch_table_id=f"{client.project}.{dataset_id}._scratch_{key}",
        job_key=key,
        rows=rows,
        row_count=len(rows),
        location=location,
        columns_added=added,
        entity_ids=sorted(entity_ids),
        archive_uris=sorted(archive_uris),
    )


def find_done_merge(client: bigquery.Client, load: PreparedLoad) -> bigquery.QueryJob | None:
    """The successful MERGE of an earlier try of this load, if any (waits for a running one)."""
    for attempt in range(MAX_JOB_ATTEMPTS):
        try:
            job = client.get_job(f"{load.job_key}_merge_{attempt}", location=load.location)
        except gexc.NotFound:
            return None
        if succeeded(job):
            return job
    return None


def load_scratch_table(client: bigquery.Client, load: PreparedLoad) -> bigquery.LoadJob:
    schema = tables.load_schema()
    scratch = bigquery.Table(load.scratch_table_id, schema=schema)
    scratch.expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)  # so one whose MERGE never ran goes too
    client.create_table(scratch, exists_ok=True)
    config = bigquery.LoadJobConfig(
        schema=schema, source_format="NEWLINE_DELIMITED_JSON", write_disposition="WRITE_TRUNCATE"
    )

    def rows_present(job: bigquery.LoadJob) -> bool:
        table = tables.get_table(client, load.scratch_table_id)
        return table is not None and table.num_rows == job.output_rows == load.row_count

    # No size given: a resumable upload, which every backend takes; rewound for each attempt.
    with load.rows.stream() as source:
        submit = functools.partial(
            client.load_table_from_file, source, scratch, rewind=True, location=load.location, job_config=config
        )
        return run_job(client, f"{load.job_key}_load", load.location, submit, rows_present)


def merge_sql(load: PreparedLoad) -> str:
    """One row per ROW_KEY: a new image is inserted; an image already there under the same archive
    but another generation (the archive was replaced) takes every new value; a row of one of the
    load's archives whose image is not in the load is deleted (the replaced archive no longer holds
    it). Rows of the same object and generation are left alone, so a rerun changes nothing.
    The column names are the schema file's, which BigQuery took when it created the table."""
    columns = [f.name for f in tables.load_schema()]
    return (
        f"MERGE `{load.table_id}` AS T\nUSING (\n  SELECT * FROM `{load.scratch_table_id}`\n"
        # WHERE TRUE: BigQuery accepts QUALIFY only next to WHERE, GROUP BY or HAVING.
        f"  WHERE TRUE\n  QUALIFY ROW_NUMBER() OVER (PARTITION BY {', '.join(f'`{c}`' for c in ROW_KEY)}"
        f" ORDER BY {', '.join(f'`{c}`' for c in DEDUPE_ORDER)}) = 1\n) AS S\n"
        f"ON {' AND '.join(f'T.`{c}` = S.`{c}`' for c in ROW_KEY)} AND T.`entity_id` IN UNNEST(@entity_ids)\n"
        f"WHEN MATCHED AND T.`storage_uri` = S.`storage_uri`\n"
        f"  AND T.`storage_generation` IS DISTINCT FROM S.`storage_generation` THEN\n"
        f"  UPDATE SET {', '.join(f'`{c}` = S.`{c}`' for c in columns if c not in ROW_KEY)}\n"
        f"WHEN NOT MATCHED THEN\n  INSERT ({', '.join(f'`{c}`' for c in columns)})\n"
        f"  VALUES ({', '.join(f'S.`{c}`' for c in columns)})\n"
        f"WHEN NOT MATCHED BY SOURCE AND T.`entity_id` IN UNNEST(@entity_ids)\n"
        f"  AND T.`storage_uri` IN UNNEST(@archive_uris) THEN\n  DELETE\n"
    )


def run_merge(client: bigquery.Client, load: PreparedLoad) -> bigquery.QueryJob:
    params = [
        bigquery.ArrayQueryParameter("entity_ids", "STRING", load.entity_ids),
        bigquery.ArrayQueryParameter("archive_uris", "STRING", load.archive_uris),
    ]
    return run_query(client, merge_sql(load), params, f"{load.job_key}_merge", load.location)


def load_rows_exactly_once(client: bigquery.Client, **prepare: Any) -> LoadResult:
    """Takes prepare_load's arguments. Its `run_key` names the run of the batch (e.g.
    "<dag_run_id>/<batch_id>"): the same key and rows give the same job ids."""
    load = prepare_load(client, **prepare)
    with load.rows:
        if load.row_count == 0:
            return LoadResult(load.table_id, 0, load.columns_added)
        merge_job, load_job_id = find_done_merge(client, load), None
        if merge_job is None:
            load_job_id = load_scratch_table(client, load).job_id
            merge_job = run_merge(client, load)
            # An API call, not a job; the table's expiry covers a crash before this line.
            client.delete_table(load.scratch_table_id, not_found_ok=True)
    stats = merge_job.dml_stats
    counts = (stats.inserted_row_count, stats.updated_row_count, stats.deleted_row_count)
    return LoadResult(load.table_id, load.row_count, load.columns_added, *counts, load_job_id, merge_job.job_id)
