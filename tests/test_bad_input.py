"""The bad-input catalogue: every way a batch can be wrong, each next to good images.

Every test runs the domain code the DAG runs (plan -> staged plan JSON -> archive_groups into a
LocalObjectStore -> rows -> report -> publish_report) on a landing zone written by the generator,
and checks, besides the reason the bad item gets:

- the good images are all planned AND archived (tar members with the very bytes of the files), and
  their rows carry the same sha256s;
- nothing in the landing zone changed except the new `batch.report.json` (tree snapshot before
  and after, links and the files outside the zone included);
- no plan, report or row text holds a planted identifying value, and the PHI audit of the outputs
  and reports finds nothing.

Manifest problems fail the whole batch (ERROR, with a message naming the file and the rule) and leave
the neighbouring good batch untouched. docs/reliability.md lists this catalogue.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from google.api_core.exceptions import RetryError, ServiceUnavailable

from dicom_archive import claims
from dicom_archive.batch import Staging, build_report, publish_report
from dicom_archive.bigquery_load import DEDUPE_ORDER, ROW_KEY
from dicom_archive.deid_gate import DEFAULT_PERSON_ATTRIBUTES, DeidPolicy, Reason
from dicom_archive.landing import LocalLandingZone
from dicom_archive.ledger import select_batches
from dicom_archive.manifest import ManifestError, parse_rfc3339
from dicom_archive.naming import MAX_COLLECTION_LENGTH, batch_id_problem
from dicom_archive.ndjson import to_ndjson
from dicom_archive.plan import BatchPlan, plan_batch
from dicom_archive.rows import RunContext
from dicom_archive.run_steps import ReportOutcome, plan_run, report_run_batch
from dicom_archive.settings import ArchiveSettings, Settings
from dicom_archive.stores import LocalObjectStore
from operators.failures import permanent_errors
from tests.archiving import archive_groups
from tools import phi_audit
from tools.landing_zone import BatchSpec, ImageSpec, image_bytes, make_image, raw_identifiers, write_batch

# pydicom warns when the generator writes the invalid values planted here; that is the point.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BATCH = "20240105-0001"
NEIGHBOUR = "20240105-0002"
COLLECTION = "IRB41449"
ENTITY, ITEM, DATE = "GL664ba0", "GL71cfb7", "20230811"
OTHER = ("GL0a1b2c", "GLdd0e1f", "20230901")
BAD = "incoming/bad.dcm"  # where a bad image goes, unless the test needs another place
ALWAYS = datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1)


def completed_in(zone: LocalLandingZone, start: datetime, end: datetime) -> list[str]:
    """The batches a backfill of [start, end) takes (the ledger), reported or not."""
    return select_batches(zone, start=start, end=end).batch_ids


# Realistic identifying values, one per person attribute of the contract (check 6).
PLANTED = {
    "PatientName": "Kowalczyk^Agnieszka",
    "OtherPatientIDs": "MRN-7731904",
    "OtherPatientNames": "Nowak^Agnieszka",
    "PatientAddress": "14 Larkspur Lane, Springfield",
    "PatientTelephoneNumbers": "+1 555 0147 2291",
    "PatientMotherBirthName": "Lindqvist^Margareta",
    "ReferringPhysicianName": "Okonkwo^Chidi^^Dr.",
    "PerformingPhysicianName": "Haverford^Eleanor",
    "OperatorsName": "Brightwater^Tomas",
    "PhysiciansOfRecord": "Castellanos^Ines",
    "RequestingPhysician": "Abernathy^Quentin",
    "NameOfPhysiciansReadingStudy": "Vasquez-Moreau^Celine",
    # The default's contact details and record locator, beyond the contract's 12.
    "PatientTelecomInformation": "agnieszka.kowalczyk@example.org",
    "ReferringPhysicianAddress": "7 Okonkwo Court, Shelbyville",
    "ReferringPhysicianTelephoneNumbers": "+1 555 0199 4410",
    "PersonAddress": "3 Haverford Row, Ogdenville",
    "PersonTelephoneNumbers": "+1 555 0133 8127",
    "PersonTelecomInformation": "eleanor.haverford@example.org",
    "MedicalRecordLocator": "LOC-4471902-K",
}


def good_images() -> list[ImageSpec]:
    """Two studies: a CT of two images (the bad image usually joins it) and an MR of one."""
    return [
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 1),
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 2),
        ImageSpec(*OTHER, "MR", 1, 1),
    ]


def bad_image(relpath: str = BAD, **overrides: object) -> ImageSpec:
    """An image of the CT study, different from the good ones, with header overrides."""
    return ImageSpec(ENTITY, ITEM, DATE, "CT", 2, 1, relpath=relpath, header_overrides=overrides)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RecordingZone(LocalLandingZone):
    """A local landing zone that remembers every file it was asked to read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened: list[tuple[str, str]] = []

    def open(self, batch_id, relpath, chunk_size=256 * 1024, **kwargs):
        self.opened.append((batch_id, relpath))
        return super().open(batch_id, relpath, chunk_size, **kwargs)

    def read_bytes(self, batch_id, relpath):
        self.opened.append((batch_id, relpath))
        return super().read_bytes(batch_id, relpath)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under the roots, links not followed: kind, content hash, mode, link target."""
    tree: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                info = path.lstat()
                if path.is_symlink():
                    entry: tuple = ("link", os.readlink(path))
                elif path.is_dir():
                    entry = ("dir", info.st_mode)
                elif path.is_file():
                    entry = ("file", sha256(path.read_bytes()), info.st_mode, info.st_mtime_ns)
                else:
                    entry = ("special", info.st_mode)
                tree[str(path)] = entry
    return tree


@dataclass
class Outcome:
    plan: BatchPlan
    report: dict
    rows: list[dict]
    archives: dict[str, list[tuple[str, str]]]  # object name -> [(member name, sha256)]
    zone: RecordingZone
    texts: list[str] = field(default_factory=list)  # plan, report and rows as written

    @property
    def reasons(self) -> dict[str, str]:
        return {q.relpath: q.reason for q in self.plan.quarantined}

    @property
    def planned(self) -> set[str]:
        return {image.relpath for group in self.plan.groups for image in group.images}

    def archived_shas(self) -> Counter:
        return Counter(sha for members in self.archives.values() for _, sha in members)

    def opened(self, relpath: str) -> bool:
        return any(path == relpath for _, path in self.zone.opened)


@dataclass
class Landing:
    """A landing zone root, an output folder and a folder outside both (link targets)."""

    tmp: Path

    @property
    def root(self) -> Path:
        return self.tmp / "landing"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def outside(self) -> Path:
        return self.tmp / "outside"

    def write(self, spec: BatchSpec) -> Path:
        return write_batch(self.root, spec)

    def process(
        self, batch_id: str, *, policy: DeidPolicy | None = None, default_collection: str | None = None
    ) -> Outcome:
        """What the DAG does with one batch, in the domain code it calls."""
        policy = policy or DeidPolicy()
        zone = RecordingZone(self.root)
        plan = plan_batch(zone, batch_id, default_collection=default_collection, policy=policy)
        plan = BatchPlan.from_json(plan.to_json())  # staged between tasks as JSON
        store = LocalObjectStore(self.out)
        summaries, rows = archive_groups(
            plan.groups,
            zone,
            store,
            deid=plan.deid,
            context=RunContext("bad-input-test", "manual__bad_input"),
            settings=ArchiveSettings(policy=policy),
        )
        ndjson = to_ndjson(rows)
        if rows:
            store.write_bytes(f"BigQuery/{plan.collection}/dicom/{batch_id}.ndjson", ndjson, "application/x-ndjson")
        report = build_report(plan, archives=summaries, table=None, rows_loaded=len(rows), rows_inserted=len(rows))
        publish_report(report, zone, store)
        archives = {}
        for summary in summaries:
            name = summary["uri"].split(f"{self.out.resolve()}/", 1)[1]
            with tarfile.open(self.out / name, "r:gz") as tar:
                archives[name] = [(m.name, sha256(tar.extractfile(m).read())) for m in tar.getmembers() if m.isfile()]
        texts = [plan.to_json(), json.dumps(report), ndjson.decode()]
        return Outcome(plan, report, rows, archives, zone, texts)


@pytest.fixture
def landing(tmp_path: Path) -> Landing:
    return Landing(tmp_path)


def file_shas(folder: Path, relpaths: list[str]) -> Counter:
    return Counter(sha256((folder / relpath).read_bytes()) for relpath in relpaths)


def assert_no_leak(landing: Landing, outcome: Outcome, planted: list[str]) -> None:
    """No planted value in plan, report or rows, and the audit of outputs and reports is clean."""
    values = [v for v in planted if phi_audit.is_meaningful(v)]
    for text in outcome.texts:
        normalized = phi_audit.normalize(text)
        for value in values:
            assert phi_audit.normalize(value) not in normalized, "a planted identifier reached the outputs"
    assert phi_audit.audit(values, [landing.out], reports=[landing.root]) == []


def run_batch(
    landing: Landing,
    *,
    bad: list[ImageSpec] = (),
    extra_files: dict[str, bytes] | None = None,
    lookup: dict | None = None,
    expect: dict[str, str],
    policy: DeidPolicy | None = None,
    planted: tuple[str, ...] = (),
    setup=None,
) -> Outcome:
    """Write a batch of good images plus the bad items, process it, check everything, return it.

    `expect` maps each bad item's path to its quarantine reason; `setup(folder)` adds what the
    generator cannot write (links, pipes) before the snapshot.
    """
    good = good_images()
    spec = BatchSpec(
        BATCH, images=[*good, *bad], collection=COLLECTION, lookup=lookup, extra_files=dict(extra_files or {})
    )
    folder = landing.write(spec)
    if setup is not None:
        setup(folder)
    before = snapshot(landing.root, landing.outside)

    outcome = landing.process(BATCH, policy=policy)

    plan = outcome.plan
    assert plan.status == "DONE", plan.error
    assert outcome.reasons == expect
    assert outcome.planned == {image.path for image in good}
    assert plan.images_seen == len(good) + len(expect)
    # The good images are in the archives, byte for byte, and in the rows.
    assert outcome.archived_shas() == file_shas(folder, [image.path for image in good])
    assert Counter(row["instance_sha256"] for row in outcome.rows) == outcome.archived_shas()
    assert sorted(outcome.archives) == sorted(
        {
            f"Collection/{COLLECTION}/Entity/{ENTITY}/{ENTITY}_{DATE}_{ITEM}.tar.gz",
            f"Collection/{COLLECTION}/Entity/{OTHER[0]}/{OTHER[0]}_{OTHER[2]}_{OTHER[1]}.tar.gz",
        }
    )
    report = outcome.report
    assert report["status"] == "DONE"
    assert report["images"]["archived"] == len(good)
    assert report["images"]["quarantined_by_reason"] == dict(Counter(expect.values()))
    assert {q["path"]: q["reason"] for q in report["quarantined"]} == expect
    # Only our report was added to the landing zone; nothing else moved.
    after = snapshot(landing.root, landing.outside)
    report_path = str(folder / "batch.report.json")
    assert set(after) - set(before) == {report_path}
    assert {k: v for k, v in after.items() if k != report_path} == before
    assert_no_leak(landing, outcome, [*raw_identifiers([spec]), *planted])
    return outcome


def run_broken_batch(
    landing: Landing,
    spec: BatchSpec,
    *,
    source: str,
    rule: str,
    default_collection: str | None = None,
    planted: tuple[str, ...] = (),
    setup=None,
) -> Outcome:
    """A batch whose manifest (or lookup, or `PHI/` folder) breaks the contract, next to a good
    batch. `planted`: texts of the broken file (keys, values) that must appear in no output nor
    report; `setup(folder)` adds what the generator cannot write (links) before the snapshot."""
    spec.images = good_images()
    folder = landing.write(spec)
    if setup is not None:
        setup(folder)
    neighbour = landing.write(BatchSpec(NEIGHBOUR, images=good_images(), collection=COLLECTION))
    before = snapshot(landing.root)

    outcome = landing.process(BATCH, default_collection=default_collection)
    assert outcome.plan.status == "ERROR"
    assert outcome.plan.error.startswith(f"{folder / source}: ")  # names the file...
    assert rule in outcome.plan.error  # ...and the rule
    assert outcome.report["status"] == "ERROR"
    assert outcome.report["error"] == outcome.plan.error
    assert not outcome.plan.groups
    assert outcome.archives == {}
    assert not list(landing.out.glob("Collection/*/Entity/**/*.tar.gz"))
    # Nothing of the batch was read but its control files.
    assert {relpath for _, relpath in outcome.zone.opened} <= {"batch.json", "lookup.json"}

    other = landing.process(NEIGHBOUR, default_collection=default_collection)  # other batches go on
    assert other.plan.status == "DONE"
    assert other.archived_shas() == file_shas(neighbour, [image.path for image in good_images()])

    after = snapshot(landing.root)
    added = {str(folder / "batch.report.json"), str(neighbour / "batch.report.json")}
    assert set(after) - set(before) == added
    assert {k: v for k, v in after.items() if k not in added} == before
    assert_no_leak(landing, outcome, [*raw_identifiers([spec]), *planted])
    for text in planted:
        assert text not in outcome.plan.error
    return outcome


def manifest(**changes: object) -> bytes:
    """batch.json of BATCH with fields changed (None removes one)."""
    doc = BatchSpec(BATCH, collection=COLLECTION).manifest()
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


# --- files that are not (whole) DICOM -------------------------------------------------------


def _full_image() -> bytes:
    return image_bytes(bad_image())


def _meta_end(data: bytes) -> int:
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    return 132 + 12 + meta.FileMetaInformationGroupLength


def _without_part10_header() -> bytes:
    ds = make_image(bad_image())
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000") + b"\0" * 64

NOT_DICOM = {
    "zero-byte": lambda: b"",
    "truncated-in-pixel-data": lambda: _full_image()[: len(_full_image()) // 2],
    "truncated-last-bytes": lambda: _full_image()[:-7],
    "truncated-in-header": lambda: _full_image()[:1000],
    "truncated-in-file-meta": lambda: _full_image()[:200],
    "garbage-after-preamble": lambda: _full_image()[:132] + bytes(range(256)) * 8,
    "garbage-after-file-meta": lambda: (
        _full_image()[: _meta_end(_full_image())] + bytes((i * 7919 + 13) % 256 for i in range(4000))
    ),
    "text-file": lambda: b"Patient list\nnothing to see here\n",
    "png-bytes": lambda: PNG,
    "dicom-without-part10-header": _without_part10_header,
}


@pytest.mark.parametrize("kind", sorted(NOT_DICOM))
def test_a_file_that_is_not_a_whole_dicom_file_is_not_dicom(landing, kind):
    outcome = run_batch(landing, extra_files={BAD: NOT_DICOM[kind]()}, expect={BAD: Reason.NOT_DICOM})
    assert outcome.plan.quarantined[0].detail.startswith(("not a DICOM Part 10 file", "does not parse as DICOM"))


@pytest.mark.timeout(60)  # before the fix, the plan blocked here forever
def test_a_named_pipe_is_never_opened(landing):
    # Opening a FIFO for reading blocks until a writer comes: the plan must not even try.
    outcome = run_batch(
        landing, expect={"incoming/pipe.dcm": Reason.UNREADABLE}, setup=lambda folder: _mkfifo(folder / "incoming")
    )
    assert not outcome.opened("incoming/pipe.dcm")


def _mkfifo(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.dcm")


def test_a_file_over_the_size_limit_is_too_large_and_never_read(landing):
    big = bad_image(PatientName=PLANTED["PatientName"])
    big.rows = big.cols = 256  # about 130 KB
    outcome = run_batch(
        landing,
        bad=[big],
        expect={BAD: Reason.TOO_LARGE},
        policy=DeidPolicy(max_image_bytes=64 * 1024),  # the good images are about 34 KB
        planted=(PLANTED["PatientName"],),
    )
    assert not outcome.opened(BAD)


# --- batch.json and lookup.json -------------------------------------------------------------


def test_a_folder_without_batch_json_is_not_ready(landing):
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION, write_manifest=False))
    # The anonymizer's manifest still being written (temp name, not renamed yet) changes nothing.
    (folder / ".batch.json.tmp").write_bytes(manifest())
    landing.write(BatchSpec(NEIGHBOUR, images=good_images(), collection=COLLECTION))
    zone = LocalLandingZone(landing.root)
    assert completed_in(zone, *ALWAYS) == [NEIGHBOUR]
    assert select_batches(zone, end=None).batch_ids == [NEIGHBOUR]
    before = snapshot(landing.root)

    outcome = landing.process(BATCH)  # a manual run that names it anyway

    assert outcome.plan.status == "NOT_READY"
    assert outcome.plan.error == f"{folder} has no batch.json"
    assert outcome.archives == {}
    assert snapshot(landing.root) == before, "a batch that is not ready gets no report"


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        pytest.param(b'{"batch_id": "20240105-0001", "status": ', "is not valid JSON", id="cut-short"),
        pytest.param(b"", "is not valid JSON", id="empty-file"),
        pytest.param(b'{"batch_id": "\xff"}', "is not valid JSON", id="not-utf8"),
        pytest.param(b"[]", "must be a JSON object, not list", id="array"),
        pytest.param(b'"DONEPROCESSING"', "must be a JSON object, not str", id="string"),
        pytest.param(b"null", "must be a JSON object, not NoneType", id="null"),
        pytest.param(b'{"batch_id": "20240105-0001", "x": NaN}', "NaN is not JSON", id="nan"),
        pytest.param(b'{"batch_id": "20240105-0001", "x": -Infinity}', "-Infinity is not JSON", id="infinity"),
        pytest.param(b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply", id="deep"),
    ],
)
def test_a_batch_json_that_is_not_a_json_object_fails_the_batch(landing, raw, rule):
    run_broken_batch(landing, BatchSpec(BATCH, raw_manifest=raw), source="batch.json", rule=rule)
    # Unreadable, it belongs to the interval of its modification time: reported once, not forever.
    assert BATCH in completed_in(LocalLandingZone(landing.root), *ALWAYS)


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        pytest.param({"batch_id": NEIGHBOUR}, "must equal the folder name", id="batch-id-of-another-folder"),
        pytest.param({"batch_id": None}, "batch_id (missing) must match", id="batch-id-missing"),
        pytest.param({"batch_id": "../20240105-0001"}, "must match", id="batch-id-path"),
        pytest.param({"collection": "IRB-1"}, "collection must match", id="collection-dash"),
        pytest.param({"collection": "a/b"}, "collection must match", id="collection-slash"),
        pytest.param({"collection": "../IRB1"}, "must match", id="collection-dotdot"),
        pytest.param({"collection": ""}, "collection must match", id="collection-empty"),
        pytest.param({"collection": "IRB 41449"}, "must match", id="collection-space"),
        pytest.param({"collection": 41449}, "collection must match", id="collection-number"),
        pytest.param({"collection": None}, "has no collection and no default", id="collection-missing"),
        pytest.param({"status": None}, "status must be a non-empty string", id="status-missing"),
        pytest.param({"status": ""}, "status must be a non-empty string", id="status-empty"),
        pytest.param({"completed_at": None}, "completed_at must be an RFC 3339", id="completed-at-missing"),
        pytest.param({"completed_at": "2024-01-05"}, "needs a date, a time and a UTC offset", id="date-only"),
        pytest.param({"completed_at": "2024-01-05T09:30:00"}, "needs a date, a time and a UTC", id="no-offset"),
        pytest.param({"completed_at": "yesterday"}, "is not an RFC 3339 timestamp", id="words"),
        pytest.param({"completed_at": "2024-13-05T09:30:00Z"}, "is not an RFC 3339", id="month-13"),
        pytest.param({"completed_at": 1704447000}, "must be an RFC 3339 timestamp string", id="epoch"),
        pytest.param({"completed_at": "2024-01-05T09:30Z"}, "is not an RFC 3339", id="no-seconds"),
        pytest.param({"completed_at": "2024-01-05T09Z"}, "is not an RFC 3339", id="hour-only"),
        pytest.param({"completed_at": "20240105T093000Z"}, "is not an RFC 3339", id="basic-format"),
        pytest.param({"completed_at": "2024-W01-5T09:30:00Z"}, "is not an RFC 3339", id="week-date"),
        pytest.param({"completed_at": "2024-01-05T09:30:00+0530"}, "is not an RFC 3339", id="offset-no-colon"),
        pytest.param({"completed_at": "2024-01-05T09:30:00+05:30:15"}, "is not an RFC 3339", id="offset-seconds"),
        pytest.param({"completed_at": "2024-01-05T09:30:00+25:00"}, "no such instant", id="offset-25h"),
        pytest.param({"completed_at": "2024-02-30T09:30:00Z"}, "no such instant", id="february-30"),
        pytest.param({"completed_at": "0001-01-01T00:00:00+05:30"}, "no such instant", id="before-year-1"),
        pytest.param({"completed_at": "9999-12-31T23:59:59-05:00"}, "no such instant", id="after-9999"),
        pytest.param(
            {"completed_at": "\uff12\uff10\uff12\uff14-01-05T09:30:00Z"}, "is not an RFC 3339", id="fullwidth-digits"
        ),
        pytest.param({"deid": "deid 0.4.13"}, "deid must be an object", id="deid-not-object"),
    ],
)
def test_a_batch_json_that_breaks_a_rule_fails_the_batch(landing, changes, rule):
    run_broken_batch(landing, BatchSpec(BATCH, raw_manifest=manifest(**changes)), source="batch.json", rule=rule)


def bucket_reports(landing: Landing) -> list[str]:
    return sorted(p.relative_to(landing.out).as_posix() for p in landing.out.glob("Collection/*/Batches/*.json"))


TOO_LONG = "I" * (MAX_COLLECTION_LENGTH + 1)  # a valid dataset id, too long for the object names


@pytest.mark.parametrize(
    ("raw", "default", "filed_under"),
    [
        pytest.param(manifest(batch_id=NEIGHBOUR), None, COLLECTION, id="named-collection"),
        pytest.param(manifest(completed_at="yesterday"), "IRB_DEFAULT", COLLECTION, id="named-wins-over-default"),
        pytest.param(manifest(status=None), None, COLLECTION, id="required-field-missing"),
        pytest.param(manifest(collection="IRB-1"), "IRB_DEFAULT", "IRB_DEFAULT", id="invalid-named-default"),
        pytest.param(manifest(collection="../IRB1"), "IRB_DEFAULT", "IRB_DEFAULT", id="path-named-default"),
        pytest.param(manifest(collection=TOO_LONG), "IRB_DEFAULT", "IRB_DEFAULT", id="too-long-named-default"),
        pytest.param(b'{"batch_id": ', "IRB_DEFAULT", "IRB_DEFAULT", id="not-json-default"),
        pytest.param(b'["collection", "IRB1"]', "IRB_DEFAULT", "IRB_DEFAULT", id="not-an-object-default"),
        pytest.param(
            b'{"collection": "IRB1", "collection": "IRB2", "batch_id": "x"}', "IRB_DEFAULT", "IRB_DEFAULT", id="twice"
        ),
        pytest.param(manifest(collection="IRB-1"), None, None, id="invalid-named-no-default"),
        pytest.param(b'{"batch_id": ', None, None, id="not-json-no-default"),
    ],
)
def test_the_error_report_of_a_broken_batch_json_reaches_the_bucket_when_a_collection_is_known(
    landing, raw, default, filed_under
):
    """The spec stores every report under Collection/<collection>/Batches/: a broken batch.json's
    too, under the collection it names when that one passes the collection rules, else the
    default; with neither, the report stays beside the batch only. Either way the report says
    the manifest is unusable (its run fails: see the run-step tests below)."""
    landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=raw))
    outcome = landing.process(BATCH, default_collection=default)
    assert (outcome.plan.status, outcome.report["collection"]) == ("ERROR", filed_under)
    assert outcome.report["manifest_unusable"] is True
    assert bucket_reports(landing) == ([f"Collection/{filed_under}/Batches/{BATCH}.json"] if filed_under else [])
    assert not list(landing.out.glob("Collection/*/Entity/**/*.tar.gz"))
    assert TOO_LONG not in outcome.plan.error
    assert "../IRB1" not in outcome.plan.error


@pytest.mark.parametrize(
    ("raw", "completed_at"),
    [
        pytest.param(manifest(deid="deid 0.4.13"), "2024-01-05T09:30:00+00:00", id="deid-broken"),
        pytest.param(manifest(collection="IRB-1"), "2024-01-05T09:30:00+00:00", id="collection-broken"),
        pytest.param(manifest(batch_id=NEIGHBOUR), "2024-01-05T09:30:00+00:00", id="batch-id-broken"),
        pytest.param(
            manifest(completed_at="2024-01-05T15:00:00+05:30", deid="x"), "2024-01-05T09:30:00+00:00", id="in-utc"
        ),
        pytest.param(manifest(completed_at="2024-02-30T09:30:00Z"), None, id="no-such-instant"),
        pytest.param(manifest(completed_at="Hercule Poirot 7731904"), None, id="not-a-timestamp"),
        pytest.param(manifest(completed_at=1704447000), None, id="not-a-string"),
        pytest.param(b'{"completed_at": "2024-01-05T09:30:00Z", ', None, id="not-json"),
    ],
)
def test_the_error_report_of_a_broken_batch_json_keeps_its_completed_at_only_when_valid(landing, raw, completed_at):
    """The ERROR report keeps the broken document's completed_at when the manifest's own parser
    accepts it (the batches view dates and sorts the batch by it), in UTC; never anything else."""
    landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=raw))
    outcome = landing.process(BATCH, default_collection="IRB_DEFAULT")
    assert (outcome.report["status"], outcome.report["manifest_unusable"]) == ("ERROR", True)
    assert outcome.report["completed_at"] == completed_at
    assert "Hercule" not in json.dumps(outcome.report)


# --- which batches fail their run -----------------------------------------------------------

LOOKUP_BROKEN = "20240105-0003"  # a valid batch.json beside a broken lookup.json
GAVE_UP = "20240105-0004"  # a valid batch.json with the anonymizer's status ERROR


def run_steps(landing: Landing, batch_ids: list[str], default_collection: str | None) -> dict[str, ReportOutcome]:
    """The plan and report steps of one local run (SEND_TO_GOOGLE=false) as the DAG calls them,
    for batches that end ERROR (nothing to archive or load): each batch's report-step outcome.
    A `failure` fails the batch's batch_report task, and so the run, visibly."""
    env = {"DICOM_LANDING_ROOT": str(landing.root), "DICOM_LOCAL_OUTPUT": str(landing.out)}
    if default_collection is not None:
        env["GOOGLE_STORAGE_COLLECTION"] = default_collection
    settings = Settings.load(env.get)
    zone, store = LocalLandingZone(landing.root), LocalObjectStore(landing.out)
    refs = plan_run(zone, store, batch_ids, "manual__steps", settings)
    return {ref["batch_id"]: report_run_batch(zone, store, ref, "manual__steps", settings) for ref in refs}


