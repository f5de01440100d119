"""Tables and their schema, row checks, and exactly-once loads, against the real BigQuery emulator."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from dicom_archive import bigquery_load as bl
from dicom_archive import bigquery_tables as tables
from dicom_archive.bigquery_load import BigQueryJobError
from dicom_archive.bigquery_rows import RowError
from dicom_archive.bigquery_withdrawals import withdraw_rows_sql
from dicom_archive.ndjson import NdjsonSpool, to_ndjson

COLLECTION = "IRB41449"


def image_row(n: int, **overrides: object) -> dict:
    """One valid image row; `n` makes the row key (collection, instance_sha256) unique."""
    row = {
        "collection": COLLECTION,
        "batch_id": "batch-1",
        "entity_id": f"GL{n % 2}",
        "item_id": f"IT{n % 3}",
        "PatientID": f"GL{n % 2}",
        "StudyDate": "2007-09-04",
        "Modality": "CT",
        "PatientAge": "045Y",
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "width": 512,
        "height": 512,
        "SeriesNumber": 1,
        "InstanceNumber": n,
        "SOPInstanceUID": None,
        "instance_sha256": f"{n:064x}",
        "archive_member": f"GL_20070904_IT/{n:04d}.dcm",
        "storage_uri": f"gs://radiology/Collection/{COLLECTION}/Entity/GL/GL_20070904_IT{n % 3}.tar.gz",
        "storage_generation": 1700000000000000 + n,
        "DicomHeader": {"Modality": "CT", "lookup": {"site": "A"}},
        "uploaded_at": "2024-05-01T10:00:00Z",
        "deid_software": "deid 0.3",
        "deid_recipe": "recipe-v1",
    }
    row.update(overrides)
    return row


def table_id(client: bigquery.Client, dataset_id: str, table: str = "dicom") -> str:
    return f"{client.project}.{dataset_id}.{table}"


def count_rows(client: bigquery.Client, dataset_id: str) -> tuple[int, int]:
    """(rows, distinct row keys) in the table."""
    sql = (
        "SELECT COUNT(*) AS n, COUNT(DISTINCT CONCAT(collection, '/', instance_sha256)) AS k "
        f"FROM `{table_id(client, dataset_id)}`"
    )
    row = next(iter(client.query(sql).result()))
    return row["n"], row["k"]


def job_ids(client: bigquery.Client) -> set[str]:
    return {job.job_id for job in client.list_jobs(all_users=True)}


def columns(client: bigquery.Client, dataset_id: str, table: str = "dicom") -> dict[str, tuple[str, str]]:
    return {f.name: (f.field_type, f.mode) for f in client.get_table(table_id(client, dataset_id, table)).schema}


# --------------------------------------------------------------------------------------------- schema


def test_schema_file_has_the_spec_columns():
    schema = {f.name: (f.field_type, f.mode) for f in tables.load_schema()}
    required = {name for name, (_, mode) in schema.items() if mode == "REQUIRED"}
    assert required == {
        "collection", "batch_id", "entity_id", "item_id", "instance_sha256",
        "archive_member", "storage_uri", "uploaded_at",
    }  # fmt: skip
    assert schema["ImageType"] == ("STRING", "REPEATED")
    assert schema["DicomHeader"] == ("JSON", "NULLABLE")
    assert schema["StudyDate"] == ("DATE", "NULLABLE")
    assert schema["uploaded_at"] == ("TIMESTAMP", "REQUIRED")
    integers = {name for name, (kind, _) in schema.items() if kind == "INTEGER"}
    assert integers == {
        "width", "height", "SeriesNumber", "InstanceNumber", "storage_generation", "storage_size",
        "private_elements_removed",
    }  # fmt: skip
    assert schema["deid_software"] == schema["deid_recipe"] == ("STRING", "NULLABLE")
    assert schema["source_sha256"] == ("STRING", "NULLABLE")
    assert schema["private_elements_removed"] == ("INTEGER", "NULLABLE")
    assert all(f.description for f in tables.load_schema())


def test_ensure_table_creates_partitioned_clustered_table(bigquery_client, dataset_id):
    dataset = tables.ensure_dataset(bigquery_client, dataset_id)
    assert dataset.dataset_id == dataset_id
    assert tables.ensure_table(bigquery_client, dataset_id) == []

    table = bigquery_client.get_table(table_id(bigquery_client, dataset_id))
    assert table.time_partitioning.type_ == "DAY"
    assert table.time_partitioning.field == "uploaded_at"
    assert table.clustering_fields == ["entity_id", "item_id"]
    assert [f.name for f in table.schema] == [f.name for f in tables.load_schema()]
    # A second call finds nothing to do.
    assert tables.ensure_table(bigquery_client, dataset_id) == []


@pytest.mark.parametrize("round_", range(3))
def test_runs_creating_one_new_table_at_once_all_end_with_it(bigquery_client, dataset_id, round_):
    """Concurrent runs of a new collection each find the dataset and table missing and create
    them: one create wins, BigQuery answers the others 409, and every run goes on with the table."""
    racers = 6
    start = threading.Barrier(racers)

    def ensure() -> list[str]:
        start.wait()
        return tables.ensure_table(bigquery_client, dataset_id)

    with ThreadPoolExecutor(racers) as pool:
        added = [future.result() for future in [pool.submit(ensure) for _ in range(racers)]]
    assert added == [[]] * racers
    table = bigquery_client.get_table(table_id(bigquery_client, dataset_id))
    assert [f.name for f in table.schema] == [f.name for f in tables.load_schema()]
    assert table.time_partitioning.field == "uploaded_at"


def test_ensure_table_adds_missing_columns_and_drops_nothing(bigquery_client, dataset_id):
    full = tables.load_schema()
    old = [f for f in full if f.name in {"collection", "entity_id", "item_id", "instance_sha256", "uploaded_at"}]
    legacy = bigquery.SchemaField("legacy_note", "STRING")
    tables.ensure_dataset(bigquery_client, dataset_id)
    tables.ensure_table(bigquery_client, dataset_id, schema=[*old, legacy])

    added = tables.ensure_table(bigquery_client, dataset_id, schema=full)

    assert added == [f.name for f in full if f not in old]
    cols = columns(bigquery_client, dataset_id)
    assert cols["legacy_note"] == ("STRING", "NULLABLE")  # never dropped
    assert cols["collection"] == ("STRING", "REQUIRED")
    # A REQUIRED column cannot be added to an existing table: it arrives NULLABLE.
    assert cols["batch_id"] == ("STRING", "NULLABLE")
    assert cols["ImageType"] == ("STRING", "REPEATED")
    assert len(cols) == len(full) + 1
    # And the REQUIRED-wanted-but-NULLABLE column is not a conflict on the next run.
    assert tables.ensure_table(bigquery_client, dataset_id, schema=full) == []


def test_type_conflict_raises_and_changes_nothing(bigquery_client, dataset_id):
    full = tables.load_schema()
    retyped = [bigquery.SchemaField("StudyDate", "STRING") if f.name == "StudyDate" else f for f in full]
    tables.ensure_dataset(bigquery_client, dataset_id)
    tables.ensure_table(bigquery_client, dataset_id, schema=retyped[:-3])  # also lacks the last 3 columns
    before = columns(bigquery_client, dataset_id)

    with pytest.raises(tables.SchemaConflictError, match=r"StudyDate: type STRING in the table, DATE wanted"):
        tables.ensure_table(bigquery_client, dataset_id, schema=full)
    with pytest.raises(tables.SchemaConflictError, match="StudyDate"):
        bl.load_rows_exactly_once(
            bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson([image_row(1)]), run_key="r1"
        )

    assert columns(bigquery_client, dataset_id) == before
    assert count_rows(bigquery_client, dataset_id) == (0, 0)


@pytest.mark.parametrize(
    ("in_table", "wanted", "conflict"),
    [
        (("STRING", "REQUIRED"), ("STRING", "NULLABLE"), "mode REQUIRED in the table, NULLABLE wanted"),
        (("STRING", "REPEATED"), ("STRING", "NULLABLE"), "mode REPEATED in the table, NULLABLE wanted"),
        (("STRING", "NULLABLE"), ("STRING", "REPEATED"), "mode NULLABLE in the table, REPEATED wanted"),
        (("INTEGER", "NULLABLE"), ("FLOAT", "NULLABLE"), "type INTEGER in the table, FLOAT wanted"),
        (("INT64", "NULLABLE"), ("INTEGER", "NULLABLE"), None),  # two names of one type
        (("STRING", "NULLABLE"), ("STRING", "REQUIRED"), None),  # a mode BigQuery cannot tighten
    ],
)
def test_mode_and_type_conflicts(bigquery_client, dataset_id, in_table, wanted, conflict):
    tables.ensure_dataset(bigquery_client, dataset_id)
    tables.ensure_table(bigquery_client, dataset_id, schema=[bigquery.SchemaField("x", *in_table)])
    want = [bigquery.SchemaField("x", *wanted), bigquery.SchemaField("y", "STRING")]
    if conflict is None:
        assert tables.ensure_table(bigquery_client, dataset_id, schema=want) == ["y"]
    else:
        with pytest.raises(tables.SchemaConflictError, match=f"x: {conflict}"):
            tables.ensure_table(bigquery_client, dataset_id, schema=want)
        assert list(columns(bigquery_client, dataset_id)) == ["x"]  # y was not added either


def test_a_key_that_is_no_column_is_a_bad_row(bigquery_client, dataset_id):
    """Rows always have the schema's columns: an unknown key is an error, never a new column."""
    rows = [image_row(1), image_row(2, scanner_room="R1"), image_row(3, modality="CT")]
    with pytest.raises(RowError) as err:
        bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="r1")
    assert err.value.errors == [
        (2, "scanner_room", "column not in the table schema"),
        (3, "modality", "column not in the table schema"),  # names are matched exactly
    ]
    with pytest.raises(gexc.NotFound):
        bigquery_client.get_dataset(dataset_id)


