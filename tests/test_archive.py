"""Study archives from real DICOM files on a local landing zone: determinism, layout, integrity,
object naming, and every quarantine reason of the batch contract.

No Airflow and no emulator: the domain package alone, on files written by tools.landing_zone.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pydicom
import pytest

from dicom_archive.archive import ArchiveIntegrityError, write_study_archive
from dicom_archive.deid_gate import CONTRACT_PERSON_ATTRIBUTES, DEFAULT_PERSON_ATTRIBUTES, DeidPolicy, Reason
from dicom_archive.landing import LocalLandingZone
from dicom_archive.naming import (
    MAX_COLLECTION_LENGTH,
    InvalidIdentifierError,
    archive_object_name,
    archive_stem,
    batch_report_object_name,
)
from dicom_archive.plan import STATUS_DONE, STATUS_ERROR, BatchPlan, StudyGroup, plan_batch
from dicom_archive.publish import WRITTEN, publish_study_archive
from dicom_archive.settings import Settings, SettingsError
from dicom_archive.stores import LocalObjectStore
from tools.landing_zone import BatchSpec, ImageSpec, image_bytes, write_batch

# Bad values are planted on purpose; pydicom warns about them when writing and reading.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

ENTITY, ITEM, DATE = "GL664ba0", "GL71cfb7", "20070904"
STEM = f"{ENTITY}_{DATE}_{ITEM}"
COLLECTION = "IRB41449"


def good_images(n: int = 3, series: int = 1, **kwargs) -> list[ImageSpec]:
    return [ImageSpec(ENTITY, ITEM, DATE, "CT", series, i, **kwargs) for i in range(1, n + 1)]


def make_batch(root: Path, batch_id: str, images: list[ImageSpec], **kwargs) -> LocalLandingZone:
    kwargs.setdefault("collection", COLLECTION)
    write_batch(root, BatchSpec(batch_id, images=images, **kwargs))
    return LocalLandingZone(root)


def archive_bytes(group: StudyGroup, zone: LocalLandingZone, **kwargs) -> tuple[bytes, object, list]:
    sink = io.BytesIO()
    digest, members = write_study_archive(group, zone, sink, **kwargs)
    return sink.getvalue(), digest, members


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getmembers()


def tar_contents(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def only_group(plan: BatchPlan) -> StudyGroup:
    assert plan.status == STATUS_DONE, plan.error
    assert len(plan.groups) == 1, [g.stem for g in plan.groups]
    return plan.groups[0]


# --- determinism ----------------------------------------------------------------------------


def test_two_runs_give_byte_identical_archives_whatever_the_file_times(tmp_path):
    zone = make_batch(tmp_path / "zone", "b1", good_images(4))
    group = only_group(plan_batch(zone, "b1"))

    first, digest1, _ = archive_bytes(group, zone)
    for path in (tmp_path / "zone" / "b1").rglob("*.dcm"):
        os.utime(path, (1_000_000_000, 1_000_000_000))  # different mtimes must not matter
    # A second run plans again: a plan's images are the files it checked, mtimes included.
    group = only_group(plan_batch(zone, "b1"))
    second, digest2, _ = archive_bytes(group, zone)

    assert first == second
    assert digest1 == digest2
    assert digest1.size == len(first)
    assert digest1.md5 == base64.b64encode(hashlib.md5(first).digest()).decode()
    # A digest-only pass (what a rerun uses to compare) agrees with the written bytes.
    digest_only, _ = write_study_archive(group, zone, None)
    assert digest_only == digest1


def test_same_images_under_other_names_and_batch_give_the_same_archive(tmp_path):
    """With distinct Series/Instance numbers and UIDs the order never looks at file names:
    the same images copied under other names into another batch give the same bytes."""
    root = tmp_path / "zone"
    zone = make_batch(root, "b1", good_images(4))
    (root / "b2" / "renamed").mkdir(parents=True)
    for n, path in enumerate(sorted((root / "b1").rglob("*.dcm"), reverse=True)):
        shutil.copyfile(path, root / "b2" / "renamed" / f"IM{n:04d}")
    (root / "b2" / "batch.json").write_text((root / "b1" / "batch.json").read_text().replace('"b1"', '"b2"'))

    a = only_group(plan_batch(zone, "b1"))
    b = only_group(plan_batch(zone, "b2"))
    assert [i.relpath for i in a.images] != [i.relpath for i in b.images]
    bytes_a, digest_a, members_a = archive_bytes(a, zone)
    bytes_b, digest_b, members_b = archive_bytes(b, zone)
    assert digest_a.md5 == digest_b.md5
    assert bytes_a == bytes_b
    assert [m.member_name for m in members_a] == [m.member_name for m in members_b]


@pytest.mark.parametrize("tied", [2, 3])
def test_with_blank_uids_and_equal_numbers_the_images_not_their_names_decide_the_order(tmp_path, tied):
    """When the headers cannot order a study's images, their contents do: the same images
    under other file names (a re-delivery) give the same archive, so its rerun is a no-op and
    not a content conflict. Only the tied images are read whole at plan time."""
    root = tmp_path / "zone"
    names = "abc"[:tied]
    images = [ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 1, blank_uids=True, relpath=f"x/{n}.dcm") for n in names]
    images.append(ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 2, blank_uids=True, relpath="x/untied.dcm"))
    # Distinct pixels (the seed includes the path), identical sort keys apart from the path.
    zone = make_batch(root, "b1", images)
    contents = {n: (root / "b1" / "x" / f"{n}.dcm").read_bytes() for n in names}
    assert len(set(contents.values())) == tied
    (root / "b2" / "x").mkdir(parents=True)
    for n, m in zip(names, reversed(names), strict=True):  # the same files under each other's names
        (root / "b2" / "x" / f"{n}.dcm").write_bytes(contents[m])
    shutil.copyfile(root / "b1" / "x" / "untied.dcm", root / "b2" / "x" / "untied.dcm")
    (root / "b2" / "batch.json").write_text((root / "b1" / "batch.json").read_text().replace('"b1"', '"b2"'))

    g1, g2 = only_group(plan_batch(zone, "b1")), only_group(plan_batch(zone, "b2"))
    assert [i.tie_sha256 == "" for i in g1.images] == [False] * tied + [True]
    run1, digest1, _ = archive_bytes(g1, zone)
    run2, digest2, _ = archive_bytes(g2, zone)
    assert run1 == run2
    assert digest1.md5 == digest2.md5
    assert sorted(tar_contents(run1).values()) == sorted([*contents.values(), (root / "b1/x/untied.dcm").read_bytes()])


# --- layout ---------------------------------------------------------------------------------


def test_member_names_never_collide_with_blank_uids_and_repeated_numbers(tmp_path):
    images = [ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 1, blank_uids=True, relpath=f"IM{n:06d}") for n in range(1, 5)]
    images.append(ImageSpec(ENTITY, ITEM, DATE, "CT", 2, 2, blank_uids=True, relpath="IM000005"))
    images.append(ImageSpec(ENTITY, ITEM, DATE, "CT", 2, 2, blank_uids=True, relpath="IM000006"))
    images.append(
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 1, blank_uids=True, relpath="IM000007",
                  header_overrides={"SeriesNumber": None, "InstanceNumber": None})
    )  # fmt: skip
    zone = make_batch(tmp_path / "zone", "b1", images)
    group = only_group(plan_batch(zone, "b1"))
    assert len(group.images) == 7

    data, _, members = archive_bytes(group, zone)
    names = [m.member_name for m in members]
    assert len(set(names)) == 7
    assert names == [
        f"{STEM}/S1/00001.dcm",
        f"{STEM}/S1/00002.dcm",
        f"{STEM}/S1/00003.dcm",
        f"{STEM}/S1/00004.dcm",
        f"{STEM}/S2/00005.dcm",
        f"{STEM}/S2/00006.dcm",
        f"{STEM}/S-unknown/00007.dcm",
    ]
    files = tar_contents(data)
    assert list(files) == names
    # Nothing of the anonymizer's file names goes into the archive.
    assert not any("IM0000" in name for name in files)


def test_tar_layout_owner_times_and_gzip_header_are_fixed(tmp_path):
    zone = make_batch(tmp_path / "zone", "b1", good_images(3))
    group = only_group(plan_batch(zone, "b1"))
    assert group.object_name == f"Collection/{COLLECTION}/Entity/{ENTITY}/{STEM}.tar.gz"
    data, _, _ = archive_bytes(group, zone)

    members = tar_members(data)
    top = members[0]
    assert top.isdir()
    assert top.name == group.object_name.rsplit("/", 1)[1].removesuffix(".tar.gz") == STEM
    assert all(m.name.startswith(f"{STEM}/") for m in members[1:])
    assert {m.name.split("/", 1)[0] for m in members} == {STEM}
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.pax_headers == {}
        assert m.mode == (0o755 if m.isdir() else 0o644)

    # gzip header: magic, deflate, no flags (so no FNAME), MTIME 0.
    assert data[:3] == b"\x1f\x8b\x08"
    flags = data[3]
    assert flags & 0x08 == 0, "the gzip header must not carry a file name"
    assert flags == 0
    assert int.from_bytes(data[4:8], "little") == 0
    assert gzip.decompress(data)[:512].startswith(STEM.encode())


def test_member_sha256_and_extracted_files_equal_the_inputs(tmp_path):
    root = tmp_path / "zone"
    zone = make_batch(root, "b1", good_images(3) + good_images(2, series=2))
    group = only_group(plan_batch(zone, "b1"))

    def row_fields(ds, image):
        return {"PatientID": ds.PatientID, "SOPInstanceUID": ds.SOPInstanceUID, "relpath": image.relpath}

    data, _, members = archive_bytes(group, zone, row_fields=row_fields)
    assert len(members) == 5

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    for member in members:
        source = (root / "b1" / member.relpath).read_bytes()
        assert member.sha256 == hashlib.sha256(source).hexdigest()
        assert member.size == len(source)
        assert (tmp_path / "out" / member.member_name).read_bytes() == source
        # What is taken from the header for the metadata row comes from the file's own header.
        assert member.fields["PatientID"] == ENTITY
        assert member.fields["SOPInstanceUID"] == pydicom.dcmread(root / "b1" / member.relpath).SOPInstanceUID
        assert member.fields["relpath"] == member.relpath
    extracted = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(extracted) == 5


# --- integrity ------------------------------------------------------------------------------


def _tamper_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _tamper_grow(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 100)


def _tamper_identity(path: Path) -> None:
    raw = path.read_bytes()
    element = b"\x12\x00\x62\x00CS\x04\x00YES "  # (0012,0062) PatientIdentityRemoved
    assert raw.count(element) == 1
    path.write_bytes(raw.replace(element, b"\x12\x00\x62\x00CS\x04\x00NO  "))  # same size


NOT_PLANNED = "is not the file that was planned"


def _unseen_by_the_file_identity(group, zone, relpath: str) -> None:
    """The plan takes the changed file's identity, as if the change had come after the identity
    check (while the file is read): what must catch it then is the header's re-check."""
    image = next(image for image in group.images if image.relpath == relpath)
    with zone.open(group.batch_id, relpath) as stream:
        image.source_identity = dict(zone.source_identity(stream))


