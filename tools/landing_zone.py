"""Generate landing zones in the shape of the batch contract, for the demo, the tests and benchmarks.

Images are built from the uncompressed sample files bundled with pydicom (nothing is downloaded):

    source       file                     modality  pixels
    ct           CT_small.dcm             CT        128x128, int16
    mr           MR_small.dcm             MR        64x64, int16
    mr_abdomen   examples_overlay.dcm     MR        300x484, uint16 (12 bits stored)
    us           examples_rgb_color.dcm   US        240x320, RGB 8-bit

Only technical attributes are copied from a sample (an allow list, so the samples' names, ids,
institutions, private tags and overlays never reach the output); the identity attributes are then
set the way the anonymizer leaves them. Pixels are the sample's, mirror-tiled to the requested size,
shifted a few pixels and given low-amplitude noise per image, so every image differs but compresses
like a real one. The ultrasound sample has the hospital name burned into its top rows: those rows are
blacked out, as a pixel scrubber would, unless the image claims BurnedInAnnotation=YES.

Everything is deterministic: the same spec gives the same bytes (for the same pydicom version).

Library:

    spec = ImageSpec("GL664ba0", "GL71cfb7", "20230811", "CT", series_number=2, instance_number=5,
                     header_overrides={"PatientName": "DOE^JANE"})
    ds = make_image(spec); write_image(spec, path); data = image_bytes(spec)
    pixels = make_synthetic_pixels("ct", nbytes=512 * 1024, seed=1)
    batch = BatchSpec("20240105-0001", images=[spec], collection="IRB41449", lookup={...},
                      extra_files={"junk/empty.dcm": b""})
    write_batch(root, batch)                       # images, lookup.json, extras, then batch.json
    batches = demo_landing_zone(root, days=3)      # see demo_batches() for what it plants
    raw_identifiers(batches)                       # values that must never reach the archive

Command line:

    python -m tools.landing_zone demo --root DIR [--days 3] [--identifiers FILE]
        The demo zone; --identifiers writes raw_identifiers() as a JSON list (keep that file outside
        the landing zone root: the root must hold only batch folders).
    python -m tools.landing_zone synthetic --root DIR --batches N --studies N --images-per-study N
                                           --image-kb N --kind ct|mr|us [--days D] [--collection X]
        Benchmark batches `synth-0001`...: one entity per study, series of at most 100 images, pixel
        data of about --image-kb KiB per image (multi-frame above one 512x512 / 480x640 frame).
    python -m tools.landing_zone wrap --source DIR --root DIR --batch-id X [--collection IRB...]
                                      [--completed-at 2024-01-05T09:30:00Z]
        Copy a folder of already de-identified files into ROOT/X unchanged (a top-level batch.json
        is not copied) and write batch.json last. Refuses to overwrite an existing batch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import io
import json
import math
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from dicom_archive.deid_gate import DEFAULT_PERSON_ATTRIBUTES
from dicom_archive.local_files import write_atomically
from dicom_archive.naming import BATCH_ID_RE, COLLECTION_RE

MANIFEST = "batch.json"
LOOKUP = "lookup.json"
DEFAULT_DEID = {"software": "deid 0.4.13", "recipe": "deid.dicom"}
DEFAULT_COLLECTION = "IRB41449"
# The default list of attributes that must not hold a value in an archived image (the contract's 12 and more).
PERSON_KEYWORDS = DEFAULT_PERSON_ATTRIBUTES

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class _Source:
    filename: str
    body_part: str
    study_description: str
    series_descriptions: tuple[str, ...]
    max_frame: tuple[int, int]  # largest frame a synthetic image uses before going multi-frame
    text_rows: int = 0  # top rows holding burned-in text in the sample
    noise: int = 3  # amplitude of the per-image noise, in stored units


SOURCES: dict[str, _Source] = {
    "ct": _Source(
        "CT_small.dcm",
        "CHEST",
        "CT CHEST W CONTRAST",
        ("AXIAL 5MM", "AXIAL 1.25MM LUNG", "CORONAL MPR", "SAGITTAL MPR"),
        (512, 512),
    ),
    "mr": _Source(
        "MR_small.dcm",
        "HEAD",
        "MR BRAIN WO CONTRAST",
        ("T2 3D SPACE", "T2 AX", "FLAIR AX", "DWI"),
        (512, 512),
    ),
    "mr_abdomen": _Source(
        "examples_overlay.dcm",
        "ABDOMEN",
        "MR ABDOMEN LIVER W CONTRAST",
        ("T1 VIBE FS TRA ART", "T1 VIBE FS TRA PV", "T2 HASTE COR", "T1 VIBE FS TRA DELAYED"),
        (512, 512),
    ),
    "us": _Source(
        "examples_rgb_color.dcm",
        "NECK",
        "US NECK SOFT TISSUE",
        ("LYMPH NODE DOPPLER", "LYMPH NODE B-MODE"),
        (480, 640),
        text_rows=53,
        noise=2,
    ),
}
MODALITY_SOURCE = {"CT": "ct", "MR": "mr", "US": "us"}
# Benchmark kinds: (source, modality); MR uses the abdomen sample, whose anatomy tiles better.
SYNTHETIC_KINDS = {"ct": ("ct", "CT"), "mr": ("mr_abdomen", "MR"), "us": ("us", "US")}

# Technical attributes copied from a sample; everything else (names, ids, dates, institutions,
# private tags, overlays, icons, sequences) is dropped rather than scrubbed, so nothing can slip.
_KEEP = (
    "SOPClassUID",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ScanOptions",
    "SliceThickness",
    "SpacingBetweenSlices",
    "KVP",
    "DataCollectionDiameter",
    "ReconstructionDiameter",
    "GantryDetectorTilt",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "FilterType",
    "FocalSpots",
    "ConvolutionKernel",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "SequenceName",
    "RepetitionTime",
    "EchoTime",
    "NumberOfAverages",
    "ImagingFrequency",
    "ImagedNucleus",
    "EchoNumbers",
    "MagneticFieldStrength",
    "FlipAngle",
    "ProtocolName",
    "PatientPosition",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "PixelSpacing",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "WindowCenter",
    "WindowWidth",
    "RescaleIntercept",
    "RescaleSlope",
)


@dataclass
class ImageSpec:
    """One de-identified image as the anonymizer would leave it.

    header_overrides sets any DICOM keyword after everything else (None deletes it), e.g.
    {"PatientName": "DOE^JANE"} to plant an identifier or {"PatientIdentityRemoved": None}; a
    sequence is a list of dicts, e.g. {"RequestAttributesSequence": [{"RequestingPhysician": "X^Y"}]}.
    private_elements plants private data elements, e.g. (("ACME 1.0", 0x0029, 0x10, "LO", "MRN-1"),).
    """

    entity_id: str
    item_id: str
    study_date: str
    modality: str = "CT"
    series_number: int = 1
    instance_number: int = 1
    blank_uids: bool = False
    rows: int | None = None
    cols: int | None = None
    frames: int = 1
    source: str | None = None  # a SOURCES key; by default chosen from the modality
    header_overrides: dict[str, object] = field(default_factory=dict)
    relpath: str | None = None  # inside the batch, POSIX; may start with PHI/
    # Private data elements, each (creator, group, element offset in the block, VR, value).
    private_elements: tuple[tuple[str, int, int, str, object], ...] = ()

    @property
    def path(self) -> str:
        return self.relpath or f"{self.entity_id}/{self.item_id}/{self.series_number}/{self.instance_number}.dcm"

    @property
    def source_name(self) -> str:
        name = self.source or MODALITY_SOURCE.get(self.modality.upper(), "ct")
        if name not in SOURCES:
            raise ValueError(f"unknown source {name!r}; choose one of {sorted(SOURCES)}")
        return name


@dataclass
class BatchSpec:
    """One batch folder. Bad inputs are expressed here: invalid fields go into batch.json as given."""

    batch_id: str
    images: list[ImageSpec] = field(default_factory=list)
    collection: str | None = None
    status: str = "DONEPROCESSING"
    completed_at: datetime = datetime(2024, 1, 5, 9, 30, tzinfo=UTC)  # naive means UTC
    deid: dict[str, str] | None = field(default_factory=lambda: dict(DEFAULT_DEID))
    lookup: dict[str, dict[str, object]] | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)  # zero-byte, non-DICOM, truncated...
    write_manifest: bool = True  # False: the folder is "not ready"
    raw_manifest: bytes | None = None  # written verbatim instead of the generated batch.json

    def manifest(self) -> dict[str, object]:
        doc: dict[str, object] = {"batch_id": self.batch_id}
        if self.collection is not None:
            doc["collection"] = self.collection
        doc["status"] = self.status
        doc["completed_at"] = rfc3339(self.completed_at)
        if self.deid is not None:
            doc["deid"] = self.deid
        return doc


def rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Images


@functools.cache
def _sample(name: str) -> Dataset:
    filename = SOURCES[name].filename
    # download=False: pydicom fetches most of its test files from the network on demand; only the
    # bundled ones are used, so this never touches the network.
    path = get_testdata_file(filename, download=False)
    if not isinstance(path, str):
        raise RuntimeError(f"pydicom sample {filename} is not bundled with pydicom {pydicom.__version__}")
    return pydicom.dcmread(path)


@functools.cache
def _sample_pixels(name: str, keep_text: bool) -> np.ndarray:
    pixels = _sample(name).pixel_array.copy()
    if not keep_text:
        pixels[: SOURCES[name].text_rows] = 0
    pixels.flags.writeable = False
    return pixels


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(part) for part in parts])


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def synthetic_shape(source: str, nbytes: int) -> tuple[int, int, int]:
    """(frames, rows, cols) whose pixel data is at most nbytes and short by less than a row per frame."""
    sample = _sample(source)
    pixel_bytes = int(sample.BitsAllocated) // 8 * int(sample.SamplesPerPixel)
    max_rows, max_cols = SOURCES[source].max_frame
    pixels = max(1, nbytes // pixel_bytes)
    frames = math.ceil(pixels / (max_rows * max_cols))
    per_frame = pixels // frames
    cols = min(max_cols, max(1, round(math.sqrt(per_frame * max_cols / max_rows))))
    rows = min(max_rows, max(1, per_frame // cols))
    return frames, rows, cols


def make_synthetic_pixels(
    source: str,
    *,
    rows: int | None = None,
    cols: int | None = None,
    frames: int = 1,
    nbytes: int | None = None,
    seed: int = 0,
    keep_text: bool = False,
) -> np.ndarray:
    """Pixels of a sample, mirror-tiled to the requested size with a per-seed shift and noise.

    source is a SOURCES key: ct, mr, mr_abdomen (16-bit) or us (8-bit RGB). nbytes picks the shape
    with synthetic_shape() and overrides rows/cols/frames. The result is shaped like pydicom's
    pixel_array: (frames, rows, cols[, 3]), without the frame axis for a single frame.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")
    name = source
    base = _sample_pixels(name, keep_text)
    if nbytes is not None:
        frames, rows, cols = synthetic_shape(name, nbytes)
    rows = rows or base.shape[0]
    cols = cols or base.shape[1]
    if rows < 1 or cols < 1 or frames < 1:
        raise ValueError(f"bad shape: {frames} frames of {rows}x{cols}")
    low, high = _stored_range(_sample(name))
    rng = np.random.default_rng(seed)
    # Mirror tiling keeps edges continuous; a shift of a few pixels makes neighbouring images (and
    # frames) differ the way adjacent slices do, so a compressor cannot just dedupe them.
    shift = 4
    widths = [(shift, max(0, rows - base.shape[0]) + shift), (shift, max(0, cols - base.shape[1]) + shift)]
    canvas = np.pad(base, widths + [(0, 0)] * (base.ndim - 2), mode="symmetric")
    out = np.empty((frames, rows, cols, *base.shape[2:]), dtype=base.dtype)
    amplitude = SOURCES[name].noise
    for frame in range(frames):
        dy, dx = (int(v) for v in rng.integers(0, 2 * shift + 1, size=2))
        tile = canvas[dy : dy + rows, dx : dx + cols].astype(np.int32)
        noise_shape = (rows, cols) + (1,) * (base.ndim - 2)
        noise = rng.integers(-amplitude, amplitude + 1, size=noise_shape, dtype=np.int32)
        if base.ndim == 3:
            # Keep the ultrasound's black surround black and grey pixels grey.
            noise = np.where(tile.max(axis=2, keepdims=True) > 0, noise, 0)
        out[frame] = np.clip(tile + noise, low, high).astype(base.dtype)
    return out if frames > 1 else out[0]


