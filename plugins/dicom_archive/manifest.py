"""batch.json and lookup.json: parsing and validation against the batch contract."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, ClassVar

from pydicom.datadict import DicomDictionary, RepeatersDictionary, keyword_dict, keyword_for_tag

from dicom_archive.deid_gate import (
    ALWAYS_PERSON_ATTRIBUTES,
    CODED_ID_ATTRIBUTES,
    DEFAULT_PERSON_ATTRIBUTES,
    ITEM_INDEX,
    coded_id_value_allowed,
    judge_field,
    keyword_vr,
    last_keyword,
    value_looks_like_person_name,
)
from dicom_archive.landing import LOCAL_REPORT_NAME, MANIFEST_NAME, REPORT_NAME, normalise_relpath
from dicom_archive.naming import BATCH_ID_RE, batch_id_problem, collection_problem, kind_of

LOOKUP_NAME = "lookup.json"
FLAG_FIELD = "flagged"

# batch.json's own status values (the anonymizer's): not a plan's status (plan.STATUS_*).
MANIFEST_STATUS_DONE = "DONEPROCESSING"
MANIFEST_STATUS_ERROR = "ERROR"


class ManifestError(ValueError):
    """A manifest or lookup file that breaks the contract; the message names file and rule.
    `named_collection`: for a batch.json that reads as a JSON object, the collection it names when
    that name passes the collection rules (where the ERROR report is filed in the bucket: never a
    name the manifest itself would refuse, a path or too long); else None. `completed_at`: likewise,
    the completed_at it holds when that one passes parse_rfc3339 (RFC 3339, UTC), for the ERROR
    report; else None."""

    def __init__(self, source: str, rule: str) -> None:
        super().__init__(f"{source}: {rule}")
        self.source = source
        self.rule = rule
        self.named_collection: str | None = None
        self.completed_at: str | None = None


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
        return self.status == MANIFEST_STATUS_ERROR


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
    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # A key written twice in one object: json keeps the last copy and drops the first, which
        # may be a flag or a value someone meant. Refused at any depth; the key is not quoted.
        if len({key for key, _ in pairs}) != len(pairs):
            raise ManifestError(source, "has a key that occurs twice in the same object (duplicate keys are refused)")
        return dict(pairs)

    try:
        value = json.loads(raw, object_pairs_hook=unique_keys, parse_constant=_reject_constant)
    except ManifestError:
        raise
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
            f"{field_name} is not an RFC 3339 timestamp: it needs a date, a time and a UTC offset"
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
        raise ManifestError(source, f"{field_name} is not an RFC 3339 timestamp: no such instant") from None


def parse_manifest(
    raw: bytes, *, folder_name: str, default_collection: str | None = None, source: str = MANIFEST_NAME
) -> BatchManifest | PendingManifest:
    """Parse and validate batch.json. Unknown fields are ignored. The batch id is checked first,
    then the status: a batch that is not complete yet is pending, whatever its other fields say."""
    doc = _parse_json_object(raw, source)
    try:
        return _manifest_of(doc, folder_name, default_collection, source)
    except ManifestError as err:
        named = doc.get("collection")
        err.named_collection = named if collection_problem(named, show_value=False) is None else None
        with contextlib.suppress(ManifestError):  # nothing unvalidated reaches the report
            err.completed_at = parse_rfc3339(doc.get("completed_at"), source, "completed_at").isoformat()
        raise


def _manifest_of(
    doc: dict[str, Any], folder_name: str, default_collection: str | None, source: str
) -> BatchManifest | PendingManifest:
    batch_id = doc.get("batch_id")
    if batch_id_problem(batch_id) is not None:
        raise ManifestError(source, f"batch_id {kind_of(batch_id)} must match {BATCH_ID_RE.pattern} without '..'")
    if batch_id != folder_name:
        raise ManifestError(source, f"batch_id must equal the folder name {folder_name!r}")

    status = doc.get("status")
    if not isinstance(status, str) or not status:
        raise ManifestError(source, "status must be a non-empty string")
    if status not in (MANIFEST_STATUS_DONE, MANIFEST_STATUS_ERROR):
        return PendingManifest(batch_id, status)

    collection = doc.get("collection")  # null is absent
    if collection is None:
        collection = default_collection
    if collection is None:
        raise ManifestError(
            source, "has no collection and no default collection is configured (GOOGLE_STORAGE_COLLECTION)"
        )
    problem = collection_problem(collection, show_value=False)
    if problem is not None:
        raise ManifestError(source, problem)

    completed_at = parse_rfc3339(doc.get("completed_at"), source, "completed_at")

    deid = doc.get("deid") or {}
    if not isinstance(deid, dict):
        raise ManifestError(source, "deid must be an object when present")
    check_deid(deid, source)

    return BatchManifest(batch_id, collection, status, completed_at, deid)


def check_deid(deid: dict[str, Any], source: str = MANIFEST_NAME) -> None:
    """batch.json's deid provenance is carried into every row and report: its keys and values go
    through the lookup.json rules (deid_violations, no coded ids). Raises ManifestError naming the
    rule and the fields (the contract's and DICOM keywords; any other by its position), never a
    value or another field's name."""
    broken = deid_violations(deid)
    if broken:
        raise ManifestError(source, "deid breaks the person-name and identifier rules: " + "; ".join(broken))


def parse_lookup(raw: bytes, source: str = LOOKUP_NAME) -> dict[str, dict[str, Any]]:
    """Parse lookup.json: image path relative to the batch (POSIX) -> metadata object.

    Fails closed on anything that could lose a flag: a key twice in one object (at any depth),
    two image keys that name the same path once normalised (`./a`, `A`), a flag that is not
    true or false, and a key that looks like the flag but is not exactly `flagged` at the top of
    an entry (`Flagged`, ` flagged`, `is_flagged`, a nested `flagged`). Messages never quote the
    keys found at fault."""
    doc = _parse_json_object(raw, source)
    seen: set[str] = set()
    for key, value in doc.items():
        if not isinstance(value, dict):
            raise ManifestError(source, f"the entry for {shown_key(key)!r} must be an object")
        if FLAG_FIELD in value and not isinstance(value[FLAG_FIELD], bool):
            # Fail closed: a flag that is neither true nor false must not let the image through.
            raise ManifestError(source, f"the entry for {shown_key(key)!r}: flagged must be true or false")
        if any(_looks_like_flag(name) for name in _key_names(value, top=True)):
            raise ManifestError(
                source,
                'an entry has a key that resembles the flag but is not exactly "flagged" at the top of the '
                "entry (another case, blanks, punctuation, a prefix, or nested): refused rather than guessed",
            )
        normal = lookup_key(key)
        if normal in seen:
            raise ManifestError(source, SEVERAL_KEYS_RULE)
        seen.add(normal)
    return doc


def is_flagged(lookup_entry: dict[str, Any] | None) -> bool:
    return bool(lookup_entry) and lookup_entry.get(FLAG_FIELD) is True


def _looks_like_flag(name: str) -> bool:
    """A key another writer may have meant as the flag: `flagged` in any case, with blanks or
    punctuation, with a prefix or suffix (`is_flagged`, `PHI-Flagged`), or `flag` alone.
    No DICOM keyword contains `flagged`; those that end in `Flag` are not `flag` alone."""
    loose = _loose(name)
    return "flagged" in loose or loose in ("flag", "isflag", "phiflag", "flagphi")


def _key_names(value: Any, *, top: bool = False) -> Iterator[str]:
    """Every key of a lookup entry at any depth (inside lists too), except the entry's own flag."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not (top and key == FLAG_FIELD):
                yield key
            yield from _key_names(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _key_names(item)


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


SEVERAL_KEYS_RULE = (
    "two image keys name the same path once normalised (`./`, `//`, backslashes, blanks, case, "
    "Unicode composition NFC): "
    "refused rather than one entry merged into or over the other"
)


def lookup_key(path: str) -> str:
    """The form under which lookup keys and image paths are compared: the landing zone's
    normalisation (`./`, `//`, backslashes, blanks, NFC), then case-insensitive, so that a key in
    another case still reaches its image; two images that differ only in case make the key
    ambiguous, never a silent miss."""
    return normalise_relpath(path).casefold()


NAME_SHAPED_KEY = "(a key shaped like a person's name, not shown)"


def shown_key(key: str) -> str:
    """An image key of lookup.json as a report or an error may show it: not when it is shaped like
    a person's name (a letter next to `^`), as the keys of an entry are never shown."""
    return NAME_SHAPED_KEY if value_looks_like_person_name(key) else key


@dataclass
class LookupMatch:
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # image path -> its entry
    unmatched: list[str] = field(default_factory=list)  # keys that match no image
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # key -> the images it matches

    def unsafe_flags(self, lookup: dict[str, dict[str, Any]]) -> list[str]:
        """Keys that carry `flagged: true` but name no image, or several: the batch must fail."""
        return sorted(k for k in (*self.unmatched, *self.ambiguous) if is_flagged(lookup.get(k)))


def match_lookup(lookup: dict[str, dict[str, Any]], relpaths: Iterable[str]) -> LookupMatch:
    """lookup.json's entries by image path. A key matching several images is applied to none of
    them (reported; fatal with a flag). Several keys for one image are refused (ManifestError),
    as parse_lookup does before: neither may silently win."""
    images: dict[str, list[str]] = {}
    for relpath in relpaths:
        images.setdefault(lookup_key(relpath), []).append(relpath)
    match = LookupMatch()
    for key in sorted(lookup):
        found = images.get(lookup_key(key), [])
        if not found:
            match.unmatched.append(key)
        elif len(found) > 1:
            match.ambiguous[key] = sorted(found)
        elif found[0] in match.entries:
            raise ManifestError(LOOKUP_NAME, SEVERAL_KEYS_RULE)
        else:
            match.entries[found[0]] = lookup[key]
    return match


# ---------------------------------------------------------------------------------------------
# lookup.json values: the header's person-name and identifier rules, by field name and by shape

# Identifying attributes, on top of the person attributes, that the header's rules let a value
# stay in (deid's default recipe writes IssuerOfPatientID and a coded PatientBirthDate): in
# lookup.json they keep no image back, but their values never reach a row (LookupCheck.withheld).
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
# The same kinds of attribute under any keyword: PatientTelecomInformation, ReferringPhysicianAddress,
# PatientBirthDateInAlternativeCalendar, RegionOfResidence, IssuerOfAdmissionID...
_IDENTIFYING_KEYWORD = re.compile(
    r"Birth|Address|Telephone|Telecom|Residence|Locator|^IssuerOf(?:Patient|Admission|ServiceEpisode)ID"
)


def is_lookup_identifying(keyword: str | None) -> bool:
    """A birth, address, telephone, residence or record-issuer attribute: one the header's rules
    let hold a value, kept out of the rows (LOOKUP_IDENTIFYING_ATTRIBUTES and its kinds)."""
    return bool(keyword) and (keyword in LOOKUP_IDENTIFYING_ATTRIBUTES or bool(_IDENTIFYING_KEYWORD.search(keyword)))


# A plain field name: dotted segments, each an identifier (letters, digits, `_`; not a digit
# first) with optional `[n]` indexes, an item number, or a DICOM tag in one of its spellings
# (`(0010,0010)`, `0x00100010`, `0010-0010`, `[0010 0010]`). Blanks, `^`, `=`, `,`, quotes and
# letters outside ASCII are not: a key like `DOE^JOHN` or `Doe, John` is a value written as a key.
_FIELD_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])*|\d+(?:\[\d+\])*")
_TAG_SEGMENT = re.compile(r"[(\[]?\s*(?:0x)?[0-9A-F]{4}\s*[-,:_/ ]?\s*(?:0x)?[0-9A-F]{4}\s*[)\]]?", re.IGNORECASE)
NOT_A_FIELD_NAME = (
    "a key that is not a plain field name (letters, digits and `_`, dotted, indexed `[n]`, or a DICOM tag; "
    "the key is not quoted)"
)
# A tag once letters and digits only are kept: `(0010,0010)`, `0x0010,0x0010`, `0010-0010`, `tag 00100010`.
_LOOSE_TAG = re.compile(r"(?:tag)?(?:0x)?([0-9a-f]{4})(?:0x)?([0-9a-f]{4})")
_INDEX = re.compile(r"(?<=[\w)\]])\[\s*\d*\s*\]")  # `A[0]`; a bracketed tag `[00100010]` is not an index