def write_error_neighbours(landing: Landing) -> None:
    """Two batches that end ERROR without failing their run: their batch.json is valid."""
    lookup = {"lookup.json": b'{"incoming/a.dcm": {"flagged": "yes"}}'}
    landing.write(BatchSpec(LOOKUP_BROKEN, images=good_images(), collection=COLLECTION, extra_files=lookup))
    landing.write(BatchSpec(GAVE_UP, images=good_images(), collection=COLLECTION, status="ERROR"))


def _loop_manifest(folder: Path) -> None:
    (folder / "batch.json").unlink()
    (folder / "batch.json").symlink_to("batch.json")


@pytest.mark.parametrize(
    ("raw", "setup", "default", "filed_under", "rule"),
    [
        pytest.param(b'{"batch_id": ', None, "IRB_DEFAULT", "IRB_DEFAULT", "is not valid JSON", id="not-json"),
        pytest.param(b"[]", None, "IRB_DEFAULT", "IRB_DEFAULT", "must be a JSON object", id="not-an-object"),
        pytest.param(manifest(completed_at=None), None, None, COLLECTION, "completed_at", id="field-missing"),
        pytest.param(
            manifest(collection="../IRB1"), None, "IRB_DEFAULT", "IRB_DEFAULT", "collection must", id="invalid-named"
        ),
        pytest.param(None, _loop_manifest, "IRB_DEFAULT", "IRB_DEFAULT", "could not be planned", id="looping-link"),
        pytest.param(b'{"batch_id": ', None, None, None, "is not valid JSON", id="no-default"),
    ],
)
def test_a_broken_batch_json_fails_its_run_wherever_its_report_is_filed(
    landing, raw, setup, default, filed_under, rule
):
    """A broken batch.json fails the run visibly, also when its ERROR report reached the bucket
    under a collection; the other batches of the run go through: a broken lookup.json or the
    anonymizer's status ERROR beside a valid batch.json end ERROR without failing it. A refused
    batch id fails, as before."""
    folder = landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=raw or manifest()))
    if setup is not None:
        setup(folder)
    write_error_neighbours(landing)

    outcomes = run_steps(landing, [BATCH, LOOKUP_BROKEN, GAVE_UP, "../outside"], default)

    assert outcomes[BATCH].report["status"] == "ERROR"
    assert outcomes[BATCH].report["collection"] == filed_under
    assert rule in (outcomes[BATCH].failure or "")
    assert "batch.json" in (outcomes[BATCH].failure or "")
    for neighbour in (LOOKUP_BROKEN, GAVE_UP):
        assert (outcomes[neighbour].failure, outcomes[neighbour].report["status"]) == (None, "ERROR")
    assert "refused batch id" in (outcomes["../outside"].failure or "")
    filed = [f"Collection/{filed_under}/Batches/{BATCH}.json"] if filed_under else []
    others = [f"Collection/{COLLECTION}/Batches/{b}.json" for b in (LOOKUP_BROKEN, GAVE_UP)]
    assert bucket_reports(landing) == sorted(filed + others)