def make_image(spec: ImageSpec) -> pydicom.Dataset:
    """The de-identified dataset for spec, with file meta, ready for dcmwrite."""
    name = spec.source_name
    source = SOURCES[name]
    sample = _sample(name)
    ds = Dataset()
    for keyword in _KEEP:
        if keyword in sample:
            ds[tag_for_keyword(keyword)] = copy.deepcopy(sample[keyword])

    burned_in = str(spec.header_overrides.get("BurnedInAnnotation", "")).upper() == "YES"
    pixels = make_synthetic_pixels(
        name,
        rows=spec.rows,
        cols=spec.cols,
        frames=spec.frames,
        seed=_seed("pixels", spec.entity_id, spec.item_id, spec.series_number, spec.instance_number, spec.path),
        keep_text=burned_in,
    )
    shape = pixels.shape[1:] if spec.frames > 1 else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    if spec.frames > 1:
        ds.NumberOfFrames = spec.frames
    data = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\0"  # DICOM values have even length
    ds.add_new(0x7FE00010, "OW" if int(ds.BitsAllocated) > 8 else "OB", data)

    entity_seed = _seed("entity", spec.entity_id)
    series_index = spec.series_number - 1
    study_uid = _uid("study", spec.entity_id, spec.item_id, spec.study_date)
    series_uid = _uid("series", study_uid, spec.series_number)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so overrides may plant any name
    ds.ImageType = (
        ["DERIVED", "SECONDARY", "REFORMATTED"]
        if "MPR" in source.series_descriptions[series_index % len(source.series_descriptions)]
        else ["ORIGINAL", "PRIMARY", "AXIAL" if spec.modality.upper() in {"CT", "MR"} else "OTHER"]
    )
    if sample.Modality != spec.modality:
        # The sample's storage class would contradict the modality; secondary capture fits any.
        ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date
    study_seed = _seed("study", spec.item_id)
    ds.StudyTime = f"{8 + study_seed % 10:02d}{study_seed // 10 % 60:02d}00"
    ds.SeriesTime = ds.StudyTime[:2] + f"{(int(ds.StudyTime[2:4]) + spec.series_number) % 60:02d}00"
    ds.AccessionNumber = spec.item_id
    ds.Modality = spec.modality
    ds.StudyDescription = source.study_description
    ds.SeriesDescription = source.series_descriptions[series_index % len(source.series_descriptions)]
    ds.PatientName = spec.entity_id  # the contract allows PatientName equal to PatientID
    ds.PatientID = spec.entity_id
    ds.PatientSex = "FM"[entity_seed % 2]
    ds.PatientAge = f"{18 + entity_seed // 7 % 72:03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = source.body_part
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = spec.instance_number
    if "ImagePositionPatient" in ds and "SliceThickness" in ds:
        # Consecutive instances are consecutive slices.
        z = float(ds.ImagePositionPatient[2]) - (spec.instance_number - 1) * float(ds.SliceThickness)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], round(z, 4)]
        ds.SliceLocation = round(z, 4)
    if spec.blank_uids:
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ""
    else:
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = _uid("frame", series_uid)
        ds.SOPInstanceUID = _uid("sop", series_uid, spec.instance_number, spec.path)

    for keyword, value in spec.header_overrides.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"header_overrides: {keyword!r} is not a DICOM keyword")
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, _sequence_items(value))
    for creator, group, offset, vr, value in spec.private_elements:
        ds.private_block(group, creator, create=True).add_new(offset, vr, value)

    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0  # filled in by the writer
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds


