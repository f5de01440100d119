"""Archives identified by content; corrections and withdrawals that keep Cloud Storage and
BigQuery in step. Every test runs the DAGs for real (dag.test()) against both emulators.

Fault proxies (tests/faultproxy.py) sit in front of both emulators: they log every request (so
a test can say "nothing was uploaded"), inject faults, and enforce the upload preconditions
(`ifGenerationMatch`) that the Cloud Storage emulator ignores, as Cloud Storage does.
Expected contents are derived from what the test planted, never from the pipeline's output.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import PROJECT, pipeline_settings, run_dag
from tests.faultproxy import FaultProxy, ProxyRequest, ProxyResponse, Rule, gcs_preconditions
from tools.landing_zone import BatchSpec, ImageSpec, write_batch

E1, E2 = "CIent01", "CIent02"
I1, I2, I3 = "CIitem01", "CIitem02", "CIitem03"
DATE = "20230105"

ACCESS_DENIED = {
    "error": {"code": 403, "message": "Access Denied: injected", "status": "PERMISSION_DENIED",
              "errors": [{"reason": "accessDenied", "message": "Access Denied: injected"}]}
}  # fmt: skip


def study(entity: str, item: str, n: int, **overrides: object) -> list[ImageSpec]:
    return [
        ImageSpec(entity, item, DATE, "CT", 1, i, rows=64, cols=64, header_overrides=dict(overrides))
        for i in range(1, n + 1)
    ]


@pytest.fixture
def env(tmp_path, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    with pipeline_settings(tmp_path / "landing", proxies=True, DICOM_GOOGLE_RETRY_SECONDS="5") as env:
        env["gcs"].add(gcs_preconditions(env["gcs"]))
        yield env


def land(env: dict, batch_id: str, images: list[ImageSpec]) -> BatchSpec:
    spec = BatchSpec(batch_id, images=images, collection=env["collection"])
    write_batch(env["root"], spec)
    return spec


def run(dag_id: str, conf: dict) -> str:
    return str(run_dag(dag_id=dag_id, conf=conf).state)


def run_batches(*batch_ids: str) -> str:
    return run("dicom_storage", {"batch_ids": list(batch_ids)})


def object_name(env: dict, entity: str, item: str) -> str:
    return f"Collection/{env['collection']}/Entity/{entity}/{entity}_{DATE}_{item}.tar.gz"


def blobs(env: dict, prefix: str = "Collection/") -> dict:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    # Straight to the emulator, around the proxy: what it really holds.
    client = storage.Client(
        project=PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": env["gcs"].upstream},
    )
    return {b.name: b for b in client.bucket(env["bucket"]).list_blobs(prefix=prefix)}


def archives(env: dict) -> dict:
    return {name: blob for name, blob in blobs(env).items() if name.endswith(".tar.gz")}


def members_of(blob) -> dict[str, str]:
    """member name -> sha256 of what the object really holds."""
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes()), mode="r:gz") as tar:
        return {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()}


def table_rows(env: dict) -> list[dict]:
    from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

    client = BigQueryHook().get_client(project_id=PROJECT)
    sql = (
        "SELECT entity_id, item_id, instance_sha256, archive_member, storage_name, storage_generation, "
        f"storage_md5Hash, batch_id FROM `{PROJECT}.{env['collection']}.dicom`"
    )
    return [dict(row.items()) for row in client.query(sql).result()]


def last_state(dag_id: str, task_id: str) -> str:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == dag_id, TaskInstance.task_id == task_id)
            .order_by(TaskInstance.start_date.desc())
            .first()
        )
        return str(ti.state)


def job_of(request: ProxyRequest) -> dict:
    """What a job insertion asks for (a resumable load's start carries the job as JSON too)."""
    try:
        config = json.loads(request.body or b"{}").get("configuration", {})
    except ValueError:
        config = {}
    return {"kind": "load" if "load" in config else "query", "sql": config.get("query", {}).get("query", "")}


def report(env: dict, batch_id: str) -> dict:
    return json.loads((env["root"] / batch_id / "batch.report.json").read_text())


def uploads(proxy: FaultProxy, marker: str = ".tar.gz") -> list:
    return [r for r in proxy.requests("POST", r"^/upload/") if marker in r.query or marker == ""]


def archive_reads(proxy: FaultProxy) -> list:
    return [r for r in proxy.requests("GET") if ".tar.gz" in r.path and "alt=media" in r.query]


# ------------------------------------------------------------------------------- content identity


def test_rerun_after_changing_the_gzip_level_is_a_no_op(env, monkeypatch):
    land(env, "ci-first", study(E1, I1, 3) + study(E2, I2, 2))
    monkeypatch.setenv("DICOM_GZIP_LEVEL", "1")
    assert run_batches("ci-first") == "success"
    first = {name: (b.generation, b.md5_hash) for name, b in archives(env).items()}
    assert set(first) == {object_name(env, E1, I1), object_name(env, E2, I2)}
    rows_before = table_rows(env)
    assert len(rows_before) == 5
    (env["root"] / "ci-first" / "batch.report.json").unlink()  # so that the rerun writes a fresh one

    monkeypatch.setenv("DICOM_GZIP_LEVEL", "3")  # other compressed bytes, same content
    env["gcs"].log.clear()
    assert run_batches("ci-first") == "success"

    assert {name: (b.generation, b.md5_hash) for name, b in archives(env).items()} == first
    assert sorted(map(str, table_rows(env))) == sorted(map(str, rows_before)), "0 new rows, none changed"
    assert uploads(env["gcs"]) == [], "no archive upload started"
    assert archive_reads(env["gcs"]) == [], "the digest comes from the images alone: no archive read"
    done = report(env, "ci-first")
    assert done["archives"]["already_present"] == 2
    assert done["archives"]["written"] == 0
    assert done["bigquery"]["rows_inserted"] == 0
    assert done["bigquery"]["rows_updated"] == 0
    assert done["bigquery"]["rows_deleted"] == 0


def test_object_without_a_digest_is_read_once_then_gets_its_digest(env):
    land(env, "ci-legacy", study(E1, I1, 3))
    assert run_batches("ci-legacy") == "success"
    name = object_name(env, E1, I1)
    blob = archives(env)[name]
    digest = blob.metadata["content_digest"]
    # Make it an object as written before content digests existed.
    blob.metadata = {k: v for k, v in blob.metadata.items() if not k.startswith("content_digest")}
    blob.patch()
    legacy = archives(env)[name]
    assert "content_digest" not in (legacy.metadata or {})
    (env["root"] / "ci-legacy" / "batch.report.json").unlink()

    env["gcs"].log.clear()
    assert run_batches("ci-legacy") == "success"
    after = archives(env)[name]
    assert after.generation == legacy.generation, "the object itself is not rewritten"
    assert after.metadata["content_digest"] == digest, "a metadata-only update added the digest"
    assert len(archive_reads(env["gcs"])) == 1, "its members were read once"
    assert uploads(env["gcs"]) == []
    assert report(env, "ci-legacy")["archives"]["already_present"] == 1
    assert len(table_rows(env)) == 3

    (env["root"] / "ci-legacy" / "batch.report.json").unlink()
    env["gcs"].log.clear()
    assert run_batches("ci-legacy") == "success"
    assert archive_reads(env["gcs"]) == [], "from now on the digest in the metadata suffices"


def test_conflict_fails_at_once_without_retries(env, monkeypatch):
    monkeypatch.setenv("DICOM_TASK_RETRIES", "3")  # read when the DAG is parsed
    land(env, "ci-conflict-a", study(E1, I1, 3))
    assert run_batches("ci-conflict-a") == "success"
    land(env, "ci-conflict-b", study(E1, I1, 2))  # the same study, other content

    assert run_batches("ci-conflict-b") == "failed"  # with retries it would wait 30 s and more

    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == "dicom_storage", TaskInstance.task_id == "archive_studies")
            .order_by(TaskInstance.start_date.desc())
            .first()
        )
        assert (str(ti.state), ti.try_number, ti.max_tries) == ("failed", 1, 3)