@pytest.mark.parametrize(
    ("tamper", "message", "unseen"),
    [
        (
            _tamper_truncate,
            r"is not the file that was planned \(changed after planning: ctime_ns, mtime_ns, size\)",
            "",
        ),
        (_tamper_grow, r"is not the file that was planned \(changed after planning: ctime_ns, mtime_ns, size\)", ""),
        (_tamper_identity, r"is not the file that was planned \(changed after planning: ctime_ns, mtime_ns\)", ""),
        (_tamper_truncate, "changed size", "unseen"),
        (_tamper_grow, "grew", "unseen"),
        (_tamper_identity, r"no longer passes the de-identification check \(identity_not_removed\)", "unseen"),
    ],
)
def test_file_changed_after_planning_fails_the_archive_and_leaves_no_object(tmp_path, tamper, message, unseen):
    root = tmp_path / "zone"
    zone = make_batch(root, "b1", good_images(3))
    group = only_group(plan_batch(zone, "b1"))
    victim = group.sorted_images()[1].relpath
    tamper(root / "b1" / victim)
    if unseen:
        _unseen_by_the_file_identity(group, zone, victim)

    with pytest.raises(ArchiveIntegrityError, match=message) as caught:
        write_study_archive(group, zone, io.BytesIO())
    assert victim in str(caught.value)

    store = LocalObjectStore(tmp_path / "out")
    with pytest.raises(ArchiveIntegrityError):
        publish_study_archive(group, zone, store)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