def _sequence_items(value: object) -> object:
    """A list of dicts as the items of a sequence (nested lists of dicts too); anything else as is."""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        items = []
        for doc in value:
            item = Dataset()
            for keyword, inner in doc.items():
                if tag_for_keyword(keyword) is None:
                    raise ValueError(f"header_overrides: {keyword!r} is not a DICOM keyword")
                setattr(item, keyword, _sequence_items(inner))
            items.append(item)
        return items
    return value


def image_bytes(spec: ImageSpec) -> bytes:
    """The Part 10 file for spec; slice it to make a truncated file."""
    ds = make_image(spec)
    buffer = io.BytesIO()
    # pydicom refuses to write an empty Media Storage SOP Instance UID when enforcing the file
    # format; the meta above is complete either way, so the bytes have the same layout.
    enforce = bool(ds.file_meta.MediaStorageSOPInstanceUID and ds.file_meta.MediaStorageSOPClassUID)
    pydicom.dcmwrite(buffer, ds, enforce_file_format=enforce)
    return buffer.getvalue()


def write_image(spec: ImageSpec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(spec))
    return path


# ---------------------------------------------------------------------------------------------
# Batches


def _path_inside(folder: Path, relpath: str) -> Path:
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith("/") or ".." in parts or "\\" in relpath:
        raise ValueError(f"path {relpath!r} must be relative, POSIX and stay inside the batch")
    return folder.joinpath(*parts)


