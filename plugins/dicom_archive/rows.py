"""One BigQuery row per archived image, from its header, lookup.json and the stored object.

Only allow-listed header fields go into `DicomHeader`; the raw header never leaves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_archive import PIPELINE_VERSION
from dicom_archive.archive import ArchivedMember
from dicom_archive.plan import ImageRecord, StudyGroup
from dicom_archive.settings import DEFAULT_HEADER_ALLOW_LIST
from dicom_archive.stores import ARCHIVE_CONTENT_TYPE, StoredObject
from dicom_archive.values import dicom_value_to_json, dicom_value_to_text

# Row columns that come straight from the header, and only from it (never from lookup.json).
HEADER_COLUMNS: tuple[str, ...] = (
    "Modality", "StudyDescription", "SeriesDescription", "BodyPartExamined", "PatientSex",
    "PatientAge", "Manufacturer", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "SOPClassUID",
)  # fmt: skip


def header_fields(ds: Dataset, allow_list: Iterable[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for keyword in allow_list:
        element = ds.data_element(keyword) if keyword in ds else None
        if element is None:
            continue
        value = dicom_value_to_json(element.value)
        if value is not None:
            fields[keyword] = value
    return fields


def _header_text(ds: Dataset, keyword: str) -> str | None:
    return dicom_value_to_text(ds.get(keyword)) if keyword in ds else None


def _header_int(ds: Dataset, keyword: str) -> int | None:
    """An INTEGER column: None for a multi-valued or non-numeric element (no value is chosen)."""
    try:
        return int(ds.get(keyword))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _header_texts(ds: Dataset, keyword: str) -> list[str]:
    """A REPEATED STRING column: one string per value, empty values left out."""
    value = ds.get(keyword) if keyword in ds else None
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    return [text for text in map(dicom_value_to_text, values) if text is not None]


def _iso_date(yyyymmdd: str) -> str:
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:]}"


@dataclass(frozen=True)
class RunContext:
    """Who and what writes the rows."""

    upload_agent: str
    dag_run_id: str | None = None
    pipeline_version: str = PIPELINE_VERSION


def image_fields(
    ds: Dataset, image: ImageRecord, allow_list: Iterable[str] = DEFAULT_HEADER_ALLOW_LIST
) -> dict[str, Any]:
    """The columns that come from one image's header and its lookup.json entry.

    Typed columns come from the header alone; lookup.json values (already checked against the
    person-name and identifier rules when the batch was planned) go only into `DicomHeader`, each
    under its own key, and a header value of the same name wins. Taken as soon as the image is
    archived, so that its parsed header need not be kept."""
    lookup = {k: v for k, v in (image.lookup or {}).items() if k != "flagged"}
    fields: dict[str, Any] = {column: _header_text(ds, column) for column in HEADER_COLUMNS}
    fields.update(
        {
            "ImageType": _header_texts(ds, "ImageType"),
            "width": _header_int(ds, "Columns"),
            "height": _header_int(ds, "Rows"),
            "SeriesNumber": _header_int(ds, "SeriesNumber"),
            "InstanceNumber": _header_int(ds, "InstanceNumber"),
            # Header values win over lookup.json values on conflict.
            "DicomHeader": {**lookup, **header_fields(ds, allow_list)},
        }
    )
    return fields


def build_row(
    *,
    group: StudyGroup,
    member: ArchivedMember,
    stored: StoredObject,
    deid: dict[str, Any],
    context: RunContext,
) -> dict[str, Any]:
    """One image's row: its identity in the study, its header fields, the stored archive."""
    return {
        "collection": group.collection,
        "batch_id": group.batch_id,
        "entity_id": group.entity_id,
        "item_id": group.item_id,
        "PatientID": group.entity_id,
        "AccessionNumber": group.item_id,
        "CodedPatientID": group.entity_id,
        "CodedAccessionNumberID": group.item_id,
        "StudyDate": _iso_date(group.study_date),
        **member.fields,
        "instance_sha256": member.sha256,
        "source_sha256": member.source_sha256 or None,
        "private_elements_removed": member.private_elements_removed,
        "archive_member": member.member_name,
        "storage_uri": stored.uri,
        "storage_bucket": stored.bucket,
        "storage_name": stored.name,
        "storage_md5Hash": stored.md5,
        "storage_crc32c": stored.crc32c,
        "storage_generation": stored.generation,
        "storage_size": stored.size,
        "storage_download": stored.media_link,
        "storage_metadataLink": stored.self_link,
        "ContentType": ARCHIVE_CONTENT_TYPE,
        # When the archive was written: the object's creation time, so a rerun that finds
        # the object already present produces the very same row.
        "uploaded_at": stored.created,
        "upload_agent": context.upload_agent,
        "dag_run_id": context.dag_run_id,
        "pipeline_version": context.pipeline_version,
        "deid_software": _str_or_none(deid.get("software")),
        "deid_recipe": _str_or_none(deid.get("recipe")),
    }


def _str_or_none(value: object) -> str | None:
    """A provenance value as text: a string as written, anything else as compact JSON (a list of
    recipes reads as one, never as Python's spelling of it)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