def test_columns_the_schema_file_gained_are_added_on_load(bigquery_client, dataset_id):
    full = tables.load_schema()
    tables.ensure_dataset(bigquery_client, dataset_id)
    tables.ensure_table(bigquery_client, dataset_id, schema=full[:-2])
    first = bl.load_rows_exactly_once(
        bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson([image_row(1)]), run_key="r1"
    )
    assert first.columns_added == [f.name for f in full[-2:]]
    row = image_row(2, **{full[-1].name: 3})
    second = bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson([row]), run_key="r2")
    assert second.columns_added == []
    sql = f"SELECT InstanceNumber, {full[-1].name} AS added FROM `{first.table_id}` ORDER BY InstanceNumber"
    assert [tuple(r.values()) for r in bigquery_client.query(sql).result()] == [(1, None), (2, 3)]


# ----------------------------------------------------------------------------------- exactly once


def test_load_rerun_and_backfill_leave_one_row_per_image(bigquery_client, dataset_id):
    client = bigquery_client
    rows = [image_row(n) for n in range(1, 5)]
    before = job_ids(client)

    first = bl.load_rows_exactly_once(
        client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="manual__2024-05-01"
    )
    first_jobs = job_ids(client) - before
    assert (first.rows_in_batch, first.rows_inserted) == (4, 4)
    assert first_jobs == {first.load_job_id, first.merge_job_id}
    assert len(first_jobs) <= 3
    assert count_rows(client, dataset_id) == (4, 4)
    # The scratch table is gone; its expiry was only the fallback.
    assert [t.table_id for t in client.list_tables(dataset_id)] == ["dicom"]

    # Rerun of the same run, the rows written by another JSON writer: the same jobs, nothing new runs.
    ndjson = b"\n".join(json.dumps(r).encode() for r in rows)
    mid = job_ids(client)
    rerun = bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=ndjson, run_key="manual__2024-05-01")
    assert job_ids(client) == mid  # re-attached to the MERGE that ran: no job runs again
    assert rerun.merge_job_id == first.merge_job_id
    assert count_rows(client, dataset_id) == (4, 4)

    # A backfill (new run key) of the same rows plus two new ones inserts only the new ones.
    mid = job_ids(client)
    backfill = bl.load_rows_exactly_once(
        client,
        dataset_id=dataset_id,
        ndjson=to_ndjson([*rows, image_row(5), image_row(6)]),
        run_key="backfill__2024-05-02",
    )
    assert len(job_ids(client) - mid) == 2
    assert (backfill.rows_in_batch, backfill.rows_inserted) == (6, 2)
    assert backfill.merge_job_id != first.merge_job_id
    assert count_rows(client, dataset_id) == (6, 6)