def is_plain_field_name(name: str) -> bool:
    """Whether a key may be a field's name (see _FIELD_SEGMENT); a flattened `A.B[0].C` is judged
    segment by segment."""
    return all(_FIELD_SEGMENT.fullmatch(part) or _TAG_SEGMENT.fullmatch(part) for part in name.split("."))


@cache
def _keywords_by_loose_name() -> dict[str, str]:
    """pydicom's keywords and descriptive names (`Patient's Name`, `Referring Physician's Name`:
    older spellings such as `PatientsName`), letters and digits only -> keyword; keywords win."""
    names = {_loose(name): keyword for name, keyword in ((entry[2], entry[4]) for entry in DicomDictionary.values())}
    names.update({_loose(keyword): keyword for keyword in keyword_dict})
    names.pop("", None)
    return names


def _loose(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.casefold())


def _tag_keyword(text: str) -> str | None:
    tag = _LOOSE_TAG.fullmatch(_loose(text))
    return (keyword_for_tag(int(tag[1] + tag[2], 16)) or None) if tag else None


def field_keyword(field_name: str) -> str | None:
    """The DICOM keyword a lookup field is about: its last `A.B.C` component, indexes (`[0]`)
    dropped, matched to pydicom's dictionary exactly; else written as a tag with any separator
    or none (`(0010,0010)`, `0x00100010`, `0010-0010`, `0010.0010`); else its letters and digits
    matched to a keyword or a descriptive name ignoring case (`patient_name`, `PatientsName`),
    with or without its final `Name` (`ReferringPhysician`)."""
    parts = [part.strip() for part in _INDEX.sub("", field_name).split(".")]
    last = parts[-1]
    if last in keyword_dict:
        return last
    for candidate in (last, ".".join(parts[-2:])):
        keyword = _tag_keyword(candidate)
        if keyword is not None:
            return keyword
    names = _keywords_by_loose_name()
    # `ReferringPhysician`, `Operators`, `Patient`: a person's name with `Name` left out.
    keyword = names.get(_loose(last)) or names.get(_loose(last) + "name")
    # Last, the identifying keywords only, with plurals and possessives blurred (`OtherPatientID`,
    # `PatientsID`, `NameOfPhysicianReadingStudy`, `PatientMothersBirthName`).
    return keyword or _identifying_by_skeleton().get(_skeleton(last))


