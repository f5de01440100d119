"""Data that others wrote: real anonymizers over real public sample files, through the whole DAG.

The fixtures are built at test time, nothing is checked in:

- the files: pydicom's bundled test files (CT, MR, JPEG 2000, an MR with overlays and private
  tags, an RT plan) and deid-data's (a head CT of a fictitious patient with names and record
  numbers in private elements, and three JPEG "cookie" images), pinned in requirements.in;
- the anonymizers, each as a site would run it (pinned in requirements.in):
  - deid (pydicom/deid) with its default recipe `deid.dicom`, as sendit ran it: the recipe itself
    sets PatientID, AccessionNumber, StudyDate and PatientBirthDate from the variables
    `entity_id`, `item_id`, `item_timestamp`, `entity_timestamp` that the site passes (sendit took
    them from its coding service: coded ids `GL` + 6 hex digits, a jittered date) and sets
    PatientIdentityRemoved YES. It keeps private elements;
  - dicognito with its defaults: it replaces every name with a made-up one, ids with random
    12-character codes (already coded ids of the contract) and shifts dates; it does not set
    PatientIdentityRemoved. The site's step after it (stated here, as a site's recipe would be):
    PatientIdentityRemoved = YES, PatientName = PatientID, OtherPatientIDs and
    OtherPatientIDsSequence removed (one coded id per patient). The other made-up person names
    stay: a gate cannot tell a made-up name from a real one, so those images are quarantined.

For each anonymizer: the original identifying values (names at any depth and in private
elements, ids, birth dates, addresses, institutions) are recorded from the raw files, the batch
goes through `dag.test()` against both emulators, none of those values may appear in any object,
archive member header, row or report (tools.phi_audit), and what was archived, stripped or
quarantined is asserted image by image, with the reasons.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_archive.deid_gate import DEFAULT_PERSON_ATTRIBUTES
from tests.conftest import PROJECT, pipeline_settings, run_dag
from tools import phi_audit
from tools.landing_zone import BatchSpec, write_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

DAG_ID = "dicom_storage"
COLLECTION = "IRB50211"
BUCKET = "real-anonymizers-archive"

PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "examples_overlay.dcm", "rtplan.dcm")
DEID_DATA_FILES = ("humans/ctbrain1.dcm", "humans/ctbrain2.dcm", *(f"dicom-cookies/image{n}.dcm" for n in (1, 2, 3)))

# Identifying keywords recorded from the raw files, at any depth (besides every PN element): the
# patient's and other persons' identifiers. Not the institution's name and address: they identify
# no person, the contract's checks let them through (deid's default recipe keeps them), and only
# the opt-in Annex E profile (DICOM_DEID_PROFILE=basic) removes them.
IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "AccessionNumber",
    "MedicalRecordLocator", "IssuerOfPatientID",
)  # fmt: skip
NOT_PERSON_CATEGORIES = ("institution", "study_id")


def sources() -> dict[str, Path]:
    """Local name -> the public sample file (bundled with pydicom or deid-data: never downloaded)."""
    from deid_data import data as deid_data

    found: dict[str, Path] = {}
    for name in PYDICOM_FILES:
        path = get_testdata_file(name, download=False)
        assert isinstance(path, str), f"pydicom {pydicom.__version__} does not bundle {name}"
        found[f"pydicom-{Path(name).stem}"] = Path(path)
    root = Path(deid_data.__file__).parent
    for name in DEID_DATA_FILES:
        path = root / name
        assert path.is_file(), f"deid-data does not ship {name}"
        found[f"deid-data-{name.replace('/', '-').removesuffix('.dcm')}"] = path
    return found


def original_identifiers(paths: list[Path]) -> list[str]:
    """The raw files' identifying values, read here with pydicom (not with the audit under test):
    the keywords above and every person name, at any depth, private elements included."""
    values: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        for element in ds.iterall():
            if element.tag.is_private and element.VR in ("LO", "SH", "UN") and isinstance(element.value, bytes):
                continue
            if element.keyword in IDENTIFYING or element.VR == "PN":
                items = (
                    element.value if isinstance(element.value, list | pydicom.multival.MultiValue) else [element.value]
                )
                values.update(str(v).strip() for v in items if str(v).strip())
    return sorted(values)


def coded(*parts: object) -> str:
    return "GL" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:6]


def run_deid(files: dict[str, Path], out: Path) -> dict[str, str]:
    """deid's default recipe with the variables a site passes; returns name -> coded PatientID."""
    from deid.dicom import get_identifiers, replace_identifiers

    names = list(files)
    paths = [str(files[name]) for name in names]
    ids = get_identifiers(paths)
    entities: dict[str, str] = {}
    for name, path in zip(names, paths, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        patient = str(ds.get("PatientID", "") or name)
        entity = entities[name] = coded("entity", patient)
        ids[path].update(
            {
                "entity_id": entity,
                "item_id": coded("item", patient, ds.get("AccessionNumber", ""), ds.get("StudyDate", ""), name),
                "item_timestamp": "20230811",
                "entity_timestamp": "19700101",
            }
        )
    cleaned = replace_identifiers(dicom_files=paths, ids=ids, save=False)  # the default recipe deid.dicom
    out.mkdir(parents=True)
    for name, ds in zip(names, cleaned, strict=True):
        ds.save_as(out / f"{name}.dcm")
    return entities


def run_dicognito(files: dict[str, Path], out: Path) -> dict[str, str]:
    """dicognito with its defaults, then the site's step (PatientIdentityRemoved, PatientName, other ids)."""
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="phi-inputs-test")  # deterministic fake values
    out.mkdir(parents=True)
    entities: dict[str, str] = {}
    for name, path in files.items():
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.PatientIdentityRemoved = "YES"
        ds.PatientName = ds.PatientID
        for keyword in ("OtherPatientIDs", "OtherPatientIDsSequence"):  # one coded id per patient
            if keyword in ds:
                delattr(ds, keyword)
        entities[name] = str(ds.PatientID)
        ds.save_as(out / f"{name}.dcm")
    return entities


