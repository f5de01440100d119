"""The per-image de-identification check of the batch contract.

A failing image is quarantined with a reason code and a detail. The detail names attributes,
never their values, so that a report can never carry PHI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from pydicom.dataset import Dataset

from dicom_archive.naming import STUDY_DATE_RE, is_valid_coded_id


class Reason(StrEnum):
    PHI_FOLDER = "phi_folder"
    FLAGGED_IN_LOOKUP = "flagged_in_lookup"
    OUTSIDE_BATCH = "outside_batch"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too_large"
    NOT_DICOM = "not_dicom"
    IDENTITY_NOT_REMOVED = "identity_not_removed"
    INVALID_PATIENT_ID = "invalid_patient_id"
    INVALID_ACCESSION_NUMBER = "invalid_accession_number"
    INVALID_STUDY_DATE = "invalid_study_date"
    BURNED_IN_ANNOTATION = "burned_in_annotation"
    IDENTIFYING_ATTRIBUTE = "identifying_attribute"


DEFAULT_PERSON_ATTRIBUTES: tuple[str, ...] = (
    "PatientName",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "NameOfPhysiciansReadingStudy",
)


@dataclass(frozen=True)
class Quarantine:
    reason: Reason
    detail: str = ""


@dataclass(frozen=True)
class DeidPolicy:
    person_attributes: tuple[str, ...] = DEFAULT_PERSON_ATTRIBUTES
    max_image_bytes: int = 4 * 1024**3


@dataclass(frozen=True)
class StudyIdentity:
    entity_id: str
    study_date: str
    item_id: str


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    return str(value).strip()


def _holds_value(ds: Dataset, keyword: str) -> bool:
    element = ds.get(keyword)
    if element is None:
        return False
    if isinstance(element, Iterable) and not isinstance(element, str | bytes):
        return any(str(v).strip() for v in element)
    return str(element).strip() != ""


def valid_study_date(value: str | None) -> bool:
    if value is None or not STUDY_DATE_RE.fullmatch(value):
        return False
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


def check_header(ds: Dataset, policy: DeidPolicy) -> StudyIdentity | Quarantine:
    """Checks 3 to 6 of the contract on a parsed header (1 and 2 happen before parsing)."""
    if _text(ds, "PatientIdentityRemoved") != "YES":
        return Quarantine(Reason.IDENTITY_NOT_REMOVED, "PatientIdentityRemoved is not YES")

    entity_id = _text(ds, "PatientID")
    if not is_valid_coded_id(entity_id):
        return Quarantine(Reason.INVALID_PATIENT_ID, "PatientID is missing or not a coded id")
    item_id = _text(ds, "AccessionNumber")
    if not is_valid_coded_id(item_id):
        return Quarantine(Reason.INVALID_ACCESSION_NUMBER, "AccessionNumber is missing or not a coded id")
    study_date = _text(ds, "StudyDate")
    if not valid_study_date(study_date):
        return Quarantine(Reason.INVALID_STUDY_DATE, "StudyDate is missing or not a valid YYYYMMDD date")

    if _text(ds, "BurnedInAnnotation") == "YES":
        return Quarantine(Reason.BURNED_IN_ANNOTATION, "BurnedInAnnotation is YES")

    filled = [
        keyword
        for keyword in policy.person_attributes
        if _holds_value(ds, keyword) and not (keyword == "PatientName" and _text(ds, keyword) == entity_id)
    ]
    if filled:
        return Quarantine(Reason.IDENTIFYING_ATTRIBUTE, "holds a value: " + ", ".join(filled))

    return StudyIdentity(entity_id=entity_id, study_date=study_date, item_id=item_id)  # type: ignore[arg-type]