def _skeleton(name: str) -> str:
    """Letters and digits without any `s` and without a final `name`: spelling slips that do not
    change which attribute is meant."""
    blurred = _loose(name).replace("s", "")
    return blurred.removesuffix("name") or blurred


@cache
def _identifying_keywords() -> frozenset[str]:
    """The person-name, identifier and identifying attributes: every PN keyword and the lists."""
    return frozenset(
        {
            *DEFAULT_PERSON_ATTRIBUTES,
            *ALWAYS_PERSON_ATTRIBUTES,
            *CODED_ID_ATTRIBUTES,
            *LOOKUP_IDENTIFYING_ATTRIBUTES,
            *(keyword for keyword in keyword_dict if keyword and keyword_vr(keyword) == "PN"),
        }
    )


@cache
def _identifying_by_skeleton() -> dict[str, str]:
    """The skeleton of each identifying attribute (by keyword and by descriptive name) -> its keyword."""
    identifying = _identifying_keywords()
    found: dict[str, str] = {}
    for entry in DicomDictionary.values():
        if entry[4] in identifying:
            found.setdefault(_skeleton(entry[4]), entry[4])
            found.setdefault(_skeleton(entry[2]), entry[4])
    return found


# Words of a field that is not a DICOM attribute but is named for a person's name, contact or
# record number (`Surname`, `PatientFullName`, `ReferringDoctor`, `HomeAddress`, `MRN`, `AccessionNo`,
# `Radiologist`, `ReviewedBy`): such a field may hold nothing but the coded ids, and may not be
# declared in DICOM_LOOKUP_FIELDS. Short ones count only as the whole name.
_PERSON_FIELD_WORDS = (
    "surname",
    "firstname",
    "givenname",
    "familyname",
    "lastname",
    "middlename",
    "fullname",
    "maidenname",
    "nickname",
    "patientname",
    "patientid",
    "personname",
    "accession",
    "physician",
    "doctor",
    "medicalrecord",
    "socialsecurity",
    "birthdate",
    "dateofbirth",
    "address",
    "telephone",
    "phone",
    "email",
    "operator",
    "observer",
    "radiologist",
    "technologist",
    "reviewer",
    "reviewedby",
    "readby",
    "signedby",
    "verifiedby",
    "responsible",
    "person",
    "birthname",
    "author",
    "nurse",
    "surgeon",
    "initials",
)
_PERSON_FIELD_NAMES = ("dob", "mrn", "ssn")