def write_batch(root: Path, spec: BatchSpec) -> Path:
    """Write the batch folder under root; batch.json comes last, through a temp name and a rename."""
    folder = root / spec.batch_id
    image_targets = [_path_inside(folder, image.path) for image in spec.images]
    extra_targets = [_path_inside(folder, relpath) for relpath in spec.extra_files]
    # extra_files may hold a broken lookup.json, but not as well as a generated one.
    reserved = [folder / LOOKUP] * (spec.lookup is not None) + [folder / MANIFEST] * spec.write_manifest
    every = image_targets + extra_targets + reserved
    if len(set(every)) != len(every):
        raise ValueError(f"batch {spec.batch_id}: two files share a path (batch.json goes in raw_manifest)")
    folder.mkdir(parents=True, exist_ok=True)
    for image, target in zip(spec.images, image_targets, strict=True):
        write_image(image, target)
    if spec.lookup is not None:
        (folder / LOOKUP).write_text(json.dumps(spec.lookup, indent=2) + "\n")
    for data, target in zip(spec.extra_files.values(), extra_targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    if spec.write_manifest:
        manifest = spec.raw_manifest
        if manifest is None:
            manifest = (json.dumps(spec.manifest(), indent=2) + "\n").encode()
        write_atomically(folder / MANIFEST, manifest)
    return folder


# ---------------------------------------------------------------------------------------------
# The demo zone


def _code(*parts: object) -> str:
    """A coded id in the anonymizer's style, e.g. GL664ba0."""
    return "GL" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:6]