class OutageZone(LocalLandingZone):
    """A landing zone whose listing of one batch meets an outage that outlasted the client's
    retries (what the storage client raises then), while another batch meets a bug."""

    outage = True

    def list_files(self, batch_id: str) -> list:
        if batch_id == BATCH and self.outage:
            raise RetryError("Timeout of 1.0s exceeded", ServiceUnavailable("503 backend error"))
        if batch_id == GAVE_UP:
            return None + 1  # a bug that only this batch's content meets
        return super().list_files(batch_id)


def test_an_outage_while_planning_fails_the_step_and_a_bug_stays_its_batchs_own(landing):
    """The developers' rule: what a retry may fix (here Google unavailable past the retry window)
    fails the plan step, which gives up its claims and writes no report, so its retry plans the
    batch; a batch's own trouble, even an unexpected exception, is that batch's ERROR only."""
    landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    landing.write(BatchSpec(GAVE_UP, images=good_images(), collection=COLLECTION))
    zone, store = OutageZone(landing.root), LocalObjectStore(landing.out)
    settings = Settings.load({"DICOM_LANDING_ROOT": str(landing.root), "DICOM_LOCAL_OUTPUT": str(landing.out)}.get)

    with pytest.raises(RetryError):
        plan_run(zone, store, [GAVE_UP, BATCH], "manual__outage", settings)
    assert not list(landing.root.glob("*/batch.report*.json"))
    assert bucket_reports(landing) == []
    for batch_id in (GAVE_UP, BATCH):  # given up: another run may take them at once
        assert claims.acquire(store, batch_id, "manual__other", timedelta(hours=1)).owned
        claims.release(store, batch_id, "manual__other")

    zone.outage = False  # the task's retry: same run, the outage is over
    refs = {ref["batch_id"]: ref for ref in plan_run(zone, store, [GAVE_UP, BATCH], "manual__outage", settings)}
    assert (refs[BATCH]["status"], refs[GAVE_UP]["status"]) == ("DONE", "ERROR")
    assert refs[BATCH]["earlier_attempts"] == []
    gave_up = Staging(store, GAVE_UP, refs[GAVE_UP]["run_key"]).read_plan()
    assert "TypeError" in gave_up.error
    written = json.loads((landing.root / GAVE_UP / "batch.json").read_text())["completed_at"]
    assert gave_up.completed_at == parse_rfc3339(written, "batch.json", "completed_at").isoformat()