def test_retry_after_failure_between_load_and_merge(bigquery_client, dataset_id):
    client = bigquery_client
    rows = [image_row(n) for n in range(1, 4)]
    before = job_ids(client)

    # First try: the load runs, then the worker dies before the MERGE.
    load = bl.prepare_load(client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="scheduled__1")
    load_job = bl.load_scratch_table(client, load)
    assert job_ids(client) - before == {load_job.job_id}
    assert client.get_table(load.scratch_table_id).num_rows == 3
    assert client.get_table(load.scratch_table_id).expires is not None
    assert count_rows(client, dataset_id) == (0, 0)

    # The retry re-attaches to that load job and runs only the MERGE: two jobs for the batch in all.
    mid = job_ids(client)
    result = bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="scheduled__1")
    assert result.load_job_id == load_job.job_id
    assert (result.rows_in_batch, result.rows_inserted) == (3, 3)
    assert job_ids(client) - mid == {result.merge_job_id}
    assert count_rows(client, dataset_id) == (3, 3)
    with pytest.raises(gexc.NotFound):
        client.get_table(load.scratch_table_id)


def test_retry_after_merge_ran_reattaches_to_it(bigquery_client, dataset_id):
    client = bigquery_client
    rows = [image_row(n) for n in range(1, 3)]
    load = bl.prepare_load(client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="r")
    bl.load_scratch_table(client, load)
    merge = bl.run_merge(client, load)  # the worker dies after this, before cleaning up
    assert merge.num_dml_affected_rows == 2

    before = job_ids(client)
    result = bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="r")
    assert job_ids(client) == before
    assert (result.merge_job_id, result.rows_inserted) == (merge.job_id, 2)
    assert count_rows(client, dataset_id) == (2, 2)


