"""Exactly-once loading of image rows into the BigQuery table `dicom`.

Plain Python on top of `google.cloud.bigquery.Client` (production gets one from
`BigQueryHook.get_client(project_id=...)`), so it runs the same against BigQuery and an emulator.

One batch costs at most two BigQuery jobs: a load into a per-run staging table and one MERGE.
The MERGE inserts rows whose (collection, instance_sha256) is not in the table yet, brings the
rows of an archive that was replaced (a correction) up to the new object, and deletes the rows of
images the batch's archives no longer hold. Both job ids are derived from the run key and a hash
of the rows, so a retry re-attaches to the job it started instead of running it twice; the MERGE
makes reruns and backfills no-ops.

Cost O(batch), not O(table): the table is clustered by entity_id, and every statement on it
(the MERGE, the withdrawal DELETE) names the entity ids it may touch as a constant list (a query
parameter), on the target's clustered column, so BigQuery reads only those entities' blocks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import bigquery

from dicom_archive.resources import include_dir

SCHEMA_PATH = include_dir() / "schemas" / "dicom.json"

DEFAULT_TABLE = "dicom"
ROW_KEY = ("collection", "instance_sha256")
# Tie-breakers after uploaded_at so the row kept among duplicates does not depend on scan order.
DEDUPE_ORDER = ("uploaded_at", "storage_uri", "archive_member")
PARTITION_FIELD = "uploaded_at"
CLUSTER_FIELDS = ("entity_id", "item_id")
STAGING_TTL = dt.timedelta(days=1)
# Each failed attempt burns a job id (BigQuery never reuses one); more than this is a real problem.
MAX_JOB_ATTEMPTS = 20

_PROJECT_RE = re.compile(r"^[A-Za-z0-9_-]{1,1024}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Job = bigquery.LoadJob | bigquery.QueryJob

# BigQuery reports legacy and standard names for the same type.
_TYPE_ALIASES = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "STRUCT": "RECORD"}


class RowError(ValueError):
    """A row does not fit the schema; `row` is the 1-based NDJSON line, `column` the field."""

    def __init__(self, errors: Sequence[tuple[int, str | None, str]]) -> None:
        self.errors = list(errors)
        self.row, self.column, self.problem = self.errors[0]
        shown = "; ".join(_describe(*err) for err in self.errors[:10])
        more = f" (and {len(self.errors) - 10} more)" if len(self.errors) > 10 else ""
        super().__init__(f"{len(self.errors)} bad row value(s): {shown}{more}")


class SchemaConflictError(RuntimeError):
    """An existing column has another type or mode than wanted; nothing is changed."""


class BigQueryJobError(RuntimeError):
    """A load or query job failed; the message carries BigQuery's own errors."""


def _describe(row: int, column: str | None, problem: str) -> str:
    return f"row {row}" + (f", column {column!r}" if column else "") + f": {problem}"


# --------------------------------------------------------------------------------------- identifiers


def check_project(project: str) -> str:
    if not _PROJECT_RE.match(project or ""):
        raise ValueError(f"invalid BigQuery project id {project!r}")
    return project


def check_name(name: str, what: str = "dataset or table") -> str:
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"invalid BigQuery {what} name {name!r} (allowed: A-Z a-z 0-9 _)")
    return name


def table_ref(project: str, dataset_id: str, table: str) -> str:
    """`project.dataset.table` after validating each part (safe to backquote in SQL)."""
    return f"{check_project(project)}.{check_name(dataset_id, 'dataset')}.{check_name(table, 'table')}"


# --------------------------------------------------------------------------------------------- schema


def load_schema(path: str | Path | None = None) -> list[bigquery.SchemaField]:
    """The table schema from a BigQuery JSON schema file (default include/schemas/dicom.json)."""
    with open(path or SCHEMA_PATH, encoding="utf-8") as fh:
        return [bigquery.SchemaField.from_api_repr(item) for item in json.load(fh)]


def _type(f: bigquery.SchemaField) -> str:
    return _TYPE_ALIASES.get(f.field_type.upper(), f.field_type.upper())


