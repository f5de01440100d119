"""Injected faults on whole DAG runs: nothing lost, nothing duplicated, a clear message.

A fault-injecting proxy (tests/faultproxy.py) sits in front of each emulator; the clients reach
it through STORAGE_EMULATOR_HOST / BIGQUERY_EMULATOR_HOST, exactly as they reach the emulators.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import PROJECT, REPO_ROOT, pipeline_settings
from tests.conftest import run_dag as run_storage_dag
from tests.faultproxy import FaultProxy, ProxyResponse, Rule
from tests.test_dag import expected_image_count, expected_objects, read_report
from tests.test_ledger import expire_claim
from tools.landing_zone import BatchSpec, demo_batches, write_batch

DAG_ID = "dicom_storage"

# What real Google APIs answer when they are overloaded: the clients retry these reasons.
BACKEND_ERROR = {
    "error": {"code": 503, "message": "backend error (injected)", "status": "UNAVAILABLE",
              "errors": [{"reason": "backendError", "message": "backend error (injected)"}]}
}  # fmt: skip
ACCESS_DENIED = {
    "error": {"code": 403, "message": "Access Denied: injected", "status": "PERMISSION_DENIED",
              "errors": [{"reason": "accessDenied", "message": "Access Denied: injected"}]}
}  # fmt: skip


@pytest.fixture
def env(tmp_path, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    """A fresh bucket, dataset and landing zone, with both emulators behind fault proxies."""
    with pipeline_settings(tmp_path / "landing", proxies=True) as env:  # a row key is per collection
        yield env


def one_batch(env: dict, batch_id: str) -> BatchSpec:
    batch = demo_batches(days=1, collection=env["collection"])[0]
    batch.batch_id = batch_id
    write_batch(env["root"], batch)
    return batch


def run_dag(batch_ids: list[str]) -> str:
    return str(run_storage_dag(batch_ids).state)


def generations(bucket: str) -> dict[str, int]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    return {b.name: b.generation for b in GCSHook().get_conn().list_blobs(bucket) if b.name.endswith(".tar.gz")}


def row_counts(batch: BatchSpec) -> tuple[int, int]:
    from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

    client = BigQueryHook().get_client(project_id=PROJECT)
    sql = (
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT instance_sha256) AS d FROM `{PROJECT}.{batch.collection}.dicom` "
        "WHERE batch_id = @batch"
    )
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ScalarQueryParameter("batch", "STRING", batch.batch_id)]
    )
    row = next(iter(client.query(sql, job_config=config).result()))
    return row["n"], row["d"]


def test_transient_errors_during_upload_and_load_are_retried_to_a_complete_run(env):
    batch = one_batch(env, "faults-transient")
    gcs: FaultProxy = env["gcs"]
    bq: FaultProxy = env["bq"]
    upload_start = gcs.add(Rule(method="POST", path=r"^/upload/", status=429, times=1))
    upload_chunk = gcs.add(Rule(method="PUT", query="upload_id", status=503, body=BACKEND_ERROR, times=2))
    job_insert = bq.add(Rule(method="POST", path=r"/jobs$", status=503, body=BACKEND_ERROR, times=1))

    # Task retries are off in the tests: only the clients' own retries can save this run.
    assert run_dag([batch.batch_id]) == "success"

    assert upload_start.fired == 1
    assert upload_chunk.fired == 2
    assert job_insert.fired == 1
    assert set(generations(env["bucket"])) == expected_objects(batch)
    n = expected_image_count(batch)
    assert row_counts(batch) == (n, n)
    assert read_report(env["root"], batch.batch_id)["status"] == "DONE"


def test_bigquery_refusing_after_the_upload_then_a_rerun(env):
    batch = one_batch(env, "faults-bq-refuses")
    refuse = env["bq"].add(Rule(method="POST", path=r"/jobs$", status=403, body=ACCESS_DENIED, times=None))

    assert run_dag([batch.batch_id]) == "failed"
    assert refuse.fired >= 1
    first = generations(env["bucket"])
    assert set(first) == expected_objects(batch), "the archives were uploaded before the load failed"
    assert not (env["root"] / batch.batch_id / "batch.report.json").exists(), "no report: re-processable"

    env["bq"].clear()
    assert run_dag([batch.batch_id]) == "success"
    assert generations(env["bucket"]) == first, "the rerun writes no second generation"
    n = expected_image_count(batch)
    assert row_counts(batch) == (n, n)
    report = read_report(env["root"], batch.batch_id)
    # The batch's first report: the archives its failed attempt wrote count as written by it.
    assert report["note"] == "completed after an interrupted attempt"
    assert report["archives"]["written"] == len(expected_objects(batch))
    assert report["archives"]["already_present"] == 0
    assert report["recovery"]["archives_written_by_interrupted_attempt"] == len(expected_objects(batch))
    assert report["bigquery"]["rows_inserted"] == n


def test_permission_error_names_the_credentials_and_the_resource(env, capfd):
    batch = one_batch(env, "faults-forbidden")
    env["gcs"].add(Rule(method="POST", path=r"^/upload/", status=403, body=ACCESS_DENIED, times=None))

    assert run_dag([batch.batch_id]) == "failed"
    log = capfd.readouterr()
    text = log.out + log.err
    # The run's first write is the batch's claim (one owner per batch).
    assert f"Google refused access (403) to the claim gs://{env['bucket']}/_claims/" in text
    assert "connection 'google_cloud_default' with anonymous credentials" in text
    assert generations(env["bucket"]) == {}


def test_task_killed_mid_upload_then_rerun_leaves_no_partial_or_duplicate_object(env):
    """The whole `airflow dags test` process is killed while an archive is in flight."""
    batch = one_batch(env, "faults-killed")
    stall = env["gcs"].add(Rule(method="PUT", query="upload_id", delay=120, times=1))
    conf = json.dumps({"batch_ids": [batch.batch_id]})
    airflow = str(REPO_ROOT / ".venv" / "bin" / "airflow")
    proc = subprocess.Popen(
        [airflow, "dags", "test", DAG_ID, "--conf", conf],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while stall.seen == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stall.seen == 1, "the upload never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert generations(env["bucket"]) == {}, "an interrupted upload never becomes an object"

    env["gcs"].clear()
    expire_claim(env, batch.batch_id)  # the killed run's claim runs out (DICOM_CLAIM_HOURS)
    assert run_dag([batch.batch_id]) == "success"
    objects = generations(env["bucket"])
    assert set(objects) == expected_objects(batch)
    n = expected_image_count(batch)
    assert row_counts(batch) == (n, n)
    report = read_report(env["root"], batch.batch_id)
    assert report["archives"]["written"] == len(objects)


def test_cloud_storage_down_when_the_run_starts_fails_clearly_and_leaves_the_batch_reprocessable(
    env, monkeypatch, capfd
):
    batch = one_batch(env, "faults-down")
    down = env["gcs"].add(Rule(reset_after=0, times=None))  # every connection is cut: the service is gone
    monkeypatch.setenv("DICOM_GOOGLE_RETRY_SECONDS", "5")

    started = time.monotonic()
    assert run_dag([batch.batch_id]) == "failed"
    assert time.monotonic() - started < 60, "gives up after the retry window, not the client's default"
    assert down.fired > 1, "the client retried before giving up"
    log = capfd.readouterr()
    assert f"Google did not answer for the claim gs://{env['bucket']}/_claims/" in log.out + log.err
    assert "Nothing was lost: rerun the batch once the service answers." in log.out + log.err
    assert not (env["root"] / batch.batch_id / "batch.report.json").exists()

    env["gcs"].clear()
    assert run_dag([batch.batch_id]) == "success"
    assert set(generations(env["bucket"])) == expected_objects(batch)
    n = expected_image_count(batch)
    assert row_counts(batch) == (n, n)


# A query that keeps the emulator busy until it is cancelled (about 10^10 rows).
LONG_QUERY = (
    "SELECT COUNT(*) AS n FROM UNNEST(GENERATE_ARRAY(1, 100000)) AS a, UNNEST(GENERATE_ARRAY(1, 100000)) AS b "
    "WHERE MOD(a * b, 7) = 3"
)


def test_killed_load_task_cancels_its_running_bigquery_job_then_a_rerun_completes(env):
    """The task is killed the way Airflow kills one (the supervisor's SIGTERM, e.g. after "mark
    failed" in the UI) while it waits for its MERGE. The proxy stands in for a long MERGE: it
    puts a query that runs until cancelled under the MERGE's job id, so the job really runs in
    the emulator, and sends the SIGTERM when the task first asks about that job."""
    batch = one_batch(env, "faults-kill-merge")
    bq: FaultProxy = env["bq"]
    merge_ids: list[str] = []
    handler_seen: list[str] = []
    previous = signal.getsignal(signal.SIGTERM)

    def long_merge(request) -> None:
        doc = json.loads(request.body or b"{}")
        query = doc.get("configuration", {}).get("query", {})
        if not query.get("query", "").lstrip().upper().startswith("MERGE"):
            return
        merge_ids.append(doc["jobReference"]["jobId"])
        query["query"] = LONG_QUERY
        query.pop("queryParameters", None)
        request.body = json.dumps(doc).encode()

    def kill_task(request) -> None:
        if not merge_ids or merge_ids[0] not in request.path or handler_seen:
            return
        handler = signal.getsignal(signal.SIGTERM)
        handler_seen.append(getattr(handler, "__qualname__", repr(handler)))
        if "_on_term" in handler_seen[0]:  # the task runner's handler: never SIGTERM pytest itself
            os.kill(os.getpid(), signal.SIGTERM)

    bq.add(Rule(method="POST", path=r"/projects/[^/]+/jobs$", before=long_merge, times=None))
    kill = bq.add(Rule(method="GET", path=r"/projects/[^/]+/(jobs|queries)/", before=kill_task, times=None))
    try:
        assert run_dag([batch.batch_id]) == "failed"
    finally:
        signal.signal(signal.SIGTERM, previous)
        for job_id in merge_ids:  # whatever happened, nothing keeps running in the emulator
            bq.upstream_request("POST", f"/bigquery/v2/projects/{PROJECT}/jobs/{job_id}/cancel")

    assert kill.seen >= 1
    assert len(merge_ids) == 1, "the MERGE was started once"
    assert "_on_term" in handler_seen[0], f"the kill came from the task runner's handler, not {handler_seen}"
    cancels = bq.requests("POST", rf"/jobs/{merge_ids[0]}/cancel$")
    assert [c.status for c in cancels] == [200], "on_kill asked BigQuery to cancel the running MERGE"
    job = bq.upstream_request("GET", f"/bigquery/v2/projects/{PROJECT}/jobs/{merge_ids[0]}").json()
    assert job["status"]["state"] == "DONE"
    assert job["status"]["errorResult"]["reason"] == "stopped", job["status"]
    assert row_counts(batch) == (0, 0), "nothing was merged"
    assert not (env["root"] / batch.batch_id / "batch.report.json").exists(), "no report: re-processable"

    bq.clear()
    assert run_dag([batch.batch_id]) == "success"
    n = expected_image_count(batch)
    assert row_counts(batch) == (n, n)
    assert read_report(env["root"], batch.batch_id)["bigquery"]["rows_inserted"] == n


def test_a_report_whose_bucket_copy_failed_is_published_whole_by_the_retry(
    tmp_path, gcs_emulator, bigquery_emulator, airflow_db, monkeypatch
):
    """The bucket copy of the report fails beyond the client's retries: the task's retry writes it,
    and the report beside the batch (which marks it reported) is not out before it."""
    monkeypatch.setenv("DICOM_TASK_RETRIES", "1")
    monkeypatch.setenv("DICOM_RETRY_DELAY_SECONDS", "4")
    monkeypatch.setenv("DICOM_GOOGLE_RETRY_SECONDS", "1")
    with pipeline_settings(tmp_path / "landing", proxies=True) as env:
        batch = one_batch(env, "faults-report-copy")
        window = {"start": None}

        def refuse_for_two_seconds(request):
            if request.method == "POST" and f"/Batches/{batch.batch_id}.json".encode() in request.body:
                window["start"] = window["start"] or time.monotonic()
                if time.monotonic() - window["start"] < 2.0:
                    return ProxyResponse.of_json(503, BACKEND_ERROR)
            return None

        refusal = env["gcs"].add(Rule(path=r"^/upload/", respond=refuse_for_two_seconds, times=None))
        dag_run = run_storage_dag([batch.batch_id])

        assert refusal.fired >= 1
        tries = {ti.task_id: ti.try_number for ti in dag_run.get_task_instances()}
        assert tries["batch_report"] == 2, tries
        assert str(dag_run.state) == "success"
        beside = read_report(env["root"], batch.batch_id)
        assert beside["status"] == "DONE"
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        name = f"Collection/{env['collection']}/Batches/{batch.batch_id}.json"
        copy = json.loads(GCSHook().download(bucket_name=env["bucket"], object_name=name))
        assert copy == beside


RATE_LIMITED = {
    "error": {"code": 403, "message": "Rate limit exceeded (injected)", "status": "PERMISSION_DENIED",
              "errors": [{"reason": "rateLimitExceeded", "message": "Rate limit exceeded (injected)"}]}
}  # fmt: skip


@pytest.mark.parametrize(
    ("refusal", "task", "tries", "words"),
    [
        pytest.param(
            Rule(method="POST", path=r"^/upload/", status=403, body=ACCESS_DENIED, times=None),
            "plan_batches",
            1,
            "Google refused access (403)",
            id="identity-without-the-role",
        ),
        pytest.param(
            Rule(method="POST", path=r"^/upload/", status=404, times=None),
            "plan_batches",
            1,
            "does not exist",
            id="bucket-that-does-not-exist",
        ),
        pytest.param(
            Rule(method="POST", path=r"^/upload/", status=403, body=RATE_LIMITED, times=None),
            "plan_batches",
            2,
            "",
            id="rate-limited-is-retried",
        ),
    ],
)
def test_a_refusal_no_retry_can_change_fails_at_once(
    tmp_path, gcs_emulator, bigquery_emulator, airflow_db, monkeypatch, capfd, refusal, task, tries, words
):
    monkeypatch.setenv("DICOM_TASK_RETRIES", "1")
    monkeypatch.setenv("DICOM_RETRY_DELAY_SECONDS", "1")
    monkeypatch.setenv("DICOM_GOOGLE_RETRY_SECONDS", "1")
    with pipeline_settings(tmp_path / "landing", proxies=True) as env:
        batch = one_batch(env, "faults-refused")
        env["gcs"].add(refusal)
        dag_run = run_storage_dag([batch.batch_id])
        assert str(dag_run.state) == "failed"
        found = {ti.task_id: (ti.try_number, str(ti.state)) for ti in dag_run.get_task_instances()}
        assert found[task] == (tries, "failed"), found
        log = capfd.readouterr()
        assert words in log.out + log.err


def test_a_landing_zone_outage_while_planning_fails_the_plan_task_and_the_batch_stays_pending(
    tmp_path, gcs_emulator, bigquery_emulator, airflow_db, monkeypatch, capfd
):
    """Listing a gs:// batch answers 503 past the clients' retries: an outage, not the batch's
    trouble. The plan task fails (and is retried), no ERROR report marks the batch done, and its
    claim is given up: the next run takes the batch and archives it."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    monkeypatch.setenv("DICOM_TASK_RETRIES", "1")
    monkeypatch.setenv("DICOM_RETRY_DELAY_SECONDS", "1")
    monkeypatch.setenv("DICOM_GOOGLE_RETRY_SECONDS", "1")
    landing = f"landing-{os.urandom(4).hex()}"
    GCSHook().create_bucket(bucket_name=landing, project_id=PROJECT)
    with pipeline_settings(f"gs://{landing}/zone", proxies=True) as env:
        batch = demo_batches(days=1, collection=env["collection"])[0]
        batch.batch_id = "faults-listing-down"
        folder = write_batch(tmp_path / "source", batch)
        for path in (p for p in folder.rglob("*") if p.is_file()):
            name = f"zone/{batch.batch_id}/{path.relative_to(folder).as_posix()}"
            GCSHook().get_conn().bucket(landing).blob(name).upload_from_filename(str(path))
        # The listing of the batch's files (a prefix naming the batch), nothing else.
        down = env["gcs"].add(
            Rule(
                method="GET", path=rf"/b/{landing}/o$", query=batch.batch_id, status=503, body=BACKEND_ERROR, times=None
            )
        )

        dag_run = run_storage_dag([batch.batch_id])
        assert str(dag_run.state) == "failed"
        found = {ti.task_id: (ti.try_number, str(ti.state)) for ti in dag_run.get_task_instances()}
        assert found["plan_batches"] == (2, "failed"), found
        assert down.fired >= 2, "both tries listed the batch"
        log = capfd.readouterr()
        assert f"Google did not answer for the batch gs://{landing}/zone/{batch.batch_id}" in log.out + log.err
        landing_bucket = GCSHook().get_conn().bucket(landing)
        assert landing_bucket.get_blob(f"zone/{batch.batch_id}/batch.report.json") is None, "no report: still pending"
        assert generations(env["bucket"]) == {}
        assert not [b.name for b in GCSHook().get_conn().list_blobs(env["bucket"], prefix="Collection/")]

        env["gcs"].clear()  # the outage is over: the next run takes the batch (its claim was given up)
        assert run_dag([batch.batch_id]) == "success"
        report = json.loads(landing_bucket.blob(f"zone/{batch.batch_id}/batch.report.json").download_as_bytes())
        assert report["status"] == "DONE"
        assert set(generations(env["bucket"])) == expected_objects(batch)