def _lookup_entry(image: ImageSpec) -> dict[str, object]:
    source = SOURCES[image.source_name]
    entry: dict[str, object] = {
        "RequestAttributesSequence.RequestedProcedureDescription": source.study_description,
        "RequestAttributesSequence.ScheduledProcedureStepID": f"SPS{_seed(image.item_id) % 10**6:06d}",
    }
    if image.modality == "CT":
        # ScanOptions also sits in the header ("HELICAL MODE"), which wins on conflict.
        entry["ScanOptions"] = "HELICAL"
        entry["CTDIvol"] = round(6.0 + image.instance_number * 0.35 + image.series_number, 2)
    else:
        entry["MagneticFieldStrength"] = 1.5
    return entry


# What the demo plants besides DOE^JANE (issue 11): names where a gate reading only the top level
# would not look, and an identifier in lookup.json.
DEMO_PRIVATE_ELEMENTS: tuple[tuple[str, int, int, str, object], ...] = (
    ("SIEMENS MED HIS", 0x0033, 0x10, "LO", "Ingrid Rasmussen"),
    ("SIEMENS MED HIS", 0x0033, 0x11, "LO", "MRN-88412907"),
)
DEMO_NESTED_NAME = "Lindgren^Sven^^Dr."
DEMO_LOOKUP_IDENTIFIER = "MRN-55201937"