def names_a_person_field(field_name: str) -> bool:
    """Whether a field that names no DICOM attribute is named for a person's name, contact or
    record number (see _PERSON_FIELD_WORDS)."""
    if _loose(field_name) == "name":
        return True  # a bare top-level `Name` (a nested `software.name` is not)
    loose = _loose(_INDEX.sub("", field_name).rsplit(".", 1)[-1])
    return loose in _PERSON_FIELD_NAMES or any(word in loose for word in _PERSON_FIELD_WORDS)


# ---------------------------------------------------------------------------------------------
# lookup.json field names: an allow list. A deny-list cannot tell a name (`Gregory_House`,
# `MRN_7731904`) from a field name, nor a person field under a spelling it does not know
# (`OperatorsName2`, `x00100010`, `Radiologist`): a field is accepted only when it is a DICOM
# keyword, a flattened sequence path of keywords, or a name the site declares.

LOOKUP_FIELDS_SETTING = "DICOM_LOOKUP_FIELDS"
# batch.json's deid provenance: the contract's fields (software, recipe and options are carried).
DEID_FIELDS = frozenset({"software", "recipe", "options"})
# A keyword segment of a flattened path with optional indexes (`ImageType[0]`); an index or an item
# number (`Seq.0.Keyword`) has at most four digits: a longer number could be a record number.
_KEYWORD_SEGMENT = re.compile(r"([A-Za-z][A-Za-z0-9]*)((?:\[[0-9]{1,4}\])*)")
_ITEM_NUMBER = re.compile(r"[0-9]{1,4}")
# A name a site may declare (DICOM_LOOKUP_FIELDS): an ASCII identifier.
_DECLARED_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