# --- object naming --------------------------------------------------------------------------


def test_object_name_of_the_spec_example():
    name = archive_object_name("IRB41449", "GL664ba0", "20070904", "GL71cfb7")
    assert name == "Collection/IRB41449/Entity/GL664ba0/GL664ba0_20070904_GL71cfb7.tar.gz"


@pytest.mark.parametrize(
    ("collection", "entity", "date", "item"),
    [
        ("IRB1", "GL/664", DATE, ITEM),
        ("IRB1", ENTITY, DATE, "a/b"),
        ("IRB1", "..", DATE, ITEM),
        ("IRB1", ENTITY, DATE, "..."),
        ("IRB1", "GL 664", DATE, ITEM),
        ("IRB1", ENTITY, DATE, "GL71 cfb7"),
        ("IRB1", "x" * 65, DATE, ITEM),
        ("IRB1", ENTITY, DATE, "y" * 65),
        ("IRB1", "", DATE, ITEM),
        ("IRB1", ENTITY, "2007-09-04", ITEM),
        ("IRB/1", ENTITY, DATE, ITEM),
        ("IRB-1", ENTITY, DATE, ITEM),
        ("..", ENTITY, DATE, ITEM),
        ("x" * 1025, ENTITY, DATE, ITEM),
    ],
)
def test_object_naming_rejects_ids_that_could_escape_or_overflow(collection, entity, date, item):
    with pytest.raises(InvalidIdentifierError):
        archive_object_name(collection, entity, date, item)