def demo_batches(
    days: int = 3, *, start: date = date(2024, 1, 5), collection: str | None = DEFAULT_COLLECTION
) -> list[BatchSpec]:
    """The demo zone's specs, one batch per day, without writing anything.

    Each batch holds a CT study (2 series x 3), an MR study (2 x 3, head MR and abdominal MR on
    alternate days) and a US study (1 x 2), all clean, with lookup.json entries for CT and MR
    (a CT entry's ScanOptions "HELICAL" contradicts the header's "HELICAL MODE" on purpose: the
    header wins).
    Entities recur across days (follow-up studies). On top, spread over the days (all in one
    batch when days=1), come images the archiver must not upload:
      - 2 images under PHI/ (a CT and a US);
      - 1 MR image flagged in lookup.json ("flagged": true);
      - 1 US image with BurnedInAnnotation=YES (its burned-in text is kept in the pixels);
      - 1 CT image whose PatientName is "DOE^JANE" instead of the entity id;
      - 1 MR image with a physician's name inside a sequence item
        (RequestAttributesSequence[0].ScheduledPerformingPhysicianName, quarantined);
      - 1 CT image whose lookup.json entry carries an identifier (OtherPatientIDs, quarantined);
    1 CT image with a name and a record number in private elements, as deid's default recipe
    leaves them (archived: the private elements are stripped from the archived copy),
    and 1 extra CT study that is archivable but awkward: anonymizer-style file names without an
    extension, blank UIDs, instance numbers 1, 2, 2, 3 and an empty PatientName.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    entities = [_code("demo-entity", n) for n in range(max(4, 2 * days + 2))]
    batches: list[BatchSpec] = []
    studies: list[dict[str, tuple[str, str, str]]] = []
    for day in range(days):
        today = start + timedelta(days=day)
        batch = BatchSpec(
            batch_id=f"{today:%Y%m%d}-0001",
            collection=collection,
            completed_at=datetime.combine(today, time(9, 30 + 7 * (day % 4)), tzinfo=UTC),
        )
        plan: dict[str, tuple[str, str, str]] = {}
        kinds = (("CT", "ct", 2, 3), ("MR", "mr" if day % 2 == 0 else "mr_abdomen", 2, 3), ("US", "us", 1, 2))
        for index, (modality, source, n_series, n_instances) in enumerate(kinds):
            entity = entities[(2 * day + index) % len(entities)]
            item = _code("demo-item", day, index)
            study_date = f"{today - timedelta(days=25 + 9 * day + 4 * index):%Y%m%d}"
            plan[modality] = (entity, item, study_date)
            for series in range(1, n_series + 1):
                for instance in range(1, n_instances + 1):
                    batch.images.append(ImageSpec(entity, item, study_date, modality, series, instance, source=source))
        batches.append(batch)
        studies.append(plan)

    def extra(day: int, modality: str, instance: int, **kwargs: object) -> ImageSpec:
        entity, item, study_date = studies[day][modality]
        source = next(i.source for i in batches[day].images if i.item_id == item)
        image = ImageSpec(entity, item, study_date, modality, 1, instance, source=source, **kwargs)
        batches[day].images.append(image)
        return image

    phi_ct = extra(0 % days, "CT", 4)
    phi_ct.relpath = "PHI/" + phi_ct.path
    phi_us = extra(1 % days, "US", 3)
    phi_us.relpath = "PHI/" + phi_us.path
    flagged = extra(1 % days, "MR", 4)  # flagged in lookup.json below
    extra(1 % days, "US", 4, header_overrides={"BurnedInAnnotation": "YES"})
    extra(2 % days, "CT", 5, header_overrides={"PatientName": "DOE^JANE"})
    private = extra(0 % days, "CT", 6)
    private.private_elements = DEMO_PRIVATE_ELEMENTS
    extra(
        1 % days,
        "MR",
        5,
        header_overrides={"RequestAttributesSequence": [{"ScheduledPerformingPhysicianName": DEMO_NESTED_NAME}]},
    )
    lookup_leak = extra(2 % days, "CT", 7)

    awkward_day = 2 % days
    awkward_date = f"{start + timedelta(days=awkward_day) - timedelta(days=3):%Y%m%d}"
    entity, item = entities[-1], _code("demo-item", "awkward")
    for n, instance in enumerate((1, 2, 2, 3), start=1):
        batches[awkward_day].images.append(
            ImageSpec(
                entity,
                item,
                awkward_date,
                "CT",
                1,
                instance,
                blank_uids=True,
                header_overrides={"PatientName": ""} if n == 4 else {},
                relpath=f"{entity}/{item}/IM{n:06d}",
            )
        )

    for day, batch in enumerate(batches):
        lookup = {
            image.path: _lookup_entry(image)
            for image in batch.images
            if image.modality in {"CT", "MR"} and not image.path.startswith("PHI/")
        }
        if day == 1 % days:
            lookup[flagged.path]["flagged"] = True
        if day == 2 % days:
            lookup[lookup_leak.path]["OtherPatientIDs"] = DEMO_LOOKUP_IDENTIFIER
        batch.lookup = lookup
    return batches


def demo_landing_zone(
    root: Path,
    *,
    days: int = 3,
    start: date = date(2024, 1, 5),
    collection: str | None = DEFAULT_COLLECTION,
    identifiers_path: Path | None = None,
) -> list[BatchSpec]:
    """Write demo_batches() under root; optionally write raw_identifiers() as a JSON list."""
    batches = demo_batches(days, start=start, collection=collection)
    root.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        write_batch(root, batch)
    if identifiers_path is not None:
        identifiers_path.parent.mkdir(parents=True, exist_ok=True)
        identifiers_path.write_text(json.dumps(raw_identifiers(batches), indent=2) + "\n")
    return batches


@functools.cache
def source_identifiers() -> tuple[str, ...]:
    """Identifying values in the pydicom samples, which make_image must drop."""
    found: set[str] = set()
    keywords = (*PERSON_KEYWORDS, "PatientID", "InstitutionName", "InstitutionAddress")
    for name in SOURCES:
        sample = _sample(name)
        values = [str(sample.get(keyword, "") or "") for keyword in keywords]
        values += [str(item.get("PatientID", "")) for item in sample.get("OtherPatientIDsSequence", [])]
        for value in values:
            # Short or placeholder values ("OB", "----") would match by chance; the manufacturer is
            # kept on purpose, so a value it contains (the MR's institution "TOSHIBA") is no leak.
            if len(value.strip("^- ")) >= 4 and value not in str(sample.get("Manufacturer", "")):
                found.add(value)
    return tuple(sorted(found))


# Planted values of these keywords are identifying too (besides the person attributes and any PN).
_IDENTIFYING_KEYWORDS = frozenset(
    {"PatientBirthName", "PatientBirthDate", "PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID"}
)


def _planted(keyword: str, value: object, image: ImageSpec) -> Iterable[str]:
    """The identifying values a header override (or a lookup value) plants, at any depth."""
    if isinstance(value, dict):
        for inner_keyword, inner in value.items():
            yield from _planted(str(inner_keyword), inner, image)
        return
    if isinstance(value, list | tuple):
        for item in value:
            yield from _planted(keyword, item, image)
        return
    if value is None or isinstance(value, bool):
        return
    text = str(value)
    last = keyword.rsplit(".", 1)[-1]
    identifying = last in PERSON_KEYWORDS or last in _IDENTIFYING_KEYWORDS or _is_person_name_keyword(last)
    if (identifying or "^" in text) and text not in ("", image.entity_id, image.item_id):
        yield text


def _is_person_name_keyword(keyword: str) -> bool:
    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VR(tag) == "PN"


def raw_identifiers(batches: Iterable[BatchSpec], *, include_sources: bool = True) -> list[str]:
    """Identifying values planted in the batches (plus, by default, the samples' own), for leak audits:
    person attributes, person names and identifiers at any depth of the header overrides, the
    values of private elements, and the identifying values of lookup.json."""
    found: set[str] = set(source_identifiers()) if include_sources else set()
    for batch in batches:
        by_path = {image.path: image for image in batch.images}
        for image in batch.images:
            for keyword, value in image.header_overrides.items():
                found.update(_planted(keyword, value, image))
            for *_where, value in image.private_elements:
                found.update(v for v in [str(value)] if v not in ("", image.entity_id))
        for path, entry in (batch.lookup or {}).items():
            image = by_path.get(path) or ImageSpec("", "", "")
            for keyword, value in entry.items():
                found.update(_planted(keyword, value, image))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Benchmarks and user folders


def synthetic_batches(
    batches: int,
    studies: int,
    images_per_study: int,
    image_kb: int,
    kind: str = "ct",
    *,
    days: int = 1,
    start: date = date(2024, 1, 5),
    collection: str | None = DEFAULT_COLLECTION,
) -> list[BatchSpec]:
    """Clean benchmark batches; images are generated only when written."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind must be one of {sorted(SYNTHETIC_KINDS)}")
    source, modality = SYNTHETIC_KINDS[kind]
    frames, rows, cols = synthetic_shape(source, image_kb * 1024)
    specs = []
    for b in range(batches):
        day = start + timedelta(days=b % max(1, days))
        batch = BatchSpec(
            f"synth-{b + 1:04d}",
            collection=collection,
            completed_at=datetime.combine(day, time(9, 0), tzinfo=UTC) + timedelta(minutes=b),
        )
        for s in range(studies):
            entity, item = _code("synth-entity", b, s), _code("synth-item", b, s)
            study_date = f"{day - timedelta(days=30 + s % 300):%Y%m%d}"
            for i in range(images_per_study):
                batch.images.append(
                    ImageSpec(
                        entity,
                        item,
                        study_date,
                        modality,
                        series_number=1 + i // 100,
                        instance_number=1 + i % 100,
                        rows=rows,
                        cols=cols,
                        frames=frames,
                        source=source,
                    )
                )
        specs.append(batch)
    return specs