ANONYMIZERS = {"deid": run_deid, "dicognito": run_dicognito}


def private_elements(ds: pydicom.Dataset) -> int:
    return sum(1 for element in ds.iterall() if element.tag.is_private)


def identifying_values(ds: pydicom.Dataset) -> list[str]:
    """Public elements at any depth that the contract does not allow to hold what they hold: a
    person name (VR PN) other than the coded PatientID, a person-identifying attribute of check 6
    with a value, a PatientID / OtherPatientIDs / AccessionNumber other than the coded ids."""
    coded = {"", str(ds.PatientID), str(ds.AccessionNumber)}
    found = []
    for element in ds.iterall():
        if element.tag.is_private or element.VR == "SQ":
            continue
        items = element.value if isinstance(element.value, list | pydicom.multival.MultiValue) else [element.value]
        values = {str(v).strip() for v in items if v is not None}
        if element.VR == "PN":
            allowed = {"", str(ds.PatientID)}
        elif element.keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber"):
            allowed = coded
        elif element.keyword in DEFAULT_PERSON_ATTRIBUTES:
            allowed = {""}
        else:
            continue
        if values - allowed:
            found.append(element.keyword)
    return sorted(found)


@pytest.fixture(scope="module")
def anonymized(tmp_path_factory) -> dict:
    """Each anonymizer's output over the same public files, as batches of a landing zone."""
    tmp = tmp_path_factory.mktemp("anonymizers")
    files = sources()
    root = tmp / "landing"
    batches: dict[str, dict] = {}
    for anonymizer, run in ANONYMIZERS.items():
        out = tmp / anonymizer
        entities = run(files, out)
        batch_id = f"20240105-{anonymizer}"
        folder = write_batch(root, BatchSpec(batch_id, collection=COLLECTION, deid={"software": anonymizer}))
        shutil.copytree(out, folder / anonymizer)
        (folder / "batch.json").touch()  # batch.json stays the newest file, as the contract asks
        images = {f"{anonymizer}/{name}.dcm": pydicom.dcmread(out / f"{name}.dcm") for name in files}
        batches[anonymizer] = {"batch_id": batch_id, "images": images, "entities": entities}
    return {"root": root, "batches": batches, "raw": list(files.values())}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, anonymized, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    with pipeline_settings(anonymized["root"], bucket=BUCKET, collection=COLLECTION):
        dag_run = run_dag([b["batch_id"] for b in anonymized["batches"].values()])
        yield {"state": str(dag_run.state), **anonymized}


def read_report(root: Path, batch_id: str) -> dict:
    return json.loads((root / batch_id / "batch.report.json").read_text())


