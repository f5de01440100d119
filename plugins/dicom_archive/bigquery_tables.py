"""BigQuery identifiers, the schema files in include/schemas/, and a collection's dataset and tables.

`ensure_table` never drops or retypes a column: another type or mode is a SchemaConflictError.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

from google.api_core import exceptions as gexc
from google.cloud import bigquery

from dicom_archive.resources import include_dir

DEFAULT_TABLE = "dicom"
WITHDRAWALS_TABLE = "withdrawals"
# BigQuery reports legacy and standard names for the same type.
_TYPE_ALIASES = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "STRUCT": "RECORD"}


class SchemaConflictError(RuntimeError):
    """An existing column has another type or mode than wanted; nothing is changed."""


def check_name(name: str, what: str) -> str:
    """`what`: "project" (which may hold a hyphen), "dataset" or "table"."""
    pattern = r"[A-Za-z0-9_-]{1,1024}" if what == "project" else r"[A-Za-z0-9_]{1,1024}"
    if not re.fullmatch(pattern, name or ""):
        raise ValueError(f"invalid BigQuery {what} name {name!r} (allowed: {pattern})")
    return name


def table_ref(project: str, dataset_id: str, table: str) -> str:
    """`project.dataset.table`, each part validated, so safe to backquote in SQL."""
    return f"{check_name(project, 'project')}.{check_name(dataset_id, 'dataset')}.{check_name(table, 'table')}"


@functools.cache
def load_schema(table: str = DEFAULT_TABLE) -> tuple[bigquery.SchemaField, ...]:
    with open(include_dir() / "schemas" / f"{table}.json", encoding="utf-8") as fh:
        return tuple(bigquery.SchemaField.from_api_repr(item) for item in json.load(fh))


def type_and_mode(f: bigquery.SchemaField) -> tuple[str, str]:
    return _TYPE_ALIASES.get(f.field_type, f.field_type), f.mode  # both upper case, mode NULLABLE if unset


def get_table(client: bigquery.Client, table_id: str) -> bigquery.Table | None:
    try:
        return client.get_table(table_id)
    except gexc.NotFound:
        return None


def ensure_dataset(client: bigquery.Client, dataset_id: str, location: str = "US") -> bigquery.Dataset:
    ref = bigquery.DatasetReference(check_name(client.project, "project"), check_name(dataset_id, "dataset"))
    try:  # look first: a service account may read and write a dataset it has no right to create
        return client.get_dataset(ref)
    except gexc.NotFound:
        dataset = bigquery.Dataset(ref)
        dataset.location = location
        return client.create_dataset(dataset, exists_ok=True)


def ensure_table(
    client: bigquery.Client,
    dataset_id: str,
    table: str = DEFAULT_TABLE,
    schema: Sequence[bigquery.SchemaField] | None = None,
    location: str = "US",
) -> list[str]:
    """Create the table (and its dataset) from its schema file, or add the columns it lacks;
    returns those added."""
    wanted = list(schema) if schema is not None else load_schema(table)
    table_id = table_ref(client.project, dataset_id, table)
    existing = get_table(client, table_id)
    if existing is None:
        ensure_dataset(client, dataset_id, location)
        new = bigquery.Table(table_id, schema=wanted)
        if table == DEFAULT_TABLE:
            new.time_partitioning = bigquery.TimePartitioning(type_="DAY", field="uploaded_at")
            new.clustering_fields = ["entity_id", "item_id"]
        existing = client.create_table(new, exists_ok=True)  # or the one created concurrently
    have = {f.name.lower(): type_and_mode(f) for f in existing.schema}
    conflicts, missing = [], []
    for want in wanted:
        new_type, new_mode = type_and_mode(want)
        old_type, old_mode = have.get(want.name.lower(), (None, None))
        # NULLABLE in the table but REQUIRED wanted is fine: BigQuery cannot tighten a mode, and the
        # row checks enforce REQUIRED. A column added to a table can only be NULLABLE (or REPEATED).
        if old_type is None:
            mode = "REPEATED" if new_mode == "REPEATED" else "NULLABLE"
            missing.append(bigquery.SchemaField(want.name, want.field_type, mode, description=want.description))
        elif old_type != new_type:
            conflicts.append(f"{want.name}: type {old_type} in the table, {new_type} wanted")
        elif (old_mode == "REPEATED") != (new_mode == "REPEATED") or (old_mode, new_mode) == ("REQUIRED", "NULLABLE"):
            conflicts.append(f"{want.name}: mode {old_mode} in the table, {new_mode} wanted")
    if conflicts:
        raise SchemaConflictError("schema conflict, table left unchanged: " + "; ".join(conflicts))
    if missing:  # guarded by the table's etag: a concurrent change fails this try, and the retry sees it
        existing.schema = [*existing.schema, *missing]
        client.update_table(existing, ["schema"])
    return [f.name for f in missing]