def wrap_folder(
    source: Path,
    root: Path,
    batch_id: str,
    *,
    collection: str | None = None,
    completed_at: datetime | None = None,
    deid: dict[str, str] | None = None,
) -> Path:
    """Copy a folder of de-identified files into a new batch root/batch_id; batch.json last."""
    if not BATCH_ID_RE.fullmatch(batch_id):
        raise ValueError(f"batch id {batch_id!r} does not match {BATCH_ID_RE.pattern}")
    if collection is not None and not COLLECTION_RE.fullmatch(collection):
        raise ValueError(f"collection {collection!r} does not match {COLLECTION_RE.pattern}")
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder")
    folder = root / batch_id
    if folder.exists():
        raise FileExistsError(f"{folder} exists; a batch is never changed once written")
    if folder.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"{folder} is inside the source folder {source}")
    files = sorted(path for path in source.rglob("*") if path.is_file())
    folder.mkdir(parents=True)
    for path in files:
        relative = path.relative_to(source)
        if relative == Path(MANIFEST):
            continue  # the manifest is ours to write, last
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    spec = BatchSpec(
        batch_id,
        collection=collection,
        completed_at=completed_at or datetime.now(UTC).replace(microsecond=0),
        deid=deid,
    )
    write_atomically(folder / MANIFEST, (json.dumps(spec.manifest(), indent=2) + "\n").encode())
    return folder


