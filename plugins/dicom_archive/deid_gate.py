"""The per-image de-identification gate of the batch contract, and its rules as plain functions.

A failing image is quarantined with every reason it fails and a detail for each. A detail names
attributes by their tag path (``RequestAttributesSequence[0].ScheduledPerformingPhysicianName``),
never their values, so that a report can never carry PHI.

The person-name and identifier rules are plain functions of a field name and a value
(`is_person_identifying_keyword`, `value_looks_like_person_name`, `person_value_allowed`,
`coded_id_value_allowed`, `judge_field`), so that anything else that reaches a row (lookup.json
values, flattened as ``A.B.C``) goes through the very same rules as the header.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from dicom_archive.naming import STUDY_DATE_RE, is_valid_coded_id


class Reason(StrEnum):
    PHI_FOLDER = "phi_folder"
    FLAGGED_IN_LOOKUP = "flagged_in_lookup"
    OUTSIDE_BATCH = "outside_batch"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too_large"
    NOT_DICOM = "not_dicom"
    MALFORMED_HEADER = "malformed_header"
    IDENTITY_NOT_REMOVED = "identity_not_removed"
    INVALID_PATIENT_ID = "invalid_patient_id"
    INVALID_ACCESSION_NUMBER = "invalid_accession_number"
    INVALID_STUDY_DATE = "invalid_study_date"
    BURNED_IN_ANNOTATION = "burned_in_annotation"
    IDENTIFYING_ATTRIBUTE = "identifying_attribute"
    PRIVATE_ATTRIBUTE = "private_attribute"
    BASIC_PROFILE = "basic_profile"


# The contract's list (check 6).
CONTRACT_PERSON_ATTRIBUTES: tuple[str, ...] = (
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
# Contact details and record locators of the same kind as the contract's PatientAddress and
# PatientTelephoneNumbers (PatientTelecomInformation is PatientTelephoneNumbers' successor, e-mail
# included). Not IssuerOfPatientID: deid's default recipe, the contract's example anonymizer, writes
# one into every image (the real-anonymizer tests' deid outputs all keep it), which the contract's
# checks pass.
CONTACT_PERSON_ATTRIBUTES: tuple[str, ...] = (
    "PatientTelecomInformation",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PersonAddress",
    "PersonTelephoneNumbers",
    "PersonTelecomInformation",
    "MedicalRecordLocator",
)
# What must hold no value unless the site removes it (DICOM_PERSON_ATTRIBUTES_REMOVED).
DEFAULT_PERSON_ATTRIBUTES: tuple[str, ...] = CONTRACT_PERSON_ATTRIBUTES + CONTACT_PERSON_ATTRIBUTES

# Checked at every depth whatever the configuration says (issue 11: names anywhere).
ALWAYS_PERSON_ATTRIBUTES: tuple[str, ...] = ("PatientBirthName",)

# Identifiers that may appear anywhere, but only holding the image's own coded ids (or nothing).
CODED_ID_ATTRIBUTES: tuple[str, ...] = ("PatientID", "OtherPatientIDs", "AccessionNumber")

# The attributes that may hold the coded patient id in place of a name.
NAME_MAY_BE_CODED_ID: frozenset[str] = frozenset({"PatientName", "OtherPatientIDs"})

PRIVATE_TAGS_MODES = ("strip", "quarantine")
DEID_PROFILES = ("contract", "basic")

# Coded-string flags: the only value that passes, compared exactly after trimming blanks.
IDENTITY_REMOVED_VALUE = "YES"
BURNED_IN_ANNOTATION_OK = "NO"


@dataclass(frozen=True)
class Quarantine:
    """One failed check: a reason code and a detail that names tags, never values."""

    reason: Reason
    detail: str = ""


@dataclass(frozen=True)
class PrivateAllow:
    """One `creator:gggg,xxee` pattern of DICOM_PRIVATE_ALLOW: element `ee` of any block that
    `creator` reserved in group `gggg` is kept as it is."""

    creator: str
    group: int
    element: int  # the low byte: the element's offset within its block

    PATTERN = re.compile(r"(?P<creator>[^:]+):(?P<group>[0-9A-Fa-f]{4}),[xX]{2}(?P<element>[0-9A-Fa-f]{2})")

    @classmethod
    def parse(cls, text: str) -> PrivateAllow:
        match = cls.PATTERN.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text.strip()!r} is not a creator:gggg,xxee pattern")
        group = int(match["group"], 16)
        if group % 2 == 0:
            raise ValueError(f"{text.strip()!r}: group {match['group']} is not a private (odd) group")
        return cls(match["creator"].strip(), group, int(match["element"], 16))

    def matches(self, creator: str | None, group: int, element: int) -> bool:
        return creator == self.creator and group == self.group and element & 0xFF == self.element

    def __str__(self) -> str:
        return f"{self.creator}:{self.group:04X},xx{self.element:02X}"


@dataclass(frozen=True)
class DeidPolicy:
    person_attributes: tuple[str, ...] = DEFAULT_PERSON_ATTRIBUTES
    max_image_bytes: int = 4 * 1024**3
    private_tags: str = "strip"  # strip | quarantine
    private_allow: tuple[PrivateAllow, ...] = ()
    profile: str = "contract"  # contract | basic
    profile_options: tuple[str, ...] = ()  # the batch's declared PS3.15 options (batch.json deid.options)
    # Defaults the site removed on purpose (DICOM_PERSON_ATTRIBUTES_REMOVED); recorded in reports.
    removed_person_attributes: tuple[str, ...] = ()
    # lookup.json fields a site declares on top of the DICOM keywords (DICOM_LOOKUP_FIELDS).
    lookup_fields: tuple[str, ...] = ()
    max_header_bytes: int = 64 * 1024**2  # everything but bulk data (pixel data) read to check a header
    max_depth: int = 16  # sequence nesting

    def __post_init__(self) -> None:
        if self.private_tags not in PRIVATE_TAGS_MODES:
            raise ValueError(f"private_tags must be one of {PRIVATE_TAGS_MODES}, not {self.private_tags!r}")
        if self.profile not in DEID_PROFILES:
            raise ValueError(f"profile must be one of {DEID_PROFILES}, not {self.profile!r}")

    @functools.cached_property
    def person_keywords(self) -> frozenset[str]:
        return frozenset(self.person_attributes) | frozenset(ALWAYS_PERSON_ATTRIBUTES)

    def private_allowed(self, creator: str | None, group: int, element: int) -> bool:
        return any(rule.matches(creator, group, element) for rule in self.private_allow)

    @functools.cached_property
    def allowed_creators(self) -> frozenset[str]:
        return frozenset(rule.creator for rule in self.private_allow)

    def describe(self) -> dict[str, object]:
        """What the batch report records about the gate (names of settings, never values of images)."""
        return {
            "profile": self.profile,
            "profile_options": list(self.profile_options),
            "private_tags": self.private_tags,
            "private_allow": [str(rule) for rule in self.private_allow],
            "person_attributes": list(self.person_attributes),
            "person_attributes_removed": list(self.removed_person_attributes),
            "lookup_fields": list(self.lookup_fields),
        }


@dataclass(frozen=True)
class StudyIdentity:
    entity_id: str
    study_date: str
    item_id: str


@dataclass
class Verdict:
    """All the failed checks of one image (empty: it passes), and its identity when valid."""

    failures: list[Quarantine] = field(default_factory=list)
    identity: StudyIdentity | None = None

    def fail(self, reason: Reason, detail: str) -> None:
        self.failures.append(Quarantine(reason, detail))

    @property
    def passed(self) -> bool:
        return not self.failures and self.identity is not None


# --- the rules, as plain functions ------------------------------------------------------------

# An index or item number in a flattened tag path (`Seq[0].Keyword`); one pattern for every path.
ITEM_INDEX = re.compile(r"\[\d*\]")
_NAME_SHAPE = re.compile(r"[^\W\d_][^\^=]*\^|\^\s*[^\W\d_]")  # a letter next to a component separator


def last_keyword(name: str) -> str:
    """`RequestAttributesSequence[0].ScheduledPerformingPhysicianName` -> the last keyword."""
    return ITEM_INDEX.sub("", name.strip()).rsplit(".", 1)[-1].strip()


@functools.lru_cache(maxsize=4096)
def keyword_vr(keyword: str) -> str | None:
    """The dictionary VR of a DICOM keyword, None when pydicom does not know the keyword."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword  # here: importing the settings stays light

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def is_dicom_keyword(keyword: str) -> bool:
    from pydicom.datadict import tag_for_keyword  # here: importing the settings stays light

    return tag_for_keyword(keyword) is not None


