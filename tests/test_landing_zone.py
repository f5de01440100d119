"""The landing-zone generator: deterministic, contract-shaped, and planting what it promises."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zlib
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tools import landing_zone as lz
from tools.landing_zone import BatchSpec, ImageSpec

REPO_ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _images(folder: Path) -> dict[str, pydicom.Dataset]:
    """Every DICOM file under a batch folder, keyed by its path relative to the folder."""
    return {
        path.relative_to(folder).as_posix(): pydicom.dcmread(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in {lz.MANIFEST, lz.LOOKUP}
    }


@pytest.fixture(scope="module")
def demo_zone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BatchSpec]]:
    root = tmp_path_factory.mktemp("demo") / "zone"
    return root, lz.demo_landing_zone(root)


# --- images ---------------------------------------------------------------------------------


def test_same_spec_gives_identical_bytes(tmp_path):
    spec = ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", series_number=2, instance_number=5)
    first = lz.write_image(spec, tmp_path / "a.dcm").read_bytes()
    second = lz.write_image(ImageSpec(**vars(spec)), tmp_path / "b.dcm").read_bytes()
    assert first == second
    other = lz.image_bytes(ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", 2, 6))
    assert other != first, "a different instance must not produce the same file"


def test_image_carries_the_spec_and_nothing_from_the_sample(tmp_path):
    spec = ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", series_number=2, instance_number=5)
    path = lz.write_image(spec, tmp_path / "deep" / "x.dcm")
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)  # no force: a real Part 10 file
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == ("GL664ba0", "GL664ba0", "GL71cfb7")
    assert (ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber) == ("20230811", "CT", 2, 5)
    assert ds.PatientIdentityRemoved == "YES"
    assert re.fullmatch(r"\d{3}Y", ds.PatientAge)
    assert ds.PatientSex in {"F", "M"}
    for keyword in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "Manufacturer", "ImageType"):
        assert ds.get(keyword), keyword
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert pydicom.uid.UID(ds[keyword].value).is_valid, keyword
    assert ds.pixel_array.shape == (128, 128)
    assert not any(element.tag.is_private for element in ds)
    for keyword in ("OtherPatientIDsSequence", "InstitutionName", "PatientBirthDate", "ReferringPhysicianName"):
        assert keyword not in ds, keyword
    for value in lz.source_identifiers():
        assert value.encode() not in raw, value


def test_blank_uids_still_give_a_part10_file(tmp_path):
    spec = ImageSpec("GL664ba0", "GL71cfb7", "20230811", "MR", blank_uids=True)
    ds = pydicom.dcmread(lz.write_image(spec, tmp_path / "x"))
    assert ds.StudyInstanceUID == ds.SeriesInstanceUID == ds.SOPInstanceUID == ""
    assert ds.file_meta.MediaStorageSOPInstanceUID == ""
    assert ds.file_meta.FileMetaInformationGroupLength > 0
    assert ds.pixel_array.shape == (64, 64)


def test_header_overrides_set_and_delete():
    spec = ImageSpec(
        "GL664ba0",
        "GL71cfb7",
        "20230811",
        "US",
        header_overrides={"PatientName": "Doe^John", "BurnedInAnnotation": "YES", "PatientIdentityRemoved": None},
    )
    ds = lz.make_image(spec)
    assert ds.PatientName == "Doe^John"
    assert ds.BurnedInAnnotation == "YES"
    assert "PatientIdentityRemoved" not in ds
    with pytest.raises(ValueError, match="NotAKeyword"):
        lz.make_image(ImageSpec("GL664ba0", "GL71cfb7", "20230811", header_overrides={"NotAKeyword": 1}))


def test_ultrasound_text_band_is_blacked_out_unless_burned_in():
    clean = lz.make_image(ImageSpec("GL664ba0", "GL71cfb7", "20230811", "US")).pixel_array
    burned = lz.make_image(
        ImageSpec("GL664ba0", "GL71cfb7", "20230811", "US", header_overrides={"BurnedInAnnotation": "YES"})
    ).pixel_array
    assert clean.shape == (240, 320, 3)
    assert not clean[:40].any()
    assert burned[:40].any()


def test_size_and_frame_overrides():
    ds = lz.make_image(ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", rows=300, cols=200, frames=3))
    assert ds.NumberOfFrames == 3
    assert ds.pixel_array.shape == (3, 300, 200)
    assert len(ds.PixelData) == 3 * 300 * 200 * 2
    frames = ds.pixel_array
    assert not np.array_equal(frames[0], frames[1]), "frames should differ like a cine loop"


@pytest.mark.parametrize(
    ("source", "modality", "shape"),
    [
        ("ct", "CT", (128, 128)),
        ("mr", "MR", (64, 64)),
        ("mr_abdomen", "MR", (300, 484)),
        ("us", "US", (240, 320, 3)),
    ],
)
def test_every_source_decodes(source, modality, shape):
    ds = lz.make_image(ImageSpec("GL664ba0", "GL71cfb7", "20230811", modality, source=source))
    assert ds.pixel_array.shape == shape
    assert ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.7", "matching modality keeps the sample's class"


def test_foreign_modality_becomes_secondary_capture():
    ds = lz.make_image(ImageSpec("GL664ba0", "GL71cfb7", "20230811", "DX"))
    assert ds.Modality == "DX"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


# --- synthetic pixels -----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["ct", "mr_abdomen", "us"])
@pytest.mark.parametrize("kib", [1, 64, 700, 3000])
def test_synthetic_pixels_have_the_requested_size(source, kib):
    requested = kib * 1024
    frames, rows, cols = lz.synthetic_shape(source, requested)
    pixels = lz.make_synthetic_pixels(source, nbytes=requested, seed=7)
    samples = 3 if source == "us" else 1
    expected = ((frames,) if frames > 1 else ()) + (rows, cols) + ((3,) if samples == 3 else ())
    assert pixels.shape == expected
    assert pixels.dtype.itemsize == (1 if source == "us" else 2)
    row_bytes = cols * pixels.itemsize * samples
    assert requested - frames * row_bytes < pixels.nbytes <= requested
    max_rows, max_cols = lz.SOURCES[source].max_frame
    assert (frames > 1) == (requested > max_rows * max_cols * pixels.itemsize * samples)


def _roughness(pixels: np.ndarray) -> float:
    return float(np.abs(np.diff(pixels.astype(np.int32), axis=1)).mean())


@pytest.mark.parametrize("source", ["ct", "mr_abdomen", "us"])
def test_synthetic_pixels_look_like_images_not_noise(source):
    pixels = lz.make_synthetic_pixels(source, rows=512, cols=512, seed=1)
    sample = lz._sample(source).pixel_array
    # As smooth as the real sample: neighbouring pixels differ about as much.
    assert 0.5 * _roughness(sample) < _roughness(pixels) < 1.2 * _roughness(sample)
    raw, sample_raw = pixels.tobytes(), sample.tobytes()
    ratio = len(raw) / len(zlib.compress(raw))
    sample_ratio = len(sample_raw) / len(zlib.compress(sample_raw))
    # And about as compressible: not noise, not a repeated tile.
    assert 0.8 * sample_ratio < ratio < 1.5 * sample_ratio
    assert not np.array_equal(pixels, lz.make_synthetic_pixels(source, rows=512, cols=512, seed=2))


def test_synthetic_pixels_respect_bits_stored():
    pixels = lz.make_synthetic_pixels("mr_abdomen", rows=600, cols=600, seed=3)
    assert pixels.min() >= 0
    assert pixels.max() <= 4095


# --- batches --------------------------------------------------------------------------------


def _small_batch(**kwargs) -> BatchSpec:
    images = [
        ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", 1, 1),
        ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", 1, 2, relpath="PHI/a/b.dcm"),
    ]
    return BatchSpec("20240105-0001", images=images, collection="IRB41449", **kwargs)


def test_batch_json_is_written_last_through_a_rename(tmp_path, monkeypatch):
    from dicom_archive import local_files

    seen: list[tuple[str, set[str]]] = []
    real_replace = local_files.os.replace

    def spy(src, dst):
        folder = Path(dst).parent
        seen.append((Path(dst).name, set(_files(folder))))
        real_replace(src, dst)

    monkeypatch.setattr(local_files.os, "replace", spy)
    spec = _small_batch(lookup={"GL664ba0/GL71cfb7/1/1.dcm": {"CTDIvol": 1.0}}, extra_files={"junk/empty.dcm": b""})
    folder = lz.write_batch(tmp_path, spec)

    assert len(seen) == 1
    name, present = seen[0]
    assert name == "batch.json"
    expected_before = {"GL664ba0/GL71cfb7/1/1.dcm", "PHI/a/b.dcm", "lookup.json", "junk/empty.dcm"}
    assert expected_before <= present
    assert "batch.json" not in present
    assert set(_files(folder)) == expected_before | {"batch.json"}, "no temp file left behind"
    manifest = json.loads((folder / "batch.json").read_text())
    assert manifest == {
        "batch_id": "20240105-0001",
        "collection": "IRB41449",
        "status": "DONEPROCESSING",
        "completed_at": "2024-01-05T09:30:00Z",
        "deid": {"software": "deid 0.4.13", "recipe": "deid.dicom"},
    }
    assert json.loads((folder / "lookup.json").read_text()) == spec.lookup


def test_write_batch_is_deterministic(tmp_path):
    first = _files(lz.write_batch(tmp_path / "one", _small_batch()))
    second = _files(lz.write_batch(tmp_path / "two", _small_batch()))
    assert first == second
    assert len(first) == 3


def test_bad_inputs_are_written_verbatim(tmp_path):
    truncated = lz.image_bytes(ImageSpec("GL664ba0", "GL71cfb7", "20230811"))[:700]
    not_ready = lz.write_batch(tmp_path, BatchSpec("pending", images=[], write_manifest=False))
    broken = lz.write_batch(
        tmp_path,
        BatchSpec(
            "broken",
            raw_manifest=b'{"batch_id": "broken",',
            extra_files={"zero.dcm": b"", "notes.txt": b"hello", "cut.dcm": truncated, "lookup.json": b"[1"},
        ),
    )
    naive = lz.write_batch(tmp_path, BatchSpec("naive", completed_at=datetime(2024, 1, 6, 12, 0), status="ERROR"))

    assert not (not_ready / "batch.json").exists()
    assert (broken / "batch.json").read_bytes() == b'{"batch_id": "broken",'
    assert (broken / "zero.dcm").stat().st_size == 0
    assert (broken / "cut.dcm").read_bytes() == truncated
    assert (broken / "lookup.json").read_bytes() == b"[1"
    manifest = json.loads((naive / "batch.json").read_text())
    assert manifest["completed_at"] == "2024-01-06T12:00:00Z"
    assert manifest["status"] == "ERROR"
    assert "collection" not in manifest


@pytest.mark.parametrize("relpath", ["../escape.dcm", "/abs.dcm", "a\\b.dcm", ""])
def test_paths_must_stay_inside_the_batch(tmp_path, relpath):
    with pytest.raises(ValueError, match="inside the batch"):
        lz.write_batch(tmp_path, BatchSpec("b", extra_files={relpath: b"x"}))


def test_clashing_paths_are_refused(tmp_path):
    image = ImageSpec("GL664ba0", "GL71cfb7", "20230811")
    with pytest.raises(ValueError, match="share a path"):
        lz.write_batch(tmp_path, BatchSpec("b", images=[image, ImageSpec(**vars(image))]))
    with pytest.raises(ValueError, match="share a path"):
        lz.write_batch(tmp_path, BatchSpec("c", extra_files={"batch.json": b"{}"}))
    assert not (tmp_path / "b").exists()


# --- the demo zone --------------------------------------------------------------------------


def test_demo_zone_is_deterministic(tmp_path, demo_zone):
    root, _ = demo_zone
    lz.demo_landing_zone(tmp_path)
    assert _files(tmp_path) == _files(root)


def test_demo_zone_has_ready_batches_on_consecutive_days(demo_zone):
    root, batches = demo_zone
    folders = sorted(path for path in root.iterdir())
    assert [folder.name for folder in folders] == ["20240105-0001", "20240106-0001", "20240107-0001"]
    days = [json.loads((folder / "batch.json").read_text())["completed_at"][:10] for folder in folders]
    assert days == ["2024-01-05", "2024-01-06", "2024-01-07"]
    assert [batch.batch_id for batch in batches] == [folder.name for folder in folders]


def _demo_images(root: Path) -> dict[str, pydicom.Dataset]:
    return {f"{folder.name}/{rel}": ds for folder in sorted(root.iterdir()) for rel, ds in _images(folder).items()}


def test_demo_zone_has_variety(demo_zone):
    root, _ = demo_zone
    images = _demo_images(root)
    assert {ds.Modality for ds in images.values()} == {"CT", "MR", "US"}
    assert len({ds.PatientID for ds in images.values()}) >= 5
    series: dict[tuple[str, str], set[int]] = {}
    for ds in images.values():
        series.setdefault((ds.PatientID, ds.AccessionNumber), set()).add(ds.SeriesNumber)
    assert len(series) >= 9
    assert sum(len(numbers) >= 2 for numbers in series.values()) >= 6
    # Entities come back on later days (follow-ups).
    per_batch = [{ds.PatientID for rel, ds in images.items() if rel.startswith(f.name)} for f in sorted(root.iterdir())]
    assert per_batch[0] & per_batch[1]
    assert per_batch[1] & per_batch[2]
    for ds in images.values():
        assert re.fullmatch(r"GL[0-9a-f]{6}", ds.PatientID)
        assert re.fullmatch(r"GL[0-9a-f]{6}", ds.AccessionNumber)


def test_demo_zone_plants_the_promised_problems(demo_zone):
    root, batches = demo_zone
    images = _demo_images(root)
    lookups = {folder.name: json.loads((folder / "lookup.json").read_text()) for folder in root.iterdir()}

    phi = {rel for rel in images if rel.split("/", 1)[1].startswith("PHI/")}
    assert len(phi) == 2
    assert {images[rel].Modality for rel in phi} == {"CT", "US"}

    flagged = {
        f"{batch}/{rel}" for batch, lookup in lookups.items() for rel, entry in lookup.items() if entry.get("flagged")
    }
    assert len(flagged) == 1
    assert images[next(iter(flagged))].Modality == "MR"

    burned = {rel for rel, ds in images.items() if ds.get("BurnedInAnnotation") == "YES"}
    assert len(burned) == 1
    assert images[next(iter(burned))].pixel_array[:40].any(), "the burned-in image keeps its text"

    named = {rel for rel, ds in images.items() if ds.PatientName not in ("", ds.PatientID)}
    assert [str(images[rel].PatientName) for rel in named] == ["DOE^JANE"]
    assert "DOE^JANE" in lz.raw_identifiers(batches)

    blank = [ds for ds in images.values() if ds.SOPInstanceUID == ""]
    assert len(blank) == 4
    assert len({(ds.PatientID, ds.AccessionNumber) for ds in blank}) == 1
    assert sorted(ds.InstanceNumber for ds in blank) == [1, 2, 2, 3]
    assert any(ds.PatientName == "" for ds in blank)

    # Everything else passes the contract's header checks.
    problems = phi | flagged | burned | named
    assert len(problems) == 5
    for rel, ds in images.items():
        if rel in problems:
            continue
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.get("BurnedInAnnotation") != "YES"
        assert all(not ds.get(keyword) for keyword in lz.PERSON_KEYWORDS if keyword != "PatientName")


def test_demo_lookup_matches_files_and_flattens_sequences(demo_zone):
    root, _ = demo_zone
    for folder in root.iterdir():
        lookup = json.loads((folder / "lookup.json").read_text())
        assert lookup
        for rel, entry in lookup.items():
            assert (folder / rel).is_file(), rel
            assert "RequestAttributesSequence.RequestedProcedureDescription" in entry
        assert any("CTDIvol" in entry and "ScanOptions" in entry for entry in lookup.values())


def test_demo_with_one_day_still_has_every_feature():
    (batch,) = lz.demo_batches(days=1)
    paths = [image.path for image in batch.images]
    assert sum(path.startswith("PHI/") for path in paths) == 2
    assert sum(bool(entry.get("flagged")) for entry in (batch.lookup or {}).values()) == 1
    assert sum(image.header_overrides.get("BurnedInAnnotation") == "YES" for image in batch.images) == 1
    assert sum(image.blank_uids for image in batch.images) == 4
    assert len(paths) == len(set(paths))


def test_raw_identifiers_cover_plants_and_samples():
    planted = lz.raw_identifiers(lz.demo_batches(), include_sources=False)
    assert planted == sorted(
        [
            "DOE^JANE",
            lz.DEMO_NESTED_NAME,
            lz.DEMO_LOOKUP_IDENTIFIER,
            *(str(value) for *_where, value in lz.DEMO_PRIVATE_ELEMENTS),
        ]
    )
    everything = lz.raw_identifiers(lz.demo_batches())
    assert {"CompressedSamples^CT1", "JFK IMAGING CENTER", "DOE^JANE"} <= set(everything)
    assert "TOSHIBA" not in everything, "a substring of the kept Manufacturer would be a false alarm"


# --- command line ---------------------------------------------------------------------------


def test_cli_demo_writes_identifiers(tmp_path):
    assert (
        lz.main(["demo", "--root", str(tmp_path / "zone"), "--days", "2", "--identifiers", str(tmp_path / "ids.json")])
        == 0
    )
    assert len(list((tmp_path / "zone").iterdir())) == 2
    assert "DOE^JANE" in json.loads((tmp_path / "ids.json").read_text())


def test_cli_synthetic(tmp_path):
    args = ["synthetic", "--root", str(tmp_path), "--batches", "2", "--studies", "3", "--images-per-study", "4"]
    assert lz.main([*args, "--image-kb", "100", "--kind", "us", "--days", "2"]) == 0
    folders = sorted(tmp_path.iterdir())
    assert [folder.name for folder in folders] == ["synth-0001", "synth-0002"]
    days = {json.loads((folder / "batch.json").read_text())["completed_at"][:10] for folder in folders}
    assert days == {"2024-01-05", "2024-01-06"}
    images = _images(folders[0])
    assert len(images) == 12
    assert len({ds.AccessionNumber for ds in images.values()}) == 3
    for ds in images.values():
        assert ds.Modality == "US"
        assert 100 * 1024 - 3 * ds.Columns < len(ds.PixelData) <= 100 * 1024 + 1


def test_cli_wrap(tmp_path):
    source = tmp_path / "mine"
    lz.write_image(ImageSpec("GL664ba0", "GL71cfb7", "20230811"), source / "a" / "IM1")
    (source / "PHI").mkdir()
    (source / "PHI" / "IM2").write_bytes(b"flagged")
    (source / "batch.json").write_text("{}")
    root = tmp_path / "zone"
    args = ["wrap", "--source", str(source), "--root", str(root), "--batch-id", "upload-1"]
    assert lz.main([*args, "--collection", "IRB41449", "--completed-at", "2024-02-01T08:00:00Z"]) == 0

    folder = root / "upload-1"
    assert (folder / "a" / "IM1").read_bytes() == (source / "a" / "IM1").read_bytes()
    assert (folder / "PHI" / "IM2").read_bytes() == b"flagged"
    manifest = json.loads((folder / "batch.json").read_text())
    assert manifest == {
        "batch_id": "upload-1",
        "collection": "IRB41449",
        "status": "DONEPROCESSING",
        "completed_at": "2024-02-01T08:00:00Z",
    }
    assert lz.main(args) == 2, "an existing batch is never overwritten"
    assert (
        lz.main(["wrap", "--source", str(source), "--root", str(root), "--batch-id", "x", "--collection", "IRB-1"]) == 2
    )
    assert not (root / "x").exists()


def test_cli_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "tools.landing_zone", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("demo", "synthetic", "wrap", "--image-kb"):
        assert command in result.stdout


def test_demo_dates_follow_start():
    batches = lz.demo_batches(days=2, start=date(2023, 12, 31))
    assert [batch.completed_at.date() for batch in batches] == [date(2023, 12, 31), date(2024, 1, 1)]
    assert all(batch.completed_at.tzinfo == UTC for batch in batches)