def test_longest_valid_ids_are_accepted():
    assert archive_stem("x" * 64, DATE, "y" * 64) == f"{'x' * 64}_{DATE}_{'y' * 64}"
    # The longest collection whose longest object names stay within Cloud Storage's 1024 bytes.
    longest = archive_object_name("I" * MAX_COLLECTION_LENGTH, "x" * 64, DATE, "y" * 64)
    assert longest.startswith(f"Collection/{'I' * MAX_COLLECTION_LENGTH}/Entity/{'x' * 64}/")
    assert len(longest.encode()) <= 1024
    assert len(batch_report_object_name("I" * MAX_COLLECTION_LENGTH, "b" * 128).encode()) <= 1024
    with pytest.raises(InvalidIdentifierError, match="limit of 1024 bytes per object name"):
        archive_object_name("I" * (MAX_COLLECTION_LENGTH + 1), "a", DATE, "e")


# --- quarantine reasons ---------------------------------------------------------------------


def plan_with(tmp_path: Path, bad: list[ImageSpec] | None = None, policy: DeidPolicy | None = None, **batch):
    """A batch of three good images of one study plus the given ones; returns (zone, plan)."""
    zone = make_batch(tmp_path / "zone", "b1", good_images(3) + (bad or []), **batch)
    return zone, plan_batch(zone, "b1", policy=policy)


def assert_good_study_archived(tmp_path: Path, zone: LocalLandingZone, plan: BatchPlan, held_back: int) -> None:
    """The three good images still form their study, and only they go into its archive."""
    group = only_group(plan)
    assert group.stem == STEM
    assert [i.relpath for i in group.images] == [f"{ENTITY}/{ITEM}/1/{n}.dcm" for n in (1, 2, 3)]
    assert group.quarantined == held_back
    store = LocalObjectStore(tmp_path / "out")
    published = publish_study_archive(group, zone, store, policy=DeidPolicy())
    assert published.outcome == WRITTEN
    data = (tmp_path / "out" / group.object_name).read_bytes()
    contents = tar_contents(data)
    assert len(contents) == 3
    good = {(tmp_path / "zone" / "b1" / i.relpath).read_bytes() for i in group.images}
    assert set(contents.values()) == good


def single_quarantine(plan: BatchPlan) -> tuple[str, str, str]:
    assert len(plan.quarantined) == 1, plan.quarantined
    q = plan.quarantined[0]
    return q.relpath, q.reason, q.detail


def test_phi_folder_is_quarantined(tmp_path):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9)
    bad.relpath = "PHI/" + bad.path
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan) == (bad.relpath, Reason.PHI_FOLDER, "under PHI/")
    assert plan.images_seen == 4
    assert_good_study_archived(tmp_path, zone, plan, held_back=0)


