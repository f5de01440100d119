"""batch.json and lookup.json: parsing and validation against the batch contract."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, ClassVar

from pydicom.datadict import keyword_dict, keyword_for_tag

from dicom_archive.deid_gate import DEFAULT_PERSON_ATTRIBUTES, judge_field
from dicom_archive.landing import PHI_FOLDER, is_under_phi_folder, normalise_relpath  # noqa: F401  (re-exported)
from dicom_archive.naming import BATCH_ID_RE, batch_id_problem, collection_problem

MANIFEST_NAME = "batch.json"
LOOKUP_NAME = "lookup.json"
REPORT_NAME = "batch.report.json"
FLAG_FIELD = "flagged"
# A SEND_TO_GOOGLE=false run's report: beside the real one, never in its place.
LOCAL_REPORT_NAME = "batch.report.local.json"

STATUS_DONE = "DONEPROCESSING"
STATUS_ERROR = "ERROR"


class ManifestError(ValueError):
    """A manifest or lookup file that breaks the contract; the message names file and rule."""

    def __init__(self, source: str, rule: str) -> None:
        super().__init__(f"{source}: {rule}")
        self.source = source
        self.rule = rule


@dataclass(frozen=True)
class BatchManifest:
    """The manifest of a complete batch (status DONEPROCESSING or ERROR)."""

    batch_id: str
    collection: str
    status: str
    completed_at: datetime
    deid: dict[str, Any] = field(default_factory=dict)

    is_ready: ClassVar[bool] = True

    @property
    def is_error(self) -> bool:
        return self.status == STATUS_ERROR


@dataclass(frozen=True)
class PendingManifest:
    """The manifest of a batch the anonymizer has not finished: any status but DONEPROCESSING or
    ERROR. Its other fields are not judged yet (they may still be written)."""

    batch_id: str
    status: str

    is_ready: ClassVar[bool] = False
    is_error: ClassVar[bool] = False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_json_object(raw: bytes, source: str) -> dict[str, Any]:
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ManifestError(source, f"is not valid JSON ({why})") from None
    if not isinstance(value, dict):
        raise ManifestError(source, f"must be a JSON object, not {type(value).__name__}")
    return value


# RFC 3339 section 5.6 date-time: full date, "T" (or a blank), full time with seconds, an offset.
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII)


def parse_rfc3339(value: object, source: str, field_name: str) -> datetime:
    """An RFC 3339 timestamp in UTC. A leap second (:60) is the next second; fractions beyond
    microseconds are cut."""
    if not isinstance(value, str):
        raise ManifestError(source, f"{field_name} must be an RFC 3339 timestamp string")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ManifestError(
            source,
            f"{field_name} {value!r} is not an RFC 3339 timestamp: it needs a date, a time and a UTC offset"
            " (e.g. 2024-01-05T09:30:00Z)",
        )
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    micro = int((match[7] or ".0")[1:7].ljust(6, "0"))
    offset = "+00:00" if match[8] in "Zz" else match[8]
    try:
        local = datetime.fromisoformat(
            f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{min(second, 59):02d}.{micro:06d}{offset}"
        )
        if second == 60:
            local += timedelta(seconds=1)
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ManifestError(source, f"{field_name} {value!r} is not an RFC 3339 timestamp: no such instant") from None


def parse_manifest(
    raw: bytes, *, folder_name: str, default_collection: str | None = None, source: str = MANIFEST_NAME
) -> BatchManifest | PendingManifest:
    """Parse and validate batch.json. Unknown fields are ignored. The batch id is checked first,
    then the status: a batch that is not complete yet is pending, whatever its other fields say."""
    doc = _parse_json_object(raw, source)

    batch_id = doc.get("batch_id")
    if batch_id_problem(batch_id) is not None:
        shown = repr(batch_id) if not isinstance(batch_id, str) or len(batch_id) <= 60 else f"{batch_id[:60]!r}..."
        raise ManifestError(source, f"batch_id {shown} must match {BATCH_ID_RE.pattern} without '..'")
    if batch_id != folder_name:
        raise ManifestError(source, f"batch_id {batch_id!r} must equal the folder name {folder_name!r}")

    status = doc.get("status")
    if not isinstance(status, str) or not status:
        raise ManifestError(source, "status must be a non-empty string")
    if status not in (STATUS_DONE, STATUS_ERROR):
        return PendingManifest(batch_id, status)

    collection = doc.get("collection")  # null is absent
    if collection is None:
        collection = default_collection
    if collection is None:
        raise ManifestError(
            source, "has no collection and no default collection is configured (GOOGLE_STORAGE_COLLECTION)"
        )
    problem = collection_problem(collection)
    if problem is not None:
        raise ManifestError(source, problem)

    completed_at = parse_rfc3339(doc.get("completed_at"), source, "completed_at")

    deid = doc.get("deid") or {}
    if not isinstance(deid, dict):
        raise ManifestError(source, "deid must be an object when present")

    return BatchManifest(batch_id, collection, status, completed_at, deid)


def parse_lookup(raw: bytes, source: str = LOOKUP_NAME) -> dict[str, dict[str, Any]]:
    """Parse lookup.json: image path relative to the batch (POSIX) -> metadata object."""
    doc = _parse_json_object(raw, source)
    for key, value in doc.items():
        if not isinstance(value, dict):
            raise ManifestError(source, f"the entry for {key!r} must be an object")
        if value.get("flagged") is not None and not isinstance(value["flagged"], bool):
            # Fail closed: a flag that is neither true nor false must not let the image through.
            raise ManifestError(source, f"the entry for {key!r}: flagged must be true or false")
    return doc


def is_flagged(lookup_entry: dict[str, Any] | None) -> bool:
    return bool(lookup_entry) and lookup_entry.get("flagged") is True


# Our own temporary name while the report is replaced (see LocalLandingZone.write_bytes).
REPORT_TEMP_NAME = f".{REPORT_NAME}.tmp"
LOCAL_REPORT_TEMP_NAME = f".{LOCAL_REPORT_NAME}.tmp"
OWN_FILES = frozenset(
    {MANIFEST_NAME, LOOKUP_NAME, REPORT_NAME, REPORT_TEMP_NAME, LOCAL_REPORT_NAME, LOCAL_REPORT_TEMP_NAME}
)


def is_control_file(relpath: str) -> bool:
    """Files of the contract and our own report, matched by their exact names at the top of the
    batch: every other file counts as seen and is archived or quarantined, whatever its name
    (an image called `.batch.json.x.dcm` included)."""
    return relpath in OWN_FILES


# ---------------------------------------------------------------------------------------------
# lookup.json keys: which image each entry is for (fails closed)


def lookup_key(path: str) -> str:
    """The form under which lookup keys and image paths are compared: the landing zone's
    normalisation (`./`, `//`, backslashes, blanks), then case-insensitive, so that a key in
    another case still reaches its image; two images that differ only in case make the key
    ambiguous, never a silent miss."""
    return normalise_relpath(path).casefold()


@dataclass
class LookupMatch:
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # image path -> its (merged) entry
    unmatched: list[str] = field(default_factory=list)  # keys that match no image
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # key -> the images it matches
    merged: dict[str, list[str]] = field(default_factory=dict)  # image -> its keys, when several

    def unsafe_flags(self, lookup: dict[str, dict[str, Any]]) -> list[str]:
        """Keys that carry `flagged: true` but name no image, or several: the batch must fail."""
        return sorted(k for k in (*self.unmatched, *self.ambiguous) if is_flagged(lookup.get(k)))


def match_lookup(lookup: dict[str, dict[str, Any]], relpaths: Iterable[str]) -> LookupMatch:
    """lookup.json's entries by image path. A key matching several images is applied to none of
    them (reported; fatal with a flag); several keys for one image are merged, a flag from any wins."""
    images: dict[str, list[str]] = {}
    for relpath in relpaths:
        images.setdefault(lookup_key(relpath), []).append(relpath)
    match = LookupMatch()
    keys_of: dict[str, list[str]] = {}
    for key in sorted(lookup):
        found = images.get(lookup_key(key), [])
        if not found:
            match.unmatched.append(key)
        elif len(found) > 1:
            match.ambiguous[key] = sorted(found)
        else:
            keys_of.setdefault(found[0], []).append(key)
    for relpath, keys in keys_of.items():
        entry: dict[str, Any] = {}
        for key in keys:
            entry.update(lookup[key])
        if any(is_flagged(lookup[key]) for key in keys):
            entry[FLAG_FIELD] = True
        match.entries[relpath] = entry
        if len(keys) > 1:
            match.merged[relpath] = keys
    return match


# ---------------------------------------------------------------------------------------------
# lookup.json values: the header's person-name and identifier rules, by field name and by shape

# Identifying attributes that a lookup value must never carry, on top of the person attributes.
LOOKUP_IDENTIFYING_ATTRIBUTES: tuple[str, ...] = (
    "PatientBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "IssuerOfPatientID",
    "MedicalRecordLocator",
    "PatientTelephoneNumbers",
    "PersonTelephoneNumbers",
    "PatientAddress",
    "PersonAddress",
    "OtherPatientIDsSequence",
)
_TAG_NAME = re.compile(r"\(?([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\)?")
_INDEX = re.compile(r"\[[^\]]*\]")


@cache
def _keywords_by_loose_name() -> dict[str, str]:
    return {_loose(keyword): keyword for keyword in keyword_dict}


def _loose(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.casefold())


def field_keyword(field_name: str) -> str | None:
    """The DICOM keyword a lookup field is about: its last `A.B.C` component, indexes (`[0]`)
    dropped, matched to pydicom's dictionary exactly, then ignoring case, blanks and `_`
    (`patient_name` is PatientName), or written as a tag (`(0010,0010)`, `00100010`)."""
    last = _INDEX.sub("", field_name).strip().rsplit(".", 1)[-1].strip()
    if last in keyword_dict:
        return last
    tag = _TAG_NAME.fullmatch(last)
    if tag:
        return keyword_for_tag(int(tag.group(1) + tag.group(2), 16)) or None
    return _keywords_by_loose_name().get(_loose(last))


def _leaves(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field path, text) for every scalar in a lookup value; nested objects extend the path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item, path)
    elif value is not None and not isinstance(value, bool):
        yield path, str(value).strip()


def lookup_violations(
    entry: dict[str, Any],
    *,
    entity_id: str | None,
    item_id: str | None,
    person_attributes: Iterable[str] = DEFAULT_PERSON_ATTRIBUTES,
) -> list[str]:
    """What in one image's lookup entry breaks the header's rules (deid.judge_field): `field (rule)`
    strings, never the values. A field is judged by the DICOM keyword it names (field_keyword:
    flattened, indexed, snake-cased or tag-numbered names included) and by the shape of its value
    (a letter next to `^`); nested objects and lists are judged value by value. On top of the
    header's rules, the birth date, address and telephone attributes must hold nothing."""
    found: dict[str, str] = {}
    for name, value in entry.items():
        if name == FLAG_FIELD:
            continue
        for path, text in _leaves(value, name):
            if not text:
                continue
            keyword = field_keyword(path)
            why = judge_field(
                keyword or path, text, entity_id=entity_id, item_id=item_id, person_attributes=person_attributes
            )
            if why is None and keyword in LOOKUP_IDENTIFYING_ATTRIBUTES:
                why = f"{keyword} holds a value"
            if why is not None:
                found.setdefault(path, why)
    return [f"{path} ({why})" for path, why in sorted(found.items())]