def test_the_raw_identifiers_are_real_and_live(anonymized):
    """Not vacuous: the raw files do carry names, ids and birth dates, in private elements too, and
    deid's default recipe leaves some of them in the landing zone (which the audit then finds)."""
    values = original_identifiers(anonymized["raw"])
    for expected in ("SIMPSON^HOMER^J^", "CompressedSamples^CT1", "00007041776", "20200704", "nameless waterfall"):
        assert expected in values, expected
    findings = phi_audit.audit(values, [anonymized["root"] / anonymized["batches"]["deid"]["batch_id"]])
    assert any("(0033," in f.field for f in findings), "deid's default recipe keeps names in private elements"


def expected_outcome(anonymizer: str, ds: pydicom.Dataset) -> tuple[str, set[str]]:
    """What the gate must do with one anonymized file: ("archived" | "stripped" | "quarantined",
    the reasons), restated from the file's content and the contract."""
    if identifying_values(ds):
        return "quarantined", {"identifying_attribute"}
    return ("stripped" if private_elements(ds) else "archived"), set()


@pytest.mark.parametrize("anonymizer", sorted(ANONYMIZERS))
def test_each_image_is_archived_stripped_or_quarantined_as_the_contract_says(pipeline, anonymizer):
    assert pipeline["state"] == "success"
    batch = pipeline["batches"][anonymizer]
    report = read_report(pipeline["root"], batch["batch_id"])
    expected = {path: expected_outcome(anonymizer, ds) for path, ds in batch["images"].items()}
    held = {q["path"]: {f["reason"] for f in q["failures"]} for q in report["quarantined"]}
    assert held == {path: reasons for path, (kind, reasons) in expected.items() if kind == "quarantined"}
    kinds = [kind for kind, _ in expected.values()]
    assert report["images"]["seen"] == len(expected)
    assert report["images"]["archived"] == kinds.count("archived") + kinds.count("stripped")
    assert report["images"]["stripped"] == kinds.count("stripped")
    # What each anonymizer leaves, as the module doc says:
    if anonymizer == "deid":
        assert kinds.count("quarantined") == 0, "deid's default recipe removes every public person name"
        assert kinds.count("stripped") >= 4, "and keeps private elements, which are stripped"
    else:
        assert kinds.count("quarantined") >= 4, "dicognito's made-up names and other ids are held back"
        assert kinds.count("archived") + kinds.count("stripped") >= 2


def _archives(bucket: str) -> dict[str, bytes]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    client = GCSHook().get_conn()
    return {blob.name: blob.download_as_bytes() for blob in client.list_blobs(bucket) if blob.name.endswith(".tar.gz")}


def test_archived_copies_carry_no_private_element_and_the_same_pixels(pipeline):
    archives = _archives(BUCKET)
    assert archives
    members = 0
    pixels = {
        hashlib.sha256(ds.PixelData).hexdigest()
        for batch in pipeline["batches"].values()
        for ds in batch["images"].values()
        if "PixelData" in ds
    }
    for data in archives.values():
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                members += 1
                ds = pydicom.dcmread(io.BytesIO(tar.extractfile(member).read()))
                assert private_elements(ds) == 0, member.name
                if "PixelData" in ds:
                    assert hashlib.sha256(ds.PixelData).hexdigest() in pixels, "pixel data is copied as it is"
    expected = sum(
        expected_outcome(a, ds)[0] != "quarantined"
        for a, batch in pipeline["batches"].items()
        for ds in batch["images"].values()
    )
    assert members == expected


def test_no_original_identifier_reaches_storage_rows_or_reports(pipeline):
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from hooks.dicom_storage import DicomStorageHook

    values = original_identifiers(pipeline["raw"])
    collected = phi_audit.identifiers_from_dicom(pipeline["raw"])  # the audit's own collection, too
    identifiers = [*values, *(i for i in collected if i.category not in NOT_PERSON_CATEGORIES)]
    auditor = phi_audit.Auditor(identifiers)
    phi_audit.run(
        auditor,
        [f"gs://{BUCKET}"],
        reports=[pipeline["root"]],
        bigquery_tables=[f"{PROJECT}.{COLLECTION}.dicom"],
        bq=DicomStorageHook().bigquery_client(PROJECT),
        gcs=GCSHook().get_conn(),
    )
    assert [str(f) for f in auditor.findings] == []
    stats = auditor.stats
    archived = sum(
        expected_outcome(a, ds)[0] != "quarantined"
        for a, batch in pipeline["batches"].items()
        for ds in batch["images"].values()
    )
    assert stats.dicom_headers == archived, "every archived header was searched"
    assert stats.rows == archived, "every row was searched"
    assert len(auditor.matcher.identifiers) >= 20