def _mode(f: bigquery.SchemaField) -> str:
    return (f.mode or "NULLABLE").upper()


def _conflict(existing: bigquery.SchemaField, wanted: bigquery.SchemaField) -> str | None:
    if _type(existing) != _type(wanted):
        return f"type {_type(existing)} in the table, {_type(wanted)} wanted"
    old, new = _mode(existing), _mode(wanted)
    if (old == "REPEATED") != (new == "REPEATED") or (old == "REQUIRED" and new == "NULLABLE"):
        return f"mode {old} in the table, {new} wanted"
    # NULLABLE in the table but REQUIRED wanted is fine: BigQuery cannot tighten a mode, and
    # validate_rows still enforces REQUIRED before anything is loaded.
    return None


def evolve_for_rows(
    schema: Sequence[bigquery.SchemaField],
    rows: Sequence[Mapping[str, Any]],
    numbers: Sequence[int] | None = None,
) -> list[bigquery.SchemaField]:
    """`schema` plus a NULLABLE column for every top-level row key it lacks, in order of appearance.

    The type is inferred from the values: BOOLEAN, INTEGER, FLOAT (ints and floats mixed), else STRING.
    """
    known = {f.name.lower() for f in schema}
    seen: dict[str, set[str]] = {}
    for number, row in zip(numbers or range(1, len(rows) + 1), rows, strict=True):
        for key, value in row.items():
            if key.lower() in known:
                continue
            if not _COLUMN_RE.match(key):
                raise RowError([(number, key, "not a valid BigQuery column name")])
            kinds = seen.setdefault(key, set())
            if value is not None:
                kinds.add(_infer_type(value))
    added = [bigquery.SchemaField(key, _merge_kinds(kinds), mode="NULLABLE") for key, kinds in seen.items()]
    return [*schema, *added]


def _infer_type(value: Any) -> str:
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "INTEGER"
    if isinstance(value, float):
        return "FLOAT"
    return "STRING"


def _merge_kinds(kinds: set[str]) -> str:
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds == {"INTEGER", "FLOAT"}:
        return "FLOAT"
    return "STRING"


# ------------------------------------------------------------------------------------ dataset, table


def ensure_dataset(client: bigquery.Client, dataset_id: str, location: str = "US") -> bigquery.Dataset:
    """The dataset, created in `location` if missing (an existing one keeps its location)."""
    ref = bigquery.DatasetReference(check_project(client.project), check_name(dataset_id, "dataset"))
    try:
        # Look first: a service account may read and write a dataset it has no right to create.
        return client.get_dataset(ref)
    except gexc.NotFound:
        pass
    dataset = bigquery.Dataset(ref)
    dataset.location = location
    return client.create_dataset(dataset, exists_ok=True)


def _get_table(client: bigquery.Client, table_id: str) -> bigquery.Table | None:
    try:
        return client.get_table(table_id)
    except gexc.NotFound:
        return None


def ensure_table(
    client: bigquery.Client,
    dataset_id: str,
    table: str = DEFAULT_TABLE,
    schema: Sequence[bigquery.SchemaField] | None = None,
) -> list[str]:
    """Create the table (day partitions on uploaded_at, clustered) or add the columns it lacks.

    Returns the names of the columns added to an existing table. Raises SchemaConflictError if an
    existing column has another type or mode; columns are never dropped or retyped.
    """
    wanted = list(schema) if schema is not None else load_schema()
    table_id = table_ref(client.project, dataset_id, table)
    for _ in range(3):  # the schema update is guarded by the table's etag: re-read if it moved
        existing = _get_table(client, table_id)
        if existing is None:
            new = bigquery.Table(table_id, schema=wanted)
            new.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field=PARTITION_FIELD
            )
            new.clustering_fields = list(CLUSTER_FIELDS)
            try:
                client.create_table(new)
                return []
            except gexc.Conflict:  # created concurrently: evolve it like any existing table
                continue
        missing = _missing_columns(existing.schema, wanted)
        if not missing:
            return []
        existing.schema = [*existing.schema, *missing]
        try:
            client.update_table(existing, ["schema"])
            return [f.name for f in missing]
        except gexc.PreconditionFailed:
            continue
    raise RuntimeError(f"could not update the schema of {table_id}: it kept changing")