def test_image_flagged_in_lookup_is_quarantined(tmp_path):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9)
    zone, plan = plan_with(tmp_path, [bad], lookup={bad.path: {"flagged": True, "ScanOptions": "HELICAL"}})
    assert single_quarantine(plan)[:2] == (bad.path, Reason.FLAGGED_IN_LOOKUP)
    assert_good_study_archived(tmp_path, zone, plan, held_back=0)


def test_lookup_flag_must_be_true_to_quarantine(tmp_path):
    extra = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 4)
    _, plan = plan_with(tmp_path, [extra], lookup={extra.path: {"flagged": False}})
    assert plan.quarantined == []
    assert len(only_group(plan).images) == 4


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"this is a radiology report, not an image\n", "no DICM preamble"),
        (b"", "no DICM preamble"),
        (b"\0" * 128 + b"DICM" + b"\xff" * 64, "does not parse as DICOM"),
    ],
    ids=["text", "empty", "garbage-after-preamble"],
)
def test_not_dicom_is_quarantined(tmp_path, content, detail):
    zone, plan = plan_with(tmp_path, extra_files={"notes/report.txt": content})
    relpath, reason, why = single_quarantine(plan)
    assert (relpath, reason) == ("notes/report.txt", Reason.NOT_DICOM)
    assert detail in why
    assert_good_study_archived(tmp_path, zone, plan, held_back=0)


def test_dicom_without_part10_header_is_quarantined(tmp_path):
    """A dataset without the 128-byte preamble and the DICM prefix is not a Part 10 file."""
    raw = image_bytes(ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9))
    assert raw[128:132] == b"DICM"
    headerless = raw[132:]
    assert pydicom.dcmread(io.BytesIO(headerless), force=True).PatientID == ENTITY  # still a dataset
    zone, plan = plan_with(tmp_path, extra_files={"IM000009": headerless})
    assert single_quarantine(plan)[:2] == ("IM000009", Reason.NOT_DICOM)
    assert_good_study_archived(tmp_path, zone, plan, held_back=0)


@pytest.mark.parametrize("value", ["NO", "", None], ids=["NO", "empty", "missing"])
def test_identity_not_removed_is_quarantined(tmp_path, value):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={"PatientIdentityRemoved": value})
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan)[:2] == (bad.path, Reason.IDENTITY_NOT_REMOVED)
    assert plan.quarantined[0].study == STEM
    assert_good_study_archived(tmp_path, zone, plan, held_back=1)


BAD_CODED_IDS = [None, "", "GL 664", "GL/664", "..", "x" * 65, "GL664ba0\\GL2"]
BAD_CODED_ID_NAMES = ["missing", "empty", "space", "slash", "dots", "too-long", "multi-valued"]


@pytest.mark.parametrize("value", BAD_CODED_IDS, ids=BAD_CODED_ID_NAMES)
def test_missing_or_invalid_patient_id_is_quarantined(tmp_path, value):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={"PatientID": value}, relpath="odd/1.dcm")
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan)[:2] == ("odd/1.dcm", Reason.INVALID_PATIENT_ID)
    failures = plan.quarantined[0].failures
    assert failures[0] == {"reason": Reason.INVALID_PATIENT_ID, "detail": "PatientID is missing or not a coded id"}
    # Every failing check is listed: the generator's PatientName (the old coded id) no longer
    # equals the PatientID, so it is judged a name too.
    assert failures[1:] in ([], [{"reason": Reason.IDENTIFYING_ATTRIBUTE, "detail": "holds a value: PatientName"}])
    assert plan.quarantined[0].study is None  # no valid study to count it against
    assert_good_study_archived(tmp_path, zone, plan, held_back=0)


@pytest.mark.parametrize("value", BAD_CODED_IDS, ids=BAD_CODED_ID_NAMES)
def test_missing_or_invalid_accession_number_is_quarantined(tmp_path, value):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={"AccessionNumber": value}, relpath="odd/1.dcm")
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan)[:2] == ("odd/1.dcm", Reason.INVALID_ACCESSION_NUMBER)
    assert_good_study_archived(tmp_path, zone, plan, held_back=0)


