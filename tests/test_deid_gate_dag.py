"""The de-identification gate through the DAG: dag.test() against both emulators.

A batch of hostile images (names nested, after the pixel data, in private elements; duplicated
flags; lenient spellings) next to clean ones: what is archived, stripped or quarantined, with
which reasons, and that no planted value reaches an object, a row or a report. Then an image
swapped for another patient's between planning and archiving: the archive task fails without
retrying and leaves no object.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import textwrap
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import plan_batch
from tests.conftest import PROJECT
from tests.conftest import run_dag as run_storage_dag
from tests.test_deid_gate import NAME, _insert_after, _pn, base, element, encode, item, with_private
from tools.landing_zone import BatchSpec, write_batch

DAG_ID = "dicom_storage"
COLLECTION = "IRB_GATE"
BATCH = "gate-0001"
PLANTED = (b"DOE^JOHN", b"MRN-4471", b"ROE^JANE")


def hostile_batch() -> dict[str, bytes]:
    private = with_private(base(InstanceNumber=2), 0x0033, "ACME 1.0", 0x10, "PN", NAME)
    with_private(private, 0x0033, "ACME 1.0", 0x11, "LO", "MRN-4471")
    private.RequestAttributesSequence = Sequence([item(RequestedProcedureID="7")])
    with_private(private.RequestAttributesSequence[0], 0x0035, "ACME NESTED", 0x01, "PN", "ROE^JANE")
    duplicated = encode(base(InstanceNumber=6, PatientIdentityRemoved="NO"))
    flag = element(0x00120062, "CS", b"NO")
    return {
        "good/1.dcm": encode(base()),
        "vendor/2.dcm": encode(private),
        "nested/3.dcm": encode(
            base(InstanceNumber=3, RequestAttributesSequence=Sequence([item(ScheduledPerformingPhysicianName=NAME)]))
        ),
        "after/4.dcm": encode(base(InstanceNumber=4)) + _pn(NAME),
        "dup/5.dcm": _insert_after(encode(base(InstanceNumber=5)), _pn(base().PatientID), _pn("ROE^JANE")),
        "dup/6.dcm": _insert_after(duplicated, flag, element(0x00120062, "CS", b"YES")),
        "lenient/7.dcm": encode(base(InstanceNumber=7, BurnedInAnnotation="NO\\YES")),
        # Deflated: archived inflated, its private element stripped; quarantined for a name.
        "deflated/8.dcm": encode(
            with_private(base(InstanceNumber=8), 0x0033, "ACME 1.0", 0x10, "LO", "MRN-4471"),
            DeflatedExplicitVRLittleEndian,
        ),
        "deflated/9.dcm": encode(base(InstanceNumber=9, PatientName=NAME), DeflatedExplicitVRLittleEndian),
    }


EXPECTED_FAILURES = {
    "nested/3.dcm": [
        {
            "reason": "identifying_attribute",
            "detail": "holds a value: RequestAttributesSequence[0].ScheduledPerformingPhysicianName",
        }
    ],
    "after/4.dcm": [
        {"reason": "malformed_header", "detail": "PatientName is out of order"},
        {"reason": "identifying_attribute", "detail": "holds a value: PatientName"},
    ],
    "dup/5.dcm": [
        {"reason": "malformed_header", "detail": "PatientName is duplicated"},
        {"reason": "identifying_attribute", "detail": "holds a value: PatientName"},
    ],
    "dup/6.dcm": [
        {"reason": "malformed_header", "detail": "PatientIdentityRemoved is duplicated"},
        {"reason": "identity_not_removed", "detail": "PatientIdentityRemoved occurs more than once"},
    ],
    "lenient/7.dcm": [{"reason": "burned_in_annotation", "detail": "BurnedInAnnotation holds several values"}],
    "deflated/9.dcm": [{"reason": "identifying_attribute", "detail": "holds a value: PatientName"}],
}


@pytest.fixture(scope="module")
def gate_env(tmp_path_factory, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    root = tmp_path_factory.mktemp("gate-landing")
    bucket = "gate-test-archive"
    GCSHook().create_bucket(bucket_name=bucket, project_id=PROJECT)
    write_batch(root, BatchSpec(BATCH, images=[], collection=COLLECTION))
    for relpath, data in hostile_batch().items():
        (root / BATCH / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / BATCH / relpath).write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "SEND_TO_GOOGLE": "true",
            "GOOGLE_CLOUD_STORAGE": bucket,
            "GOOGLE_PROJECT_NAME": PROJECT,
            "DICOM_LANDING_ROOT": str(root),
        }.items():
            mp.setenv(name, value)
        for name in ("DICOM_PRIVATE_TAGS", "DICOM_PRIVATE_ALLOW", "DICOM_DEID_PROFILE", "DICOM_PERSON_ATTRIBUTES"):
            mp.delenv(name, raising=False)
        yield {"root": root, "bucket": bucket}


def run_dag(batch_ids: list[str]) -> str:
    return str(run_storage_dag(batch_ids).state)


def bucket_blobs(bucket: str) -> dict[str, bytes]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    client = GCSHook().get_conn()
    return {blob.name: blob.download_as_bytes() for blob in client.list_blobs(bucket)}


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_hostile_batch_through_the_dag(gate_env, bigquery_client):
    from dicom_archive.deid_gate import DEFAULT_PERSON_ATTRIBUTES

    root, bucket = gate_env["root"], gate_env["bucket"]
    assert run_dag([BATCH]) == "success"

    report = json.loads((root / BATCH / "batch.report.json").read_text())
    assert report["status"] == "DONE"
    assert report["images"]["seen"] == 9
    assert report["images"]["archived"] == 3
    assert report["images"]["stripped"] == 2
    assert report["images"]["private_elements_removed"] == 4
    assert report["images"]["quarantined_by_reason"] == {
        "burned_in_annotation": 1,
        "identifying_attribute": 2,
        "malformed_header": 3,
    }
    assert {q["path"]: q["failures"] for q in report["quarantined"]} == EXPECTED_FAILURES
    assert report["deid_gate"] == {
        "profile": "contract",
        "profile_options": [],
        "private_tags": "strip",
        "private_allow": [],
        "person_attributes": list(DEFAULT_PERSON_ATTRIBUTES),
        "person_attributes_removed": [],
        "lookup_fields": [],
    }

    blobs = bucket_blobs(bucket)
    (archive_name,) = [name for name in blobs if name.endswith(".tar.gz")]
    archived = members(blobs[archive_name])
    assert len(archived) == 3
    for data in archived.values():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert [e.tag for e in ds.iterall() if e.tag.is_private] == []
        assert ds.PixelData == base().PixelData
    for name, data in blobs.items():  # archives, the bucket's report: nothing planted anywhere
        for planted in PLANTED:
            assert planted not in name.encode()
            assert planted not in (b"".join(members(data).values()) if name.endswith(".tar.gz") else data)

    rows = list(
        bigquery_client.query(
            f"SELECT archive_member, instance_sha256, source_sha256, private_elements_removed, "
            f"TO_JSON_STRING(t) AS everything FROM `{PROJECT}.{COLLECTION}.dicom` AS t ORDER BY archive_member"
        ).result()
    )
    assert len(rows) == 3
    sources = {hashlib.sha256(d).hexdigest(): p for p, d in hostile_batch().items()}
    by_source = {sources[row["source_sha256"]]: row for row in rows}
    assert set(by_source) == {"good/1.dcm", "vendor/2.dcm", "deflated/8.dcm"}
    good, vendor, deflated = by_source["good/1.dcm"], by_source["vendor/2.dcm"], by_source["deflated/8.dcm"]
    assert (good["private_elements_removed"], vendor["private_elements_removed"]) == (0, 3)
    assert deflated["private_elements_removed"] == 1
    assert deflated["instance_sha256"] == hashlib.sha256(archived[deflated["archive_member"]]).hexdigest()
    assert good["instance_sha256"] == good["source_sha256"]
    assert vendor["instance_sha256"] != vendor["source_sha256"]
    assert vendor["instance_sha256"] == hashlib.sha256(archived[vendor["archive_member"]]).hexdigest()
    for row in rows:
        for planted in PLANTED:
            assert planted.decode() not in row["everything"]
    for planted in PLANTED:
        assert planted not in (root / BATCH / "batch.report.json").read_bytes()


DAG_FILE = textwrap.dedent(
    '''
    """A DAG written by tests/test_deid_gate_dag.py: one archive task over inline study groups."""
    import json
    from datetime import UTC, datetime
    from pathlib import Path

    from airflow.sdk import DAG

    from operators.archive import DicomStudyArchiveOperator

    GROUPS = json.loads((Path(__file__).parent / "groups.json").read_text())

    with DAG(dag_id="{dag_id}", schedule=None, start_date=datetime(2024, 1, 1, tzinfo=UTC), catchup=False):
        DicomStudyArchiveOperator(task_id="archive", study_groups=GROUPS, retries=3)
    '''
)


def test_an_image_swapped_between_plan_and_archive_fails_the_task_without_retry(
    gate_env, tmp_path, monkeypatch, airflow_db
):
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    root = tmp_path / "landing"
    write_batch(root, BatchSpec("swap-0001", images=[], collection="IRB_SWAP"))
    for name, data in {"a.dcm": encode(base()), "b.dcm": encode(base(InstanceNumber=2))}.items():
        (root / "swap-0001" / name).write_bytes(data)
    plan = plan_batch(LocalLandingZone(root), "swap-0001")
    (group,) = plan.groups
    # Another patient's image, also de-identified, of the same size.
    other = encode(base(InstanceNumber=2, PatientID="GL000000", PatientName="GL000000"))
    assert len(other) == (root / "swap-0001" / "b.dcm").stat().st_size
    (root / "swap-0001" / "b.dcm").write_bytes(other)

    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "groups.json").write_text(json.dumps([group.to_dict()]))
    dag_id = "test_gate_identity_swap"
    (folder / "swap_dag.py").write_text(DAG_FILE.format(dag_id=dag_id))
    bag = DagBag(dag_folder=str(folder), bundle_path=folder)
    assert bag.import_errors == {}
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(root))

    run = bag.dags[dag_id].test()
    (ti,) = run.get_task_instances()
    assert str(run.state) == "failed"
    assert str(ti.state) == "failed", "an integrity failure is not retried"
    assert ti.try_number == 1
    assert group.object_name.startswith("Collection/IRB_SWAP/")
    assert not [name for name in bucket_blobs(gate_env["bucket"]) if name.startswith("Collection/IRB_SWAP/")]