def _missing_columns(
    existing: Sequence[bigquery.SchemaField], wanted: Sequence[bigquery.SchemaField]
) -> list[bigquery.SchemaField]:
    by_name = {f.name.lower(): f for f in existing}
    conflicts, missing = [], []
    for want in wanted:
        have = by_name.get(want.name.lower())
        if have is None:
            # A new column of an existing table can only be NULLABLE (or REPEATED).
            mode = "REPEATED" if _mode(want) == "REPEATED" else "NULLABLE"
            missing.append(
                bigquery.SchemaField(
                    want.name, want.field_type, mode=mode, description=want.description, fields=want.fields
                )
            )
        elif problem := _conflict(have, want):
            conflicts.append(f"{want.name}: {problem}")
    if conflicts:
        raise SchemaConflictError("schema conflict, table left unchanged: " + "; ".join(conflicts))
    return missing


def _effective_schema(
    existing: bigquery.Table | None, wanted: Sequence[bigquery.SchemaField]
) -> list[bigquery.SchemaField]:
    """`wanted` plus the columns an earlier run added to the table, so their types are reused."""
    if existing is None:
        return list(wanted)
    names = {f.name.lower() for f in wanted}
    return [*wanted, *(f for f in existing.schema if f.name.lower() not in names)]


# ----------------------------------------------------------------------------------------- row checks


class _Bad(ValueError):
    pass


def parse_rows(rows: Sequence[Mapping[str, Any]] | bytes) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows as dicts, with the 1-based number each one is reported under.

    For NDJSON bytes that is the line number (blank lines are skipped but counted).
    """
    if not isinstance(rows, bytes | bytearray):
        parsed = [dict(row) for row in rows]
        return parsed, list(range(1, len(parsed) + 1))
    parsed, numbers, errors = [], [], []
    for number, line in enumerate(bytes(rows).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            errors.append((number, None, f"not valid JSON ({exc})"))
            continue
        if not isinstance(value, dict):
            errors.append((number, None, "not a JSON object"))
        else:
            parsed.append(value)
            numbers.append(number)
    if errors:
        raise RowError(errors)
    return parsed, numbers


def validate_rows(
    rows: Sequence[Mapping[str, Any]],
    schema: Sequence[bigquery.SchemaField],
    numbers: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Rows checked against `schema` and normalized for an NDJSON load.

    Checks what the emulators report poorly: unknown columns, REQUIRED values, and that every value
    fits its type. Raises RowError naming each bad row (`numbers`, default 1-based position) and column.
    """
    fields = {f.name.lower(): f for f in schema}
    required = [f for f in schema if _mode(f) == "REQUIRED"]
    out, errors = [], []
    for number, row in zip(numbers or range(1, len(rows) + 1), rows, strict=True):
        clean: dict[str, Any] = {}
        for key, value in row.items():
            f = fields.get(str(key).lower())
            if f is None:
                errors.append((number, key, "column not in the table schema"))
            elif f.name in clean:
                errors.append((number, key, f"given twice (as {f.name!r} too)"))
            else:
                try:
                    clean[f.name] = _coerce_field(f, value)
                except _Bad as exc:
                    errors.append((number, f.name, str(exc)))
        errors.extend((number, f.name, "REQUIRED value missing") for f in required if clean.get(f.name) is None)
        out.append(clean)
    if errors:
        raise RowError(errors)
    return out


def _coerce_field(f: bigquery.SchemaField, value: Any) -> Any:
    if _mode(f) == "REPEATED":
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise _Bad(f"REPEATED {_type(f)} expects a list, got {type(value).__name__}")
        if any(item is None for item in value):
            raise _Bad("REPEATED values cannot contain null")
        return [_coerce(_type(f), item) for item in value]
    return None if value is None else _coerce(_type(f), value)


