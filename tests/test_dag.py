"""The dicom_storage DAG, parsed and run for real: dag.test() against both emulators.

Expected objects and row counts are derived from the landing zone's specs (what was planted),
not from the pipeline's own output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import bigquery

from hooks.dicom_storage import DicomStorageHook
from tests.conftest import PROJECT, REPO_ROOT, pipeline_settings
from tests.conftest import run_dag as run_storage_dag
from tools.landing_zone import BatchSpec, ImageSpec, demo_batches, write_batch

DAG_ID = "dicom_storage"
COLLECTION = "IRB41449"


def accepted(image: ImageSpec, lookup: dict | None) -> bool:
    """The contract's checks, restated from the spec of what the generator planted."""
    overrides = image.header_overrides
    entry = (lookup or {}).get(image.path, {})
    return not (
        image.path.startswith("PHI/")
        or entry.get("flagged") is True
        or overrides.get("BurnedInAnnotation") == "YES"
        or overrides.get("PatientName", image.entity_id) not in ("", image.entity_id)
        or "RequestAttributesSequence" in overrides  # the demo's physician name in a sequence item
        or "OtherPatientIDs" in entry  # the demo's identifier in lookup.json
    )  # private elements are stripped from the archived copy: such an image is archived


def expected_objects(batch: BatchSpec) -> set[str]:
    return {
        f"Collection/{batch.collection}/Entity/{i.entity_id}/{i.entity_id}_{i.study_date}_{i.item_id}.tar.gz"
        for i in batch.images
        if accepted(i, batch.lookup)
    }


def expected_image_count(batch: BatchSpec) -> int:
    return sum(accepted(i, batch.lookup) for i in batch.images)


def test_dagbag_has_no_import_errors_and_the_expected_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {DAG_ID, "dicom_withdraw"}
    dag = bag.get_dag(DAG_ID)
    assert set(dag.task_ids) == {
        "wait_for_batches",
        "plan_batches",
        "study_chunks",
        "archive_studies",
        "load_metadata",
        "collection_summary",
        "batch_report",
    }
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.catchup is False
    assert dag.get_task("wait_for_batches").mode == "reschedule"
    # Pools are a setting; unset, default_pool, which every Airflow has (no manual step).
    assert dag.get_task("archive_studies").pool == "default_pool"
    assert dag.get_task("load_metadata").pool == "default_pool"


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    """Settings of a local run that sends to the emulators, with a fresh bucket and landing zone.

    The demo's batches name the demo's collection in their manifests; no other module loads it."""
    root = tmp_path_factory.mktemp("landing")
    # several mapped archive tasks per batch
    with pipeline_settings(root, collection=COLLECTION, DICOM_STUDIES_PER_TASK="2") as env:
        yield env


def run_dag(batch_ids: list[str]) -> str:
    return str(run_storage_dag(batch_ids).state)


def bucket_objects(bucket: str) -> dict[str, int]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    return {b.name: b.generation for b in GCSHook().get_conn().list_blobs(bucket)}


def table_counts(client: bigquery.Client) -> tuple[int, int]:
    rows = client.query(
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT instance_sha256) AS d FROM `{PROJECT}.{COLLECTION}.dicom`"
    ).result()
    row = next(iter(rows))
    return row["n"], row["d"]


def extra_links() -> set[tuple[str, str]]:
    """The console links the UI shows, as the worker stored them in XCom for the latest run."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run_id = session.query(DagRun.run_id).filter(DagRun.dag_id == DAG_ID).order_by(DagRun.id.desc()).first()[0]
        rows = session.query(XComModel.task_id, XComModel.value).filter(
            XComModel.dag_id == DAG_ID, XComModel.run_id == run_id, XComModel.key.like("_link_%")
        )
        return {(task_id, value) for task_id, value in rows}


def rendered_fields(dag_id: str, task_id: str, run_id: str | None = None) -> list[dict]:
    """What the UI's "Rendered Templates" shows for each instance of a task (default: in the
    DAG's latest run)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as Rendered
    from airflow.utils.session import create_session

    with create_session() as session:
        if run_id is None:
            run_id = session.query(DagRun.run_id).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()[0]
        rows = session.query(Rendered).filter(
            Rendered.dag_id == dag_id, Rendered.task_id == task_id, Rendered.run_id == run_id
        )
        return [row.rendered_fields for row in rows.order_by(Rendered.map_index)]