def test_duplicates_within_a_batch_give_one_row(bigquery_client, dataset_id):
    rows = [
        image_row(7, uploaded_at="2024-05-01T10:00:02Z", archive_member="late.dcm"),
        image_row(7, uploaded_at="2024-05-01T10:00:01Z", archive_member="early.dcm"),
        image_row(7, uploaded_at="2024-05-01T10:00:03Z", archive_member="later.dcm"),
        image_row(8),
    ]
    result = bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="dup")
    assert (result.rows_in_batch, result.rows_inserted) == (4, 2)
    assert count_rows(bigquery_client, dataset_id) == (2, 2)
    sql = f"SELECT archive_member FROM `{result.table_id}` WHERE instance_sha256 = @sha"
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("sha", "STRING", f"{7:064x}")])
    kept = [r["archive_member"] for r in bigquery_client.query(sql, job_config=config).result()]
    assert kept == ["early.dcm"]  # the earliest upload wins


def test_values_round_trip_with_their_types(bigquery_client, dataset_id):
    row = image_row(
        1,
        uploaded_at="2024-05-01T12:30:00+02:00",
        StudyDate="2007-09-04",
        width="640",
        ImageType=["DERIVED", "SECONDARY"],
    )
    result = bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson([row]), run_key="types")
    got = dict(next(iter(bigquery_client.query(f"SELECT * FROM `{result.table_id}`").result())))
    assert got["uploaded_at"] == dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.UTC)
    assert got["StudyDate"] == dt.date(2007, 9, 4)
    assert got["width"] == 640
    assert got["ImageType"] == ["DERIVED", "SECONDARY"]
    assert got["DicomHeader"] == {"Modality": "CT", "lookup": {"site": "A"}}
    assert got["storage_generation"] == 1700000000000001
    assert got["SOPInstanceUID"] is None


# ------------------------------------------------------------------------------------------ bad rows