# ----------------------------------------------------------------------------------- corrections


def test_corrected_study_replaces_the_archive_and_the_rows_exactly(env, monkeypatch, capfd):
    original = study(E1, I1, 4) + study(E2, I2, 2)
    land(env, "ci-orig", original)
    assert run_batches("ci-orig") == "success"
    name = object_name(env, E1, I1)
    old = archives(env)[name]
    other_rows = sorted(str(r) for r in table_rows(env) if r["entity_id"] == E2)

    # The anonymizer re-sends the study corrected: image 4 removed, image 2 changed.
    corrected = study(E1, I1, 3)
    corrected[1].header_overrides = {"SeriesDescription": "CORRECTED"}
    land(env, "ci-fix", corrected)
    monkeypatch.setenv("DICOM_REPLACE_CHANGED_ARCHIVES", "true")
    jobs: list[dict] = []
    capture = env["bq"].add(Rule(method="POST", path=r"/jobs$", times=None, before=lambda r: jobs.append(job_of(r))))
    assert run_batches("ci-fix") == "success"
    env["bq"].rules.remove(capture)

    new = archives(env)[name]
    new_generation, new_md5 = new.generation, new.md5_hash  # before a download rereads them from headers
    assert new_generation != old.generation
    starts = [r for r in env["gcs"].requests("POST", r"^/upload/") if f"ifGenerationMatch={old.generation}" in r.query]
    assert starts, "the replacement was guarded by the old generation"
    held = members_of(new)
    assert len(held) == 3
    rows = [r for r in table_rows(env) if r["entity_id"] == E1]
    assert sorted((r["archive_member"], r["instance_sha256"]) for r in rows) == sorted(held.items())
    assert {(r["storage_name"], r["storage_generation"], r["storage_md5Hash"], r["batch_id"]) for r in rows} == {
        (name, new_generation, new_md5, "ci-fix")
    }
    assert sorted(str(r) for r in table_rows(env) if r["entity_id"] == E2) == other_rows, "other studies untouched"
    # The batch's own jobs (the summary task's monitoring query aside): a load and one MERGE.
    batch_jobs = [j for j in jobs if "__TABLES__" not in j["sql"]]
    assert len(batch_jobs) <= 3, batch_jobs
    assert [j["kind"] for j in batch_jobs] == ["load", "query"]
    assert batch_jobs[1]["sql"].startswith("MERGE")

    fixed = report(env, "ci-fix")
    assert fixed["archives"]["replaced"] == 1
    assert fixed["archives"]["replacements"] == [
        {"uri": f"gs://{env['bucket']}/{name}", "images_before": 4, "images_after": 3}
    ]
    assert fixed["bigquery"]["rows_deleted"] == 2  # image 4, and the old version of image 2
    log = capfd.readouterr()
    assert f"replaced gs://{env['bucket']}/{name}: 4 images before, 3 after" in log.out + log.err