def asset_event_uris() -> set[str]:
    """The assets that received an event, through the asset aliases of the two operators."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(AssetModel.uri).join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
        return {uri for (uri,) in rows}


def phi_audit(pipeline_env: dict, batches: list[BatchSpec]) -> list:
    """Every identifying value planted in the landing zone (and carried by the pydicom samples the
    images start from), searched in object names, archive members and headers, rows and reports."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from tools.landing_zone import raw_identifiers
    from tools.phi_audit import audit

    hook = DicomStorageHook()
    return audit(
        raw_identifiers(batches, include_sources=True),
        [f"gs://{pipeline_env['bucket']}"],
        reports=[pipeline_env["root"]],
        bigquery_tables=[f"{PROJECT}.{COLLECTION}.dicom"],
        bigquery_client=hook.bigquery_client(PROJECT),
        storage_client=GCSHook().get_conn(),
    )


def read_report(root: Path, batch_id: str) -> dict:
    return json.loads((root / batch_id / "batch.report.json").read_text())


def read_bucket_report(bucket: str, collection: str, batch_id: str) -> dict:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    blob = GCSHook().get_conn().bucket(bucket).blob(f"Collection/{collection}/Batches/{batch_id}.json")
    return json.loads(blob.download_as_bytes())


@pytest.fixture(scope="module")
def good_batches(pipeline_env) -> list[BatchSpec]:
    batches = demo_batches(days=3)
    for batch in batches:
        write_batch(pipeline_env["root"], batch)
    return batches


def test_end_to_end_run_writes_exact_objects_rows_and_reports(pipeline_env, good_batches, bigquery_client):
    state = run_dag([b.batch_id for b in good_batches])
    assert state == "success"

    objects = bucket_objects(pipeline_env["bucket"])
    archives = {name for name in objects if name.endswith(".tar.gz")}
    assert archives == set().union(*(expected_objects(b) for b in good_batches))
    assert {n for n in objects if "/Batches/" in n} == {
        f"Collection/{COLLECTION}/Batches/{b.batch_id}.json" for b in good_batches
    }
    assert not [n for n in objects if n.startswith("_staging/")], "staging is cleared after the report"

    total = sum(expected_image_count(b) for b in good_batches)
    assert table_counts(bigquery_client) == (total, total)
    archives = (
        f"https://console.cloud.google.com/storage/browser/{pipeline_env['bucket']}"
        f"/Collection/{COLLECTION}?project={PROJECT}"
    )
    reports = {
        (
            task,
            f"https://console.cloud.google.com/storage/browser/_details/{pipeline_env['bucket']}"
            f"/Collection/{COLLECTION}/Batches/{b.batch_id}.json?project={PROJECT}",
        )
        for b in good_batches
        for task in ("archive_studies", "load_metadata")
    }
    assert extra_links() == {
        ("archive_studies", archives),
        ("load_metadata", archives),
        ("load_metadata", f"https://console.cloud.google.com/bigquery?project={PROJECT}&p={PROJECT}"
         f"&d={COLLECTION}&t=dicom&page=table"),
    } | reports  # fmt: skip

    assert asset_event_uris() >= {
        f"gs://{pipeline_env['bucket']}/Collection/{COLLECTION}",
        f"bigquery://{PROJECT}/{COLLECTION}/dicom",
    }, "downstream DAGs can be scheduled on the bucket prefix and the table"

    # Each task shows where it read and wrote: the settings, filled in when the task ran.
    destination = {"bucket": pipeline_env["bucket"], "project": PROJECT, "impersonation_chain": None}
    archive_tasks = rendered_fields(DAG_ID, "archive_studies")
    assert archive_tasks
    for fields in archive_tasks:
        shown = {k: fields.get(k) for k in (*destination, "landing_root")}
        assert shown == {**destination, "landing_root": str(pipeline_env["root"])}
    load_tasks = rendered_fields(DAG_ID, "load_metadata")
    assert len(load_tasks) == len(good_batches)
    for fields in load_tasks:
        assert {k: fields.get(k) for k in (*destination, "location")} == {**destination, "location": "US"}
    assert rendered_fields(DAG_ID, "wait_for_batches")[0]["landing_root"] == str(pipeline_env["root"])

    findings = phi_audit(pipeline_env, good_batches)
    assert findings == [], [str(f) for f in findings]

    for batch in good_batches:
        report = read_report(pipeline_env["root"], batch.batch_id)
        assert report["status"] == "DONE"
        assert report["images"]["seen"] == len(batch.images)
        assert report["images"]["archived"] == expected_image_count(batch)
        assert report["images"]["quarantined"] == len(batch.images) - expected_image_count(batch)
        assert report["archives"]["total"] == len(expected_objects(batch))
        assert report["bigquery"]["rows_in_batch"] == expected_image_count(batch)
        timings = report["timings"]
        assert timings["plan_seconds"] > 0
        assert timings["archive_seconds"] > 0
        assert timings["load_seconds"] > 0