@pytest.mark.parametrize(
    ("override", "column", "words"),
    [
        ({"StudyDate": "2007/09/04"}, "StudyDate", "NULLABLE DATE: Input should be a valid date"),
        ({"StudyDate": "2007-02-30"}, "StudyDate", "NULLABLE DATE: Input should be a valid date"),
        ({"uploaded_at": "yesterday"}, "uploaded_at", "REQUIRED TIMESTAMP: Input should be a valid datetime"),
        ({"uploaded_at": None}, "uploaded_at", "REQUIRED TIMESTAMP: value missing"),
        ({"storage_uri": None}, "storage_uri", "REQUIRED STRING: value missing"),
        ({"width": "12a"}, "width", "NULLABLE INTEGER: Input should be a valid integer"),
        ({"width": 1.5}, "width", "fractional part"),
        ({"width": 2**63}, "width", "less than or equal to 9223372036854775807"),
        ({"width": True}, "width", "a boolean is not a number"),
        ({"ImageType": "ORIGINAL"}, "ImageType", "REPEATED STRING: Input should be a valid array (got str)"),
        ({"ImageType": ["A", None]}, "ImageType", "REPEATED STRING item 1: Input should be a valid string"),
        ({"DicomHeader": "{}"}, "DicomHeader", "not an object or array"),
        ({"Modality": ["CT"]}, "Modality", "NULLABLE STRING: Input should be a valid string (got list)"),
    ],
)
def test_bad_value_names_row_and_column_and_changes_nothing(bigquery_client, dataset_id, override, column, words):
    rows = [image_row(1), image_row(2), image_row(3, **override)]
    with pytest.raises(RowError) as err:
        bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="bad")
    assert (err.value.row, err.value.column) == (3, column)
    assert f"row 3, column {column!r}" in str(err.value)
    assert words in str(err.value)
    with pytest.raises(gexc.NotFound):  # validation runs before anything is created
        bigquery_client.get_dataset(dataset_id)


@pytest.mark.parametrize("parts", [1, 2], ids=["whole", "in-chunks"])
def test_ndjson_errors_count_lines_and_report_all(bigquery_client, dataset_id, parts):
    missing = image_row(2)
    del missing["storage_uri"]
    lines = [
        json.dumps(image_row(1)),
        "",
        json.dumps(missing),
        "{not json",
        json.dumps(image_row(4, height=1.5)),
        "[1]",
    ]
    # A batch's rows come chunk by chunk (each archive task's staged rows): lines count across chunks.
    ndjson = (
        "\n".join(lines).encode()
        if parts == 1
        else iter([("\n".join(lines[:3]) + "\n").encode(), "\n".join(lines[3:]).encode()])
    )
    with pytest.raises(RowError) as err:
        bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=ndjson, run_key="bad")
    # NDJSON line numbers (the blank line 2 counts), every bad line reported, in order.
    assert [(row, column) for row, column, _ in err.value.errors] == [
        (3, "storage_uri"), (4, None), (5, "height"), (6, None),
    ]  # fmt: skip
    assert (err.value.row, err.value.column) == (3, "storage_uri")
    assert "REQUIRED STRING: value missing" in err.value.errors[0][2]
    assert "Invalid JSON" in err.value.errors[1][2]
    assert "row 6: Input should be an object" in str(err.value)
    with pytest.raises(gexc.NotFound):
        bigquery_client.get_dataset(dataset_id)


def test_load_job_errors_are_surfaced_verbatim(bigquery_client, dataset_id):
    client = bigquery_client
    load = bl.prepare_load(client, dataset_id=dataset_id, ndjson=to_ndjson([image_row(1)]), run_key="r")
    # Bytes that skipped validation, under the load's own job id (attempt 0).
    broken_rows = NdjsonSpool()
    broken_rows.write({"collection": "c", "uploaded_at": "not a time"})
    broken = dataclasses.replace(load, rows=broken_rows)
    with pytest.raises(BigQueryJobError) as err:
        bl.load_scratch_table(client, broken)
    assert f"{load.job_key}_load_0" in str(err.value)
    failed = client.get_job(f"{load.job_key}_load_0")
    assert failed.error_result["message"] in str(err.value)

    # The retry skips the failed attempt's id and loads under the next one.
    job = bl.load_scratch_table(client, load)
    assert job.job_id == f"{load.job_key}_load_1"
    assert client.get_table(load.scratch_table_id).num_rows == 1


