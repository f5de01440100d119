"""Planning a batch: validate the manifest, check every image's header, group into studies.

Only the header of each image is read here, all of it, at every depth and past the pixel data,
whose value is skipped by its length (header_walk); the archive step walks each header again,
then streams the file once, in full, and takes the sha256 and the row from that pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydicom.dataelem import RawDataElement, convert_raw_data_element

from dicom_archive.deflated import walked_image
from dicom_archive.deid_gate import DeidPolicy, Reason, StudyIdentity, keyword_vr
from dicom_archive.header_walk import HeaderWalk, WalkError, judge_header
from dicom_archive.landing import (
    MANIFEST_NAME,
    HeldImagesError,
    LandingFile,
    LandingZone,
    aliases,
    file_identity_of,
    is_under_phi_folder,
    shown_path,
)
from dicom_archive.manifest import (
    FLAG_FIELD,
    LOOKUP_NAME,
    BatchManifest,
    LookupMatch,
    ManifestError,
    PendingManifest,
    check_lookup_entry,
    is_control_file,
    is_flagged,
    is_keyword_path,
    keyword_path_of_any_item,
    match_lookup,
    parse_lookup,
    parse_manifest,
    shown_key,
)
from dicom_archive.naming import archive_object_name, archive_stem, batch_id_problem
from dicom_archive.values import dicom_value_to_json

HASH_CHUNK = 1024 * 1024
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
    # Only for an image that ties with another of its study on every header key: the sha256 of
    # the file, so that the order (the member names) follows the images, not their file names.
    tie_sha256: str = ""
    # What the file was when its header was checked (LandingZone.source_identity of the opened
    # file: device, inode, size, mtime and ctime; an object's generation): the archive step reads
    # only that file. Empty in a plan staged before it was recorded: identity unknown, and the
    # archive step refuses the image (fail closed).
    source_identity: dict[str, int] = field(default_factory=dict)
    # Fields of its lookup.json entry left out of its row (LookupCheck.withheld).
    lookup_withheld: list[str] = field(default_factory=list)

    def header_key(self) -> tuple:
        big = 2**63  # blank or repeated UIDs and numbers are allowed
        return (
            self.series_number if self.series_number is not None else big,
            self.series_uid,
            self.instance_number if self.instance_number is not None else big,
            self.sop_uid,
        )

    def sort_key(self) -> tuple:
        return (*self.header_key(), self.tie_sha256, self.relpath)


@dataclass
class QuarantinedImage:
    relpath: str
    reason: str
    detail: str = ""  # every failing check's detail, joined
    study: str | None = None  # the archive stem, when the header names a valid study
    failures: list[dict[str, str]] = field(default_factory=list)  # every failing check: reason, detail

    def all_failures(self) -> list[dict[str, str]]:
        return self.failures or [{"reason": self.reason, "detail": self.detail}]


@dataclass
class StudyGroup:
    collection: str
    batch_id: str
    entity_id: str
    study_date: str
    item_id: str
    images: list[ImageRecord] = field(default_factory=list)
    quarantined: int = 0  # images of this study that were held back
    deid_options: list[str] = field(default_factory=list)  # the batch's declared PS3.15 options
    # The batch's completed_at (RFC 3339, UTC): which of two batches sending the study is the newer
    # (publish.py). None in a plan staged by an earlier version.
    completed_at: str | None = None

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
    gate: dict[str, Any] = field(default_factory=dict)  # the de-identification gate's settings (DeidPolicy.describe)
    aliases: dict[str, str] = field(default_factory=dict)  # a second name of an image -> the name counted
    lookup_unmatched: list[str] = field(default_factory=list)  # lookup.json keys that name no image
    lookup_ambiguous: dict[str, list[str]] = field(default_factory=dict)  # key -> the images it names
    # batch.json itself cannot be used (or the batch id was refused): the batch fails its run
    # visibly, whatever collection its ERROR report is filed under. Not set for the anonymizer's
    # own status ERROR, nor for a broken lookup.json beside a valid batch.json: those batches end
    # ERROR without failing the run. False in a plan staged before it existed, whose broken
    # manifest shows by its missing collection (run_steps._failure_of).
    manifest_unusable: bool = False

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
        doc.pop("lookup_merged", None)  # staged by an earlier version (several keys for one image now fail)
        doc["groups"] = [StudyGroup.from_dict(g) for g in doc["groups"]]
        doc["quarantined"] = [QuarantinedImage(**q) for q in doc["quarantined"]]
        return cls(**doc)


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def inspect_image(
    zone: LandingZone,
    batch_id: str,
    file: LandingFile,
    lookup_entry: dict[str, Any] | None,
    policy: DeidPolicy,
) -> tuple[StudyIdentity, ImageRecord] | QuarantinedImage:
    """Every check of the contract for one image, on its whole header (the pixel data is
    skipped by its length, never read); the quarantine entry lists every check that fails."""

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
        with zone.open(batch_id, file.relpath, source=file.planned_source()) as stream:
            source = dict(zone.source_identity(stream))
            if not _is_listed_file(source, file):
                # Replaced between the listing (which judged its links and aliases) and the open.
                return quarantined(Reason.UNREADABLE, "changed or replaced while the batch was being checked")
            paths = _lookup_paths(lookup_entry)
            with walked_image(stream, file.size, policy, record=frozenset(paths.values())) as image:
                walk = image.walk
            source = source or dict(zone.source_identity(stream))  # a bucket names it once read
    except WalkError as err:
        return quarantined(err.reason, err.detail)
    except OSError as err:
        return quarantined(Reason.UNREADABLE, f"cannot be read: {err.strerror or type(err).__name__}")

    verdict = judge_header(walk, policy)
    if not verdict.passed:
        first = verdict.failures[0]
        held = QuarantinedImage(
            file.relpath,
            str(first.reason),
            "; ".join(f.detail for f in verdict.failures),
            failures=[{"reason": str(f.reason), "detail": f.detail} for f in verdict.failures],
        )
        if verdict.identity is not None:
            held.study = archive_stem(verdict.identity.entity_id, verdict.identity.study_date, verdict.identity.item_id)
        return held
    ds = walk.dataset()
    record = ImageRecord(
        relpath=file.relpath,
        size=file.size,
        header_length=walk.header_length,
        series_number=_int_or_none(ds.get("SeriesNumber")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        series_uid=str(ds.get("SeriesInstanceUID") or ""),
        sop_uid=str(ds.get("SOPInstanceUID") or ""),
        lookup=_without_header_conflicts(lookup_entry, paths, walk),
        source_identity=source,
    )
    return verdict.identity, record  # type: ignore[return-value]


def _lookup_paths(entry: dict[str, Any] | None) -> dict[str, str]:
    """The lookup.json fields that name a header attribute -> its path at any item."""
    return {key: keyword_path_of_any_item(key) for key in entry or {} if key != FLAG_FIELD and is_keyword_path(key)}


def _value_index(key: str) -> int | None:
    """`ImageType[1]`: the field is one value of a multi-valued attribute (not a sequence's item)."""
    last = key.rsplit(".", 1)[-1]
    if "[" not in last or keyword_vr(last.split("[", 1)[0]) == "SQ":
        return None
    return int(last.rsplit("[", 1)[1].rstrip("]"))


def _without_header_conflicts(
    entry: dict[str, Any] | None, paths: dict[str, str], walk: HeaderWalk
) -> dict[str, Any] | None:
    """The entry less its fields whose attribute the header holds with another value (at any item
    of a sequence path): the header's values win (the contract), and a header value the row's
    allow list leaves out is not replaced by the anonymizer's either."""

    def held(raw: RawDataElement, index: int | None) -> Any:
        try:
            value = dicom_value_to_json(convert_raw_data_element(raw).value)
        except Exception:  # a value pydicom cannot read: the header holds something all the same
            return raw.value
        if index is None:
            return value
        values = value if isinstance(value, list) else [value]
        return values[index] if index < len(values) else None

    conflicts = {
        key
        for key, path in paths.items()
        if any(
            value is not None and value != entry[key]
            for value in (held(raw, _value_index(key)) for raw in walk.recorded.get(path, []))
        )
    }
    return {k: v for k, v in entry.items() if k not in conflicts} if entry and conflicts else entry


def _is_listed_file(source: dict[str, int], file: LandingFile) -> bool:
    """Whether an opened local file is the one the listing stat'ed (its device:inode and size);
    a bucket's listing and reads name the same object (True)."""
    if "st_ino" not in source:
        return True
    return file_identity_of(source) == file.identity and source["size"] == file.size


def _hash_ties(zone: LandingZone, batch_id: str, images: list[ImageRecord]) -> None:
    """Give the images that tie on every header key their file's sha256 (reading them whole: only
    those, so a study of distinct UIDs or numbers costs nothing), so that the same images under
    other file names make the same archive."""
    ties = Counter(image.header_key() for image in images)
    for image in images:
        if ties[image.header_key()] > 1:
            digest = hashlib.sha256()
            with zone.open(batch_id, image.relpath, chunk_size=HASH_CHUNK, source=image.source_identity) as stream:
                while chunk := stream.read(HASH_CHUNK):
                    digest.update(chunk)
            image.tie_sha256 = digest.hexdigest()


def read_manifest(
    zone: LandingZone, batch_id: str, default_collection: str | None
) -> BatchManifest | PendingManifest | None:
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


def broken_manifest_plan(
    batch_id: str, error: str, default_collection: str | None, broken: ManifestError | None = None
) -> BatchPlan:
    """The ERROR plan of a batch whose batch.json cannot be used (`broken`: its error, when the
    document could be read). Its report is filed in the bucket under the collection the broken
    document still names (ManifestError.named_collection), else the default; with neither it stays
    beside the batch only. It keeps the valid completed_at the document still holds."""
    named, completed_at = (broken.named_collection, broken.completed_at) if broken else (None, None)
    collection = named or default_collection
    return BatchPlan(batch_id, collection, STATUS_ERROR, completed_at=completed_at, error=error, manifest_unusable=True)


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
    problem = batch_id_problem(batch_id)
    if problem is not None:
        # Checked before touching the landing zone: a requested id must not name a path.
        return BatchPlan(batch_id, None, STATUS_ERROR, error=problem, manifest_unusable=True)
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
                error=f"{zone.describe(batch_id, MANIFEST_NAME)}: its status means the batch is not ready yet "
                "(only DONEPROCESSING or ERROR are processed)",
            )
        raw_lookup = zone.read_bytes(batch_id, LOOKUP_NAME)
    except ManifestError as err:
        return broken_manifest_plan(batch_id, str(err), default_collection, err)
    try:
        # An empty lookup.json is not valid JSON either: it may have lost the flags it was written for.
        lookup = parse_lookup(raw_lookup, zone.describe(batch_id, LOOKUP_NAME)) if raw_lookup is not None else {}
    except ManifestError as err:
        # batch.json is valid: the ERROR report keeps its collection, so it reaches the bucket too.
        return BatchPlan(
            batch_id,
            manifest.collection,
            STATUS_ERROR,
            completed_at=manifest.completed_at.isoformat(),
            deid=manifest.deid,
            error=str(err),
        )

    options = manifest.deid.get("options") if isinstance(manifest.deid, dict) else None
    if isinstance(options, list):
        policy = dataclasses.replace(policy, profile_options=tuple(str(o) for o in options))
    plan = BatchPlan(
        batch_id=batch_id,
        collection=manifest.collection,
        status=STATUS_DONE,
        completed_at=manifest.completed_at.isoformat(),
        deid=manifest.deid,
        gate=policy.describe(),
    )
    if manifest.is_error:
        plan.status = STATUS_ERROR
        plan.error = f"{zone.describe(batch_id, MANIFEST_NAME)}: the anonymizer reported status ERROR"
        return plan

    try:
        files = [file for file in zone.list_files(batch_id) if not is_control_file(file.relpath)]
    except HeldImagesError as err:
        plan.status = STATUS_ERROR
        plan.error = (
            f"{zone.describe(batch_id, err.relpath)}: {err.problem} (nothing of the batch is uploaded rather "
            "than risk uploading an image held under PHI/ under another name)"
        )
        return plan
    matched = match_lookup(lookup, (file.relpath for file in files))
    plan.lookup_unmatched = [shown_key(key) for key in matched.unmatched]
    plan.lookup_ambiguous = {
        shown_key(key): [shown_path(i) for i in images] for key, images in matched.ambiguous.items()
    }
    unsafe = matched.unsafe_flags(lookup)
    if unsafe:
        plan.status = STATUS_ERROR
        plan.error = (
            f"{zone.describe(batch_id, LOOKUP_NAME)}: flagged entries that match no image, or several "
            "(compared after normalising `./`, `//`, backslashes, blanks, case and Unicode composition; "
            "nothing is uploaded rather than risk an unflagged image): "
            f"{', '.join(repr(shown_key(key)) for key in unsafe)}"
        )
        return plan
    held_identities = _held_identities(files, matched)
    second_names = _second_names(files, held_identities)
    groups: dict[StudyIdentity, StudyGroup] = {}
    for file in files:
        if file.relpath in second_names:
            plan.aliases[file.relpath] = second_names[file.relpath]  # a file reached twice counts once
            continue
        plan.images_seen += 1
        entry = matched.entries.get(file.relpath)
        if _held_by_link(file, entry, held_identities):
            plan.quarantined.append(
                QuarantinedImage(
                    file.relpath, str(Reason.PHI_FOLDER), "a link to an image under PHI/ or flagged in lookup.json"
                )
            )
            continue
        outcome = _check_lookup_values(inspect_image(zone, batch_id, file, entry, policy), entry, policy)
        if isinstance(outcome, QuarantinedImage):
            plan.quarantined.append(outcome)
            continue
        identity, record = outcome
        group = groups.get(identity)
        if group is None:
            group = groups[identity] = StudyGroup(
                manifest.collection,
                batch_id,
                identity.entity_id,
                identity.study_date,
                identity.item_id,
                deid_options=list(policy.profile_options),
                completed_at=plan.completed_at,
            )
        group.images.append(record)

    plan.groups = [groups[key] for key in sorted(groups, key=lambda k: (k.entity_id, k.study_date, k.item_id))]
    held_back = Counter(q.study for q in plan.quarantined if q.study)
    for group in plan.groups:
        _hash_ties(zone, batch_id, group.images)
        group.images = group.sorted_images()
        group.quarantined = held_back[group.stem]
    if not plan.groups:
        plan.status = STATUS_EMPTY
    return plan