def test_a_broken_batch_json_fails_its_run_whichever_version_staged_its_plan(landing):
    """A plan staged before the manifest's failure had a field of its own (an upgrade between
    the plan and report steps) still fails a broken batch.json, by its missing collection; a
    broken lookup.json's plan, staged then, keeps its collection and does not fail."""
    landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=b'{"batch_id": '))
    write_error_neighbours(landing)
    zone, store = LocalLandingZone(landing.root), LocalObjectStore(landing.out)
    settings = Settings.load(
        {"DICOM_LANDING_ROOT": str(landing.root), "DICOM_LOCAL_OUTPUT": str(landing.out),
         "GOOGLE_STORAGE_COLLECTION": "IRB_DEFAULT"}.get
    )  # fmt: skip
    refs = {ref["batch_id"]: ref for ref in plan_run(zone, store, [BATCH, LOOKUP_BROKEN], "manual__old", settings)}
    for batch_id, ref in refs.items():
        staged = Staging(store, batch_id, ref["run_key"])
        old = json.loads(store.read_bytes(staged.plan_name))
        old.pop("manifest_unusable")
        if batch_id == BATCH:
            old["collection"] = ref["collection"] = None  # what the previous version planned
        store.write_bytes(staged.plan_name, json.dumps(old).encode(), "application/json")

    old_broken = report_run_batch(zone, store, refs[BATCH], "manual__old", settings)
    old_lookup = report_run_batch(zone, store, refs[LOOKUP_BROKEN], "manual__old", settings)
    assert "is not valid JSON" in (old_broken.failure or "")
    assert old_lookup.failure is None

    new = run_steps(landing, [BATCH], "IRB_DEFAULT")[BATCH]
    assert new.report["collection"] == "IRB_DEFAULT"
    assert "is not valid JSON" in (new.failure or "")


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        pytest.param({"batch_id": "Poirot^Hercule"}, "batch_id (a string of 14 characters) must", id="batch-id-name"),
        pytest.param({"batch_id": "Hercule_Poirot"}, "batch_id must equal the folder name", id="batch-id-another"),
        pytest.param({"batch_id": ["Hercule Poirot"]}, "batch_id (a list) must match", id="batch-id-list"),
        pytest.param({"collection": "Poirot Hercule"}, "collection must match", id="collection-name"),
        pytest.param({"collection": {"Hercule": "Poirot"}}, "collection must match", id="collection-object"),
        pytest.param({"completed_at": "Hercule Poirot 7731904"}, "is not an RFC 3339", id="completed-at-name"),
        pytest.param({"completed_at": "2024-01-05THercule:Poirot"}, "is not an RFC 3339", id="completed-at-inside"),
        pytest.param({"completed_at": "2024-02-30T09:30:00+05:30"}, "no such instant", id="completed-at-no-instant"),
    ],
)
def test_a_bad_batch_json_value_is_never_quoted(landing, changes, rule):
    """Errors reach the report, the task log and the bucket: they name the field and the rule only."""
    spec = BatchSpec(BATCH, raw_manifest=manifest(**changes))
    outcome = run_broken_batch(landing, spec, source="batch.json", rule=rule, planted=("Hercule", "Poirot", "7731904"))
    assert "2024-02-30" not in outcome.plan.error