@pytest.mark.parametrize(
    "value",
    [None, "", "20230230", "20231301", "20230000", "2023-01-01", "230101"],
    ids=["missing", "empty", "feb-30", "month-13", "day-0", "dashed", "short"],
)
def test_missing_or_invalid_study_date_is_quarantined(tmp_path, value):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={"StudyDate": value}, relpath="odd/1.dcm")
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan)[:2] == ("odd/1.dcm", Reason.INVALID_STUDY_DATE)
    assert_good_study_archived(tmp_path, zone, plan, held_back=0)


def test_leap_day_is_a_valid_study_date(tmp_path):
    other = ImageSpec(ENTITY, ITEM, "20240229", "CT", 1, 1, relpath="leap/1.dcm")
    _, plan = plan_with(tmp_path, [other])
    assert plan.quarantined == []
    assert sorted(g.study_date for g in plan.groups) == ["20070904", "20240229"]


def test_burned_in_annotation_is_quarantined(tmp_path):
    bad = ImageSpec(ENTITY, ITEM, DATE, "US", 1, 9, header_overrides={"BurnedInAnnotation": "YES"})
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan)[:2] == (bad.path, Reason.BURNED_IN_ANNOTATION)
    assert_good_study_archived(tmp_path, zone, plan, held_back=1)


def test_burned_in_annotation_no_is_archived(tmp_path):
    extra = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 4, header_overrides={"BurnedInAnnotation": "NO"})
    _, plan = plan_with(tmp_path, [extra])
    assert plan.quarantined == []
    assert len(only_group(plan).images) == 4


PERSON_VALUES = {
    "PatientName": "DOE^JANE",
    "OtherPatientIDs": "MRN0012345",
    "OtherPatientNames": "ROE^JANE",
    "PatientAddress": "1 Main Street, Springfield",
    "PatientTelephoneNumbers": "555-0100",
    "PatientMotherBirthName": "SMITH^MARY",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "PerformingPhysicianName": "GREY^MEREDITH",
    "OperatorsName": "TECH^TOM",
    "PhysiciansOfRecord": "WELBY^MARCUS",
    "RequestingPhysician": "KILDARE^JAMES",
    "NameOfPhysiciansReadingStudy": "QUINCY^R",
    # Not the contract's: contact details and record locators of the same kind (phi5 finding 4).
    "PatientTelecomInformation": "jane.doe@example.org +1 555 0100",
    "ReferringPhysicianAddress": "221B Baker Street",
    "ReferringPhysicianTelephoneNumbers": "555-0143",
    "PersonAddress": "12 Elm Street Springfield",
    "PersonTelephoneNumbers": "555-0177",
    "PersonTelecomInformation": "house@example.org",
    "MedicalRecordLocator": "LOC-4471902",
}


def test_the_parametrized_attributes_are_the_default():
    assert tuple(PERSON_VALUES) == DEFAULT_PERSON_ATTRIBUTES
    assert DEFAULT_PERSON_ATTRIBUTES[:12] == CONTRACT_PERSON_ATTRIBUTES  # the contract's 12 first, all kept
    assert "IssuerOfPatientID" not in DEFAULT_PERSON_ATTRIBUTES  # deid's default recipe fills it in every image


@pytest.mark.parametrize("keyword", list(PERSON_VALUES))
def test_each_person_identifying_attribute_is_quarantined(tmp_path, keyword):
    value = PERSON_VALUES[keyword]
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={keyword: value})
    zone, plan = plan_with(tmp_path, [bad])
    relpath, reason, detail = single_quarantine(plan)
    assert (relpath, reason) == (bad.path, Reason.IDENTIFYING_ATTRIBUTE)
    assert keyword in detail
    assert value not in detail
    assert value.split("^")[0] not in plan.to_json()
    assert_good_study_archived(tmp_path, zone, plan, held_back=1)


def test_multi_valued_identifying_attribute_is_quarantined(tmp_path):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={"OtherPatientIDs": ["", "MRN77"]})
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan)[1] == Reason.IDENTIFYING_ATTRIBUTE
    assert_good_study_archived(tmp_path, zone, plan, held_back=1)


