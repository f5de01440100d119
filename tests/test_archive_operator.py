"""DicomStudyArchiveOperator run for real: a minimal DAG, parsed from a folder, saved to the
metadata database and run with `dag.test()`, against the Cloud Storage emulator (through the
fault proxy, which records every request) and against the local output folder.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import textwrap
from pathlib import Path

import pytest

from dicom_archive.archive import write_study_archive
from dicom_archive.batch import run_key
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import BatchPlan, plan_batch
from tests.conftest import PROJECT
from tests.faultproxy import FaultProxy, proxied
from tests.test_dag import rendered_fields
from tools.landing_zone import BatchSpec, ImageSpec, write_batch

DAG_ID = "test_dicom_study_archive_operator"
BATCH_ID = "20240105-0001"
COLLECTION = "IRB41449"
DEID = {"software": "deid 0.4.13", "recipe": "deid.dicom"}
XCOM_KEYS = {"uri", "generation", "md5", "crc32c", "size", "outcome", "written_by_batch", "image_count",
             "quarantined_count", "input_bytes", "seconds", "images_stripped", "private_elements_removed",
             "content_digest", "name"}  # fmt: skip

DAG_FILE = textwrap.dedent(
    '''
    """A DAG written by tests/test_archive_operator.py: one archive task over inline study groups."""
    import json
    from datetime import UTC, datetime
    from pathlib import Path

    from airflow.sdk import DAG

    from operators.archive import DicomStudyArchiveOperator

    GROUPS = json.loads((Path(__file__).parent / "groups.json").read_text())

    with DAG(dag_id="{dag_id}", schedule=None, start_date=datetime(2024, 1, 1, tzinfo=UTC), catchup=False):
        DicomStudyArchiveOperator(task_id="archive", study_groups=GROUPS, deid={deid!r}, retries=0)
    '''
)


# The same task with its destination and identity templated, as a DAG author would write it.
TEMPLATED_DAG_ID = "test_dicom_study_archive_operator_templated"
IMPERSONATED = "archiver@test-project.iam.gserviceaccount.com"
TEMPLATED_DAG_FILE = textwrap.dedent(
    '''
    """A DAG written by tests/test_archive_operator.py: the destination comes from the run's params."""
    import json
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from airflow.sdk import DAG

    from operators.archive import DicomStudyArchiveOperator

    GROUPS = json.loads((Path(__file__).parent / "groups.json").read_text())

    with DAG(
        dag_id="{dag_id}",
        schedule=None,
        start_date=datetime(2024, 1, 1, tzinfo=UTC),
        catchup=False,
        params={{"bucket": "unset", "delegate": "unset"}},
    ):
        DicomStudyArchiveOperator(
            task_id="archive",
            study_groups=GROUPS,
            deid={deid!r},
            bucket="{{{{ params.bucket }}}}",
            impersonation_chain=["{{{{ params.delegate }}}}", "{impersonated}"],
            retries=1,  # a bad destination must still fail at once
            retry_delay=timedelta(seconds=1),
        )
    '''
)


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> tuple[Path, BatchPlan]:
    """A batch of two studies; one of them has an image held back for an operator's name."""
    root = tmp_path_factory.mktemp("landing")
    images = [ImageSpec("GL664ba0", "GL71cfb7", "20070904", "CT", s, i) for s in (1, 2) for i in (1, 2, 3)]
    images += [ImageSpec("GL2b4d1e", "GL9a0c33", "20070911", "MR", 1, i) for i in (1, 2)]
    images.append(ImageSpec("GL664ba0", "GL71cfb7", "20070904", "CT", 3, 1, header_overrides={"OperatorsName": "T^T"}))
    write_batch(root, BatchSpec(BATCH_ID, images=images, collection=COLLECTION))
    plan = plan_batch(LocalLandingZone(root), BATCH_ID)
    assert [len(g.images) for g in plan.groups] == [2, 6]
    assert [g.quarantined for g in plan.groups] == [0, 1]
    return root, plan


@pytest.fixture(scope="module")
def dag_bag(airflow_db, landing, tmp_path_factory):
    """The test DAGs, parsed from their own folder and saved the way the dag processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    _, plan = landing
    folder = tmp_path_factory.mktemp("dags")
    (folder / "groups.json").write_text(json.dumps([g.to_dict() for g in plan.groups]))
    (folder / "archive_test_dag.py").write_text(DAG_FILE.format(dag_id=DAG_ID, deid=DEID))
    (folder / "archive_templated_dag.py").write_text(
        TEMPLATED_DAG_FILE.format(dag_id=TEMPLATED_DAG_ID, deid=DEID, impersonated=IMPERSONATED)
    )
    bag = DagBag(dag_folder=str(folder), bundle_path=folder)
    assert bag.import_errors == {}
    DagBundlesManager().sync_bundles_to_db()  # the bundle row the DAG refers to
    sync_bag_to_db(bag, "dags-folder", None)
    return bag


@pytest.fixture(scope="module")
def dag(dag_bag):
    return dag_bag.dags[DAG_ID]


@pytest.fixture(scope="module")
def templated_dag(dag_bag):
    return dag_bag.dags[TEMPLATED_DAG_ID]


@pytest.fixture
def settings_env(monkeypatch, landing, tmp_path):
    root, _ = landing
    monkeypatch.setenv("GOOGLE_PROJECT_NAME", PROJECT)
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(root))
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "output"))
    for name in ("DICOM_REPLACE_CHANGED_ARCHIVES", "GOOGLE_STORAGE_COLLECTION", "DICOM_PERSON_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def proxy(gcs_emulator) -> FaultProxy:
    with proxied(gcs_emulator.url, "STORAGE_EMULATOR_HOST") as running:
        yield running


def run_dag(dag) -> tuple[str, list[dict]]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    run = dag.test()
    assert run.state == DagRunState.SUCCESS
    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(run_id=run.run_id, key="return_value", dag_ids=DAG_ID, task_ids="archive")
        ).one()
        return run.run_id, XComModel.deserialize_value(row)


def expected_archives(root: Path, plan: BatchPlan) -> dict[str, bytes]:
    zone = LocalLandingZone(root)
    out = {}
    for group in plan.groups:
        sink = io.BytesIO()
        write_study_archive(group, zone, sink)
        out[group.object_name] = sink.getvalue()
    return out


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_archives_to_cloud_storage_and_stages_rows_outside_xcom(dag, landing, settings_env, proxy, bucket_name):
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    root, plan = landing
    settings_env.setenv("SEND_TO_GOOGLE", "true")
    settings_env.setenv("GOOGLE_CLOUD_STORAGE", bucket_name)

    run_id, summaries = run_dag(dag)

    expected = expected_archives(root, plan)
    bucket = GCSHook(gcp_conn_id="google_cloud_default").get_conn().bucket(bucket_name)
    assert [s["uri"] for s in summaries] == [f"gs://{bucket_name}/{g.object_name}" for g in plan.groups]
    for summary, group in zip(summaries, plan.groups, strict=True):
        assert set(summary) == XCOM_KEYS
        data = expected[group.object_name]
        blob = bucket.get_blob(group.object_name)
        assert summary["outcome"] == "written"
        assert (summary["md5"], summary["size"]) == (b64md5(data), len(data))
        assert (summary["generation"], summary["md5"], summary["crc32c"], summary["size"]) == (
            blob.generation,
            blob.md5_hash,
            blob.crc32c,
            blob.size,
        )
        assert (summary["image_count"], summary["quarantined_count"]) == (len(group.images), group.quarantined)
        assert summary["input_bytes"] == group.size
        assert blob.metadata["batch_id"] == BATCH_ID
        assert blob.metadata["image_count"] == str(len(group.images))
        assert blob.content_type == "application/gzip"
    assert [(s["image_count"], s["quarantined_count"]) for s in summaries] == [(2, 0), (6, 1)]

    # The per-image rows are staged in the bucket for the BigQuery step; XCom stays small.
    staging = f"_staging/{BATCH_ID}/{run_key(run_id)}/"
    names = sorted(blob.name for blob in bucket.list_blobs(prefix=f"_staging/{BATCH_ID}/"))
    rows_files = [n for n in names if n.startswith(f"{staging}rows/") and n.endswith(".ndjson")]
    assert len(rows_files) == 1, names
    rows = [json.loads(line) for line in bucket.blob(rows_files[0]).download_as_bytes().splitlines()]
    assert len(rows) == 8
    assert {r["storage_uri"] for r in rows} == {s["uri"] for s in summaries}
    by_uri = {s["uri"]: s for s in summaries}
    planned = {
        hashlib.sha256((root / BATCH_ID / i.relpath).read_bytes()).hexdigest(): g for g in plan.groups for i in g.images
    }
    assert {r["instance_sha256"] for r in rows} == set(planned)
    for row in rows:
        group = planned[row["instance_sha256"]]
        assert row["batch_id"] == BATCH_ID
        assert row["collection"] == COLLECTION
        assert row["storage_uri"] == f"gs://{bucket_name}/{group.object_name}"
        assert row["storage_bucket"] == bucket_name
        assert row["storage_md5Hash"] == by_uri[row["storage_uri"]]["md5"]
        assert row["archive_member"].startswith(f"{group.stem}/")
        assert row["deid_software"] == DEID["software"]
    summaries_file = f"{staging}archives/{rows_files[0].rsplit('/', 1)[1].removesuffix('.ndjson')}.json"
    assert json.loads(bucket.blob(summaries_file).download_as_bytes()) == summaries
    xcom_text = json.dumps(summaries)
    assert "instance_sha256" not in xcom_text
    assert "archive_member" not in xcom_text
    assert len(xcom_text) < 2000
    # Only the archives and the staging files were written; no ACL call was made.
    assert sorted(n for n in (b.name for b in bucket.list_blobs()) if not n.startswith("_staging/")) == sorted(expected)
    assert not [r for r in proxy.log if "/acl" in r.path or "predefinedacl=" in r.query.lower()]


def test_rerun_finds_the_archives_already_present(dag, landing, settings_env, proxy, bucket_name):
    settings_env.setenv("SEND_TO_GOOGLE", "true")
    settings_env.setenv("GOOGLE_CLOUD_STORAGE", bucket_name)
    _, first = run_dag(dag)
    archive_uploads = len(proxy.requests("POST", r"^/upload/", "uploadType=resumable"))
    assert archive_uploads == 2
    _, second = run_dag(dag)
    assert [s["outcome"] for s in first] == ["written", "written"]
    assert [s["outcome"] for s in second] == ["already_present", "already_present"]
    assert [(s["generation"], s["md5"]) for s in second] == [(s["generation"], s["md5"]) for s in first]
    # The second run wrote its staging files only (simple uploads), no archive.
    assert len(proxy.requests("POST", r"^/upload/", "uploadType=resumable")) == archive_uploads


def test_local_mode_writes_the_same_bytes_and_sends_nothing(dag, landing, settings_env, proxy, bucket_name, tmp_path):
    _root, plan = landing
    settings_env.setenv("SEND_TO_GOOGLE", "true")
    settings_env.setenv("GOOGLE_CLOUD_STORAGE", bucket_name)
    _, to_google = run_dag(dag)
    assert proxy.log, "the Cloud Storage run went through the proxy"

    proxy.clear()
    settings_env.setenv("SEND_TO_GOOGLE", "false")
    settings_env.delenv("GOOGLE_CLOUD_STORAGE")
    run_id, local = run_dag(dag)

    assert proxy.log == [], "SEND_TO_GOOGLE=false must not reach Cloud Storage"
    output = tmp_path / "output"
    assert [s["md5"] for s in local] == [s["md5"] for s in to_google]
    for summary, group in zip(local, plan.groups, strict=True):
        path = output / group.object_name
        assert summary["uri"] == path.resolve().as_uri()
        data = path.read_bytes()
        assert b64md5(data) == summary["md5"]
        assert len(data) == summary["size"]
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            assert len([m for m in tar.getmembers() if m.isfile()]) == len(group.images)
    rows = list((output / "_staging" / BATCH_ID / run_key(run_id) / "rows").glob("*.ndjson"))
    assert len(rows) == 1
    assert len(rows[0].read_bytes().splitlines()) == 8
    assert not any(p.suffix == ".partial" or p.name.endswith(".partial") for p in output.rglob("*")), (
        "no half-written file is left behind"
    )


def test_templated_bucket_is_where_the_task_writes_and_what_rendered_templates_show(
    templated_dag, landing, settings_env, gcs_emulator, tmp_path
):
    from airflow.providers.google.cloud.hooks.gcs import GCSHook
    from airflow.utils.state import DagRunState

    root, plan = landing
    storage = GCSHook(gcp_conn_id="google_cloud_default")
    settings_bucket, run_bucket = (f"settings-{tmp_path.name[-8:].lower()}", f"run-{tmp_path.name[-8:].lower()}")
    for name in (settings_bucket, run_bucket):
        storage.create_bucket(bucket_name=name, project_id=PROJECT)
    settings_env.setenv("SEND_TO_GOOGLE", "true")
    settings_env.setenv("GOOGLE_CLOUD_STORAGE", settings_bucket)
    delegate = "delegate@test-project.iam.gserviceaccount.com"

    run = templated_dag.test(run_conf={"bucket": run_bucket, "delegate": delegate})

    assert run.state == DagRunState.SUCCESS
    client = storage.get_conn()
    archives = sorted(b.name for b in client.list_blobs(run_bucket) if b.name.endswith(".tar.gz"))
    assert archives == sorted(g.object_name for g in plan.groups)
    assert list(client.list_blobs(settings_bucket)) == [], "the setting's bucket is not written"
    (rendered,) = rendered_fields(TEMPLATED_DAG_ID, "archive", run.run_id)
    assert rendered["bucket"] == run_bucket
    assert rendered["impersonation_chain"] == [delegate, IMPERSONATED]
    # Left at their defaults, the destination fields show the settings the task used.
    assert rendered["project"] == PROJECT
    assert rendered["landing_root"] == str(root)


@pytest.mark.parametrize(
    ("bucket", "problem"),
    [
        ("Not_A_Bucket", "bucket name 'Not_A_Bucket' has uppercase"),
        ("", "GOOGLE_CLOUD_STORAGE \\(the bucket\\) is required"),
    ],
)
def test_bad_templated_bucket_fails_the_task_at_once_with_the_rule_named(
    templated_dag, settings_env, gcs_emulator, bucket_name, capfd, bucket, problem
):
    from airflow.utils.state import DagRunState, TaskInstanceState

    settings_env.setenv("SEND_TO_GOOGLE", "true")
    settings_env.setenv("GOOGLE_CLOUD_STORAGE", bucket_name)  # a good setting: the argument wins, and is checked

    run = templated_dag.test(run_conf={"bucket": bucket, "delegate": "d@test-project.iam.gserviceaccount.com"})

    assert run.state == DagRunState.FAILED
    ti = run.get_task_instance("archive")
    assert (ti.state, ti.try_number) == (TaskInstanceState.FAILED, 1), "no retry: a retry cannot fix it"
    log = capfd.readouterr()
    assert re.search(problem, log.out + log.err)
    assert re.search(r"task arguments: bucket=", log.out + log.err)


def test_an_image_changed_after_planning_fails_the_task_at_once_naming_the_image(
    dag, landing, settings_env, tmp_path, capfd
):
    """The planned files are not the ones the task finds (here: a copy of the landing zone, so
    every file is another one): the task fails once, not retried, and its log names the image,
    the rule and why it is not retried."""
    import shutil

    from airflow.utils.state import DagRunState, TaskInstanceState

    root, plan = landing
    copy = tmp_path / "landing-copy"
    shutil.copytree(root, copy)
    settings_env.setenv("DICOM_LANDING_ROOT", str(copy))
    settings_env.setenv("SEND_TO_GOOGLE", "false")

    run = dag.test()

    assert run.state == DagRunState.FAILED
    ti = run.get_task_instance("archive")
    assert (ti.state, ti.try_number) == (TaskInstanceState.FAILED, 1)
    log = capfd.readouterr()
    found = re.search(
        r"AirflowFailException: ArchiveIntegrityError: (\S+) is not the file that was planned "
        r"\(changed after planning: [^)]+\); nothing of this archive is kept \(not retried: a retry cannot fix this\)",
        log.out + log.err,
    )
    assert found, "the task's log gives the reason, the image and why it was not retried"
    planned = {str(copy / BATCH_ID / image.relpath) for group in plan.groups for image in group.images}
    assert found[1] in planned
    assert not [p for p in (tmp_path / "output").rglob("*.tar.gz")], "nothing of the archive is kept"