@pytest.mark.parametrize("status", ["Poirot^Hercule", "MRN 7731904"])
def test_a_pending_status_is_never_quoted(landing, status):
    landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION, status=status))
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "NOT_READY"
    assert "its status means the batch is not ready yet" in outcome.plan.error
    assert status not in outcome.plan.error
    assert status.split()[0] not in outcome.plan.error


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        pytest.param(b'{"incoming/a.dcm": {"flagged": tru', "is not valid JSON", id="not-json"),
        pytest.param(b"", "is not valid JSON", id="empty-file"),
        pytest.param(b'["incoming/a.dcm"]', "must be a JSON object, not list", id="array"),
        pytest.param(b'{"incoming/a.dcm": "CT CHEST"}', "the entry for 'incoming/a.dcm' must be an object", id="entry"),
        pytest.param(b'{"incoming/a.dcm": {"flagged": "true"}}', "flagged must be true or false", id="flag-string"),
        pytest.param(b'{"incoming/a.dcm": {"flagged": 1}}', "flagged must be true or false", id="flag-number"),
        pytest.param(b'{"incoming/a.dcm": {"flagged": null}}', "flagged must be true or false", id="flag-null"),
        pytest.param(
            b'{"Doe^Jane.dcm": []}', 'the entry for "(a key shaped like a person\'s name, not shown)"', id="name-key"
        ),
    ],
)
def test_a_lookup_json_that_breaks_the_contract_fails_the_batch(landing, raw, rule):
    spec = BatchSpec(BATCH, collection=COLLECTION, extra_files={"lookup.json": raw})
    outcome = run_broken_batch(landing, spec, source="lookup.json", rule=rule)
    # The manifest itself is fine: the batch is found by its completed_at, then fails visibly.
    assert BATCH in completed_in(
        LocalLandingZone(landing.root), datetime(2024, 1, 5, tzinfo=UTC), datetime(2024, 1, 6, tzinfo=UTC)
    )
    # ...and its ERROR report keeps the manifest's collection, so it is stored in the bucket too.
    assert outcome.plan.collection == outcome.report["collection"] == COLLECTION
    stored = json.loads((landing.out / f"Collection/{COLLECTION}/Batches/{BATCH}.json").read_bytes())
    assert (stored["status"], stored["error"]) == ("ERROR", outcome.plan.error)


@pytest.mark.parametrize("raw", [b"[]", b"null", b'{"incoming/a.dcm": {"flagged": "yes"}}'])
def test_a_broken_lookup_json_keeps_the_default_collection_in_its_error_report(landing, raw):
    """batch.json without a collection falls back to GOOGLE_STORAGE_COLLECTION: so does the
    ERROR report of a broken lookup.json, which is then stored in the bucket under it."""
    spec = BatchSpec(BATCH, raw_manifest=manifest(collection=None), extra_files={"lookup.json": raw})
    outcome = run_broken_batch(
        landing, spec, source="lookup.json", rule="lookup.json", default_collection="IRB_DEFAULT"
    )
    assert outcome.report["collection"] == "IRB_DEFAULT"
    assert (landing.out / f"Collection/IRB_DEFAULT/Batches/{BATCH}.json").is_file()


DUPLICATE_KEY = "has a key that occurs twice in the same object"
# Whatever follows a duplicated key, json.loads keeps the last copy: a flag could be dropped.
DUPLICATE_LOOKUPS = {
    "image-key-flag-first": '{"incoming/a.dcm": {"flagged": true}, "incoming/a.dcm": {"CTDIvol": 1.0}}',
    "image-key-flag-last": '{"incoming/a.dcm": {"CTDIvol": 1.0}, "incoming/a.dcm": {"flagged": true}}',
    "flag-twice-in-an-entry": '{"incoming/a.dcm": {"flagged": true, "CTDIvol": 1.0, "flagged": false}}',
    "flag-escaped": '{"incoming/a.dcm": {"flagged": true, "fl\\u0061gged": false}}',
    "nested-key": '{"incoming/a.dcm": {"Notes": {"CTDIvol": 1.0, "CTDIvol": 2.0}}}',
    "in-a-list": '{"incoming/a.dcm": {"Items": [{"KVP": 1}, {"KVP": 1, "KVP": 2}]}}',
    "three-deep": '{"incoming/a.dcm": {"A": {"B": {"C": 1, "C": 1}}}}',
}


@pytest.mark.parametrize("raw", DUPLICATE_LOOKUPS.values(), ids=DUPLICATE_LOOKUPS.keys())
def test_a_lookup_json_with_a_duplicate_key_at_any_depth_fails_the_batch(landing, raw):
    spec = BatchSpec(BATCH, collection=COLLECTION, extra_files={"lookup.json": raw.encode()})
    outcome = run_broken_batch(landing, spec, source="lookup.json", rule=DUPLICATE_KEY)
    for key in ("incoming", "flagged", "CTDIvol", "KVP"):
        assert key not in outcome.plan.error, "a key is quoted"


FLAG_LOOKALIKES = {
    "capital": {"Flagged": True},
    "upper": {"FLAGGED": True},
    "leading-blank": {" flagged": True},
    "trailing-blank": {"flagged ": True},
    "is-flagged": {"is_flagged": True},
    "phi-flagged": {"PHI-Flagged": True},
    "flag": {"flag": True},
    "flagged-false-lookalike": {"Flagged": False, "CTDIvol": 1.0},
    "ligature": {"\ufb02agged": True},  # casefolds to "flagged"
    "beside-the-real-flag": {"flagged": False, "Flagged": True},
    "nested": {"Notes": {"flagged": True}},
    "nested-in-a-list": {"Items": [{"Flagged": True}]},
}


@pytest.mark.parametrize("entry", FLAG_LOOKALIKES.values(), ids=FLAG_LOOKALIKES.keys())
def test_a_lookup_key_that_resembles_the_flag_fails_the_batch(landing, entry):
    """Decision (README): only `flagged` at the top of an entry is the flag; a key that reduces to
    `flagged` (or `flag`) once case, blanks and punctuation are dropped is refused, not guessed."""
    raw = json.dumps({"incoming/a.dcm": entry}).encode()
    spec = BatchSpec(BATCH, collection=COLLECTION, extra_files={"lookup.json": raw})
    run_broken_batch(landing, spec, source="lookup.json", rule="resembles the flag")


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param(("a.dcm", "./a.dcm"), id="dot-slash"),
        pytest.param(("a.dcm", "A.DCM"), id="case"),
        pytest.param(("x/a.dcm", "x//a.dcm"), id="double-slash"),
        pytest.param(("x/a.dcm", "x\\a.dcm"), id="backslash"),
        pytest.param(("a.dcm", " a.dcm "), id="blanks"),
        pytest.param(("no/such.dcm", "./NO/such.dcm"), id="matching-no-image"),
    ],
)
@pytest.mark.parametrize("flag_first", [True, False])
def test_two_lookup_keys_for_the_same_path_fail_the_batch(landing, keys, flag_first):
    """Decision (README): refused rather than merged, whichever carries the flag."""
    entries = [{"flagged": True}, {"CTDIvol": 1.0}] if flag_first else [{"CTDIvol": 1.0}, {"flagged": True}]
    raw = json.dumps(dict(zip(keys, entries, strict=True))).encode()
    spec = BatchSpec(BATCH, collection=COLLECTION, extra_files={"lookup.json": raw})
    run_broken_batch(landing, spec, source="lookup.json", rule="two image keys name the same path")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            '{"batch_id": "%s", "collection": "%s", "status": "ERROR", "status": "DONEPROCESSING", '
            '"completed_at": "2024-01-05T09:30:00Z"}',
            id="status",
        ),
        pytest.param(
            '{"batch_id": "%s", "collection": "%s", "status": "DONEPROCESSING", '
            '"completed_at": "2024-01-05T09:30:00Z", "deid": {"recipe": "a", "recipe": "b"}}',
            id="nested-deid",
        ),
        pytest.param(
            '{"batch_id": "%s", "collection": "%s", "collection": "%s", "status": "DONEPROCESSING", '
            '"completed_at": "2024-01-05T09:30:00Z"}',
            id="same-value-twice",
        ),
    ],
)
def test_a_batch_json_with_a_duplicate_key_fails_the_batch(landing, raw):
    ids = (BATCH, COLLECTION, COLLECTION)[: raw.count("%s")]
    spec = BatchSpec(BATCH, raw_manifest=(raw % ids).encode())
    run_broken_batch(landing, spec, source="batch.json", rule=DUPLICATE_KEY)


