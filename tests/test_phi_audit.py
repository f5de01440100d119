"""The PHI leak audit: it finds what is planted, and nothing in what the real pipeline writes."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_archive.batch import Staging, build_report, publish_report, run_key
from dicom_archive.landing import LocalLandingZone
from dicom_archive.ndjson import to_ndjson
from dicom_archive.plan import plan_batch
from dicom_archive.publish import publish_study_archive
from dicom_archive.rows import RunContext
from dicom_archive.settings import ArchiveSettings
from dicom_archive.stores import GCSObjectStore, LocalObjectStore
from tests.archiving import archive_groups
from tools import landing_zone as lz
from tools import phi_audit
from tools.phi_audit import Identifier, audit, identifiers_from_dicom

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "Kowalczyk^Agnieszka"  # the planted identifier of these tests
SAMPLES = [get_testdata_file(source.filename, download=False) for source in lz.SOURCES.values()]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def raw_values(batches: list[lz.BatchSpec]) -> list[Identifier | str]:
    """What the audit searches for: the generator's planted values and the samples' own identifiers."""
    return [*lz.raw_identifiers(batches), *identifiers_from_dicom(SAMPLES), NAME]


def dicom_bytes(mutate=None, **overrides: object) -> bytes:
    """A de-identified image of the generator, changed by `mutate(ds)` before writing."""
    ds = lz.make_image(lz.ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", header_overrides=overrides))
    if mutate is not None:
        mutate(ds)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def assert_masked(findings: list[phi_audit.Finding], value: str = NAME) -> None:
    assert findings
    for finding in findings:
        text = str(finding).casefold()
        assert phi_audit.normalize(value) not in phi_audit.normalize(text)
        assert value.casefold() not in text
        assert "#" in finding.masked


# --- the real pipeline's outputs ------------------------------------------------------------


@dataclass
class Pipeline:
    root: Path  # the landing zone (holds quarantined images with PHI, and the reports)
    out: Path  # the local output folder: archives, rows, reports, staging
    batches: list[lz.BatchSpec]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The demo landing zone through plan, archive, rows and report into a LocalObjectStore.

    Staging is not cleared, so the staged plans and row chunks are audited too."""
    tmp = tmp_path_factory.mktemp("pipeline")
    root, out = tmp / "landing", tmp / "out"
    batches = lz.demo_landing_zone(root)
    zone, store = LocalLandingZone(root), LocalObjectStore(out)
    for spec in batches:
        plan = plan_batch(zone, spec.batch_id)
        staging = Staging(store, spec.batch_id, run_key("scheduled__2024-01-05T00:00:00+00:00"))
        staging.write_plan(plan)
        summaries, rows = archive_groups(
            plan.groups, zone, store, deid=plan.deid, context=RunContext("phi-audit-test"), settings=ArchiveSettings()
        )
        staging.write_chunk("0000000", summaries, rows)
        store.write_bytes(f"BigQuery/{plan.collection}/dicom/{spec.batch_id}.ndjson", to_ndjson(rows), "x")
        report = build_report(plan, archives=summaries, table=None, rows_loaded=len(rows), rows_inserted=len(rows))
        publish_report(report, zone, store)
    return Pipeline(root, out, batches)


@pytest.fixture
def outputs(pipeline: Pipeline, tmp_path: Path) -> Path:
    """A private copy of the clean outputs, to plant leaks in."""
    return Path(shutil.copytree(pipeline.out, tmp_path / "out"))


def test_clean_pipeline_outputs_have_no_findings(pipeline):
    auditor = phi_audit.Auditor(raw_values(pipeline.batches))
    phi_audit.run(auditor, [pipeline.out], reports=[pipeline.root])
    assert auditor.findings == []
    # Not vacuous: every archive, member, header, row and report was looked at.
    images = sum(len(b.images) for b in pipeline.batches)
    stats = auditor.stats
    assert stats.archives >= 9
    assert stats.members == stats.dicom_headers + stats.archives  # one top folder per archive
    assert 0 < stats.dicom_headers < images  # the quarantined ones are not archived
    assert stats.rows == 2 * stats.dicom_headers  # rows in BigQuery/ and in the staged chunks
    assert len(auditor.matcher.identifiers) >= 20