@cache
def _dictionary_keywords() -> frozenset[str]:
    """Every keyword of pydicom's dictionary (public, retired and repeating groups included)."""
    return frozenset(entry[4] for entry in (*DicomDictionary.values(), *RepeatersDictionary.values())) - {""}


def is_keyword_path(name: str) -> bool:
    """A DICOM keyword, exact case (`CTDIvol`), or a flattened sequence path whose every segment
    is one, each but the last a sequence (`RequestAttributesSequence.RequestedProcedureDescription`,
    `Seq[0].Keyword`, `Seq.0.Keyword`). No other case, no look-alike letters, no tag numbers
    (`00100010` could as well be a record number)."""
    segments = name.split(".")
    after_sequence = False
    for position, segment in enumerate(segments, start=1):
        last = position == len(segments)
        if after_sequence and not last and _ITEM_NUMBER.fullmatch(segment):
            after_sequence = False  # an item number: a keyword must follow
            continue
        match = _KEYWORD_SEGMENT.fullmatch(segment)
        if match is None or match[1] not in _dictionary_keywords():
            return False
        after_sequence = keyword_vr(match[1]) == "SQ"
        if not last and not after_sequence:
            return False
    return True


def keyword_path_of_any_item(name: str) -> str:
    """A keyword path with its item numbers left out (`Seq[0].Keyword`, `Seq.0.Keyword` ->
    `Seq.Keyword`): the path at any item, as header_walk records values."""
    return ".".join(ITEM_INDEX.sub("", part) for part in name.split(".") if not _ITEM_NUMBER.fullmatch(part))