# batch.json's deid provenance reaches every row (deid_software, deid_recipe) and the report.
BAD_DEID = {
    "software-name-shaped": ({"software": "Okonkwo^Chidi", "recipe": "deid.dicom"}, ("Okonkwo^Chidi",)),
    "recipe-name-shaped": ({"software": "deid 0.4.13", "recipe": "by ^Chidimma"}, ("Chidimma",)),
    "option-name-shaped": ({"options": ["113100", "Brightwater^Tomas"]}, ("Brightwater^Tomas",)),
    "nested-object": ({"software": {"name": "deid", "operator": "Castellanos^Ines"}}, ("Castellanos^Ines",)),
    "person-field": ({"OperatorsName": "Tomas Brightwater"}, ("Tomas Brightwater",)),
    "person-field-old-spelling": (
        {"software": "deid", "PatientsName": "Agnieszka Kowalczyk"},
        ("Agnieszka Kowalczyk",),
    ),
    "person-field-as-tag": ({"0x00080090": "Chidi Okonkwo"}, ("Chidi Okonkwo",)),
    "identifier-field": ({"recipe": "deid.dicom", "PatientID": "MRN-7731904"}, ("MRN-7731904",)),
    "name-as-key": ({"Okonkwo^Chidi": "reviewed"}, ("Okonkwo^Chidi",)),
    "name-as-nested-key": ({"software": {"Doe, Johnathan": True}}, ("Doe, Johnathan",)),
    "name-as-key-in-options": ({"options": [{"Vasquez Celine": 1}]}, ("Vasquez Celine",)),
    # phi2 #6: a field that is not the contract's nor a keyword is shown by its position only.
    "name-key-over-a-name": ({"Notes": {"Hercule_Poirot": "Doe^Jane"}}, ("Hercule_Poirot", "Notes", "Doe^Jane")),
    "person-field-suffix": ({"software": "deid", "OperatorsName_old": "Doe^Jane"}, ("OperatorsName_old", "Doe^Jane")),
    "record-number-field": ({"MRN_7731904": ["Doe^Jane"]}, ("MRN_7731904", "7731904")),
}


@pytest.mark.parametrize(("deid", "planted"), BAD_DEID.values(), ids=BAD_DEID.keys())
def test_batch_json_deid_values_go_through_the_lookup_rules(landing, deid, planted):
    spec = BatchSpec(BATCH, raw_manifest=manifest(deid=deid))
    run_broken_batch(
        landing,
        spec,
        source="batch.json",
        rule="deid breaks the person-name and identifier rules",
        planted=planted,
    )


@pytest.mark.parametrize(("deid", "planted"), list(BAD_DEID.values())[:4], ids=list(BAD_DEID)[:4])
def test_a_deid_given_to_the_archive_step_otherwise_is_checked_before_anything_is_written(landing, deid, planted):
    """The archive step's `deid` may come from a DAG author, not a manifest: checked again, it
    fails the step (permanent: ManifestError) before any archive or row is made."""
    landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    plan = plan_batch(LocalLandingZone(landing.root), BATCH)
    assert plan.groups
    with pytest.raises(ManifestError, match="deid breaks the person-name and identifier rules") as caught:
        archive_groups(
            plan.groups,
            LocalLandingZone(landing.root),
            LocalObjectStore(landing.out),
            deid=deid,
            context=RunContext("bad-input-test"),
            settings=ArchiveSettings(),
        )
    assert planted[0] not in str(caught.value)
    assert not landing.out.exists() or not any(landing.out.rglob("*.tar.gz"))
    assert ManifestError in permanent_errors()


def test_a_batch_json_without_collection_uses_the_default_collection(landing):
    folder = landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=manifest(collection=None)))
    outcome = landing.process(BATCH, default_collection="IRB_DEFAULT")
    assert outcome.plan.status == "DONE"
    assert {name.split("/")[1] for name in outcome.archives} == {"IRB_DEFAULT"}
    assert outcome.archived_shas() == file_shas(folder, [image.path for image in good_images()])


@pytest.mark.parametrize(
    "unfinished",
    [
        {"completed_at": None},
        {"completed_at": "soon"},
        {"completed_at": "0001-01-01T00:00:00+05:30"},
        {"collection": "not yet/known"},
        {"deid": "still writing"},
    ],
    ids=["no-completed-at", "completed-at-words", "completed-at-out-of-range", "bad-collection", "bad-deid"],
)
@pytest.mark.parametrize("status", ["IN_PROGRESS", "doneprocessing"])
def test_a_batch_not_finished_is_pending_whatever_its_other_fields_say(landing, status, unfinished):
    """Only a complete manifest is judged: an unfinished one is not an error, so the batch is
    taken once the anonymizer finishes it (an ERROR report would keep it from every later run)."""
    folder = landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=manifest(status=status, **unfinished)))
    zone = LocalLandingZone(landing.root)
    assert select_batches(zone, end=None).batch_ids == []
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "NOT_READY"
    assert not (folder / "batch.report.json").exists()

    (folder / "batch.json").write_bytes(manifest())  # the anonymizer finishes the batch
    assert select_batches(zone, end=None).batch_ids == [BATCH]
    assert landing.process(BATCH).plan.status == "DONE"


def test_an_unreadable_manifest_is_named_only_by_the_run_that_takes_it(landing):
    """The sensor warns of a batch.json it cannot read only when its run takes the batch (dated
    by the file's modification time): a run that leaves it for later, or a backfill of an interval
    it is not in, says nothing of it."""
    folder = landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=b'{"batch_id": '))
    landing.write(BatchSpec(NEIGHBOUR, images=good_images(), collection=COLLECTION))
    modified = datetime(2024, 1, 6, 12, tzinfo=UTC)
    os.utime(folder / "batch.json", (modified.timestamp(), modified.timestamp()))
    zone = LocalLandingZone(landing.root)

    before = select_batches(zone, end=datetime(2024, 1, 6, tzinfo=UTC))  # a run whose interval ends before it
    assert (before.batch_ids, before.later, before.unreadable) == ([NEIGHBOUR], 1, {})
    backfill = select_batches(zone, start=datetime(2024, 1, 5, tzinfo=UTC), end=datetime(2024, 1, 6, tzinfo=UTC))
    assert (backfill.batch_ids, backfill.unreadable) == ([NEIGHBOUR], {})

    taken = select_batches(zone, end=datetime(2024, 1, 7, tzinfo=UTC))
    assert taken.batch_ids == [NEIGHBOUR, BATCH]
    assert list(taken.unreadable) == [BATCH]
    assert "is not valid JSON" in taken.unreadable[BATCH]
    assert taken.unreadable_dated == {BATCH: modified}


def test_a_manifest_that_breaks_the_parser_fails_only_its_batch_in_the_ledger(landing):
    for name, raw in (
        (BATCH, manifest(completed_at="9999-12-31T23:59:59-05:00")),
        ("20240105-0003", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000),
    ):
        landing.write(BatchSpec(name, images=good_images(), raw_manifest=raw))
    landing.write(BatchSpec(NEIGHBOUR, images=good_images(), collection=COLLECTION))
    selection = select_batches(LocalLandingZone(landing.root), end=None)
    assert NEIGHBOUR in selection.batch_ids
    assert set(selection.unreadable) == {BATCH, "20240105-0003"}


