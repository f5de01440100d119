"""Monitoring through Airflow itself: labelled mapped tasks, outcomes at a glance, run notes,
the batches view's rows and pages, extra links, local reports, and a plugin that costs the DAG
processor nothing. Real Airflow (dag.test()) against both emulators.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from batches_view.model import batch_rows, filter_rows, runs_from_plans
from batches_view.outcomes import batch_label, needs_attention, run_note
from tests.conftest import PROJECT, REPO_ROOT, pipeline_settings, run_dag
from tools.landing_zone import BatchSpec, ImageSpec, demo_batches, write_batch

DAG_ID = "dicom_storage"
COLLECTION = "IRB_monitoring"  # its own: the session's emulators are shared


def _report(batch_id: str, status: str, seen: int, archived: int, held: dict[str, int], rows: int = 0) -> dict:
    return {
        "batch_id": batch_id,
        "collection": COLLECTION,
        "status": status,
        "images": {
            "seen": seen,
            "archived": archived,
            "quarantined": sum(held.values()),
            "quarantined_by_reason": held,
        },
        "archives": {"written": 1 if archived else 0, "already_present": 0},
        "bigquery": {"rows_inserted": rows},
    }


def test_labels_and_note_tell_outcomes_apart():
    good = _report("b-good", "DONE", 14, 14, {}, rows=14)
    partial = _report("b-partial", "DONE", 10, 6, {"phi_folder": 4}, rows=6)
    empty = _report("b-empty", "EMPTY", 3, 0, {"identifying_attribute": 3})
    assert batch_label(good) == "b-good: DONE, 1 archives written, 14 new rows"
    assert batch_label(partial) == "b-partial: DONE, 4 of 10 quarantined, 1 archives written, 6 new rows"
    assert batch_label(empty) == "b-empty: EMPTY, 3 of 3 quarantined"
    assert [needs_attention(r) for r in (good, partial, empty)] == [False, True, True]

    note = run_note([good, partial, empty], unreported=["b-failed"])
    assert note.startswith("⚠ **4 batches**: 2 DONE, 1 EMPTY, 1 no report;")
    assert "20 rows inserted; 7 images quarantined" in note
    assert "| b-partial | DONE | 10 | 6 | 4 (phi_folder 4) | 1 | 6 |" in note
    assert "| b-failed | no report" in note
    assert not run_note([good]).startswith("⚠"), "a clean run carries no warning sign"


def test_the_note_tells_an_error_report_whose_task_failed_and_counts_one_batch():
    broken = _report("b-broken", "ERROR", 0, 0, {})
    note = run_note([broken], failed=["b-broken"])
    assert note.startswith("⚠ **1 batch**: 1 ERROR (task failed);")
    assert "| b-broken | ERROR (task failed) |" in note
    assert "no report" not in note
    assert run_note([_report("b-good", "DONE", 1, 1, {}, rows=1)]).startswith("**1 batch**: 1 DONE;")


@pytest.fixture(scope="module")
def monitored_env(tmp_path_factory, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("landing")
    extra = {"DICOM_STUDIES_PER_TASK": "2", "DICOM_LINKS_TO": "console"}
    with pipeline_settings(root, bucket="monitoring-archive", collection=COLLECTION, **extra) as env:
        yield env


def good_and_empty(root) -> tuple[BatchSpec, BatchSpec]:
    good = demo_batches(days=1, start=datetime(2024, 2, 1).date(), collection=COLLECTION)[0]
    named = ImageSpec("GLee0001", "GLff0001", "20230106", "CT", source="ct", header_overrides={"PatientName": "X^Y"})
    empty = BatchSpec(
        "20240202-0001", images=[named], collection=COLLECTION, completed_at=datetime(2024, 2, 2, tzinfo=UTC)
    )
    write_batch(root, good)
    write_batch(root, empty)
    return good, empty


@pytest.fixture(scope="module")
def monitored_run(monitored_env) -> dict:
    good, empty = good_and_empty(monitored_env["root"])
    dag_run = run_dag([good.batch_id, empty.batch_id])
    return {"good": good, "empty": empty, "run_id": dag_run.run_id, "state": str(dag_run.state)}


def task_instances(run_id: str) -> dict[tuple[str, int], tuple[str, str | None]]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id)
        return {(ti.task_id, ti.map_index): (str(ti.state), ti.rendered_map_index) for ti in tis}


def test_mapped_tasks_are_labelled_and_the_empty_batch_is_skipped(monitored_env, monitored_run):
    good, empty = monitored_run["good"], monitored_run["empty"]
    assert monitored_run["state"] == "success"
    tis = task_instances(monitored_run["run_id"])

    chunks = sorted(label for (task, _), (_, label) in tis.items() if task == "archive_studies")
    report = json.loads((monitored_env["root"] / good.batch_id / "batch.report.json").read_text())
    studies = report["archives"]["total"]  # one archive per study; two studies per task (DICOM_STUDIES_PER_TASK=2)
    assert studies == 4
    # The labels the grid shows, as the DAG's map_index_template rendered them (1-based, inclusive).
    assert chunks == [f"{good.batch_id} studies 1-2", f"{good.batch_id} studies 3-4"]
    loads = {label for (task, _), (_, label) in tis.items() if task == "load_metadata"}
    assert loads == {good.batch_id, empty.batch_id}

    reports = {
        label.split(":")[0]: (state, label) for (task, _), (state, label) in tis.items() if task == "batch_report"
    }
    assert reports[empty.batch_id] == ("skipped", f"{empty.batch_id}: EMPTY, 1 of 1 quarantined")
    state, label = reports[good.batch_id]
    assert state == "success"
    assert label.startswith(f"{good.batch_id}: DONE, ")
    assert " quarantined, " in label  # the demo batch holds some images back


def test_the_empty_batch_keeps_its_report_in_xcom(monitored_run):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        values = [
            XComModel.deserialize_value(row)
            for row in session.query(XComModel).filter(
                XComModel.dag_id == DAG_ID,
                XComModel.run_id == monitored_run["run_id"],
                XComModel.task_id == "batch_report",
                XComModel.key == "return_value",
            )
        ]
    assert sorted(v["status"] for v in values) == ["DONE", "EMPTY"]


def test_the_run_note_summarises_the_run(monitored_run):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        note = session.query(DagRun).filter(DagRun.run_id == monitored_run["run_id"]).one().note
    assert note is not None, "the listener writes the note when the run ends"
    assert note.startswith("⚠ **2 batches**: 1 DONE, 1 EMPTY;")
    assert f"| {monitored_run['empty'].batch_id} | EMPTY | 1 | 0 | 1 (identifying_attribute 1) | 0 | 0 |" in note


def load_links(run_id: str) -> dict[str, dict[str, str]]:
    """The extra links of each load_metadata instance (by its label, the batch id; each link by its
    class name), as the worker stored them in XCom for the UI."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    labels = {index: label for (task, index), (_, label) in task_instances(run_id).items() if task == "load_metadata"}
    links: dict[str, dict[str, str]] = {label: {} for label in labels.values() if label}
    with create_session() as session:
        rows = session.query(XComModel).filter(
            XComModel.dag_id == DAG_ID,
            XComModel.run_id == run_id,
            XComModel.task_id == "load_metadata",
            XComModel.key.like("_link_%"),
        )
        for row in rows:
            links[labels[row.map_index]][row.key.removeprefix("_link_")] = XComModel.deserialize_value(row)
    return links