@pytest.mark.parametrize("name", [ENTITY, "", None], ids=["equal-to-PatientID", "empty", "absent"])
def test_patient_name_equal_to_patient_id_or_empty_is_allowed(tmp_path, name):
    extra = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 4, header_overrides={"PatientName": name})
    zone, plan = plan_with(tmp_path, [extra])
    assert plan.quarantined == []
    group = only_group(plan)
    assert len(group.images) == 4
    _, _, members = archive_bytes(group, zone)
    assert len(members) == 4


def test_patient_name_that_only_contains_the_patient_id_is_quarantined(tmp_path):
    bad = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={"PatientName": f"{ENTITY}^JANE"})
    zone, plan = plan_with(tmp_path, [bad])
    assert single_quarantine(plan)[1] == Reason.IDENTIFYING_ATTRIBUTE
    assert_good_study_archived(tmp_path, zone, plan, held_back=1)


def test_configured_attribute_list_adds_to_the_contract_default(tmp_path):
    settings = Settings.load(
        {
            "DICOM_LANDING_ROOT": str(tmp_path),
            "DICOM_LOCAL_OUTPUT": str(tmp_path / "out"),
            "DICOM_PERSON_ATTRIBUTES": "InstitutionName, OperatorsName",
        }.get
    )
    policy = settings.policy
    assert policy.person_attributes == (*DEFAULT_PERSON_ATTRIBUTES, "InstitutionName")
    institution = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 7, header_overrides={"InstitutionName": "ST ELSEWHERE"})
    operator = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 8, header_overrides={"OperatorsName": "TECH^TOM"})
    referrer = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 9, header_overrides={"ReferringPhysicianName": "HOUSE^G"})
    zone, plan = plan_with(tmp_path, [institution, operator, referrer], policy=policy)

    held = {q.relpath: (q.reason, q.detail) for q in plan.quarantined}
    assert held == {
        institution.path: (Reason.IDENTIFYING_ATTRIBUTE, "holds a value: InstitutionName"),
        operator.path: (Reason.IDENTIFYING_ATTRIBUTE, "holds a value: OperatorsName"),
        referrer.path: (Reason.IDENTIFYING_ATTRIBUTE, "holds a value: ReferringPhysicianName"),
    }
    group = only_group(plan)
    assert len(group.images) == 3
    # The archive step re-checks with the same policy; the institution is not checked by default.
    _, _, members = archive_bytes(group, zone, policy=policy)
    assert len(members) == 3


def test_removing_a_default_person_attribute_takes_its_own_setting(tmp_path):
    env = {"DICOM_LANDING_ROOT": str(tmp_path), "DICOM_LOCAL_OUTPUT": str(tmp_path / "out")}
    settings = Settings.load({**env, "DICOM_PERSON_ATTRIBUTES_REMOVED": "OtherPatientIDs"}.get)
    assert "OtherPatientIDs" not in settings.policy.person_attributes
    assert settings.policy.describe()["person_attributes_removed"] == ["OtherPatientIDs"]
    with pytest.raises(SettingsError, match=r"may only name defaults.*InstitutionName"):
        Settings.load({**env, "DICOM_PERSON_ATTRIBUTES_REMOVED": "InstitutionName"}.get)


def test_a_default_contact_attribute_can_be_removed_like_the_contracts(tmp_path):
    env = {"DICOM_LANDING_ROOT": str(tmp_path), "DICOM_LOCAL_OUTPUT": str(tmp_path / "out")}
    policy = Settings.load({**env, "DICOM_PERSON_ATTRIBUTES_REMOVED": "ReferringPhysicianAddress"}.get).policy
    assert policy.describe()["person_attributes_removed"] == ["ReferringPhysicianAddress"]
    address = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 7, header_overrides={"ReferringPhysicianAddress": "1 Main St"})
    locator = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 8, header_overrides={"MedicalRecordLocator": "LOC-1"})
    zone, plan = plan_with(tmp_path, [address, locator], policy=policy)
    assert {q.relpath: q.detail for q in plan.quarantined} == {locator.path: "holds a value: MedicalRecordLocator"}
    _, _, members = archive_bytes(only_group(plan), zone, policy=policy)
    assert address.path in {m.relpath for m in members}


