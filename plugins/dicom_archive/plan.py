"""Planning a batch: validate the manifest, check every image's header, group into studies.

Only the header of each image is read here (pydicom stops before the pixel data); the archive
step reads each file once more, in full, and takes the sha256 and the row from that one read.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_archive.deid import DeidPolicy, Quarantine, Reason, StudyIdentity, check_header, valid_study_date
from dicom_archive.landing import LandingFile, LandingZone
from dicom_archive.manifest import (
    LOOKUP_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    BatchManifest,
    ManifestError,
    is_control_file,
    is_flagged,
    is_under_phi_folder,
    parse_lookup,
    parse_manifest,
)
from dicom_archive.naming import BATCH_ID_RE, InvalidIdentifierError, archive_object_name, archive_stem

STATUS_DONE = "DONE"
STATUS_EMPTY = "EMPTY"
STATUS_ERROR = "ERROR"
STATUS_NOT_READY = "NOT_READY"  # no batch.json, or a status that says the anonymizer is not done
WITHDRAWN = "withdrawn"  # quarantine reason: the study or its patient was withdrawn (withdraw.py)


@dataclass
class ImageRecord:
    relpath: str
    size: int
    header_length: int
    series_number: int | None
    instance_number: int | None
    series_uid: str
    sop_uid: str
    lookup: dict[str, Any] | None = None

    def sort_key(self) -> tuple:
        # Blank or repeated UIDs and numbers are allowed; relpath breaks the last tie.
        big = 2**63
        return (
            self.series_number if self.series_number is not None else big,
            self.series_uid,
            self.instance_number if self.instance_number is not None else big,
            self.sop_uid,
            self.relpath,
        )


@dataclass
class QuarantinedImage:
    relpath: str
    reason: str
    detail: str = ""
    study: str | None = None  # the archive stem, when the header names a valid study


@dataclass
class StudyGroup:
    collection: str
    batch_id: str
    entity_id: str
    study_date: str
    item_id: str
    images: list[ImageRecord] = field(default_factory=list)
    quarantined: int = 0  # images of this study that were held back

    @property
    def stem(self) -> str:
        return archive_stem(self.entity_id, self.study_date, self.item_id)

    @property
    def object_name(self) -> str:
        return archive_object_name(self.collection, self.entity_id, self.study_date, self.item_id)

    @property
    def size(self) -> int:
        return sum(image.size for image in self.images)

    def sorted_images(self) -> list[ImageRecord]:
        return sorted(self.images, key=ImageRecord.sort_key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> StudyGroup:
        images = [ImageRecord(**image) for image in doc["images"]]
        return cls(**{**doc, "images": images})


@dataclass
class BatchPlan:
    batch_id: str
    collection: str | None
    status: str  # DONE, EMPTY, ERROR or NOT_READY
    completed_at: str | None = None
    deid: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    images_seen: int = 0
    groups: list[StudyGroup] = field(default_factory=list)
    quarantined: list[QuarantinedImage] = field(default_factory=list)
    plan_seconds: float = 0.0

    @property
    def images_accepted(self) -> int:
        return sum(len(g.images) for g in self.groups)

    def quarantine_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for q in self.quarantined:
            counts[q.reason] += 1
        return dict(sorted(counts.items()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BatchPlan:
        doc = json.loads(text)
        doc["groups"] = [StudyGroup.from_dict(g) for g in doc["groups"]]
        doc["quarantined"] = [QuarantinedImage(**q) for q in doc["quarantined"]]
        return cls(**doc)


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # where stop_before_pixels stops
_ITEM_TAG, _SEQUENCE_DELIMITER_TAG = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs whose length takes 4 bytes (after 2 reserved ones).
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def _has_short_element(ds: pydicom.Dataset) -> bool:
    """An element holding fewer bytes than its declared length: the file ended inside it."""
    for element in ds.elements():
        if isinstance(element, RawDataElement):
            if (
                element.length != _UNDEFINED_LENGTH
                and isinstance(element.value, bytes)
                and len(element.value) < element.length
            ):
                return True
        elif element.VR == "SQ" and any(_has_short_element(item) for item in element.value):
            return True
    return False


def _is_image(ds: pydicom.Dataset) -> bool:
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or ""
    return "Rows" in ds or "Image Storage" in UID(str(sop_class)).name


def incomplete_reason(ds: pydicom.Dataset, stream: BinaryIO, header_length: int, size: int) -> str | None:
    """Why a file whose header parsed is still not a whole Part 10 file (None: it is whole).

    pydicom reads what is there without complaint: a file cut short, or garbage after the
    preamble, parses into a partial dataset. Checked without reading the pixel data: the file
    meta names a transfer syntax, no header element is cut short, and what follows the header
    is the pixel data element, complete (its declared length, or its fragments up to the
    sequence delimiter, fit in the file). `stream` is left positioned anywhere.
    """
    if not ds.file_meta.get("TransferSyntaxUID") or _has_short_element(ds.file_meta) or _has_short_element(ds):
        return "truncated or corrupt header"
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return None  # the dataset was inflated: stream positions say nothing about it
    if header_length >= size:
        # Whole non-image objects (reports, presentation states) end here; an image cannot.
        return "an image without pixel data (truncated)" if _is_image(ds) else None
    implicit, little = ds.original_encoding
    order = "<" if little is not False else ">"
    stream.seek(header_length)
    head = stream.read(8)
    if len(head) < 8:
        return "truncated pixel data"
    group, element = struct.unpack(f"{order}HH", head[:4])
    if (group << 16 | element) not in _PIXEL_DATA_TAGS:
        return "unexpected data after the header"
    if implicit or not b"AA" <= head[4:6] <= b"ZZ":  # like pydicom, accept a switch to implicit VR
        (length,) = struct.unpack(f"{order}L", head[4:])
    elif head[4:6] in _LONG_LENGTH_VRS:
        extra = stream.read(4)
        if len(extra) < 4:
            return "truncated pixel data"
        (length,) = struct.unpack(f"{order}L", extra)
    else:
        (length,) = struct.unpack(f"{order}H", head[6:])
    if length != _UNDEFINED_LENGTH:
        return "truncated pixel data" if stream.tell() + length > size else None
    # Encapsulated: items (fragments) up to a sequence delimiter, most often the file's last bytes.
    items_start = stream.tell()
    delimiter = struct.pack(f"{order}HHL", 0xFFFE, 0xE0DD, 0)
    if size - items_start >= 8:
        stream.seek(size - 8)
        if stream.read(8) == delimiter:
            return None
    position = items_start
    while True:
        stream.seek(position)
        item = stream.read(8)
        if len(item) < 8:
            return "truncated pixel data"
        group, element, length = struct.unpack(f"{order}HHL", item)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER_TAG:
            return None
        if tag != _ITEM_TAG or length == _UNDEFINED_LENGTH:
            return "corrupt pixel data"
        position += 8 + length
        if position > size:
            return "truncated pixel data"


def _study_stem(ds: pydicom.Dataset) -> str | None:
    try:
        date = str(ds.get("StudyDate", ""))
        if not valid_study_date(date):
            return None
        return archive_stem(str(ds.get("PatientID", "")), date, str(ds.get("AccessionNumber", "")))
    except InvalidIdentifierError:
        return None


def inspect_image(
    zone: LandingZone,
    batch_id: str,
    file: LandingFile,
    lookup_entry: dict[str, Any] | None,
    policy: DeidPolicy,
) -> tuple[StudyIdentity, ImageRecord] | QuarantinedImage:
    """Checks 1 to 6 of the contract for one image, reading only its header."""

    def quarantined(reason: Reason, detail: str = "") -> QuarantinedImage:
        return QuarantinedImage(file.relpath, str(reason), detail)

    if is_under_phi_folder(file.relpath):
        return quarantined(Reason.PHI_FOLDER, "under PHI/")
    if is_flagged(lookup_entry):
        return quarantined(Reason.FLAGGED_IN_LOOKUP, "flagged in lookup.json")
    if file.outside_batch:
        return quarantined(Reason.OUTSIDE_BATCH, "a link that points outside the batch folder")
    if file.special:
        return quarantined(Reason.UNREADABLE, "not a regular file (a named pipe, socket or device)")
    if file.size > policy.max_image_bytes:
        return quarantined(Reason.TOO_LARGE, f"{file.size} bytes is over the limit of {policy.max_image_bytes}")
    try:
        with zone.open(batch_id, file.relpath) as stream:
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
            header_length = stream.tell()
            damage = incomplete_reason(ds, stream, header_length, file.size)
    except InvalidDicomError:
        return quarantined(Reason.NOT_DICOM, "not a DICOM Part 10 file (no DICM preamble)")
    except OSError as err:
        return quarantined(Reason.UNREADABLE, f"cannot be read: {err.strerror or type(err).__name__}")
    except Exception as err:  # pydicom raises many kinds on a damaged file
        return quarantined(Reason.NOT_DICOM, f"does not parse as DICOM ({type(err).__name__})")
    if damage is not None:
        return quarantined(Reason.NOT_DICOM, f"does not parse as DICOM ({damage})")

    verdict = check_header(ds, policy)
    if isinstance(verdict, Quarantine):
        held = quarantined(verdict.reason, verdict.detail)
        held.study = _study_stem(ds)
        return held
    record = ImageRecord(
        relpath=file.relpath,
        size=file.size,
        header_length=header_length,
        series_number=_int_or_none(ds.get("SeriesNumber")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        series_uid=str(ds.get("SeriesInstanceUID") or ""),
        sop_uid=str(ds.get("SOPInstanceUID") or ""),
        lookup=lookup_entry,
    )
    return verdict, record


def read_manifest(zone: LandingZone, batch_id: str, default_collection: str | None) -> BatchManifest | None:
    """The batch's manifest, or None while the batch is not complete. Raises ManifestError."""
    raw = zone.read_bytes(batch_id, MANIFEST_NAME)
    if raw is None:
        return None
    return parse_manifest(
        raw,
        folder_name=batch_id,
        default_collection=default_collection,
        source=zone.describe(batch_id, MANIFEST_NAME),
    )