def test_second_run_changes_nothing(pipeline_env, good_batches, bigquery_client):
    before = bucket_objects(pipeline_env["bucket"])
    rows_before = table_counts(bigquery_client)

    assert run_dag([b.batch_id for b in good_batches]) == "success"

    after = bucket_objects(pipeline_env["bucket"])
    assert after == before, "no new object, no new generation, reports included"
    assert table_counts(bigquery_client) == rows_before
    for batch in good_batches:
        report = read_report(pipeline_env["root"], batch.batch_id)
        assert report["archives"]["written"] == 0
        assert report["archives"]["already_present"] == len(expected_objects(batch))
        assert report["bigquery"]["rows_inserted"] == 0


def test_error_empty_and_bad_manifest_batches_beside_a_good_one(pipeline_env, bigquery_client):
    root = pipeline_env["root"]
    clean = ImageSpec("GLaa0001", "GLbb0001", "20230105", "CT", source="ct")
    good = BatchSpec("mixed-good", images=[clean], collection=COLLECTION)
    errored = BatchSpec("mixed-error", images=[clean], collection=COLLECTION, status="ERROR")
    named = ImageSpec("GLaa0002", "GLbb0002", "20230106", "CT", source="ct", header_overrides={"PatientName": "X^Y"})
    empty = BatchSpec("mixed-empty", images=[named], collection=COLLECTION)
    broken = BatchSpec("mixed-broken", images=[clean], raw_manifest=b'{"batch_id": "someone-else"}')
    for batch in (good, errored, empty, broken):
        write_batch(root, batch)

    # The broken manifest fails its batch (and so the run), and nothing else.
    dag_run = run_storage_dag(["mixed-good", "mixed-error", "mixed-empty", "mixed-broken"])
    assert str(dag_run.state) == "failed"
    reports = {ti.map_index: str(ti.state) for ti in dag_run.get_task_instances() if ti.task_id == "batch_report"}
    assert sorted(reports.values()) == ["failed", "skipped", "skipped", "success"]  # ERROR and EMPTY end skipped

    objects = bucket_objects(pipeline_env["bucket"])
    assert expected_objects(good) <= set(objects)
    assert not any("GLaa0002" in name for name in objects), "nothing of the EMPTY batch is uploaded"
    assert read_report(root, "mixed-good")["status"] == "DONE"
    assert read_report(root, "mixed-error")["status"] == "ERROR"
    assert read_report(root, "mixed-error")["archives"]["total"] == 0
    empty_report = read_report(root, "mixed-empty")
    assert empty_report["status"] == "EMPTY"
    assert empty_report["images"]["quarantined_by_reason"] == {"identifying_attribute": 1}
    broken_report = read_report(root, "mixed-broken")
    assert broken_report["status"] == "ERROR"
    assert "batch.json" in broken_report["error"]
    assert "must equal the folder name" in broken_report["error"]
    # Its ERROR report is stored in the bucket too, under the default collection (pipeline_env
    # sets GOOGLE_STORAGE_COLLECTION): the run fails all the same.
    stored = read_bucket_report(pipeline_env["bucket"], COLLECTION, "mixed-broken")
    assert (stored["status"], stored["error"]) == ("ERROR", broken_report["error"])


