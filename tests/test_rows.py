"""The rows the pipeline builds fit the table: the schema's columns, no more, no fewer, whatever the images."""

from __future__ import annotations

import json

import pytest
from google.cloud import bigquery
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicom_archive.archive import ArchivedMember, read_archive_members
from dicom_archive.batch import Staging, StudyFields, run_key
from dicom_archive.bigquery_rows import check_rows
from dicom_archive.landing import LocalLandingZone
from dicom_archive.ndjson import NdjsonSpool, to_ndjson
from dicom_archive.plan import ImageRecord, StudyGroup, plan_batch
from dicom_archive.rows import HEADER_COLUMNS, RunContext, image_fields
from dicom_archive.settings import ArchiveSettings
from dicom_archive.stores import LocalObjectStore
from dicom_archive.values import dicom_value_to_text
from tests.archiving import archive_groups
from tests.conftest import REPO_ROOT
from tools import landing_zone as lz

SCHEMA = json.loads((REPO_ROOT / "include" / "schemas" / "dicom.json").read_text())


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every row of the demo landing zone (CT, MR, US, multi-frame, lookup.json fields...), archived locally."""
    tmp = tmp_path_factory.mktemp("rows")
    zone, store = LocalLandingZone(tmp / "landing"), LocalObjectStore(tmp / "out")
    found = []
    for spec in lz.demo_landing_zone(tmp / "landing"):
        plan = plan_batch(zone, spec.batch_id)
        _, batch_rows = archive_groups(
            plan.groups, zone, store, deid=plan.deid, context=RunContext("rows-test"), settings=ArchiveSettings()
        )
        found.extend(batch_rows)
    return found


def test_every_row_has_exactly_the_schema_columns(rows):
    assert len(rows) > 10
    columns = {field["name"] for field in SCHEMA}
    for row in rows:
        assert set(row) == columns, (set(row) - columns, columns - set(row))


def test_required_columns_are_never_null(rows):
    required = [field["name"] for field in SCHEMA if field["mode"] == "REQUIRED"]
    assert required
    for row in rows:
        assert [name for name in required if row[name] is None] == []


def test_a_local_row_names_no_bucket(rows):
    """SEND_TO_GOOGLE=false: the archive is a local file, its place is storage_uri (file://)."""
    for row in rows:
        assert row["storage_bucket"] is None
        assert row["storage_uri"].startswith("file://")


# Every STRING (not REPEATED) column that comes from the header, and a multi-valued value for it.
# pydicom splits a text value at DICOM's separator `\`, so `CT\CHEST` is two values.
MULTI_VALUED_TEXT = {
    "Modality": "CT\\PT",
    "StudyDescription": "CT\\CHEST",
    "SeriesDescription": "AX\\3MM\\",
    "BodyPartExamined": "CHEST\\ABDOMEN",
    "PatientSex": "M\\F",
    "PatientAge": "045Y\\046Y",
    "Manufacturer": "GE\\SIEMENS",
    "StudyInstanceUID": "1.2.3\\1.2.4",
    "SeriesInstanceUID": "1.2.3.1\\1.2.3.2",
    "SOPInstanceUID": "1.2.3.1.1\\1.2.3.1.2",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.4",
}


def _rows_of(tmp_path, images: list[lz.ImageSpec]) -> list[dict]:
    lz.write_batch(tmp_path / "landing", lz.BatchSpec("b1", images=images, collection="IRB1"))
    zone, store = LocalLandingZone(tmp_path / "landing"), LocalObjectStore(tmp_path / "out")
    plan = plan_batch(zone, "b1")
    assert plan.status == "DONE", (plan.status, plan.error, plan.quarantined)
    _, found = archive_groups(
        plan.groups, zone, store, deid=plan.deid, context=RunContext("rows-test"), settings=ArchiveSettings()
    )
    return found


def _loaded(rows: list[dict]) -> list[dict]:
    """The rows as the BigQuery load sends them (checked against the schema) - raises on a bad value."""
    return list(check_rows([to_ndjson(rows)], tuple(bigquery.SchemaField.from_api_repr(f) for f in SCHEMA)))


def test_every_string_header_column_is_covered():
    """The cases below name every STRING column filled from the header; a new one must be added."""
    string_columns = {f["name"] for f in SCHEMA if f["type"] == "STRING" and f["mode"] != "REPEATED"}
    assert set(HEADER_COLUMNS) <= string_columns
    assert set(MULTI_VALUED_TEXT) == set(HEADER_COLUMNS)


@pytest.mark.parametrize("column", sorted(MULTI_VALUED_TEXT))
def test_a_multi_valued_header_value_is_one_string_joined_by_backslash(tmp_path, column):
    """A multi-valued header value in a STRING column gives the string as the header holds it: the
    load does not fail, and the local NDJSON and the BigQuery load carry the same value."""
    value = MULTI_VALUED_TEXT[column]
    [row] = _rows_of(tmp_path, [lz.ImageSpec("GL664ba0", "GL71cfb7", "20070904", header_overrides={column: value})])
    assert row[column] == value
    [loaded] = _loaded([row])
    assert loaded[column] == value
    assert json.loads(to_ndjson([row]))[column] == value


def test_multi_valued_integer_columns_stay_null_and_single_values_are_text(tmp_path):
    """INTEGER columns get no value from a multi-valued element (none is chosen); a single value in a
    STRING column stays a string; ImageType (REPEATED) gets one string per value."""
    overrides = {"SeriesNumber": "1\\2", "InstanceNumber": "3\\4", "StudyDescription": "CT", "ImageType": "ORIGINAL"}
    [row] = _rows_of(tmp_path, [lz.ImageSpec("GL664ba0", "GL71cfb7", "20070904", header_overrides=overrides)])
    assert (row["SeriesNumber"], row["InstanceNumber"]) == (None, None)
    assert row["StudyDescription"] == "CT"
    assert row["ImageType"] == ["ORIGINAL"]
    [loaded] = _loaded([row])
    assert (loaded["SeriesNumber"], loaded["InstanceNumber"], loaded["ImageType"]) == (None, None, ["ORIGINAL"])


def test_a_number_in_a_text_column_keeps_its_spelling(tmp_path):
    """A STRING column whose element the file encodes with a numeric VR (explicit VR IS / DS) gets the
    number as the header spells it, a string, in the local NDJSON as in the load - not a JSON number."""
    ds = Dataset()
    ds.add_new(tag_for_keyword("StudyDescription"), "DS", "0.50")
    ds.add_new(tag_for_keyword("Manufacturer"), "IS", "007")
    ds.add_new(tag_for_keyword("BodyPartExamined"), "DS", ["1.0", "2.50"])
    ds.add_new(tag_for_keyword("PatientAge"), "IS", ["1", "2"])
    image = ImageRecord("a.dcm", 1, 1, None, None, "", "")
    fields = image_fields(ds, image)
    assert fields["StudyDescription"] == "0.50"
    assert fields["Manufacturer"] == "007"
    assert fields["BodyPartExamined"] == "1.0\\2.50"
    assert fields["PatientAge"] == "1\\2"
    assert dicom_value_to_text(b"\x00\x01") is None
    assert dicom_value_to_text(["", ""]) is None


@pytest.mark.parametrize(
    ("software", "recipe", "shown_software", "shown_recipe"),
    [
        ("deid 0.4.13", "deid.dicom", "deid 0.4.13", "deid.dicom"),
        (
            ["deid 0.4.13", "dicognito 0.17"],
            {"name": "deid.dicom", "v": 2},
            '["deid 0.4.13","dicognito 0.17"]',
            '{"name":"deid.dicom","v":2}',
        ),
        (4, True, "4", "true"),
        (None, None, None, None),
    ],
)
def test_deid_provenance_reaches_the_row_as_text_or_json(tmp_path, software, recipe, shown_software, shown_recipe):
    zone, store = LocalLandingZone(tmp_path / "landing"), LocalObjectStore(tmp_path / "out")
    spec = lz.demo_landing_zone(tmp_path / "landing")[0]
    plan = plan_batch(zone, spec.batch_id)
    deid = {"software": software, "recipe": recipe}
    _, batch_rows = archive_groups(
        plan.groups, zone, store, deid=deid, context=RunContext("rows-test"), settings=ArchiveSettings()
    )
    assert batch_rows
    assert {(row["deid_software"], row["deid_recipe"]) for row in batch_rows} == {(shown_software, shown_recipe)}


# ------------------------------------------------------------------ rows spooled to a file (archive tasks)


def test_rows_spooled_to_a_file_are_staged_byte_identical_to_the_list(rows, tmp_path):
    """An archive task keeps its rows in a file, not in memory: what it stages from the file is
    what the list gave, byte for byte (the BigQuery load's job ids hash these bytes), and the rows
    read back are the rows written, for every value the demo's images give and a few harder ones."""
    odd = {
        "text": 'Müller \udc80 \u2028 \\ "quoted"',
        "floats": [0.1, 1e-07, 1.5e300, -0.0, 2.0],
        "big": 2**63 + 1,
        "nested": {"b": [1, None, True], "a": {}},
        "empty": [],
    }
    written = [*rows, odd]
    store = LocalObjectStore(tmp_path / "out")
    staging = Staging(store, "b1", run_key("spool-test"))
    with NdjsonSpool() as spool:
        for row in written:
            spool.write(row)
        assert len(spool) == len(written)
        assert list(spool) == written
        assert b"".join(spool.lines()) == to_ndjson(written)
        staging.write_chunk("0000000", [], spool)
        spool.write({"after": "a read"})  # a read leaves the file ready for more
        assert list(spool)[-1] == {"after": "a read"}
    assert b"".join(staging.read_rows(["0000000"])) == to_ndjson(written)
    staging.write_chunk("0000001", [], written)
    assert b"".join(staging.read_rows(["0000001"])) == to_ndjson(written)


def test_staged_rows_are_read_chunk_by_chunk_when_asked_for(tmp_path):
    """The load task reads one chunk's rows at a time (in chunk order), never the batch's at once;
    a missing chunk's rows fail the read when it is reached, naming the chunk."""
    store = LocalObjectStore(tmp_path / "out")
    staging = Staging(store, "b1", run_key("lazy"))
    for chunk_id in ("0000002", "0000000"):
        staging.write_chunk(chunk_id, [], [{"chunk": chunk_id}])
    reads: list[str] = []
    real_read = store.read_bytes
    store.read_bytes = lambda name: reads.append(name) or real_read(name)  # type: ignore[method-assign]

    parts = staging.read_rows(["0000002", "0000001", "0000000"])
    assert reads == [], "nothing is read before it is asked for"
    assert next(parts) == to_ndjson([{"chunk": "0000000"}])
    assert len(reads) == 1
    with pytest.raises(FileNotFoundError, match="rows of chunk 0000001 are missing"):
        next(parts)


def _image(relpath: str, instance: int) -> ImageRecord:
    return ImageRecord(relpath, 1, 1, 1, instance, "1.2.3", f"1.2.3.{instance}")


def _header(instance: int) -> Dataset:
    ds = Dataset()
    ds.InstanceNumber = instance
    ds.Modality = "CT"
    return ds


def test_study_fields_keep_the_last_pass_over_the_study_in_member_order():
    """A study read twice (a rerun hashes it, then replaces the changed archive) gives each member
    the fields of the last pass; fields out of step with the members fail, never pair wrongly."""
    images = [_image("a.dcm", 1), _image("b.dcm", 2), _image("c.dcm", 3)]
    group = StudyGroup("IRB1", "b1", "GL664ba0", "20070904", "GL71cfb7", images)
    members = [ArchivedMember(i.relpath, f"m/{i.relpath}", 1, "0" * 64, {}) for i in group.sorted_images()]
    with StudyFields(("Modality",)) as fields:
        fields.start(group)
        fields.take(_header(1), images[0])  # a first pass, cut short
        fields.take(_header(2), images[1])
        for image in group.sorted_images():  # the pass whose members are published
            assert fields.take(_header(image.instance_number), image) == {}  # the member keeps nothing
        paired = list(fields.members_with_fields(members))
        assert [m.relpath for m in paired] == ["a.dcm", "b.dcm", "c.dcm"]
        assert [m.fields["InstanceNumber"] for m in paired] == [1, 2, 3]
        assert paired[0].fields["DicomHeader"] == {"Modality": "CT"}

        with pytest.raises(RuntimeError, match="3 images' row fields were taken for 2 members"):
            list(fields.members_with_fields(members[:2]))
        with pytest.raises(RuntimeError, match=r"row fields of a\.dcm were taken for the member of c\.dcm"):
            list(fields.members_with_fields(members[::-1]))

        fields.start(group)  # the next study starts empty
        with pytest.raises(RuntimeError, match="0 images' row fields"):
            list(fields.members_with_fields(members))


def test_a_replaced_archive_gets_the_rows_of_its_new_images(tmp_path):
    """A corrected study replaces its archive (DICOM_REPLACE_CHANGED_ARCHIVES): the study is hashed,
    then written, each pass taking the row fields again; the rows are those of the new archive."""
    store = LocalObjectStore(tmp_path / "out")
    ids = ("GL664ba0", "GL71cfb7", "20070904")
    found = []
    for landing, description in (("first", "BEFORE"), ("second", "AFTER")):
        images = [
            lz.ImageSpec(*ids, instance_number=n, header_overrides={"StudyDescription": f"{description} {n}"})
            for n in (1, 2, 3)
        ]
        lz.write_batch(tmp_path / landing, lz.BatchSpec("b1", images=images, collection="IRB1"))
        zone = LocalLandingZone(tmp_path / landing)
        plan = plan_batch(zone, "b1")
        settings = ArchiveSettings(replace_changed=True)
        summaries, batch_rows = archive_groups(
            plan.groups, zone, store, deid=plan.deid, context=RunContext("rows-test"), settings=settings
        )
        found.append((summaries, batch_rows))
    (summary,), rows_after = found[1]
    assert summary["outcome"] == "replaced"
    assert sorted(row["StudyDescription"] for row in rows_after) == ["AFTER 1", "AFTER 2", "AFTER 3"]
    with store.open_reader(summary["name"], None) as stream:
        members = dict(read_archive_members(stream))
    assert {row["archive_member"]: row["instance_sha256"] for row in rows_after} == members
    assert {row["storage_generation"] for row in rows_after} == {summary["generation"]}


def test_an_older_batch_after_a_newer_correction_gives_no_rows_and_reports_superseded(tmp_path):
    """Local mode (the same domain code as a run that sends): the older batch's study is left in
    its newer version; no rows, so nothing of the study is updated or deleted; the report says so."""
    from datetime import UTC, datetime

    from dicom_archive.batch import build_report, needs_rows_mark

    images = [lz.ImageSpec("GLsup001", "GAsup001", "20230105", "CT", 1, i, rows=64, cols=64) for i in (1, 2, 3)]
    older, newer = datetime(2024, 1, 5, 9, tzinfo=UTC), datetime(2024, 1, 6, 9, tzinfo=UTC)
    lz.write_batch(tmp_path / "landing", lz.BatchSpec("c1", images=images[:2], collection="IRB1", completed_at=older))
    lz.write_batch(tmp_path / "landing", lz.BatchSpec("c2", images=images, collection="IRB1", completed_at=newer))
    zone, store = LocalLandingZone(tmp_path / "landing"), LocalObjectStore(tmp_path / "out")
    settings = ArchiveSettings(replace_changed=True)

    def archive(batch_id: str):
        plan = plan_batch(zone, batch_id)
        summaries, found = archive_groups(
            plan.groups, zone, store, deid=plan.deid, context=RunContext("sup-test"), settings=settings
        )
        return plan, summaries, found

    archive("c1")
    _, (replaced,), _ = archive("c2")
    assert replaced["outcome"] == "replaced"
    plan, (summary,), found = archive("c1")

    assert found == [], "no rows: the MERGE neither updates nor deletes a row of the study"
    assert (summary["outcome"], summary["generation"]) == ("superseded", replaced["generation"])
    assert not needs_rows_mark(summary)
    report = build_report(plan, archives=[summary], table=None, rows_loaded=0, rows_inserted=0)
    assert report["archives"] | {"superseded_by": None} == {
        "total": 1,
        "written": 0,
        "already_present": 0,
        "replaced": 0,
        "replacements": [],
        "superseded": 1,
        "superseded_images": 2,
        "superseded_by": None,
        "bytes": 0,
        "input_bytes": summary["input_bytes"],
        "objects": [],
    }
    assert report["archives"]["superseded_by"] == [
        {
            "uri": summary["uri"],
            "images_in_batch": 2,
            "images_in_archive": 3,
            "newer_batch": "c2",
            "newer_completed_at": "2024-01-06T09:00:00+00:00",
        }
    ]
    assert report["images"]["archived"] == 0
    assert report["images"]["seen"] == report["images"]["archived"] + report["archives"]["superseded_images"]


def _row(sha: str, uri: str = "file:///a.tar.gz", generation: int | None = 1, **more: object) -> dict:
    row = {"collection": "IRB1", "instance_sha256": sha, "storage_uri": uri, "storage_generation": generation}
    return {**row, "uploaded_at": "2024-01-02T00:00:00Z", "archive_member": f"{sha}.dcm", **more}


@pytest.mark.parametrize(
    ("old", "new", "kept", "counts"),
    [
        pytest.param(None, ["a", "b"], ["a", "b"], (2, 0, 0), id="first-load"),
        pytest.param(["a", "b"], ["a", "b"], ["a", "b"], (0, 0, 0), id="no-op-rerun"),
        pytest.param(["a"], ["a", "b"], ["a", "b"], (1, 0, 0), id="a-new-image"),
        pytest.param(["a", "b", "c"], ["a", "b"], ["a", "b"], (0, 0, 1), id="an-image-the-batch-no-longer-holds"),
        pytest.param(["a", "b"], ["a2", "b"], ["a2", "b"], (0, 1, 0), id="a-replaced-archive"),
        pytest.param(["a", "b"], ["a3", "b"], ["a3", "b"], (0, 1, 0), id="moved-to-another-archive"),
    ],
)
def test_local_rows_are_merged_as_the_merge_merges_them(old, new, kept, counts):
    """ndjson.merge_rows: the MERGE's rule (bigquery_load.merge_sql) on a local rows file."""
    from dicom_archive.ndjson import merge_rows, to_ndjson

    versions = {
        "a": _row("a"), "b": _row("b"), "c": _row("c"),
        "a2": _row("a", generation=2, uploaded_at="2024-02-01T00:00:00Z"),
        "a3": _row("a", uri="file:///other.tar.gz", uploaded_at="2024-02-01T00:00:00Z"),
    }  # fmt: skip
    old_rows = None if old is None else to_ndjson(versions[k] for k in old)
    merged, got = merge_rows(old_rows, to_ndjson(versions[k] for k in new))
    assert merged == to_ndjson(versions[k] for k in kept)
    assert (got["rows_inserted"], got["rows_updated"], got["rows_deleted"]) == counts


def test_local_merge_keeps_an_unchanged_row_as_first_written_and_one_row_per_image():
    from dicom_archive.ndjson import merge_rows, to_ndjson

    first = to_ndjson([_row("a", dag_run_id="run1"), _row("b", dag_run_id="run1")])
    rerun = [_row("b", dag_run_id="run2", uploaded_at="2024-03-01T00:00:00Z"), _row("a", dag_run_id="run2")]
    merged, counts = merge_rows(first, to_ndjson(rerun))
    assert merged.splitlines() == first.splitlines()[::-1], "the old lines, in the batch's order"
    assert counts == {"rows_inserted": 0, "rows_updated": 0, "rows_deleted": 0}

    # The same image twice in one batch: the row first in DEDUPE_ORDER is kept, whatever the scan order.
    copies = [_row("a", archive_member="z/copy.dcm"), _row("a", archive_member="a/copy.dcm")]
    for order in (copies, copies[::-1]):
        merged, counts = merge_rows(None, to_ndjson(order))
        assert [json.loads(line)["archive_member"] for line in merged.splitlines()] == ["a/copy.dcm"]
        assert counts["rows_inserted"] == 1
    # Blank lines are no rows.
    assert merge_rows(first + b"\n\n", first)[1] == {"rows_inserted": 0, "rows_updated": 0, "rows_deleted": 0}