def plan_batch(
    zone: LandingZone,
    batch_id: str,
    *,
    default_collection: str | None = None,
    policy: DeidPolicy | None = None,
) -> BatchPlan:
    """Everything the archive step needs to know about one batch (see _plan_batch); timed for
    the batch report."""
    started = time.monotonic()
    plan = _plan_batch(zone, batch_id, default_collection=default_collection, policy=policy)
    plan.plan_seconds = round(time.monotonic() - started, 3)
    return plan


def _plan_batch(
    zone: LandingZone,
    batch_id: str,
    *,
    default_collection: str | None = None,
    policy: DeidPolicy | None = None,
) -> BatchPlan:
    """Everything the archive step needs to know about one batch. Never raises for bad input:
    a broken manifest gives an ERROR plan with the message, a bad image a quarantine entry."""
    policy = policy or DeidPolicy()
    if not BATCH_ID_RE.fullmatch(batch_id) or batch_id.strip(".") == "":
        # Checked before touching the landing zone: a requested id must not name a path.
        return BatchPlan(batch_id, None, STATUS_ERROR, error=f"{batch_id!r} is not a valid batch id")
    try:
        manifest = read_manifest(zone, batch_id, default_collection)
        if manifest is None:
            return BatchPlan(batch_id, None, STATUS_NOT_READY, error=f"{zone.describe(batch_id)} has no batch.json")
        if not manifest.is_ready:
            # Like a missing batch.json: a batch the anonymizer has not finished is not processed,
            # even when a manual run names it.
            return BatchPlan(
                batch_id,
                None,
                STATUS_NOT_READY,
                error=f"{zone.describe(batch_id, MANIFEST_NAME)}: status {manifest.status!r} means the batch is "
                "not ready yet (only DONEPROCESSING or ERROR are processed)",
            )
        raw_lookup = zone.read_bytes(batch_id, LOOKUP_NAME)
        # An empty lookup.json is not valid JSON either: it may have lost the flags it was written for.
        lookup = parse_lookup(raw_lookup, zone.describe(batch_id, LOOKUP_NAME)) if raw_lookup is not None else {}
    except ManifestError as err:
        return BatchPlan(batch_id, None, STATUS_ERROR, error=str(err))

    plan = BatchPlan(
        batch_id=batch_id,
        collection=manifest.collection,
        status=STATUS_DONE,
        completed_at=manifest.completed_at.isoformat(),
        deid=manifest.deid,
    )
    if manifest.is_error:
        plan.status = STATUS_ERROR
        plan.error = f"{zone.describe(batch_id, MANIFEST_NAME)}: the anonymizer reported status ERROR"
        return plan

    groups: dict[StudyIdentity, StudyGroup] = {}
    for file in zone.list_files(batch_id):
        if is_control_file(file.relpath):
            continue
        plan.images_seen += 1
        outcome = inspect_image(zone, batch_id, file, lookup.get(file.relpath), policy)
        if isinstance(outcome, QuarantinedImage):
            plan.quarantined.append(outcome)
            continue
        identity, record = outcome
        group = groups.get(identity)
        if group is None:
            group = groups[identity] = StudyGroup(
                manifest.collection, batch_id, identity.entity_id, identity.study_date, identity.item_id
            )
        group.images.append(record)

    plan.groups = [groups[key] for key in sorted(groups, key=lambda k: (k.entity_id, k.study_date, k.item_id))]
    held_back = Counter(q.study for q in plan.quarantined if q.study)
    for group in plan.groups:
        group.images = group.sorted_images()
        group.quarantined = held_back[group.stem]
    if not plan.groups:
        plan.status = STATUS_EMPTY
    return plan