@pytest.mark.parametrize(
    ("written", "instant"),
    [
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),  # a leap second
        ("2024-01-05t09:30:00z", datetime(2024, 1, 5, 9, 30, tzinfo=UTC)),
        ("2024-01-05 09:30:00Z", datetime(2024, 1, 5, 9, 30, tzinfo=UTC)),
        ("2024-01-05T15:00:00.123456789+05:30", datetime(2024, 1, 5, 9, 30, 0, 123456, tzinfo=UTC)),
        ("2024-01-05T04:30:00-05:00", datetime(2024, 1, 5, 9, 30, tzinfo=UTC)),
    ],
)
def test_rfc3339_timestamps_are_read_as_utc(written, instant):
    assert parse_rfc3339(written, "batch.json", "completed_at") == instant


def test_a_null_collection_falls_back_to_the_default(landing):
    raw = json.dumps({**json.loads(manifest()), "collection": None}).encode()
    landing.write(BatchSpec(BATCH, images=good_images(), raw_manifest=raw))
    outcome = landing.process(BATCH, default_collection="IRB_DEFAULT")
    assert outcome.plan.status == "DONE"
    assert {name.split("/")[1] for name in outcome.archives} == {"IRB_DEFAULT"}


@pytest.mark.parametrize("status", ["PROCESSING", "donepro", "DONE", "QUEUED"])
def test_a_batch_with_an_unknown_status_is_not_ready(landing, status):
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION, status=status))
    zone = LocalLandingZone(landing.root)
    assert completed_in(zone, *ALWAYS) == []
    # A manual run that names it does not archive it either.
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "NOT_READY"
    assert not (folder / "batch.report.json").exists()
    assert outcome.plan.error == (
        f"{folder / 'batch.json'}: its status means the batch is not ready yet "
        "(only DONEPROCESSING or ERROR are processed)"
    )
    assert outcome.archives == {}
    assert outcome.rows == []
    assert {relpath for _, relpath in outcome.zone.opened} <= {"batch.json"}


def test_a_batch_the_anonymizer_gave_up_on_is_reported_and_nothing_uploaded(landing):
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION, status="ERROR"))
    assert completed_in(LocalLandingZone(landing.root), *ALWAYS) == [BATCH]  # ready: it gets a report
    before = snapshot(landing.root)

    outcome = landing.process(BATCH)

    assert outcome.plan.status == "ERROR"
    assert outcome.plan.collection == COLLECTION
    assert outcome.plan.error == f"{folder / 'batch.json'}: the anonymizer reported status ERROR"
    assert outcome.archives == {}
    assert outcome.rows == []
    assert outcome.report["status"] == "ERROR"
    assert {relpath for _, relpath in outcome.zone.opened} <= {"batch.json", "lookup.json"}
    assert set(snapshot(landing.root)) - set(before) == {str(folder / "batch.report.json")}
    # The report is also kept in the bucket, under the collection.
    assert (landing.out / f"Collection/{COLLECTION}/Batches/{BATCH}.json").is_file()


# --- header checks (contract checks 3 to 6) -------------------------------------------------

BAD_IDS = {
    "slash": "GL66/4ba0",
    "dotdot": "..",
    "dot": ".",
    "traversal": "../GL664ba0",
    "space": "Jane Roe",
    "65-chars": "X" * 65,
    "backslash-multi-value": "GL66\\4ba0",
    "unicode": "GL664bä0",
}


@pytest.mark.parametrize("value", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_a_patient_id_that_is_not_a_coded_id_is_quarantined(landing, value):
    run_batch(landing, bad=[bad_image(PatientID=value)], expect={BAD: Reason.INVALID_PATIENT_ID}, planted=("Jane Roe",))


@pytest.mark.parametrize("value", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_an_accession_number_that_is_not_a_coded_id_is_quarantined(landing, value):
    run_batch(
        landing,
        bad=[bad_image(AccessionNumber=value)],
        expect={BAD: Reason.INVALID_ACCESSION_NUMBER},
        planted=("Jane Roe",),
    )


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        pytest.param("PatientID", None, Reason.INVALID_PATIENT_ID, id="PatientID-missing"),
        pytest.param("PatientID", "", Reason.INVALID_PATIENT_ID, id="PatientID-empty"),
        pytest.param("AccessionNumber", None, Reason.INVALID_ACCESSION_NUMBER, id="AccessionNumber-missing"),
        pytest.param("AccessionNumber", "", Reason.INVALID_ACCESSION_NUMBER, id="AccessionNumber-empty"),
        pytest.param("StudyDate", None, Reason.INVALID_STUDY_DATE, id="StudyDate-missing"),
        pytest.param("StudyDate", "", Reason.INVALID_STUDY_DATE, id="StudyDate-empty"),
        pytest.param("StudyDate", "20230230", Reason.INVALID_STUDY_DATE, id="February-30"),
        pytest.param("StudyDate", "2023-01-01", Reason.INVALID_STUDY_DATE, id="ISO-dashes"),
        pytest.param("StudyDate", "99999999", Reason.INVALID_STUDY_DATE, id="99999999"),
        pytest.param("StudyDate", "20231301", Reason.INVALID_STUDY_DATE, id="month-13"),
        pytest.param("StudyDate", "2023081", Reason.INVALID_STUDY_DATE, id="seven-digits"),
        pytest.param("PatientIdentityRemoved", None, Reason.IDENTITY_NOT_REMOVED, id="identity-removed-missing"),
        pytest.param("PatientIdentityRemoved", "NO", Reason.IDENTITY_NOT_REMOVED, id="identity-removed-NO"),
        pytest.param("PatientIdentityRemoved", "yes", Reason.IDENTITY_NOT_REMOVED, id="identity-removed-lowercase"),
        pytest.param("BurnedInAnnotation", "YES", Reason.BURNED_IN_ANNOTATION, id="burned-in-annotation"),
    ],
)
def test_a_header_that_breaks_the_contract_is_quarantined(landing, keyword, value, reason):
    outcome = run_batch(landing, bad=[bad_image(**{keyword: value})], expect={BAD: reason})
    assert outcome.opened(BAD)  # read, judged, not archived


@pytest.mark.parametrize("keyword", DEFAULT_PERSON_ATTRIBUTES)
def test_a_filled_person_attribute_is_quarantined_and_its_value_never_reported(landing, keyword):
    value = PLANTED[keyword]
    outcome = run_batch(
        landing, bad=[bad_image(**{keyword: value})], expect={BAD: Reason.IDENTIFYING_ATTRIBUTE}, planted=(value,)
    )
    held = outcome.plan.quarantined[0]
    assert held.detail == f"holds a value: {keyword}"  # the attribute, never its value
    # The study it belongs to still knows one of its images was held back.
    study = next(group for group in outcome.plan.groups if group.entity_id == ENTITY)
    assert (held.study, study.quarantined) == (study.stem, 1)


def test_every_person_attribute_at_once_is_named_in_the_detail(landing):
    outcome = run_batch(
        landing, bad=[bad_image(**PLANTED)], expect={BAD: Reason.IDENTIFYING_ATTRIBUTE}, planted=tuple(PLANTED.values())
    )
    detail = outcome.plan.quarantined[0].detail
    assert detail.startswith("holds a value: ")
    # Named in header order (tag paths), every one of them.
    assert sorted(detail.removeprefix("holds a value: ").split(", ")) == sorted(DEFAULT_PERSON_ATTRIBUTES)


def test_a_multi_valued_other_patient_ids_with_one_value_is_quarantined(landing):
    run_batch(
        landing,
        bad=[bad_image(OtherPatientIDs=["", "MRN-7731904"])],
        expect={BAD: Reason.IDENTIFYING_ATTRIBUTE},
        planted=("MRN-7731904",),
    )


@pytest.mark.parametrize("value", ["", ENTITY], ids=["empty", "equal-to-PatientID"])
def test_a_patient_name_that_is_empty_or_the_coded_id_is_archived(landing, value):
    good = ImageSpec(
        ENTITY, ITEM, DATE, "CT", 3, 1, relpath="incoming/tolerated.dcm", header_overrides={"PatientName": value}
    )
    folder = landing.write(BatchSpec(BATCH, images=[*good_images(), good], collection=COLLECTION))
    outcome = landing.process(BATCH)
    assert outcome.reasons == {}
    assert outcome.archived_shas() == file_shas(folder, [i.path for i in [*good_images(), good]])


# --- what the anonymizer set aside ----------------------------------------------------------


def test_an_image_under_phi_is_never_read(landing):
    phi = bad_image(relpath="PHI/" + BAD, PatientName=PLANTED["PatientName"], BurnedInAnnotation="YES")
    outcome = run_batch(landing, bad=[phi], expect={phi.path: Reason.PHI_FOLDER}, planted=(PLANTED["PatientName"],))
    assert not outcome.opened(phi.path)


