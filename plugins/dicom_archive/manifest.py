"""batch.json and lookup.json: parsing and validation against the batch contract."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dicom_archive.naming import BATCH_ID_RE, COLLECTION_RE

MANIFEST_NAME = "batch.json"
LOOKUP_NAME = "lookup.json"
REPORT_NAME = "batch.report.json"
# A SEND_TO_GOOGLE=false run's report: beside the real one, never in its place.
LOCAL_REPORT_NAME = "batch.report.local.json"
PHI_FOLDER = "PHI"

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
    batch_id: str
    collection: str
    status: str
    completed_at: datetime
    deid: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ready(self) -> bool:
        return self.status in (STATUS_DONE, STATUS_ERROR)

    @property
    def is_error(self) -> bool:
        return self.status == STATUS_ERROR


def _parse_json_object(raw: bytes, source: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(source, f"is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ManifestError(source, f"must be a JSON object, not {type(value).__name__}")
    return value


def parse_rfc3339(value: object, source: str, field_name: str) -> datetime:
    if not isinstance(value, str):
        raise ManifestError(source, f"{field_name} must be an RFC 3339 timestamp string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ManifestError(source, f"{field_name} {value!r} is not an RFC 3339 timestamp") from None
    if parsed.tzinfo is None or "T" not in value.upper():
        raise ManifestError(source, f"{field_name} {value!r} needs a date, a time and a UTC offset")
    return parsed.astimezone(UTC)


def parse_manifest(
    raw: bytes, *, folder_name: str, default_collection: str | None = None, source: str = MANIFEST_NAME
) -> BatchManifest:
    """Parse and validate batch.json. Unknown fields are ignored."""
    doc = _parse_json_object(raw, source)

    batch_id = doc.get("batch_id")
    if not isinstance(batch_id, str) or not BATCH_ID_RE.fullmatch(batch_id):
        raise ManifestError(source, f"batch_id {batch_id!r} must match {BATCH_ID_RE.pattern}")
    if batch_id != folder_name:
        raise ManifestError(source, f"batch_id {batch_id!r} must equal the folder name {folder_name!r}")

    collection = doc.get("collection", default_collection)
    if collection is None:
        raise ManifestError(
            source, "has no collection and no default collection is configured (GOOGLE_STORAGE_COLLECTION)"
        )
    if not isinstance(collection, str) or not COLLECTION_RE.fullmatch(collection):
        raise ManifestError(source, f"collection {collection!r} must match {COLLECTION_RE.pattern}")

    status = doc.get("status")
    if not isinstance(status, str) or not status:
        raise ManifestError(source, "status must be a non-empty string")

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


def is_under_phi_folder(relpath: str) -> bool:
    return relpath.split("/", 1)[0] == PHI_FOLDER


def is_control_file(relpath: str) -> bool:
    """Files of the contract (and our own report) that are not images."""
    return relpath in (MANIFEST_NAME, LOOKUP_NAME, REPORT_NAME, LOCAL_REPORT_NAME) or (
        "/" not in relpath and relpath.startswith(f".{MANIFEST_NAME}")
    )