def report_url(env: dict, batch_id: str) -> str:
    return (
        f"https://console.cloud.google.com/storage/browser/_details/{env['bucket']}/Collection/{COLLECTION}/"
        f"Batches/{batch_id}.json?project={PROJECT}"
    )


def test_the_empty_batch_links_its_report(monitored_env, monitored_run):
    """An EMPTY batch stored nothing, but its report says why: its load_metadata instance links it."""
    links = load_links(monitored_run["run_id"])
    empty = monitored_run["empty"].batch_id
    assert links[empty] == {
        "BatchReportLink": report_url(monitored_env, empty),
        "CollectionArchivesLink": "",  # it wrote no archive
        "CollectionTableLink": "",  # it loaded no row
    }
    good = monitored_run["good"].batch_id
    assert links[good]["BatchReportLink"] == report_url(monitored_env, good)


def test_an_empty_batch_objects_page_says_it_has_no_table(monitored_env, monitored_run):
    from batches_view.app import render_objects

    report = json.loads((monitored_env["root"] / monitored_run["empty"].batch_id / "batch.report.json").read_text())
    page = render_objects(monitored_run["empty"].batch_id, report)
    assert "no table (nothing loaded)" in page
    assert "table ." not in page


BROKEN = "20240204-0001"
BROKEN_COMPLETED_AT = "2024-02-04T10:00:00Z"