def is_person_identifying_keyword(name: str, person_attributes: Iterable[str] = DEFAULT_PERSON_ATTRIBUTES) -> bool:
    """A field that must not hold a value (a person's name, address, phone, other ids...).

    `name` may be a flattened path (`A.B.C`, `A[0].B`): its last keyword counts. Any keyword
    whose dictionary VR is PN is a person name, listed or not."""
    keyword = last_keyword(name)
    if keyword in ALWAYS_PERSON_ATTRIBUTES or keyword in set(person_attributes):
        return True
    return keyword_vr(keyword) == "PN"


def is_coded_id_keyword(name: str) -> bool:
    """PatientID, OtherPatientIDs, AccessionNumber: allowed only empty or equal to coded ids."""
    return last_keyword(name) in CODED_ID_ATTRIBUTES


def value_components(value: object) -> list[str]:
    """A DICOM value as its trimmed components (backslash-separated, or a list's items)."""
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    if isinstance(value, list | tuple):
        return [part for item in value for part in value_components(item)]
    return [part.strip(" \0") for part in str(value).split("\\")]


def holds_value(value: object) -> bool:
    return any(value_components(value))


def value_looks_like_person_name(value: object) -> bool:
    """A value shaped like a DICOM person name: a letter next to a `^` component separator
    (`DOE^JOHN`, `Smith^`, `^Jane`). Blank or coded ids never do."""
    return any(_NAME_SHAPE.search(part) for part in value_components(value))