def run_flagged(landing: Landing, lookup: dict) -> Outcome:
    """The good images and BAD, which holds an identifier and which `lookup` flags: BAD is held
    unread, for its flag."""
    flagged = bad_image(OperatorsName=PLANTED["OperatorsName"])
    outcome = run_batch(
        landing,
        bad=[flagged],
        lookup=lookup,
        expect={BAD: Reason.FLAGGED_IN_LOOKUP},
        planted=(PLANTED["OperatorsName"],),
    )
    assert not outcome.opened(BAD)
    return outcome


def test_an_image_flagged_in_lookup_json_is_never_read(landing):
    lookup = {image.path: {"ScanOptions": "HELICAL", "CTDIvol": 12.1} for image in good_images()}
    lookup[BAD] = {"ScanOptions": "HELICAL", "flagged": True}
    outcome = run_flagged(landing, lookup)
    # The good images' lookup values still reach their rows; the header wins on conflict.
    ct_rows = [row for row in outcome.rows if row["entity_id"] == ENTITY]
    assert {row["DicomHeader"]["CTDIvol"] for row in ct_rows} == {12.1}
    assert {row["DicomHeader"]["ScanOptions"] for row in ct_rows} == {"HELICAL MODE"}


# --- links ----------------------------------------------------------------------------------


def _outside_image(landing: Landing) -> Path:
    """A perfectly valid image outside the landing zone, carrying a name that must never travel."""
    target = landing.outside / "elsewhere" / "secret.dcm"
    target.parent.mkdir(parents=True)
    target.write_bytes(image_bytes(ImageSpec(ENTITY, ITEM, DATE, "CT", 4, 1)))
    return target


def test_a_link_pointing_out_of_the_batch_is_never_followed(landing):
    target = _outside_image(landing)
    outcome = run_batch(
        landing,
        expect={"incoming/link.dcm": Reason.OUTSIDE_BATCH},
        setup=lambda folder: _symlink(folder / "incoming" / "link.dcm", target),
    )
    assert not outcome.opened("incoming/link.dcm")
    assert sha256(target.read_bytes()) not in outcome.archived_shas()


def test_a_link_to_another_batch_is_outside_the_batch(landing):
    neighbour = landing.write(BatchSpec(NEIGHBOUR, images=[ImageSpec(*OTHER, "MR", 2, 1)], collection=COLLECTION))
    target = neighbour / ImageSpec(*OTHER, "MR", 2, 1).path
    outcome = run_batch(
        landing,
        expect={"incoming/link.dcm": Reason.OUTSIDE_BATCH},
        setup=lambda folder: _symlink(
            folder / "incoming" / "link.dcm", Path("..", "..", NEIGHBOUR, target.relative_to(neighbour))
        ),
    )
    assert not outcome.opened("incoming/link.dcm")


def test_a_dangling_link_is_outside_the_batch(landing):
    run_batch(
        landing,
        expect={"incoming/gone.dcm": Reason.OUTSIDE_BATCH},
        setup=lambda folder: _symlink(folder / "incoming" / "gone.dcm", landing.tmp / "no-such-file"),
    )


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_linked_folder_is_never_walked(landing, where):
    # Pointing outside, it could lead anywhere; pointing inside, it would archive images twice.
    def setup(folder: Path) -> None:
        target = _outside_image(landing).parent if where == "outside" else folder / ENTITY
        _symlink(folder / "linked", target)

    outcome = run_batch(landing, expect={"linked": Reason.OUTSIDE_BATCH}, setup=setup)
    assert not [relpath for _, relpath in outcome.zone.opened if relpath.startswith("linked")]


def test_a_linked_batch_folder_is_never_discovered(landing):
    target = landing.outside / "batches" / BATCH
    write_batch(target.parent, BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    landing.write(BatchSpec(NEIGHBOUR, images=good_images(), collection=COLLECTION))
    _symlink(landing.root / "linked-batch", target)
    zone = LocalLandingZone(landing.root)
    assert zone.batch_ids() == [NEIGHBOUR]
    assert completed_in(zone, *ALWAYS) == [NEIGHBOUR]
    assert select_batches(zone, end=None).batch_ids == [NEIGHBOUR]


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


# --- batch ids given by a user --------------------------------------------------------------


class ExplodingZone:
    """A landing zone that fails the test if anything touches it."""

    uri = "nowhere"

    def __getattr__(self, name):
        raise AssertionError(f"the landing zone was touched ({name}) for an invalid batch id")


@pytest.mark.parametrize(
    "batch_id",
    ["..", ".", "...", "../outside", "../../etc", "a/b", "/etc", "x/../y", "", " ", "a\\b", ".hidden", "-x", "a" * 129,
     "a..b", "a..", "x..y.z"],
)  # fmt: skip
def test_a_batch_id_that_is_a_path_is_refused_without_touching_anything(landing, batch_id):
    # A valid batch one level up: "../outside" would find it if the id were used as a path.
    write_batch(landing.tmp / "outside", BatchSpec("outside", images=good_images(), collection=COLLECTION))
    landing.root.mkdir()
    plan = plan_batch(ExplodingZone(), batch_id, default_collection=COLLECTION)
    assert plan.status == "ERROR"
    assert plan.error == batch_id_problem(batch_id), "the one batch-id rule, with its reason"
    zone = RecordingZone(landing.root)
    assert plan_batch(zone, batch_id).status == "ERROR"
    assert zone.opened == []


# --- what is left: nothing, all quarantined, duplicates -------------------------------------


def test_a_batch_with_only_batch_json_is_empty(landing):
    folder = landing.write(BatchSpec(BATCH, collection=COLLECTION))
    before = snapshot(landing.root)
    outcome = landing.process(BATCH)
    assert (outcome.plan.status, outcome.plan.images_seen, outcome.plan.error) == ("EMPTY", 0, None)
    assert outcome.report["status"] == "EMPTY"
    assert outcome.archives == {}
    assert set(snapshot(landing.root)) - set(before) == {str(folder / "batch.report.json")}


def test_a_batch_where_every_image_is_quarantined_is_empty(landing):
    images = [
        bad_image(relpath="PHI/a.dcm"),
        bad_image(relpath="b.dcm", BurnedInAnnotation="YES"),
        bad_image(relpath="c.dcm", PatientName=PLANTED["PatientName"]),
    ]
    folder = landing.write(BatchSpec(BATCH, images=images, collection=COLLECTION, extra_files={"d.dcm": b""}))
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "EMPTY"
    assert outcome.reasons == {
        "PHI/a.dcm": Reason.PHI_FOLDER,
        "b.dcm": Reason.BURNED_IN_ANNOTATION,
        "c.dcm": Reason.IDENTIFYING_ATTRIBUTE,
        "d.dcm": Reason.NOT_DICOM,
    }
    assert outcome.report["images"] == {
        "seen": 4,
        "archived": 0,
        "quarantined": 4,
        "quarantined_by_reason": {
            "burned_in_annotation": 1,
            "identifying_attribute": 1,
            "not_dicom": 1,
            "phi_folder": 1,
        },
        "stripped": 0,
        "private_elements_removed": 0,
    }
    assert outcome.archives == {}
    assert (folder / "batch.report.json").is_file()
    assert_no_leak(landing, outcome, [PLANTED["PatientName"]])


def test_the_same_file_twice_in_a_study_is_archived_twice_and_keyed_once(landing):
    """Decision (docs/reliability.md): both copies are archived (the archive mirrors what was
    delivered, member names never collide); both rows carry the same (collection, instance_sha256),
    and the BigQuery MERGE keeps one of them (ROW_NUMBER over the key, ordered by DEDUPE_ORDER)."""
    copy_path = "copies/again.dcm"
    original = good_images()[0]
    good = good_images()
    folder = landing.write(
        BatchSpec(BATCH, images=good, collection=COLLECTION, extra_files={copy_path: image_bytes(original)})
    )
    outcome = landing.process(BATCH)
    assert outcome.reasons == {}
    assert outcome.planned == {image.path for image in good} | {copy_path}
    duplicated = sha256((folder / original.path).read_bytes())
    assert sha256((folder / copy_path).read_bytes()) == duplicated
    members = outcome.archives[f"Collection/{COLLECTION}/Entity/{ENTITY}/{ENTITY}_{DATE}_{ITEM}.tar.gz"]
    assert len(members) == 3
    assert len({name for name, _ in members}) == 3  # names never collide
    assert [sha for _, sha in members].count(duplicated) == 2
    rows = [row for row in outcome.rows if row["instance_sha256"] == duplicated]
    assert len(rows) == 2  # one per archive member...
    assert len({row["archive_member"] for row in rows}) == 2
    assert {(row["collection"], row["instance_sha256"]) for row in rows} == {(COLLECTION, duplicated)}  # ...one key
    assert ROW_KEY == ("collection", "instance_sha256")
    assert DEDUPE_ORDER[-1] == "archive_member"  # the kept row is deterministic: the first member