# ---------------------------------------------------------------------------------------------
# Command line


def _timestamp(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.landing_zone",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("Command line:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write the demo landing zone")
    demo.add_argument("--root", type=Path, required=True)
    demo.add_argument("--days", type=int, default=3)
    demo.add_argument("--collection", default=DEFAULT_COLLECTION)
    demo.add_argument("--identifiers", type=Path, help="write the planted identifying values here (JSON)")

    synthetic = commands.add_parser("synthetic", help="write clean batches for benchmarks")
    synthetic.add_argument("--root", type=Path, required=True)
    synthetic.add_argument("--batches", type=int, default=1)
    synthetic.add_argument("--studies", type=int, default=1)
    synthetic.add_argument("--images-per-study", type=int, default=10)
    synthetic.add_argument("--image-kb", type=int, default=512, help="pixel data per image, KiB")
    synthetic.add_argument("--kind", choices=sorted(SYNTHETIC_KINDS), default="ct")
    synthetic.add_argument("--days", type=int, default=1, help="spread batches over this many days")
    synthetic.add_argument("--collection", default=DEFAULT_COLLECTION)

    wrap = commands.add_parser("wrap", help="turn a folder of de-identified files into a batch")
    wrap.add_argument("--source", type=Path, required=True)
    wrap.add_argument("--root", type=Path, required=True)
    wrap.add_argument("--batch-id", required=True)
    wrap.add_argument("--collection")
    wrap.add_argument("--completed-at", type=_timestamp, help="RFC 3339; default now")

    args = parser.parse_args(argv)
    if args.command == "demo":
        batches = demo_landing_zone(
            args.root, days=args.days, collection=args.collection, identifiers_path=args.identifiers
        )
        images = sum(len(batch.images) for batch in batches)
        print(f"wrote {len(batches)} batches, {images} images under {args.root}")
    elif args.command == "synthetic":
        specs = synthetic_batches(
            args.batches,
            args.studies,
            args.images_per_study,
            args.image_kb,
            args.kind,
            days=args.days,
            collection=args.collection,
        )
        for spec in specs:
            write_batch(args.root, spec)
        print(f"wrote {len(specs)} batches, {sum(len(s.images) for s in specs)} images under {args.root}")
    else:
        try:
            folder = wrap_folder(
                args.source,
                args.root,
                args.batch_id,
                collection=args.collection,
                completed_at=args.completed_at,
            )
        except (ValueError, FileExistsError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"wrote batch {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