def _name_groups(name: str) -> list[str]:
    """A person name's component groups (alphabetic, ideographic, phonetic), each without its trailing
    `^`s, trailing empty groups dropped: PS3.5 6.2 lets a writer keep or omit trailing empty
    components and groups with their delimiters, so `ID^^^^` is the name `ID`, and `^`, `^^^^`
    and `=` are empty names. A `^` before or between components is kept (`^ID` is not `ID`)."""
    groups = [group.rstrip("^") for group in name.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return groups


def person_value_allowed(value: object, entity_id: str | None, *, person_name: bool = False) -> bool:
    """A person name is allowed only empty or equal to the image's coded PatientID.

    `person_name`: the value is a PN (not an LO such as OtherPatientIDs, where `^` is a character
    like any other): each of its component groups that holds anything must be the coded id exactly
    (`ID^`, `ID=ID`, `^^^^` pass; `ID^JOHN`, `^ID`, `ID=JOHN` do not)."""
    for part in value_components(value):
        pieces = [group for group in _name_groups(part) if group] if person_name else [part] if part else []
        if any(entity_id is None or piece != entity_id for piece in pieces):
            return False
    return True


def person_name_holds_value(value: object) -> bool:
    """Whether a PN value holds anything but component and group delimiters (`^`, `=`)."""
    return any(_name_groups(part) for part in value_components(value))


def coded_id_value_allowed(value: object, coded_ids: Iterable[str | None]) -> bool:
    """An identifier is allowed only empty or equal to one of the image's coded ids."""
    allowed = {c for c in coded_ids if c}
    return all(part == "" or part in allowed for part in value_components(value))


def judge_field(
    name: str,
    value: object,
    *,
    entity_id: str | None,
    item_id: str | None,
    person_attributes: Iterable[str] = DEFAULT_PERSON_ATTRIBUTES,
) -> str | None:
    """Why a named value must not reach a row (None: it may). Never quotes the value.

    The header's rules, for a named value that comes from elsewhere (lookup.json, batch.json's
    deid): person-identifying names hold nothing (a patient name may hold the coded PatientID),
    identifiers hold only coded ids; and, stricter than for the header, whose free text a scanner
    may write with `^` (a StudyDescription `Head^Routine`), no value may be shaped like a person
    name."""
    if is_coded_id_keyword(name):
        if not coded_id_value_allowed(value, (entity_id, item_id)):
            return f"{name} holds an identifier other than the coded ids"
        return None
    if is_person_identifying_keyword(name, person_attributes):
        keyword = last_keyword(name)
        is_name = keyword_vr(keyword) == "PN"
        if keyword in NAME_MAY_BE_CODED_ID or is_name:
            if not person_value_allowed(value, entity_id, person_name=is_name):
                return f"{name} holds a person's name or identifier"
        elif holds_value(value):
            return f"{name} holds a value"
        return None
    if value_looks_like_person_name(value):
        return f"{name} holds a value shaped like a person's name"
    return None


def coded_flag(values: list[str], expected: str) -> str | None:
    """Why copies of a coded-string flag do not say exactly `expected` (None: they do).

    `values` holds each copy's raw text; a flag passes only when it occurs once, with a
    single value equal to `expected` after trimming blanks (`yes`, ` YES\\NO` do not)."""
    if not values:
        return "is missing"
    if len(values) > 1:
        return "occurs more than once"
    parts = values[0].split("\\")
    if len(parts) > 1:
        return "holds several values"
    text = parts[0].strip(" \0")
    if text == expected:
        return None
    if text == "":
        return "is empty"
    if text.upper() == expected:
        return f"is not exactly {expected} (wrong case)"
    return f"is not {expected}"


def valid_study_date(value: str | None) -> bool:
    if value is None or not STUDY_DATE_RE.fullmatch(value):
        return False
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


def check_identity(patient_id: str | None, accession: str | None, study_date: str | None, verdict: Verdict) -> None:
    """Check 4 of the contract: the coded ids and the study date that name the archive."""
    ok = True
    if not is_valid_coded_id(patient_id):
        verdict.fail(Reason.INVALID_PATIENT_ID, "PatientID is missing or not a coded id")
        ok = False
    if not is_valid_coded_id(accession):
        verdict.fail(Reason.INVALID_ACCESSION_NUMBER, "AccessionNumber is missing or not a coded id")
        ok = False
    if not valid_study_date(study_date):
        verdict.fail(Reason.INVALID_STUDY_DATE, "StudyDate is missing or not a valid YYYYMMDD date")
        ok = False
    if ok:
        verdict.identity = StudyIdentity(entity_id=patient_id, study_date=study_date, item_id=accession)  # type: ignore[arg-type]