@pytest.fixture(scope="module")
def broken_run(monitored_env) -> dict:
    """A batch whose batch.json breaks a rule (deid is not an object) but holds a valid completed_at."""
    raw = json.dumps(
        {"batch_id": BROKEN, "collection": COLLECTION, "status": "DONEPROCESSING",
         "completed_at": BROKEN_COMPLETED_AT, "deid": "not an object"}
    ).encode()  # fmt: skip
    write_batch(monitored_env["root"], BatchSpec(BROKEN, images=[], collection=COLLECTION, raw_manifest=raw))
    dag_run = run_dag([BROKEN])
    return {"run_id": dag_run.run_id, "state": str(dag_run.state)}


def test_an_unusable_batch_json_fails_its_run_and_shows_its_error_report(monitored_env, broken_run):
    """The run fails visibly, and the UI still shows the ERROR report: the task's label, its XCom
    and the run's note, as for any other ERROR batch, and its link."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    assert broken_run["state"] == "failed"
    reports = {label: state for (task, _), (state, label) in task_instances(broken_run["run_id"]).items()
               if task == "batch_report"}  # fmt: skip
    assert reports == {f"{BROKEN}: ERROR": "failed"}
    with create_session() as session:
        values = [
            XComModel.deserialize_value(row)
            for row in session.query(XComModel).filter(
                XComModel.dag_id == DAG_ID,
                XComModel.run_id == broken_run["run_id"],
                XComModel.task_id == "batch_report",
                XComModel.key == "return_value",
            )
        ]
        note = session.query(DagRun).filter(DagRun.run_id == broken_run["run_id"]).one().note
    assert [(v["batch_id"], v["status"], v["manifest_unusable"]) for v in values] == [(BROKEN, "ERROR", True)]
    assert "deid must be an object" in values[0]["error"]
    assert values[0]["completed_at"] == "2024-02-04T10:00:00+00:00", "the document's valid completed_at is kept"
    assert note is not None
    assert note.startswith("⚠ **1 batch**: 1 ERROR (task failed);")
    assert f"| {BROKEN} | ERROR (task failed) |" in note
    assert "no report" not in note
    assert load_links(broken_run["run_id"])[BROKEN] == {
        "BatchReportLink": report_url(monitored_env, BROKEN),
        "CollectionArchivesLink": "",
        "CollectionTableLink": "",
    }


def test_the_view_warns_when_the_landing_root_does_not_exist(monitored_env, tmp_path, monkeypatch):
    from batches_view.app import _collect, render_page

    missing = tmp_path / "no-such-landing"
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(missing))
    settings, rows, warnings = _collect()
    assert rows == []
    assert any(f"the landing root {missing} does not exist" in w for w in warnings), warnings
    page = render_page("DICOM batches", rows, settings, {}, warnings, form=True)
    assert (
        f'<div class="warn">The landing zone cannot be read, so no batch is listed: the landing root {missing} ' in page
    )


def test_batches_view_rows_from_reports_staging_and_runs(monitored_env, monitored_run):
    from datetime import timedelta

    from batches_view.app import _runs_by_batch
    from dicom_archive import claims
    from hooks.dicom_storage import DicomStorageHook, load_settings

    root = monitored_env["root"]
    waiting = BatchSpec("20240203-0001", images=[], collection=COLLECTION, write_manifest=False)
    not_ready = BatchSpec("20240203-0002", images=[], collection=COLLECTION, status="RUNNING")
    pending = BatchSpec("20240203-0003", images=[], collection=COLLECTION)
    claimed = BatchSpec("20240203-0004", images=[], collection=COLLECTION)
    given_up = BatchSpec("20240203-0005", images=[], collection=COLLECTION)  # its run left it: pending
    for batch in (waiting, not_ready, pending, claimed, given_up):
        write_batch(root, batch)

    settings = load_settings()
    hook = DicomStorageHook()
    store = hook.archive_store(settings)
    assert claims.acquire(store, claimed.batch_id, "scheduled__elsewhere", timedelta(hours=1)).owned
    assert claims.acquire(store, given_up.batch_id, "scheduled__elsewhere", timedelta(hours=1)).owned
    assert claims.give_up(store, given_up.batch_id, "scheduled__elsewhere")
    try:
        rows = batch_rows(hook.landing_zone(settings), store, _runs_by_batch(), COLLECTION)
    finally:
        claims.release(store, claimed.batch_id, "scheduled__elsewhere")
        store.delete(claims.claim_name(given_up.batch_id), None)
    by_id = {row.batch_id: row for row in rows}
    good, empty = monitored_run["good"].batch_id, monitored_run["empty"].batch_id
    ids = (good, empty, waiting.batch_id, not_ready.batch_id, pending.batch_id, claimed.batch_id, given_up.batch_id)
    assert {b: by_id[b].state for b in ids} == {
        good: "DONE",
        empty: "EMPTY",
        waiting.batch_id: "waiting",
        not_ready.batch_id: "NOT_READY",
        pending.batch_id: "pending",
        claimed.batch_id: "claimed",
        given_up.batch_id: "pending",
    }
    assert [b for b in ids if by_id[b].claimed] == [claimed.batch_id]
    report = json.loads((root / good / "batch.report.json").read_text())
    assert by_id[good].images_seen == report["images"]["seen"]
    assert by_id[good].rows_inserted == report["bigquery"]["rows_inserted"]
    assert by_id[good].quarantined_by_reason == report["images"]["quarantined_by_reason"]
    assert [run.run_id for run in by_id[good].runs] == [monitored_run["run_id"]]
    assert by_id[good].runs[0].chunks == 2
    assert [r.batch_id for r in filter_rows(rows, state="EMPTY")] == [empty]
    assert {r.batch_id for r in filter_rows(rows, run_id=monitored_run["run_id"])} == {good, empty}
    assert [r.batch_id for r in filter_rows(rows, date_from="2024-02-02", date_to="2024-02-02")] == [empty]


def test_the_view_shows_no_header_value(monitored_env, monitored_run):
    from batches_view.app import _collect, render_page
    from tools.landing_zone import raw_identifiers

    settings, rows, warnings = _collect()
    page = render_page("DICOM batches", rows, settings, {}, warnings, form=True)
    assert f'data-batch="{monitored_run["empty"].batch_id}"' in page
    assert 'data-state="EMPTY"' in page
    identifiers = raw_identifiers([monitored_run["good"], monitored_run["empty"]], include_sources=True)
    coded = {i.entity_id for i in monitored_run["good"].images + monitored_run["empty"].images}
    leaked = sorted(v for v in set(identifiers) | coded if len(v) >= 4 and v in page)
    assert leaked == [], "neither raw identifiers nor coded patient ids appear in the view"


def test_extra_links_console_or_batches_view(monitored_env, monitored_run, monkeypatch):
    from operators.links import BatchReportLink, CollectionArchivesLink, CollectionTableLink

    bucket, batch = monitored_env["bucket"], monitored_run["good"].batch_id
    assert BatchReportLink.url(bucket=bucket, collection=COLLECTION, batch_id=batch, project=PROJECT) == (
        f"https://console.cloud.google.com/storage/browser/_details/{bucket}/Collection/{COLLECTION}/Batches/"
        f"{batch}.json?project={PROJECT}"
    )
    monkeypatch.setenv("DICOM_LINKS_TO", "batches-view")
    assert BatchReportLink.url(bucket=bucket, collection=COLLECTION, batch_id=batch, project=PROJECT) == (
        f"/dicom-batches/report/{batch}"
    )
    assert CollectionArchivesLink.url(bucket=bucket, collection=COLLECTION, project=PROJECT, batch_id=batch) == (
        f"/dicom-batches/objects/{batch}"
    )
    assert CollectionTableLink.url(project=PROJECT, dataset=COLLECTION, table="dicom") == (
        f"/dicom-batches/?collection={COLLECTION}"
    )


def test_local_run_keeps_its_report_beside_the_cloud_one(monitored_env, monitored_run, tmp_path, monkeypatch, caplog):
    root = monitored_env["root"]
    good = monitored_run["good"].batch_id
    cloud_report = (root / good / "batch.report.json").read_bytes()
    assert b"gs://" in cloud_report
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "output"))

    assert str(run_dag([good]).state) == "success"

    assert (root / good / "batch.report.json").read_bytes() == cloud_report, "the Cloud Storage report is untouched"
    local = json.loads((root / good / "batch.report.local.json").read_text())
    assert local["status"] == "DONE"
    assert local["bigquery"]["table"].startswith("file://") or local["bigquery"]["table"].startswith("/")
    # The log of collection_summary says what the report says.
    out = caplog.text  # the task's log
    assert "nothing loaded to BigQuery in this run" not in out
    loaded = local["bigquery"]
    assert loaded["rows_in_batch"] > 0
    assert f"batch {good}: {loaded['rows_in_batch']} rows in {loaded['table']} ({loaded['rows_inserted']} new)" in out


def test_runs_from_plans_orders_runs_and_finds_instances():
    plans = [
        ("r1", "failed", "2024-01-01T00:00:00", None, [{"batch_id": "a", "chunk_ids": ["0", "2"]}]),
        ("r2", "success", "2024-01-02T00:00:00", None, [{"batch_id": "b"}, {"batch_id": "a", "chunk_ids": ["0"]}]),
    ]
    runs = runs_from_plans(plans)
    assert [(r.run_id, r.map_index, r.chunks) for r in runs["a"]] == [("r1", 0, 2), ("r2", 1, 1)]


PARSE_PROBE = """
import sys, time
import airflow
from airflow import plugins_manager
from airflow.dag_processing.dagbag import DagBag
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
parse = time.perf_counter() - t0
assert not bag.import_errors, bag.import_errors
dag_imports_view = any(name.startswith("batches_view") for name in sys.modules)
plugins_manager.ensure_plugins_loaded()
names = [p.name for p in plugins_manager._get_plugins()[0]]
app_modules = [m for m in ("batches_view.app", "app") if m in sys.modules]
built = [getattr(sys.modules[m], "_APP", None) is not None for m in app_modules]
print(dag_imports_view, "dicom_batches" in names, any(built), "fastapi.applications" in sys.modules, round(parse, 3))
"""


def test_the_plugin_adds_nothing_to_dag_parsing():
    import os

    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(REPO_ROOT / "dags")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dag_imports_view, loaded, built, _, _ = result.stdout.splitlines()[-1].split()
    assert dag_imports_view == "False", "the DAG file never imports the plugin"
    assert loaded == "True", "the plugin loads"
    assert built == "False", "loading the plugin (as the DAG processor does) does not build the web app"


def test_a_run_naming_a_missing_pool_says_so_in_its_note(monitored_run):
    """Airflow leaves a task whose pool does not exist "scheduled" forever, silently: the listener
    names the pool in the run's note as soon as the run starts. (Runs last: it rewrites the note.)"""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    from batches_view import listener

    run_id = monitored_run["run_id"]
    with create_session() as session:
        session.query(TaskInstance).filter(
            TaskInstance.run_id == run_id, TaskInstance.task_id == "archive_studies"
        ).update({"pool": "dicom_storage_gcs_missing"})
    with create_session() as session:
        dag_run = session.query(DagRun).filter(DagRun.run_id == run_id).one()
        assert listener.missing_pools(dag_run, session) == ["dicom_storage_gcs_missing"]
        session.expunge(dag_run)  # as dag.test() hands it over: the listener opens its own session
    listener.on_dag_run_running(dag_run=dag_run, msg="running")
    with create_session() as session:
        note = session.query(DagRun).filter(DagRun.run_id == run_id).one().note
    assert note.startswith("⚠ **Pool 'dicom_storage_gcs_missing' does not exist**")