def declared_field_problem(name: str) -> str | None:
    """Why a name may not be declared in DICOM_LOOKUP_FIELDS (None: it may): it must be an ASCII
    identifier, not the flag, and not a person-name, identifier or contact field under another
    spelling (`PatientsName`, `Surname`, `MRN`): declaring never re-admits one."""
    if not _DECLARED_NAME.fullmatch(name):
        return "not a plain field name (an ASCII letter, then letters, digits or _; at most 64)"
    if _looks_like_flag(name):
        return "the flag, not a field"
    keyword = field_keyword(name)
    if keyword is not None and name not in _dictionary_keywords() and keyword in _identifying_keywords():
        return f"another spelling of {keyword}"
    if keyword is None and names_a_person_field(name):
        return "named for a person's name, contact or record number"
    return None


def unaccepted_field_rule(where: str) -> str:
    """The detail of a lookup field that is not accepted: its position, never its text."""
    return (
        f"{where} of this image's entry is not a DICOM keyword nor a field declared in "
        f"{LOOKUP_FIELDS_SETTING} (the field is not quoted)"
    )


def _texts(value: Any) -> Iterator[tuple[str, bool]]:
    """(text, whether it is a key) for every scalar of a field's value and every key of its
    objects: under a field that is not a sequence, a key is a value of that field too
    (`{"OtherPatientIDs": {"7731904": true}}`)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, True
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)
    elif value is not None and not isinstance(value, bool):
        yield str(value), False


@dataclass
class _EntryCheck:
    """One walk of a lookup entry (or batch.json's deid): each field's value judged under the field
    it is accepted as; a field that is not accepted is named by its position only."""

    accept: Callable[[str, bool], bool]  # (key, at the top) -> accepted
    unaccepted_is_violation: bool
    entity_id: str | None
    item_id: str | None
    person_attributes: frozenset[str]
    withhold: bool = True  # a LOOKUP_IDENTIFYING_ATTRIBUTES value: withheld (else a violation)
    found: dict[str, str] = field(default_factory=dict)  # shown field -> rule
    unaccepted: list[str] = field(default_factory=list)  # positions
    withheld: list[str] = field(default_factory=list)  # fields at the top of the entry
    _top: str = ""  # the field at the top of the entry being walked

    def walk(self, entry: dict[str, Any], prefix: str = "") -> None:
        for position, (key, value) in enumerate(entry.items(), start=1):
            if not prefix and key == FLAG_FIELD:
                continue
            if not prefix:
                self._top = key
            if not self.accept(key, not prefix):
                where = f"field {position}" + (f" of {prefix}" if prefix else "")
                if self.unaccepted_is_violation:
                    self.unaccepted.append(where)
                else:  # judged by what its name resembles, shown by its position
                    self.judge(where, key if is_plain_field_name(key) else "", value)
                continue
            path = f"{prefix}.{key}" if prefix else key
            if keyword_vr(last_keyword(key)) == "SQ" and isinstance(value, dict | list):
                items = value if isinstance(value, list) else [value]
                for index, item in enumerate(items):
                    inner = f"{path}[{index}]" if isinstance(value, list) else path
                    if isinstance(item, dict):
                        self.walk(item, inner)
                    else:
                        self.judge(inner, "", item)
            else:
                self.judge(path, key, value)

    def judge(self, shown: str, name: str, value: Any) -> None:
        """`name` (a field's own name, or "" for none) decides the rules; `shown` is what a report
        may show of it."""
        keyword = field_keyword(name) if name else None
        for text, is_key in _texts(value):
            if is_key and not is_plain_field_name(text):
                self.found.setdefault(shown, NOT_A_FIELD_NAME)
                return
            text = text.strip()
            if not text:
                continue
            why = judge_field(
                keyword or shown,
                text,
                entity_id=self.entity_id,
                item_id=self.item_id,
                person_attributes=self.person_attributes,
            )
            if why is None and (is_lookup_identifying(keyword) or (is_key and self._names_identifying(text))):
                # A key under a field that is not a sequence naming such an attribute, or a person's
                # name or id (`{"StudyDescription": {"PatientBirthDate": ...}}`): its value is one too.
                if self.withhold:
                    if self._top not in self.withheld:
                        self.withheld.append(self._top)
                    return
                why = f"{keyword or shown} holds a value"
            named_for_a_person = keyword is None and bool(name) and names_a_person_field(name)
            if why is None and named_for_a_person and not coded_id_value_allowed(text, (self.entity_id, self.item_id)):
                why = f"{shown} is named for a person's name, contact or record number and holds a value"
            if why is not None:
                self.found.setdefault(shown, why)
                return

    def _names_identifying(self, key: str) -> bool:
        keyword = field_keyword(key)
        if keyword is None:  # a plain word (`name`, `model`): a value like any other of its field
            return False
        return (
            is_lookup_identifying(keyword)
            or keyword in CODED_ID_ATTRIBUTES
            or keyword_vr(keyword) == "PN"
            or keyword in self.person_attributes
        )

    def violations(self) -> list[str]:
        return [unaccepted_field_rule(where) for where in self.unaccepted] + [
            f"{shown} ({why})" for shown, why in sorted(self.found.items())
        ]


@dataclass(frozen=True)
class LookupCheck:
    """What one image's lookup.json entry breaks (`field (rule)` strings, never a value: the image
    is quarantined), and its fields whose values stay out of the row (the image is archived)."""

    violations: list[str]
    withheld: list[str]


def check_lookup_entry(
    entry: dict[str, Any],
    *,
    entity_id: str | None,
    item_id: str | None,
    person_attributes: Iterable[str] = DEFAULT_PERSON_ATTRIBUTES,
    declared_fields: Collection[str] = (),
) -> LookupCheck:
    """Judge one image's lookup.json entry.

    Every field must be accepted (is_keyword_path, or at the top of the entry a name in
    `declared_fields`, DICOM_LOOKUP_FIELDS), at any depth (the fields of a sequence's items
    too); one that is not is named by its position, never by its text (unaccepted_field_rule).
    The value of an accepted field goes through the header's person-name and identifier rules
    (deid.judge_field) by its keyword, and by its shape (a letter next to `^`); a declared field,
    by the keyword it resembles or as named for a person (field_keyword, names_a_person_field).
    Keys of an object under a field that is not a sequence are that field's values, and must be
    plain field names (NOT_A_FIELD_NAME: `DOE^JOHN`, `Doe, John`). A field holding a birth date,
    address, telephone or issuer attribute (LOOKUP_IDENTIFYING_ATTRIBUTES) with a value, which
    the header's rules allow, is withheld: the top field of the entry holding it is left out of
    the row."""
    declared = frozenset(declared_fields)
    check = _EntryCheck(
        accept=lambda key, top: (top and key in declared) or is_keyword_path(key),
        unaccepted_is_violation=True,
        entity_id=entity_id,
        item_id=item_id,
        person_attributes=frozenset(person_attributes),
    )
    check.walk(entry)
    return LookupCheck(check.violations(), check.withheld)


def deid_violations(deid: dict[str, Any]) -> list[str]:
    """check_lookup_entry's violations for batch.json's deid provenance: the contract's fields (DEID_FIELDS)
    and DICOM keywords are named; any other field is ignored like an unknown field of batch.json,
    but its value is still judged (by what its name resembles) and it is shown by position."""
    check = _EntryCheck(
        accept=lambda key, top: key in DEID_FIELDS or is_keyword_path(key),
        unaccepted_is_violation=False,
        entity_id=None,
        item_id=None,
        person_attributes=frozenset(DEFAULT_PERSON_ATTRIBUTES),
        withhold=False,  # the provenance reaches every row whole
    )
    check.walk(deid)
    broken = check.violations()
    if not all(is_plain_field_name(name) for name in _key_names(deid)):
        broken.insert(0, NOT_A_FIELD_NAME)
    return broken