def test_identifiers_are_validated(bigquery_client):
    with pytest.raises(ValueError, match="dataset"):
        tables.ensure_dataset(bigquery_client, "IRB`; DROP")
    with pytest.raises(ValueError, match="table"):
        tables.table_ref(bigquery_client.project, "IRB1", "dicom-x")
    with pytest.raises(ValueError, match="run_key"):
        bl.load_rows_exactly_once(bigquery_client, dataset_id="IRB1", ndjson=to_ndjson([image_row(1)]), run_key="")


def test_empty_batch_runs_no_job(bigquery_client, dataset_id):
    before = job_ids(bigquery_client)
    result = bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson([]), run_key="empty")
    assert (result.rows_in_batch, result.rows_inserted, result.merge_job_id) == (0, 0, None)
    assert job_ids(bigquery_client) == before
    assert count_rows(bigquery_client, dataset_id) == (0, 0)


# ------------------------------------------------------------------- corrections and pruning (cost O(batch))


def test_merge_is_bounded_by_the_batch_entities_on_the_clustered_column(bigquery_client, dataset_id):
    """BigQuery prunes a clustered table's blocks only on constant filters of its clustering
    columns; the emulator reports no bytes scanned, so this is shown from the statement, and by
    a row outside the batch's entities that the MERGE would otherwise touch."""
    client = bigquery_client
    archive = image_row(1)["storage_uri"]
    others = [image_row(n, entity_id="OTHER", storage_uri=archive) for n in (101, 102)]  # same uri, other entity
    bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=to_ndjson(others), run_key="others")
    rows = [image_row(n, entity_id="GL1") for n in (1, 4)]
    load = bl.prepare_load(client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="bounded")

    sql = bl.merge_sql(load)
    assert "ON T.`collection` = S.`collection` AND T.`instance_sha256` = S.`instance_sha256` AND " in sql
    assert sql.count("T.`entity_id` IN UNNEST(@entity_ids)") == 2  # the join, and the delete of stale rows
    assert "WHEN NOT MATCHED BY SOURCE AND T.`entity_id` IN UNNEST(@entity_ids)" in sql
    assert "PARTITION BY" in sql  # dedup over the scratch table only
    assert (load.entity_ids, load.archive_uris) == (["GL1"], [archive])  # the MERGE's parameters
    assert "WHERE `entity_id` IN UNNEST(@entity_ids)" in withdraw_rows_sql("p.d.dicom")

    result = bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="bounded")
    assert (result.rows_inserted, result.rows_deleted) == (2, 0)
    kept = client.query(f"SELECT COUNT(*) AS n FROM `{table_id(client, dataset_id)}` WHERE entity_id = 'OTHER'")
    assert next(iter(kept.result()))["n"] == 2, "rows outside the batch's entities are never touched"


def test_replaced_archive_rows_are_updated_and_stale_ones_deleted(bigquery_client, dataset_id):
    client = bigquery_client
    old = [image_row(n, entity_id="GL1", storage_generation=1) for n in (1, 4, 7)]
    bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=to_ndjson(old), run_key="first")
    # The corrected archive: image 7 gone, image 4 changed (a new sha), image 1 unchanged, new generation.
    new = [
        image_row(1, entity_id="GL1", storage_generation=2, batch_id="batch-2"),
        image_row(40, entity_id="GL1", storage_generation=2, batch_id="batch-2", storage_uri=old[0]["storage_uri"]),
    ]
    result = bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=to_ndjson(new), run_key="second")
    assert (result.rows_inserted, result.rows_updated, result.rows_deleted) == (1, 1, 2)
    got = client.query(
        f"SELECT instance_sha256, storage_generation, batch_id FROM `{table_id(client, dataset_id)}` ORDER BY 1"
    ).result()
    assert [tuple(r.values()) for r in got] == [(f"{1:064x}", 2, "batch-2"), (f"{40:064x}", 2, "batch-2")]
    # The same batch again changes nothing.
    again = bl.load_rows_exactly_once(client, dataset_id=dataset_id, ndjson=to_ndjson(new), run_key="third")
    assert (again.rows_inserted, again.rows_updated, again.rows_deleted) == (0, 0, 0)