@pytest.mark.parametrize(
    ("how", "replace"),
    [("rerun", "true"), ("backfill", "true"), ("rerun", "false")],
)
def test_reprocessing_an_older_batch_never_reverts_a_newer_correction(env, monkeypatch, how, replace):
    """c1 sends a study (2 images); c2, completed a day later, sends it corrected (3 images) and
    replaces it. Reprocessing c1 (a rerun, or a backfill of its interval; nothing changed in c1)
    is a no-op: same object and generation, same rows; its report says the study is superseded."""
    from tests.test_ledger import run_as

    older, newer = datetime(2024, 1, 5, 9, tzinfo=UTC), datetime(2024, 1, 6, 9, tzinfo=UTC)
    images = study(E1, I1, 3)
    write_batch(env["root"], BatchSpec("c1", images=images[:2], collection=env["collection"], completed_at=older))
    write_batch(env["root"], BatchSpec("c2", images=images, collection=env["collection"], completed_at=newer))
    monkeypatch.setenv("DICOM_REPLACE_CHANGED_ARCHIVES", "true")
    assert run_batches("c1") == "success"
    assert run_batches("c2") == "success"
    name = object_name(env, E1, I1)
    corrected = archives(env)[name]
    state = (corrected.generation, corrected.md5_hash, corrected.metadata["batch_id"])
    assert corrected.metadata["image_count"] == "3"
    rows = sorted(str(r) for r in table_rows(env))
    assert len(rows) == 3
    first_report = report(env, "c1")

    monkeypatch.setenv("DICOM_REPLACE_CHANGED_ARCHIVES", replace)
    uploads_before = len(uploads(env["gcs"]))
    if how == "rerun":
        assert run_batches("c1") == "success"
    else:
        backfill = run_as("backfill", older, older + timedelta(hours=1))  # the interval holding c1 only
        assert str(backfill.state) == "success"

    again = report(env, "c1")
    assert again["run_key"] != first_report["run_key"], "c1 was reprocessed"
    after = archives(env)[name]
    assert (after.generation, after.md5_hash, after.metadata["batch_id"]) == state, "the correction stays"
    assert len(members_of(after)) == 3
    assert len(uploads(env["gcs"])) == uploads_before, "nothing was uploaded"
    assert sorted(str(r) for r in table_rows(env)) == rows, "rows unchanged: count, generation, batch"
    assert again["status"] == "DONE"
    assert again["archives"]["superseded"] == 1
    assert again["archives"]["superseded_by"] == [
        {
            "uri": f"gs://{env['bucket']}/{name}",
            "images_in_batch": 2,
            "images_in_archive": 3,
            "newer_batch": "c2",
            "newer_completed_at": "2024-01-06T09:00:00+00:00",
        }
    ]
    assert (again["archives"]["written"], again["archives"]["replaced"], again["archives"]["objects"]) == (0, 0, [])
    assert (again["images"]["archived"], again["archives"]["superseded_images"]) == (0, 2)
    assert not again["bigquery"].get("rows_inserted")
    assert not again["bigquery"].get("rows_updated")
    assert not again["bigquery"].get("rows_deleted")