def _coerce(kind: str, value: Any) -> Any:
    coerce = _COERCERS.get(kind)
    # Types this project does not use (NUMERIC, RECORD, ...) are left for BigQuery to check.
    return value if coerce is None else coerce(value)


def _to_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _Bad(f"STRING expects a string, got {type(value).__name__}")


def _to_integer(value: Any) -> int:
    if isinstance(value, bool):
        raise _Bad("INTEGER expects an integer, got bool")
    if isinstance(value, str) and _INT_RE.match(value.strip()):
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise _Bad(f"INTEGER expects an integer, got {value!r}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _Bad(f"INTEGER out of the INT64 range: {value}")
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Bad("FLOAT expects a number, got bool")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Bad(f"FLOAT expects a number, got {value!r}") from None
    if not math.isfinite(number):  # NaN and infinity have no NDJSON spelling
        raise _Bad(f"FLOAT expects a finite number, got {value!r}")
    return number


def _to_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Bad(f"BOOLEAN expects true or false, got {value!r}")


def _to_date(value: Any) -> str:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str) and _DATE_RE.match(value):
        try:
            return dt.date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    raise _Bad(f"DATE expects 'YYYY-MM-DD', got {value!r}")


def _to_timestamp(value: Any) -> str:
    stamp = value
    if isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            stamp = None
    if not isinstance(stamp, dt.datetime):
        raise _Bad(f"TIMESTAMP expects an RFC 3339 string such as '2024-01-31T12:00:00Z', got {value!r}")
    if stamp.tzinfo is None:  # BigQuery reads a timestamp without offset as UTC; so do we
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _to_json(value: Any) -> Any:
    if not isinstance(value, dict | list):
        raise _Bad(f"JSON expects an object or array, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"JSON value cannot be serialized: {exc}") from None
    return value


_COERCERS: dict[str, Callable[[Any], Any]] = {
    "STRING": _to_string,
    "INTEGER": _to_integer,
    "FLOAT": _to_float,
    "BOOLEAN": _to_boolean,
    "DATE": _to_date,
    "TIMESTAMP": _to_timestamp,
    "JSON": _to_json,
}


def to_ndjson(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """Canonical NDJSON (sorted keys), so the same rows always hash to the same job ids."""
    lines = (json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for row in rows)
    return "".join(line + "\n" for line in lines).encode("utf-8")


# --------------------------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class Batch:
    """A validated batch and the deterministic names of everything it will create."""

    project: str
    dataset_id: str
    table: str
    run_key: str
    schema: list[bigquery.SchemaField]
    ndjson: bytes
    row_count: int
    digest: str
    location: str | None
    columns_added: list[str] = field(default_factory=list)
    entity_ids: tuple[str, ...] = ()  # of the batch's rows: what the statements may touch
    archive_uris: tuple[str, ...] = ()  # of the batch's rows: the archives whose rows it defines

    @property
    def table_id(self) -> str:
        return f"{self.project}.{self.dataset_id}.{self.table}"

    @property
    def staging_table_id(self) -> str:
        return f"{self.project}.{self.dataset_id}._staging_{self.table}_{_slug(self.run_key)}_{self.digest[:12]}"

    def job_id(self, step: str, attempt: int) -> str:
        return f"{self.table}_{step}_{_slug(self.run_key)}_{self.digest}_{attempt}"


@dataclass(frozen=True)
class LoadResult:
    rows_in_batch: int
    rows_inserted: int
    table_id: str
    load_job_id: str | None
    merge_job_id: str | None
    staging_table_id: str | None
    columns_added: list[str] = field(default_factory=list)
    reattached: bool = False  # the MERGE had already run (an earlier try of the same batch)
    rows_updated: int = 0  # rows moved to a replaced archive's new object
    rows_deleted: int = 0  # rows of images a replaced archive no longer holds


def _slug(run_key: str) -> str:
    # Readable part only; the digest keeps distinct keys that sanitize alike apart.
    return re.sub(r"[^A-Za-z0-9_]+", "_", run_key).strip("_")[:100] or "run"


def prepare_batch(
    client: bigquery.Client,
    *,
    dataset_id: str,
    rows: Sequence[Mapping[str, Any]] | bytes,
    run_key: str,
    table: str = DEFAULT_TABLE,
    schema: Sequence[bigquery.SchemaField] | None = None,
    location: str | None = None,
) -> Batch:
    """Validate the rows, then make sure the dataset and the (evolved) table exist.

    Validation runs before any change, so a bad row leaves BigQuery untouched.
    """
    if not run_key:
        raise ValueError("run_key must not be empty")
    project = check_project(client.project)
    table_id = table_ref(project, dataset_id, table)
    parsed, numbers = parse_rows(rows)
    existing = _get_table(client, table_id)
    wanted = evolve_for_rows(_effective_schema(existing, schema or load_schema()), parsed, numbers)
    if existing is not None:
        _missing_columns(existing.schema, wanted)  # raises SchemaConflictError before any change
    ndjson = to_ndjson(validate_rows(parsed, wanted, numbers))
    dataset = ensure_dataset(client, dataset_id, location or "US")
    added = ensure_table(client, dataset_id, table, wanted)
    digest = hashlib.sha256(b"\0".join([run_key.encode(), table_id.encode(), ndjson])).hexdigest()[:24]
    return Batch(
        project=project,
        dataset_id=dataset_id,
        table=table,
        run_key=run_key,
        schema=wanted,
        ndjson=ndjson,
        row_count=len(parsed),
        digest=digest,
        location=location or dataset.location,
        columns_added=added,
        entity_ids=tuple(sorted({str(row.get("entity_id")) for row in parsed if row.get("entity_id")})),
        archive_uris=tuple(sorted({str(row.get("storage_uri")) for row in parsed if row.get("storage_uri")})),
    )


# ---------------------------------------------------------------------------------------------- jobs


def _succeeded(job: Job) -> bool:
    """Wait for a job and tell whether it ended without error."""
    try:
        job.result()
    except gexc.GoogleAPICallError:
        return False
    return job.error_result is None


def _raise_job_error(job: Job, what: str, exc: Exception | None = None) -> None:
    details = json.dumps({"error_result": job.error_result, "errors": job.errors}, default=str)
    raise BigQueryJobError(f"{what} job {job.job_id} failed: {details}") from exc


def _run_or_reattach(
    client: bigquery.Client,
    batch: Batch,
    step: str,
    submit: Callable[[str], Job],
    usable: Callable[[Job], bool] = lambda job: True,
) -> Job:
    """Run `submit(job_id)` under the step's first free attempt id and wait for it (see run_job)."""
    return run_job(client, lambda attempt: batch.job_id(step, attempt), batch.location, step, submit, usable)


def run_job(
    client: bigquery.Client,
    job_id: Callable[[int], str],
    location: str | None,
    step: str,
    submit: Callable[[str], Job],
    usable: Callable[[Job], bool] = lambda job: True,
) -> Job:
    """Run `submit(job_id(attempt))` under the first free attempt id and wait for it.

    An attempt id already taken (409) belongs to an earlier try: if that job is running or
    succeeded and is still `usable`, wait for it and return it instead of starting another one.
    """
    for attempt in range(MAX_JOB_ATTEMPTS):
        this_id = job_id(attempt)
        try:
            job = submit(this_id)
        except gexc.Conflict:
            job = client.get_job(this_id, location=location)
            if _succeeded(job) and usable(job):
                return job
            continue  # that attempt failed or its output is gone: its id is burnt
        try:
            job.result()
        except gexc.GoogleAPICallError as exc:
            _raise_job_error(job, step, exc)
        if job.error_result is not None:
            _raise_job_error(job, step)
        return job
    raise BigQueryJobError(f"{step}: {MAX_JOB_ATTEMPTS} attempts of {job_id(0)} all used")


def find_done_merge(client: bigquery.Client, batch: Batch) -> bigquery.QueryJob | None:
    """The successful MERGE of an earlier try of this batch, if any (waits for a running one)."""
    for attempt in range(MAX_JOB_ATTEMPTS):
        try:
            job = client.get_job(batch.job_id("merge", attempt), location=batch.location)
        except gexc.NotFound:
            return None
        if _succeeded(job):
            return job
    return None


def stage_batch(client: bigquery.Client, batch: Batch) -> bigquery.LoadJob:
    """Load the batch into its staging table (one load job, or the earlier try's)."""
    staging = bigquery.Table(batch.staging_table_id, schema=batch.schema)
    # Expiry on the table itself, so a staging table whose MERGE never ran cleans itself up.
    staging.expires = dt.datetime.now(dt.UTC) + STAGING_TTL
    client.create_table(staging, exists_ok=True)
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
        schema=batch.schema,
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
        create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        max_bad_records=0,
    )

    def submit(job_id: str) -> bigquery.LoadJob:
        # No size given: the client then uses a resumable upload, which every backend accepts.
        return client.load_table_from_file(
            io.BytesIO(batch.ndjson),
            batch.staging_table_id,
            job_id=job_id,
            location=batch.location,
            job_config=config,
        )

    def staged_rows_present(job: bigquery.LoadJob) -> bool:
        table = _get_table(client, batch.staging_table_id)
        return table is not None and table.num_rows == job.output_rows == batch.row_count

    return _run_or_reattach(client, batch, "load", submit, staged_rows_present)


def merge_sql(batch: Batch) -> str:
    """MERGE of the staging table into the table, one row per (collection, instance_sha256).

    - a new image: inserted;
    - an image already in the table under the same archive but another generation (the archive
      was replaced): every column takes the new value (storage fields, member name, run);
    - a row of one of the batch's archives whose image is not in the batch: deleted (the
      replaced archive no longer holds it).
    Rows of the same object and generation are left alone, so a rerun changes nothing.
    `@entity_ids` (the batch's, a constant list on the clustered column) bounds what is read.
    """
    columns = [f.name for f in batch.schema]
    names = {c.lower() for c in columns}
    for name in columns:
        if not _COLUMN_RE.match(name):
            raise ValueError(f"invalid column name {name!r}")
    order = ", ".join(f"`{c}`" for c in DEDUPE_ORDER if c.lower() in names)
    key = ", ".join(f"`{c}`" for c in ROW_KEY)
    on = " AND ".join(f"T.`{c}` = S.`{c}`" for c in ROW_KEY)
    updates = ", ".join(f"`{c}` = S.`{c}`" for c in columns if c not in ROW_KEY)
    # WHERE TRUE: BigQuery accepts QUALIFY only next to WHERE, GROUP BY or HAVING.
    return (
        f"MERGE `{batch.table_id}` AS T\n"
        f"USING (\n"
        f"  SELECT * FROM `{batch.staging_table_id}`\n"
        f"  WHERE TRUE\n"
        f"  QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {order}) = 1\n"
        f") AS S\n"
        f"ON {on} AND T.`entity_id` IN UNNEST(@entity_ids)\n"
        f"WHEN MATCHED AND T.`storage_uri` = S.`storage_uri`\n"
        f"  AND T.`storage_generation` IS DISTINCT FROM S.`storage_generation` THEN\n"
        f"  UPDATE SET {updates}\n"
        f"WHEN NOT MATCHED THEN\n"
        f"  INSERT ({', '.join(f'`{c}`' for c in columns)})\n"
        f"  VALUES ({', '.join(f'S.`{c}`' for c in columns)})\n"
        f"WHEN NOT MATCHED BY SOURCE AND T.`entity_id` IN UNNEST(@entity_ids)\n"
        f"  AND T.`storage_uri` IN UNNEST(@archive_uris) THEN\n"
        f"  DELETE\n"
    )


def merge_parameters(batch: Batch) -> list[bigquery.ArrayQueryParameter]:
    return [
        bigquery.ArrayQueryParameter("entity_ids", "STRING", list(batch.entity_ids)),
        bigquery.ArrayQueryParameter("archive_uris", "STRING", list(batch.archive_uris)),
    ]


def merge_batch(client: bigquery.Client, batch: Batch) -> bigquery.QueryJob:
    """Run (or re-attach to) the batch's MERGE from its staging table into the table."""
    sql = merge_sql(batch)
    config = bigquery.QueryJobConfig(query_parameters=merge_parameters(batch))

    def submit(job_id: str) -> bigquery.QueryJob:
        # job_retry=None: a retried query would need a new id, which defeats re-attaching.
        return client.query(sql, job_id=job_id, location=batch.location, job_retry=None, job_config=config)

    return _run_or_reattach(client, batch, "merge", submit)


def dml_counts(job: bigquery.QueryJob) -> tuple[int, int, int]:
    """(inserted, updated, deleted) rows of a DML job; all of it as inserted where the backend
    reports only the total."""
    stats = getattr(job, "dml_stats", None)
    if stats is not None:
        return int(stats.inserted_row_count or 0), int(stats.updated_row_count or 0), int(stats.deleted_row_count or 0)
    return int(job.num_dml_affected_rows or 0), 0, 0


def load_rows_exactly_once(
    client: bigquery.Client,
    *,
    dataset_id: str,
    rows: Sequence[Mapping[str, Any]] | bytes,
    run_key: str,
    table: str = DEFAULT_TABLE,
    location: str | None = None,
    schema: Sequence[bigquery.SchemaField] | None = None,
) -> LoadResult:
    """Insert the rows whose (collection, instance_sha256) is new; reruns and retries are no-ops.

    `run_key` names the batch (e.g. "<dag_run_id>/<batch_id>"); the same key and rows give the
    same job ids, so a retry re-attaches to the jobs of the try it replaces.
    """
    batch = prepare_batch(
        client, dataset_id=dataset_id, rows=rows, run_key=run_key, table=table, schema=schema, location=location
    )
    if batch.row_count == 0:
        return LoadResult(0, 0, batch.table_id, None, None, None, batch.columns_added)
    done = find_done_merge(client, batch)
    if done is not None:
        return _result(batch, None, done, reattached=True)
    load_job = stage_batch(client, batch)
    merge_job = merge_batch(client, batch)
    # An API call, not a job; the table's expiry covers a crash before this line.
    client.delete_table(batch.staging_table_id, not_found_ok=True)
    return _result(batch, load_job.job_id, merge_job, reattached=False)


def _result(batch: Batch, load_job_id: str | None, merge_job: bigquery.QueryJob, *, reattached: bool) -> LoadResult:
    inserted, updated, deleted = dml_counts(merge_job)
    return LoadResult(
        rows_in_batch=batch.row_count,
        rows_inserted=inserted,
        rows_updated=updated,
        rows_deleted=deleted,
        table_id=batch.table_id,
        load_job_id=load_job_id,
        merge_job_id=merge_job.job_id,
        staging_table_id=batch.staging_table_id,
        columns_added=batch.columns_added,
        reattached=reattached,
    )


# ----------------------------------------------------------------------------------------- withdrawals

WITHDRAWALS_TABLE = "withdrawals"
WITHDRAWALS_SCHEMA = [
    bigquery.SchemaField("request_id", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("collection", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("entity_id", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("item_id", "STRING"),  # NULL: the whole entity (patient)
    bigquery.SchemaField("reason", "STRING"),
    bigquery.SchemaField("source", "STRING"),
    bigquery.SchemaField("requested_at", "TIMESTAMP"),
    bigquery.SchemaField("completed_at", "TIMESTAMP", mode="REQUIRED"),
    bigquery.SchemaField("objects_deleted", "INTEGER"),
    bigquery.SchemaField("versions_deleted", "INTEGER"),
    bigquery.SchemaField("rows_deleted", "INTEGER"),
    bigquery.SchemaField("dag_run_id", "STRING"),
]


def ensure_withdrawals_table(client: bigquery.Client, dataset_id: str, location: str | None = None) -> str:
    """The collection's `withdrawals` log (one row per completed request), created if missing."""
    ensure_dataset(client, dataset_id, location or "US")
    table_id = table_ref(client.project, dataset_id, WITHDRAWALS_TABLE)
    if _get_table(client, table_id) is None:
        client.create_table(bigquery.Table(table_id, schema=WITHDRAWALS_SCHEMA), exists_ok=True)
    return table_id


def withdraw_rows_sql(table_id: str, *, whole_entity: bool) -> str:
    """DELETE of one entity's (or one study's) rows. The entity is a constant on the clustered
    column, so BigQuery reads only that entity's blocks."""
    study = "" if whole_entity else "\n  AND `item_id` = @item_id"
    return (
        f"DELETE FROM `{table_id}`\nWHERE `entity_id` IN UNNEST(@entity_ids)\n  AND `collection` = @collection{study}\n"
    )


def withdrawal_log_sql(table_id: str) -> str:
    """Insert the request's log row once (a rerun or a retry finds it there)."""
    columns = [f.name for f in WITHDRAWALS_SCHEMA]
    select = ",\n    ".join(f"@{c} AS `{c}`" for c in columns)
    return (
        f"MERGE `{table_id}` AS T\n"
        f"USING (SELECT\n    {select}) AS S\n"
        f"ON T.`request_id` = S.`request_id`\n"
        f"WHEN NOT MATCHED THEN\n"
        f"  INSERT ({', '.join(f'`{c}`' for c in columns)})\n"
        f"  VALUES ({', '.join(f'S.`{c}`' for c in columns)})\n"
    )


def _withdraw_job_id(request_id: str, key: str, step: str) -> Callable[[int], str]:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return lambda attempt: f"withdraw_{step}_{_slug(request_id)}_{digest}_{attempt}"


def delete_withdrawn_rows(
    client: bigquery.Client,
    *,
    dataset_id: str,
    collection: str,
    request_id: str,
    entity_id: str,
    item_id: str | None,
    table: str = DEFAULT_TABLE,
    location: str | None = None,
) -> int:
    """Delete the entity's (or study's) rows under a deterministic job id: a retry re-attaches to
    the job an earlier try ran and reports its count. 0 when the table does not exist."""
    table_id = table_ref(client.project, dataset_id, table)
    if _get_table(client, table_id) is None:
        return 0
    sql = withdraw_rows_sql(table_id, whole_entity=item_id is None)
    params: list[Any] = [
        bigquery.ArrayQueryParameter("entity_ids", "STRING", [entity_id]),
        bigquery.ScalarQueryParameter("collection", "STRING", collection),
    ]
    if item_id is not None:
        params.append(bigquery.ScalarQueryParameter("item_id", "STRING", item_id))
    config = bigquery.QueryJobConfig(query_parameters=params)
    key = "\0".join([table_id, request_id, entity_id, item_id or ""])

    def submit(job_id: str) -> bigquery.QueryJob:
        return client.query(sql, job_id=job_id, location=location, job_retry=None, job_config=config)

    job = run_job(client, _withdraw_job_id(request_id, key, "delete"), location, "withdrawal delete", submit)
    return int(job.num_dml_affected_rows or 0)


def log_withdrawal(
    client: bigquery.Client, *, dataset_id: str, record: Mapping[str, Any], location: str | None = None
) -> None:
    """One row per request in the collection's `withdrawals` table (idempotent)."""
    table_id = ensure_withdrawals_table(client, dataset_id, location)
    kinds = {"INTEGER": "INT64", "TIMESTAMP": "TIMESTAMP", "STRING": "STRING"}
    params = []
    for f in WITHDRAWALS_SCHEMA:
        value = record.get(f.name)
        if f.field_type == "TIMESTAMP" and value is not None:
            value = dt.datetime.fromisoformat(str(value))
        params.append(bigquery.ScalarQueryParameter(f.name, kinds[f.field_type], value))
    config = bigquery.QueryJobConfig(query_parameters=params)
    sql = withdrawal_log_sql(table_id)

    def submit(job_id: str) -> bigquery.QueryJob:
        return client.query(sql, job_id=job_id, location=location, job_retry=None, job_config=config)

    key = "\0".join([table_id, str(record["request_id"])])
    run_job(client, _withdraw_job_id(str(record["request_id"]), key, "log"), location, "withdrawal log", submit)