def _held_identities(files: list[LandingFile], matched: LookupMatch) -> set[str]:
    """Identities of the files that are never uploaded under any name: under PHI/ or flagged."""
    return {
        file.identity
        for file in files
        if file.identity is not None
        and (is_under_phi_folder(file.relpath) or is_flagged(matched.entries.get(file.relpath)))
    }


def _second_names(files: list[LandingFile], held: set[str]) -> dict[str, str]:
    """Each further name of a file reached under several (hard or symbolic links) -> the name it is
    counted under. The names of a held file are all kept, so that each is quarantined and reported."""
    return {
        other.relpath: names[0].relpath
        for identity, names in aliases(files).items()
        if identity not in held
        for other in names[1:]
    }


def _held_by_link(file: LandingFile, entry: dict[str, Any] | None, held: set[str]) -> bool:
    """A name that is not itself under PHI/ or flagged, for a file that is (or links into PHI/)."""
    if is_under_phi_folder(file.relpath) or is_flagged(entry):
        return False  # quarantined under its own reason by inspect_image
    return file.identity in held or (file.link_target is not None and is_under_phi_folder(file.link_target))


def _check_lookup_values(
    outcome: tuple[StudyIdentity, ImageRecord] | QuarantinedImage,
    entry: dict[str, Any] | None,
    policy: DeidPolicy,
) -> tuple[StudyIdentity, ImageRecord] | QuarantinedImage:
    """An image whose lookup.json entry breaks the header's person-name or identifier rules is
    quarantined (identifying_attribute, the fields named, never their values): its entry is
    never staged nor loaded, and the anonymizer's output for that image is suspect. Fields the
    header's rules allow but that identify (a birth date, an issuer) are left out of the image's
    row. For an image already held back, the lookup's failures join its list (judged without
    its coded ids)."""
    if not entry or is_flagged(entry):
        return outcome
    identity = None if isinstance(outcome, QuarantinedImage) else outcome[0]
    checked = check_lookup_entry(
        entry,
        entity_id=identity.entity_id if identity else None,
        item_id=identity.item_id if identity else None,
        person_attributes=policy.person_attributes,
        declared_fields=policy.lookup_fields,
    )
    if isinstance(outcome, QuarantinedImage):
        if checked.violations and outcome.reason not in _NEVER_READ:
            failures = [*outcome.all_failures(), _lookup_failure(checked.violations)]
            outcome.failures = failures
            outcome.detail = "; ".join(f["detail"] for f in failures)
        return outcome
    identity, record = outcome
    if not checked.violations:
        if checked.withheld:
            record.lookup = {k: v for k, v in (record.lookup or {}).items() if k not in checked.withheld}
            record.lookup_withheld = checked.withheld
        return outcome
    failure = _lookup_failure(checked.violations)
    quarantined = QuarantinedImage(record.relpath, failure["reason"], failure["detail"], failures=[failure])
    quarantined.study = archive_stem(identity.entity_id, identity.study_date, identity.item_id)
    return quarantined


# Quarantined before the file is read: nothing else about them is judged.
_NEVER_READ = frozenset(str(r) for r in (Reason.PHI_FOLDER, Reason.FLAGGED_IN_LOOKUP, Reason.OUTSIDE_BATCH))


def _lookup_failure(broken: list[str]) -> dict[str, str]:
    return {"reason": str(Reason.IDENTIFYING_ATTRIBUTE), "detail": "lookup.json: " + "; ".join(broken)}


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