def test_the_same_identifiers_do_find_the_quarantined_images_in_the_landing_zone(pipeline):
    # The landing zone still holds the image whose PatientName is DOE^JANE (quarantined): proof that
    # the identifiers of the clean test are live, and that a quarantined image is caught if copied.
    # So do the demo's other plants (issue 11): names in private elements and in a sequence item,
    # and an identifier in lookup.json.
    findings = audit(raw_values(pipeline.batches), [pipeline.root])
    assert {(f.where, f.field.rsplit(": ", 1)[-1].rsplit(".", 1)[-1]) for f in findings} == {
        ("DICOM header", "(0010,0010) PatientName"),
        ("DICOM header", "(0033,1010)"),
        ("DICOM header", "(0033,1011)"),
        ("DICOM header", "(0040,0006) ScheduledPerformingPhysicianName"),
        ("JSON file", "OtherPatientIDs"),
    }
    assert_masked([f for f in findings if "PatientName" in f.field], "DOE^JANE")


def test_the_command_line_is_clean_on_the_pipeline_outputs(pipeline, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(lz.raw_identifiers(pipeline.batches)))
    argv = ["--raw", str(ids), *[arg for s in SAMPLES for arg in ("--raw", s)]]
    argv += ["--outputs", str(pipeline.out), "--reports", str(pipeline.root)]
    result = subprocess.run(
        [sys.executable, "-m", "tools.phi_audit", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("0 findings")


def test_the_audit_module_does_not_import_airflow():
    code = "import sys, tools.phi_audit; sys.exit('airflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False).returncode == 0


# --- planted leaks --------------------------------------------------------------------------


def test_finds_an_identifier_in_an_object_name(pipeline, outputs):
    archive = next(outputs.glob("Collection/*/Entity/*/*.tar.gz"))
    leaked = archive.with_name("KOWALCZYK AGNIESZKA.tar.gz")
    archive.rename(leaked)
    findings = audit(raw_values(pipeline.batches), [outputs])
    assert [(f.where, f.field, f.category) for f in findings] == [
        ("object name", archive.with_name("k*****************a.tar.gz").relative_to(outputs).as_posix(), "identifier")
    ]
    assert_masked(findings)
    # Any spelling that keeps a component of 8+ characters is found too.
    leaked.rename(archive.with_name("kowalczyk_a_20230811.tar.gz"))
    assert [f.where for f in audit([NAME], [outputs])] == ["object name"]


def test_finds_an_identifier_in_an_archive_member_name(outputs):
    (outputs / "Collection/IRB41449/Entity/GL1").mkdir()
    (outputs / "Collection/IRB41449/Entity/GL1/GL1_20230811_GL2.tar.gz").write_bytes(
        tar_gz({"GL1_20230811_GL2/Agnieszka/00001.dcm": dicom_bytes()})
    )
    findings = audit([NAME], [outputs])
    assert [(f.where, f.field) for f in findings] == [
        (
            "archive member name",
            # The name is the leak: it is masked in the finding too.
            "Collection/IRB41449/Entity/GL1/GL1_20230811_GL2.tar.gz!GL1_20230811_GL2/a*******a/00001.dcm",
        )
    ]
    assert findings[0].category == "identifier"  # a component of the planted name
    assert_masked(findings)


def _in_sequence(ds: Dataset) -> None:
    item = Dataset()
    item.RequestedProcedureDescription = "CT CHEST"
    item.ReferringPhysicianName = "Kowalczyk^Agnieszka"  # a PN deep in a sequence
    outer = Dataset()
    outer.ReferencedStudySequence = [item]
    ds.RequestAttributesSequence = [outer]


def _in_private_string(ds: Dataset) -> None:
    ds.private_block(0x0011, "ACME PATIENT 1.0", create=True).add_new(0x01, "LO", "Kowalczyk^Agnieszka")


def _in_private_blob(ds: Dataset) -> None:
    ds.private_block(0x0013, "ACME BLOB", create=True).add_new(0x02, "UN", b"\x01\x00KOWALCZYK AGNIESZKA\x00\x07")


def _in_file_meta(ds: Dataset) -> None:
    ds.file_meta.SourceApplicationEntityTitle = "AGNIESZKA"


def _in_preamble(ds: Dataset) -> None:
    # No element holds the preamble and no reader shows it.
    ds.preamble = b"\x00PATIENT KOWALCZYK^AGNIESZKA\x01".ljust(128, b"\0")


@pytest.mark.parametrize(
    ("mutate", "overrides", "element"),
    [
        pytest.param(None, {"PatientName": NAME}, "(0010,0010) PatientName", id="PatientName"),
        pytest.param(
            None, {"StudyDescription": "CT for kowalczyk agnieszka"}, "(0008,1030) StudyDescription", id="free-text"
        ),
        pytest.param(
            _in_sequence,
            {},
            "(0040,0275) RequestAttributesSequence[0].(0008,1110) ReferencedStudySequence[0].(0008,0090) "
            "ReferringPhysicianName",
            id="nested-sequence",
        ),
        pytest.param(_in_private_string, {}, "(0011,1001)", id="private-string"),
        pytest.param(_in_private_blob, {}, "(0013,1002)", id="private-UN-blob"),
        pytest.param(_in_file_meta, {}, "(0002,0016) SourceApplicationEntityTitle", id="file-meta"),
        pytest.param(_in_preamble, {}, "preamble", id="preamble"),
    ],
)
def test_finds_an_identifier_inside_a_dicom_header_in_an_archive(outputs, mutate, overrides, element):
    name = "Collection/IRB41449/Entity/GL664ba0/GL664ba0_20230811_GL71cfb7.tar.gz"
    (outputs / name).parent.mkdir(parents=True)
    (outputs / name).write_bytes(tar_gz({"GL664ba0_20230811_GL71cfb7/S1/00001.dcm": dicom_bytes(mutate, **overrides)}))
    findings = audit([NAME], [outputs])
    assert {f.where for f in findings} == {"DICOM header"}
    assert {f.field for f in findings} == {f"{name}!GL664ba0_20230811_GL71cfb7/S1/00001.dcm: {element}"}
    assert_masked(findings)


def test_finds_a_raw_identifier_of_the_samples_in_a_header(outputs):
    # The pydicom samples' own values, e.g. the CT's institution, must be dropped by the generator.
    (outputs / "leak.tar.gz").write_bytes(tar_gz({"x/1.dcm": dicom_bytes(InstitutionName="JFK IMAGING CENTER")}))
    findings = audit(identifiers_from_dicom(SAMPLES), [outputs])
    assert [(f.where, f.category) for f in findings] == [("DICOM header", "institution")]


def test_finds_an_identifier_in_a_row(pipeline, outputs):
    rows_file = next(outputs.glob("BigQuery/*/dicom/*.ndjson"))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    rows[2]["DicomHeader"]["RequestAttributesSequence.RequestedProcedureDescription"] = "CT for AGNIESZKA KOWALCZYK"
    rows_file.write_bytes(to_ndjson(rows))
    findings = audit(raw_values(pipeline.batches), [outputs])
    relative = rows_file.relative_to(outputs).as_posix()
    assert [(f.where, f.field) for f in findings] == [
        ("row", f"{relative} line 3 $.DicomHeader.RequestAttributesSequence.RequestedProcedureDescription")
    ]
    assert findings[0].category == "identifier"
    assert_masked(findings)


def test_finds_an_identifier_in_a_report(pipeline, tmp_path):
    landing = Path(shutil.copytree(pipeline.root, tmp_path / "landing"))
    report_path = landing / pipeline.batches[0].batch_id / "batch.report.json"
    report = json.loads(report_path.read_text())
    report["quarantined"][0]["detail"] = "PatientName is Kowalczyk^Agnieszka"
    report_path.write_text(json.dumps(report))
    findings = audit([NAME], reports=[landing])
    assert [(f.where, f.field) for f in findings] == [
        ("report", f"{pipeline.batches[0].batch_id}/batch.report.json $.quarantined[0].detail")
    ]
    assert_masked(findings)
    # --reports reads nothing but the reports: the images next to them are the anonymizer's.
    assert audit(["DOE^JANE"], reports=[landing]) == []


def test_the_command_line_reports_masked_findings_and_exit_code_1(outputs, tmp_path, capsys):
    (outputs / "Collection/IRB41449/Batches/leak.json").write_text(json.dumps({"error": "DOE, JANE was here"}))
    (outputs / "notes.txt").write_text("nothing\nKOWALCZYK^AGNIESZKA\n")
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([NAME, {"value": "Doe^Jane", "category": "patient_name"}]))
    assert phi_audit.main(["--raw", str(ids), "--outputs", str(outputs)]) == 1
    out = capsys.readouterr().out
    assert "LEAK" in out
    assert "kowalczyk" not in out.casefold()
    assert "agnieszka" not in out.casefold()
    assert phi_audit.main(["--raw", str(ids), "--outputs", str(outputs), "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert {(f["where"], f["field"], f["category"]) for f in findings} == {
        ("file content", "notes.txt line 2", "identifier"),
        ("report", "Collection/IRB41449/Batches/leak.json $.error", "patient_name"),  # "JANE", a component
    }


# --- identifiers and matching rules ---------------------------------------------------------


def test_identifiers_from_the_generator_samples():
    found = {i.value: i.category for i in identifiers_from_dicom(SAMPLES)}
    assert found["CompressedSamples^CT1"] == "patient_name"
    assert found["CompressedSamples"] == "patient_name"  # a component
    assert found["1CT1"] == "patient_id"
    assert found["ABCD1234"] == "patient_id"  # OtherPatientIDsSequence, inside a sequence
    assert found["8000000000330109"] == "accession_number"
    assert found["JFK IMAGING CENTER"] == "institution"
    assert found["18-20Waehringer Guertel, Wien, Wien, 1090, Austria"] == "institution"
    assert found["Weißenkirchen In Der Wachau"] == "address"  # a component of PatientAddress
    assert found["meduser"] == "person_name"  # OperatorsName
    # Too short or generic: "CT1", "----", the placeholder birth date 11111111, the MR's
    # institution TOSHIBA (inside its manufacturer's name, which the outputs keep on purpose).
    assert not {"CT1", "----", "11111111", "TOSHIBA", "Sssssss"} & set(found)
    # Everything the generator itself declares identifying is among them.
    assert {phi_audit.normalize(v) for v in lz.source_identifiers()} - {"sssssss jsssss"} <= {
        phi_audit.normalize(v) for v in found
    }


def test_identifiers_from_a_raw_file_cover_the_categories(tmp_path):
    def plant(ds: Dataset) -> None:
        ds.PatientName = "Ramírez^Lucía^Inés"
        ds.PatientBirthDate = "19650417"
        ds.PatientAddress = "221B Baker Street"
        ds.PatientTelephoneNumbers = "+44 20 7946 0958"
        ds.OtherPatientIDs = ["MRN-55501234", "77"]
        ds.InstitutionName = "St Elsewhere General"
        ds.StudyID = "ST-998877"
        ds.AccessionNumber = "ACC20230811001"
        step = Dataset()
        step.ScheduledPerformingPhysicianName = "Whitfield^Nora"
        ds.ScheduledProcedureStepSequence = [step]

    path = tmp_path / "raw" / "x"  # no extension, in a folder
    path.parent.mkdir()
    path.write_bytes(dicom_bytes(plant))
    (tmp_path / "raw" / "notes.txt").write_text("not DICOM, ignored")
    found = {(i.value, i.category) for i in identifiers_from_dicom([tmp_path / "raw"])}
    assert {
        ("Ramírez^Lucía^Inés", "patient_name"),
        ("Ramírez", "patient_name"),
        ("Lucía Ramírez", "patient_name"),  # given family
        ("19650417", "birth_date"),
        ("1965-04-17", "birth_date"),  # as a row's DATE column would show it
        ("221B Baker Street", "address"),
        ("+44 20 7946 0958", "phone"),
        ("442079460958", "phone"),
        ("MRN-55501234", "patient_id"),
        ("St Elsewhere General", "institution"),
        ("ST-998877", "study_id"),
        ("ACC20230811001", "accession_number"),
        ("Whitfield^Nora", "person_name"),  # a PN inside a sequence
        ("Whitfield", "person_name"),
    } <= found
    assert "77" not in {value for value, _ in found}  # too short


@pytest.mark.parametrize(
    ("value", "meaningful"),
    [
        ("DOE", False),  # fewer than 4 letters or digits
        ("CT1", False),
        ("----", False),
        ("3610", False),  # digits only, fewer than 6
        ("-0500", False),
        ("123456", True),
        ("00000000", False),  # one character repeated: a placeholder
        ("XXXX", False),
        ("ANONYMOUS", False),  # common words
        ("Unknown", False),
        ("Hospital", False),
        ("1CT1", True),
        ("Jane", True),
        ("meduser", True),
    ],
)
def test_the_meaningfulness_rule(value, meaningful):
    assert phi_audit.is_meaningful(value) is meaningful


@pytest.mark.parametrize(
    ("identifier", "text", "found"),
    [
        ("DOE^JANE", "doe jane", True),  # case-insensitive, ^ as space
        ("Doe Jane", "DOE^JANE", True),
        ("DOE^JANE", "Study of DOE^JANE, follow-up", True),
        ("1CT1", "Collection/X/Entity/1CT1/1CT1_20040119_A.tar.gz", True),
        ("1CT1", "X1CT12", False),  # short values must stand alone
        ("19650417", "1.2.826.0.1.3680043.8.498.1965041712", False),  # numbers: not inside longer numbers
        ("19650417", "born 19650417.", True),
        ("Kowalczyk", "kowalczykowa", True),  # 8+ characters: anywhere
        ("Jane", "Janet", False),
    ],
)
def test_the_matching_rules(identifier, text, found):
    assert bool(phi_audit.Matcher([identifier]).find(text)) is found


def test_mask_never_shows_the_value():
    assert phi_audit.mask("Kowalczyk^Agnieszka").startswith("k*****************a #")
    assert phi_audit.mask("1CT1").startswith("1*** #")
    assert phi_audit.mask("DOE^JANE") == phi_audit.mask("doe jane")  # same fingerprint


# --- Cloud Storage and BigQuery -------------------------------------------------------------


def test_audits_a_bucket_in_the_gcs_emulator(pipeline, bucket_name, tmp_path):
    bucket = phi_audit.storage_client().bucket(bucket_name)
    store = GCSObjectStore(bucket, upload_chunk=256 * 1024)
    zone = LocalLandingZone(pipeline.root)
    spec = pipeline.batches[2]  # the day with DOE^JANE quarantined and the awkward study
    plan = plan_batch(zone, spec.batch_id)
    published = [publish_study_archive(group, zone, store) for group in plan.groups]
    assert {p.outcome for p in published} == {"written"}
    rows = tmp_path / "rows.ndjson"
    rows.write_text("".join(json.dumps({"entity_id": g.entity_id}) + "\n" for g in plan.groups))
    bucket.blob(f"BigQuery/{plan.collection}/dicom/{spec.batch_id}.ndjson").upload_from_filename(rows)

    auditor = phi_audit.Auditor(raw_values(pipeline.batches))
    phi_audit.run(auditor, [f"gs://{bucket_name}"])
    assert auditor.findings == []
    assert auditor.stats.archives == len(plan.groups)
    assert auditor.stats.dicom_headers == plan.images_accepted

    bucket.blob("Collection/IRB41449/Entity/GL1/GL1_20230811_GL2.tar.gz").upload_from_string(
        tar_gz({"GL1_20230811_GL2/S1/00001.dcm": dicom_bytes(OperatorsName=NAME)})
    )
    findings = audit(raw_values(pipeline.batches), [f"gs://{bucket_name}/Collection/IRB41449"])
    assert [(f.location, f.where, f.field) for f in findings] == [
        (
            f"gs://{bucket_name}/Collection/IRB41449",
            "DICOM header",
            "Collection/IRB41449/Entity/GL1/GL1_20230811_GL2.tar.gz!GL1_20230811_GL2/S1/00001.dcm: "
            "(0008,1070) OperatorsName",
        )
    ]
    assert_masked(findings)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([NAME]))
    assert phi_audit.main(["--raw", str(ids), "--outputs", f"gs://{bucket_name}"]) == 1


def test_audits_rows_in_the_bigquery_emulator(bigquery_emulator, tmp_path):
    from google.cloud import bigquery

    client = phi_audit.bigquery_client("test-project")
    dataset = f"IRB_audit_{tmp_path.name[-8:].replace('-', '_')}"
    client.create_dataset(dataset)
    table = f"test-project.{dataset}.dicom"
    schema = [bigquery.SchemaField("entity_id", "STRING"), bigquery.SchemaField("StudyDescription", "STRING")]
    client.create_table(bigquery.Table(table, schema=schema))
    rows = [{"entity_id": "GL664ba0", "StudyDescription": "CT CHEST"}, {"entity_id": "GL1", "StudyDescription": "x"}]
    rows.append({"entity_id": "GL2", "StudyDescription": "CT for KOWALCZYK AGNIESZKA"})
    config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON, schema=schema)
    client.load_table_from_file(io.BytesIO(to_ndjson(rows)), table, job_config=config).result()

    findings = audit([NAME], bigquery_tables=[table])
    assert [(f.location, f.where, f.field.split(" ", 2)[2]) for f in findings] == [(table, "row", "$.StudyDescription")]
    assert_masked(findings)
    assert audit(["DOE^JANE"], bigquery_tables=[table]) == []