def apply_withdrawals(plan: BatchPlan, withdrawn_by: Callable[[str, str], str | None]) -> BatchPlan:
    """Hold back every study that was withdrawn, like a quarantine reason: its images are listed
    as `withdrawn` and never archived again. `withdrawn_by(entity_id, item_id)` names the
    withdrawal request, or None. Kept apart from the header checks: it needs the archive store."""
    kept = []
    for group in plan.groups:
        request = withdrawn_by(group.entity_id, group.item_id)
        if request is None:
            kept.append(group)
            continue
        plan.quarantined.extend(
            QuarantinedImage(image.relpath, WITHDRAWN, f"withdrawn by request {request}", study=group.stem)
            for image in group.images
        )
    plan.groups = kept
    if plan.status == STATUS_DONE and not plan.groups:
        plan.status = STATUS_EMPTY
    return plan


def find_completed_batches(
    zone: LandingZone,
    start: datetime,
    end: datetime,
    default_collection: str | None = None,
) -> list[str]:
    """Batches whose batch.json says they are complete (DONEPROCESSING or ERROR) and whose
    completed_at lies in [start, end). A manifest that cannot be read is owned by the interval
    of its file's modification time, so that it is reported once, not by every run."""
    found = []
    for batch_id in zone.batch_ids():
        try:
            manifest = read_manifest(zone, batch_id, default_collection)
        except ManifestError:
            modified = zone.modified(batch_id, MANIFEST_NAME)
            if modified is not None and start <= modified < end:
                found.append(batch_id)
            continue
        if manifest is not None and manifest.is_ready and start <= manifest.completed_at < end:
            found.append(batch_id)
    return found


def find_unreported_batches(zone: LandingZone) -> list[str]:
    """Batches with a batch.json and no report of ours yet: what a manual run picks up."""
    return [
        batch_id
        for batch_id in zone.batch_ids()
        if zone.modified(batch_id, MANIFEST_NAME) is not None and zone.modified(batch_id, REPORT_NAME) is None
    ]