# ----------------------------------------------------------------------------------- withdrawals


def request_file(env: dict, request_id: str, doc: dict) -> Path:
    folder = env["root"] / "_withdrawals"
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{request_id}.json.tmp"
    tmp.write_text(json.dumps({"collection": env["collection"], **doc}))
    return tmp.replace(folder / f"{request_id}.json")  # written last, through a rename


def withdrawal_record(env: dict, request_id: str) -> dict | None:
    found = blobs(env, f"Collection/{env['collection']}/Withdrawals/{request_id}.json")
    return json.loads(next(iter(found.values())).download_as_bytes()) if found else None


def test_withdrawal_removes_objects_and_rows_and_a_rerun_does_not_bring_them_back(env):
    land(env, "ci-wd", study(E1, I1, 3) + study(E1, I3, 2) + study(E2, I2, 2))
    assert run_batches("ci-wd") == "success"
    request_file(env, "wd-0001", {"entity_id": E1, "reason": "consent_withdrawn"})

    assert run("dicom_withdraw", {}) == "success"

    assert set(archives(env)) == {object_name(env, E2, I2)}
    assert {r["entity_id"] for r in table_rows(env)} == {E2}
    record = withdrawal_record(env, "wd-0001")
    assert record["status"] == "complete"
    assert (record["objects_deleted"], record["rows_deleted"], record["scope"]) == (2, 5, "entity")
    assert record["completed_at"]
    assert record["started_at"]

    # A rerun of the original batch holds the withdrawn studies back.
    (env["root"] / "ci-wd" / "batch.report.json").unlink()
    assert run_batches("ci-wd") == "success"
    assert set(archives(env)) == {object_name(env, E2, I2)}
    assert {r["entity_id"] for r in table_rows(env)} == {E2}
    again = report(env, "ci-wd")
    assert again["images"]["quarantined_by_reason"] == {"withdrawn": 5}
    assert again["withdrawn"] == {"studies": 2, "images": 5}

    # The request is done: the next scheduled run has nothing to do, and the summary SQL knows.
    assert run("dicom_withdraw", {}) == "success"
    assert last_state("dicom_withdraw", "find_requests") == "skipped"
    assert withdrawal_record(env, "wd-0001") == record, "the record is left as it was"
    from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

    from dicom_archive.sql_templates import run_summary

    client = BigQueryHook().get_client(project_id=PROJECT)
    summary = run_summary(client, "withdrawals_summary", project=PROJECT, dataset=env["collection"])
    assert [(s["scope"], s["reason"], s["requests"], s["objects_deleted"], s["rows_deleted"]) for s in summary] == [
        ("entity", "consent_withdrawn", 1, 2, 5)
    ]