def test_ndjson_writer_is_canonical_and_ascii():
    """The one NDJSON writer (staged rows, local output, loads): the same rows give the same bytes
    whatever their key order, so job ids hash alike; non-ASCII text is escaped, so any str encodes."""
    a = to_ndjson([{"b": 1, "a": "Müller \udc80"}, {"x": None}])
    assert a == to_ndjson([{"a": "Müller \udc80", "b": 1}, {"x": None}])
    assert a.isascii()
    assert a.splitlines() == [b'{"a":"M\\u00fcller \\udc80","b":1}', b'{"x":null}']
    assert json.loads(a.splitlines()[0])["a"] == "Müller \udc80"


def test_rows_given_chunk_by_chunk_load_as_the_same_rows_at_once(bigquery_client, dataset_id):
    """The load task hands over each chunk's staged rows in turn (Staging.read_rows), so a batch's
    rows are never in memory together: same checked rows, same job ids, same table."""
    rows = [image_row(n) for n in range(1, 6)]
    whole = bl.prepare_load(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="r")
    chunks = (to_ndjson(rows[i : i + 2]) for i in range(0, len(rows), 2))  # a generator: read once
    chunked = bl.prepare_load(bigquery_client, dataset_id=dataset_id, ndjson=chunks, run_key="r")
    with whole.rows, chunked.rows:
        assert (chunked.job_key, chunked.row_count, chunked.entity_ids) == (whole.job_key, 5, whole.entity_ids)
        assert b"".join(chunked.rows.lines()) == b"".join(whole.rows.lines())
    other = bl.prepare_load(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson(rows[:4]), run_key="r")
    assert other.job_key != whole.job_key, "other rows, other jobs"

    result = bl.load_rows_exactly_once(
        bigquery_client, dataset_id=dataset_id, ndjson=(to_ndjson([r]) for r in rows), run_key="r"
    )
    assert (result.rows_in_batch, result.rows_inserted) == (5, 5)
    assert count_rows(bigquery_client, dataset_id) == (5, 5)


class FailedJob:
    """A job BigQuery ended with `reason` (what job.result() raises then, as the client builds it)."""

    def __init__(self, job_id: str, status: int, reason: str) -> None:
        self.job_id = job_id
        self.error_result = {"reason": reason, "message": f"{reason}: Table p:IRB1.dicom (injected)"}
        self.errors = [self.error_result]
        self.exc = gexc.from_http_status(status, self.error_result["message"], errors=self.errors)

    def result(self) -> None:
        raise self.exc


@pytest.mark.parametrize(
    ("status", "reason", "at_once", "words"),
    [
        pytest.param(403, "accessDenied", True, "Google refused access (403)", id="access-denied"),
        pytest.param(404, "notFound", True, "does not exist", id="dataset-gone"),
        pytest.param(403, "quotaExceeded", False, "quotaExceeded", id="quota-is-retried"),
        pytest.param(429, "rateLimitExceeded", False, "rateLimitExceeded", id="rate-limit-is-retried"),
        pytest.param(500, "backendError", False, "backendError", id="backend-error-is-retried"),
    ],
)
def test_a_job_refused_by_bigquery_fails_its_task_at_once_an_outage_retries(status, reason, at_once, words):
    """A job that BigQuery ends with 403 accessDenied (the identity may start jobs, not write the
    table) or 404 fails the task at once, as the same refusal of the job's start does; a rate
    limit or a backend error is left to the task's retries. The operators' own nesting."""
    from airflow.sdk.exceptions import AirflowFailException

    from hooks.dicom_storage import DicomStorageHook
    from operators.failures import fail_at_once_on_permanent_errors

    hook = DicomStorageHook(credentials_file="")
    with (
        pytest.raises((AirflowFailException, BigQueryJobError)) as raised,
        fail_at_once_on_permanent_errors(),
        hook.explain_google_errors("the BigQuery table p.IRB1.dicom"),
    ):
        bl.run_job(None, "merge_x", "US", lambda job_id: FailedJob(job_id, status, reason))
    assert isinstance(raised.value, AirflowFailException) is at_once, repr(raised.value)
    assert words in str(raised.value)
    if not at_once:
        assert isinstance(raised.value, BigQueryJobError)
