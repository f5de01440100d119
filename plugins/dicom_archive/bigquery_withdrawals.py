"""A withdrawal in BigQuery: delete an entity's (or a study's) rows, and log the request once in
the collection's `withdrawals` table. Both run under deterministic job ids (bigquery_load.run_job).
The DELETE names the entity on the clustered column, so BigQuery reads only that entity's blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.cloud import bigquery

from dicom_archive import bigquery_tables as tables
from dicom_archive.bigquery_load import job_key, run_query


def withdraw_rows_sql(table_id: str) -> str:
    """A NULL @item_id withdraws the whole entity, any other value the one study."""
    return (
        f"DELETE FROM `{table_id}`\nWHERE `entity_id` IN UNNEST(@entity_ids) AND `collection` = @collection\n"
        "  AND (@item_id IS NULL OR `item_id` = @item_id)\n"
    )


def delete_withdrawn_rows(
    client: bigquery.Client,
    *,
    collection: str,
    request_id: str,
    entity_id: str,
    item_id: str | None,
    location: str = "US",
) -> int:
    """The number of rows deleted from the collection's dataset; 0 when the table does not exist."""
    table_id = tables.table_ref(client.project, collection, tables.DEFAULT_TABLE)
    if tables.get_table(client, table_id) is None:
        return 0
    params = [
        bigquery.ArrayQueryParameter("entity_ids", "STRING", [entity_id]),
        bigquery.ScalarQueryParameter("collection", "STRING", collection),
        bigquery.ScalarQueryParameter("item_id", "STRING", item_id),
    ]
    key = job_key("withdraw_delete", request_id, "\0".join([table_id, entity_id, item_id or ""]).encode())
    return int(run_query(client, withdraw_rows_sql(table_id), params, key, location).num_dml_affected_rows or 0)


def log_withdrawal(
    client: bigquery.Client, *, dataset_id: str, record: Mapping[str, Any], location: str = "US"
) -> None:
    """Inserted once: a rerun or a retry finds the request's row there."""
    tables.ensure_table(client, dataset_id, tables.WITHDRAWALS_TABLE, location=location)
    table_id = tables.table_ref(client.project, dataset_id, tables.WITHDRAWALS_TABLE)
    params = [
        # RFC 3339 timestamps go as they are: BigQuery reads them, and the client passes text through.
        bigquery.ScalarQueryParameter(
            f.name, "INT64" if f.field_type == "INTEGER" else f.field_type, record.get(f.name)
        )
        for f in tables.load_schema(tables.WITHDRAWALS_TABLE)
    ]
    columns = [p.name for p in params]
    sql = (
        f"MERGE `{table_id}` AS T\nUSING (SELECT {', '.join(f'@{c} AS `{c}`' for c in columns)}) AS S\n"
        f"ON T.`request_id` = S.`request_id`\nWHEN NOT MATCHED THEN\n"
        f"  INSERT ({', '.join(f'`{c}`' for c in columns)}) VALUES ({', '.join(f'S.`{c}`' for c in columns)})\n"
    )
    run_query(client, sql, params, job_key("withdraw_log", str(record["request_id"]), table_id.encode()), location)