def test_manual_withdrawal_of_one_study(env):
    land(env, "ci-wd-one", study(E1, I1, 2) + study(E1, I3, 2))
    assert run_batches("ci-wd-one") == "success"
    conf = {"collection": env["collection"], "entity_id": E1, "item_id": I1, "reason": "phi_found"}
    dag_run = run_dag(dag_id="dicom_withdraw", conf=conf)
    assert str(dag_run.state) == "success"
    assert set(archives(env)) == {object_name(env, E1, I3)}
    assert {(r["entity_id"], r["item_id"]) for r in table_rows(env)} == {(E1, I3)}
    records = blobs(env, f"Collection/{env['collection']}/Withdrawals/")
    (doc,) = [json.loads(b.download_as_bytes()) for b in records.values()]
    assert (doc["scope"], doc["item_id"], doc["objects_deleted"], doc["rows_deleted"]) == ("study", I1, 1, 2)
    assert _withdraw_labels(dag_run.run_id) == [doc["request_id"]], "the grid shows the request by its id"


def _withdraw_labels(run_id: str) -> list[str | None]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(
            TaskInstance.dag_id == "dicom_withdraw", TaskInstance.run_id == run_id, TaskInstance.task_id == "withdraw"
        )
        return [ti.rendered_map_index for ti in tis]


def _body_has(marker: bytes, status: int = 403):
    def respond(request: ProxyRequest) -> ProxyResponse | None:
        if marker in request.body:
            return ProxyResponse.of_json(status, ACCESS_DENIED)
        return None

    return respond


# (step, proxy, rule): each interrupts the withdrawal at one of its steps.
INTERRUPTIONS = {
    "mark": ("gcs", lambda: Rule(method="POST", path=r"^/upload/", respond=_body_has(b"/Withdrawn/"), times=1)),
    "plan": ("gcs", lambda: Rule(method="POST", path=r"^/upload/", respond=_body_has(b"/Withdrawals/"), times=1)),
    "objects": ("gcs", lambda: Rule(method="DELETE", path=r"\.tar\.gz$", skip=1, status=403, body=ACCESS_DENIED)),
    "rows": ("bq", lambda: Rule(method="POST", path=r"/jobs$", respond=_body_has(b"DELETE FROM"), times=1)),
    "rows-answer-lost": ("bq", lambda: Rule(method="POST", path=r"/jobs$", reset_after_forward=True, times=1)),
    "log": ("bq", lambda: Rule(method="POST", path=r"/jobs$", respond=_body_has(b"withdrawals`"), times=1)),
    "complete": (
        "gcs",
        lambda: Rule(method="POST", path=r"^/upload/", respond=_body_has(b'"complete"'), times=1),
    ),
}


@pytest.mark.parametrize("step", sorted(INTERRUPTIONS))
def test_withdrawal_interrupted_at_each_step_then_rerun_ends_complete(env, step):
    land(env, "ci-wd-fault", study(E1, I1, 2) + study(E1, I3, 2) + study(E2, I2, 1))
    assert run_batches("ci-wd-fault") == "success"
    request_file(env, "wd-fault", {"entity_id": E1, "reason": "irb_decision"})
    which, make_rule = INTERRUPTIONS[step]
    rule = env[which].add(make_rule())

    first = run("dicom_withdraw", {})
    assert rule.fired >= 1, f"the fault at step {step!r} never fired"
    if step != "rows-answer-lost":  # the client retries a lost answer and re-attaches to its job
        assert first == "failed"
        assert (withdrawal_record(env, "wd-fault") or {}).get("status") != "complete"
    env[which].rules.remove(rule)

    assert run("dicom_withdraw", {}) in ("success", "skipped")
    record = withdrawal_record(env, "wd-fault")
    assert record["status"] == "complete"
    assert (record["objects_deleted"], record["rows_deleted"]) == (2, 4), "counts survive the interruption"
    assert set(archives(env)) == {object_name(env, E2, I2)}
    assert {r["entity_id"] for r in table_rows(env)} == {E2}
    assert blobs(env, f"Collection/{env['collection']}/Withdrawn/{E1}.json"), "the study stays withdrawn"
