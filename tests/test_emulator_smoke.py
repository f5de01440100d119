"""The emulators answer through the same Google provider hooks production uses.

These tests are never skipped: if an emulator cannot start, the fixture fails the test.
"""

from __future__ import annotations

import hashlib
import io
import json

from google.cloud import bigquery

from tools import emulators


def test_gcs_object_roundtrip_through_gcs_hook(bucket_name):
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    hook = GCSHook(gcp_conn_id="google_cloud_default")
    payload = b"de-identified bytes\n" * 1000
    hook.upload(bucket_name=bucket_name, object_name="smoke/one.bin", data=payload)

    assert hook.exists(bucket_name, "smoke/one.bin")
    assert hook.download(bucket_name=bucket_name, object_name="smoke/one.bin") == payload
    blob = hook.get_conn().bucket(bucket_name).get_blob("smoke/one.bin")
    assert blob.size == len(payload)
    import base64

    assert base64.b64decode(blob.md5_hash) == hashlib.md5(payload).digest()


def test_bigquery_dataset_table_load_and_query_through_hook(bigquery_client, dataset_id):
    client = bigquery_client
    client.create_dataset(dataset_id)
    table_id = f"{client.project}.{dataset_id}.smoke"
    schema = [bigquery.SchemaField("name", "STRING"), bigquery.SchemaField("n", "INTEGER")]
    client.create_table(bigquery.Table(table_id, schema=schema))

    rows = "\n".join(json.dumps({"name": f"row{i}", "n": i}) for i in range(10)).encode()
    job_config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON, schema=schema)
    client.load_table_from_file(io.BytesIO(rows), table_id, job_config=job_config).result()

    result = list(
        client.query(
            f"SELECT COUNT(*) AS c, SUM(n) AS s FROM `{table_id}` WHERE n >= @low",
            job_config=bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("low", "INT64", 5)]),
        ).result()
    )
    assert (result[0]["c"], result[0]["s"]) == (5, 5 + 6 + 7 + 8 + 9)


def test_emulator_stop_leaves_no_process(tmp_path):
    emulator = emulators.start_gcs(emulators.free_port(), tmp_path / "gcs.log")
    emulators.wait_ready(emulator)
    assert emulators.is_alive(emulator.pid)
    emulators.stop(emulator.pid)
    assert not emulators.is_alive(emulator.pid)