def test_every_reason_in_one_batch_keeps_the_good_study(tmp_path):
    """All at once: the report counts each reason and the clean study is archived intact."""
    phi = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 10)
    phi.relpath = "PHI/" + phi.path
    flagged = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 11)
    bad = [
        phi,
        flagged,
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 12, header_overrides={"PatientIdentityRemoved": "NO"}),
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 13, header_overrides={"BurnedInAnnotation": "YES"}),
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 14, header_overrides={"OperatorsName": "TECH^TOM"}),
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 15, header_overrides={"StudyDate": "20230230"}, relpath="d.dcm"),
    ]
    zone, plan = plan_with(
        tmp_path, bad, lookup={flagged.path: {"flagged": True}}, extra_files={"junk.txt": b"not an image"}
    )
    assert plan.images_seen == 10
    assert plan.quarantine_counts() == {
        "burned_in_annotation": 1,
        "flagged_in_lookup": 1,
        "identifying_attribute": 1,
        "identity_not_removed": 1,
        "invalid_study_date": 1,
        "not_dicom": 1,
        "phi_folder": 1,
    }
    assert_good_study_archived(tmp_path, zone, plan, held_back=3)


# --- manifest and lookup errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "file", "rule"),
    [
        ({"raw_manifest": b"{not json"}, "batch.json", "is not valid JSON"),
        ({"raw_manifest": b"[1, 2]"}, "batch.json", "must be a JSON object, not list"),
        ({"raw_manifest": b'{"batch_id": "other", "collection": "IRB1", "status": "DONEPROCESSING",'
                          b' "completed_at": "2024-01-05T09:30:00Z"}'},
         "batch.json", "must equal the folder name 'b1'"),
        ({"collection": "IRB-41449"}, "batch.json", "collection must match"),
        ({"raw_manifest": b'{"batch_id": "b1", "status": "DONEPROCESSING", "completed_at": "2024-01-05T09:30:00Z"}'},
         "batch.json", "no default collection is configured (GOOGLE_STORAGE_COLLECTION)"),
        ({"raw_manifest": b'{"batch_id": "b1", "collection": "IRB1", "status": "DONEPROCESSING",'
                          b' "completed_at": "yesterday"}'},
         "batch.json", "completed_at is not an RFC 3339 timestamp"),
        ({"raw_manifest": b'{"batch_id": "b1", "collection": "IRB1", "status": "DONEPROCESSING",'
                          b' "completed_at": "2024-01-05T09:30:00"}'},
         "batch.json", "needs a date, a time and a UTC offset"),
        ({"extra_files": {"lookup.json": b"{broken"}}, "lookup.json", "is not valid JSON"),
        ({"extra_files": {"lookup.json": b'["a"]'}}, "lookup.json", "must be a JSON object, not list"),
        ({"lookup": {"x/1.dcm": "flagged"}}, "lookup.json", "the entry for 'x/1.dcm' must be an object"),
    ],
    ids=[
        "manifest-not-json", "manifest-not-object", "batch-id-mismatch", "bad-collection", "no-collection",
        "bad-completed-at", "naive-completed-at", "lookup-not-json", "lookup-not-object", "lookup-entry",
    ],
)  # fmt: skip
def test_bad_manifest_or_lookup_gives_error_naming_file_and_rule(tmp_path, batch, file, rule):
    zone = make_batch(tmp_path / "zone", "b1", good_images(2), **batch)
    plan = plan_batch(zone, "b1")
    assert plan.status == STATUS_ERROR
    assert plan.groups == []
    assert str(tmp_path / "zone" / "b1" / file) in plan.error
    assert rule in plan.error


def test_anonymizer_error_status_gives_error_and_no_groups(tmp_path):
    zone = make_batch(tmp_path / "zone", "b1", good_images(2), status="ERROR")
    plan = plan_batch(zone, "b1")
    assert (plan.status, plan.groups, plan.images_seen) == (STATUS_ERROR, [], 0)
    assert "batch.json" in plan.error
    assert "status ERROR" in plan.error


def test_a_broken_batch_does_not_stop_the_others(tmp_path):
    root = tmp_path / "zone"
    make_batch(root, "bad", good_images(2), raw_manifest=b"{")
    zone = make_batch(root, "good", good_images(2))
    assert plan_batch(zone, "bad").status == STATUS_ERROR
    assert len(only_group(plan_batch(zone, "good")).images) == 2