@pytest.fixture
def refusing_google(monkeypatch) -> Iterator[list[str]]:
    """Both Google endpoints pointed at a server that records every request and answers 403."""
    import http.server
    import threading

    seen: list[str] = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(403)
            self.end_headers()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", url)
    yield seen
    server.shutdown()


def test_local_mode_sends_nothing_and_reads_settings_from_variables(
    pipeline_env, refusing_google, tmp_path, monkeypatch
):
    from airflow.models import Variable

    root, output = tmp_path / "landing", tmp_path / "output"
    batch = demo_batches(days=1)[0]
    write_batch(root, batch)
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(output))
    monkeypatch.delenv("DICOM_LANDING_ROOT")
    Variable.set("DICOM_LANDING_ROOT", str(root))  # read by the tasks through the Task SDK
    try:
        assert run_dag([batch.batch_id]) == "success"
    finally:
        Variable.delete("DICOM_LANDING_ROOT")

    assert refusing_google == [], "SEND_TO_GOOGLE=false must not call Google at all"
    archives = {p.relative_to(output).as_posix() for p in output.rglob("*.tar.gz")}
    assert archives == expected_objects(batch)
    rows = (output / "BigQuery" / COLLECTION / "dicom" / f"{batch.batch_id}.ndjson").read_text().splitlines()
    assert len(rows) == expected_image_count(batch)
    assert {json.loads(r)["storage_uri"].split("/output/", 1)[1] for r in rows} == expected_objects(batch)
    # A local run's report has its own name: it never stands in for a report of Cloud Storage objects.
    assert json.loads((root / batch.batch_id / "batch.report.local.json").read_text())["status"] == "DONE"
    assert not (root / batch.batch_id / "batch.report.json").exists()
    assert not list(output.glob("_staging/*/*/*")), "staging is cleared after the report"


def test_local_rerun_merges_rows_as_the_table_would(pipeline_env, refusing_google, tmp_path, monkeypatch):
    """A no-op rerun in local mode leaves the rows file as it was and reports no new row (the
    MERGE's rule, ndjson.merge_rows); a row the file lost comes back as the one new row."""
    root, output = tmp_path / "landing", tmp_path / "output"
    batch = demo_batches(days=1)[0]
    write_batch(root, batch)
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(output))
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(root))
    rows_file = output / "BigQuery" / COLLECTION / "dicom" / f"{batch.batch_id}.ndjson"
    report_file = root / batch.batch_id / "batch.report.local.json"

    assert run_dag([batch.batch_id]) == "success"
    first, images = rows_file.read_bytes(), expected_image_count(batch)
    assert json.loads(report_file.read_text())["bigquery"]["rows_inserted"] == images

    assert run_dag([batch.batch_id]) == "success"
    assert rows_file.read_bytes() == first, "a rerun rewrites no row (uploaded_at, dag_run_id stay)"
    loaded = json.loads(report_file.read_text())["bigquery"]
    assert (loaded["rows_in_batch"], loaded["rows_inserted"], loaded["rows_updated"], loaded["rows_deleted"]) == (
        images, 0, 0, 0)  # fmt: skip

    lines = first.splitlines(keepends=True)
    rows_file.write_bytes(b"".join(lines[1:]))
    assert run_dag([batch.batch_id]) == "success"
    assert json.loads(report_file.read_text())["bigquery"]["rows_inserted"] == 1
    now = rows_file.read_bytes().splitlines(keepends=True)
    assert set(lines[1:]) <= set(now), "the other rows are kept as they were"
    assert len(now) == images
    (back,) = set(now) - set(lines[1:])
    assert json.loads(back)["instance_sha256"] == json.loads(lines[0])["instance_sha256"]
    assert json.loads(back)["dag_run_id"] != json.loads(lines[0])["dag_run_id"], "written by the last run"
    assert refusing_google == []


def test_run_with_nothing_to_do_is_skipped_not_failed(pipeline_env, good_batches, tmp_path, monkeypatch):
    empty_root = tmp_path / "empty-landing"
    empty_root.mkdir()
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(empty_root))
    dag_run = run_storage_dag(conf={})  # a manual run without batch_ids: every complete batch without a report

    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success", states
    assert states["wait_for_batches"] == "skipped"
    assert states["plan_batches"] == "skipped"
    assert "failed" not in states.values()
