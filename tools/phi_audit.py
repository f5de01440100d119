"""PHI leak audit: look for identifying values of the raw (pre-anonymization) data in what the pipeline wrote.

    python -m tools.phi_audit --raw RAW [--raw RAW ...] --outputs OUT [--outputs OUT ...]
                              [--reports LANDING_ROOT ...] [--bigquery PROJECT.DATASET.TABLE ...] [--json]

RAW is a folder of raw DICOM files (searched recursively, lookup.json files included), one DICOM file, a
raw lookup.json, or a JSON list of identifying values (strings, or {"value": ..., "category": ...}
objects; `python -m tools.landing_zone demo --identifiers FILE` writes one). OUT is a local output
folder (SEND_TO_GOOGLE=false) or a `gs://bucket[/prefix]`; LANDING_ROOT is a landing zone (local or
gs://) of which only the `<batch>/batch.report.json` files are read (the landing zone itself still
holds the quarantined images, which may carry PHI on purpose). Exit code 1 when anything is found,
0 when clean, 2 on a usage error. A finding names the place, the field and the category of the
identifier, never the identifier itself: it is masked (first and last character) and fingerprinted
(`#` + 8 hex of its sha256).

What is collected from raw DICOM files (anywhere in the dataset, inside sequences too): PatientName,
OtherPatientNames, PatientBirthName, PatientMotherBirthName and every other person name (PN) element,
with their components; PatientID, OtherPatientIDs, IssuerOfPatientID, MedicalRecordLocator;
PatientBirthDate; PatientAddress; telephone numbers; InstitutionName, InstitutionAddress,
InstitutionalDepartmentName; AccessionNumber; StudyID; private elements of unknown VR whose value is
shaped like a name (a letter next to `^`); every copy of a duplicated top-level element (read raw).
From raw lookup.json files (given as files, or found in a RAW folder): values of fields that name one
of those keywords (last `A.B.C` component, case, blanks and `_` ignored) and values shaped like names.

A value is skipped when it is too short or too generic to mean anything (it would match by chance):
  - fewer than 4 letters or digits (`DOE`, `CT1`, `----`);
  - only digits (separators aside) and fewer than 6 of them (`3610`, `-0500`);
  - one character repeated (`00000000`, `11111111`, `XXXX`): a placeholder;
  - a common word or placeholder (GENERIC_VALUES: `ANONYMOUS`, `UNKNOWN`, `PATIENT`, `HOSPITAL`...);
  - from a DICOM file: contained in that file's Manufacturer or ManufacturerModelName (a vendor name
    such as an institution called `TOSHIBA` next to the manufacturer `TOSHIBA_MEC`; the
    manufacturer is kept in the outputs on purpose).

Variants searched for each value: the value itself; for a person name (or any value with `^`) each
component and "given family"; for a date YYYYMMDD also YYYY-MM-DD; for a phone number its digits alone.

Matching is case-insensitive on normalised text: casefold, DICOM `^` separators turned into spaces,
runs of white space collapsed, on both sides. A value of 8 or more characters matches anywhere; a
shorter one, or one made of digits only, must not touch a letter or digit on either side (`1CT1`
is found in `Entity/1CT1/x` and `1CT1_2004`, not in `X1CT12`; `19650101` not inside a longer number
such as a UID).

What is scanned: object names (file paths under a local folder, object names in a bucket); in every
`.tar.gz`/`.tgz`/`.tar`, each member name and, for DICOM members, the 128-byte preamble (printable
runs: no element holds it and no reader shows it), every element of the header at any
depth (file meta, sequences, private elements; text values decoded, binary values of type OB/UN/OW
searched for printable runs; pixel data and values over 1 MiB skipped), then every top-level element
again read raw in file order (what a parsed view hides: the other copies of a duplicated element,
bytes of sequences it could not place; elements after the pixel data are in both walks), other
members as text; JSON and NDJSON files (report, staged plan and rows, BigQuery rows written locally)
key by key and value by value, a string that holds JSON (a JSON column read back as text) decoded
too; other small files as text; BigQuery rows (every column) when tables are given.

Library:

    identifiers = identifiers_from_dicom([raw_folder])          # list[Identifier]
    findings = audit(identifiers + ["DOE^JANE"], [out_folder, "gs://bucket/prefix"],
                     bigquery_tables=["proj.IRB41449.dicom"], reports=[landing_root])
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

REPORT_NAME = "batch.report.json"
LOOKUP_NAME = "lookup.json"
MIN_CHARS = 4  # letters or digits
PREAMBLE_BYTES = 128  # before `DICM` in a Part 10 file
MIN_DIGITS = 6  # for a value made of digits only
ANYWHERE_LENGTH = 8  # normalised values at least this long match inside other words too
MAX_VALUE_BYTES = 1024 * 1024  # larger element values (pixel data, blobs) are not searched
MAX_TEXT_FILE_BYTES = 16 * 1024 * 1024  # larger files of unknown kind: only their names are searched
SPOOL_BYTES = 64 * 1024 * 1024  # archive members up to this size stay in memory

GENERIC_VALUES = frozenset(
    (
        "anonymous", "anonymized", "anonymised", "anon", "unknown", "none", "null", "nil", "n/a", "test",
        "testing", "patient", "patients", "phantom", "removed", "deidentified", "de-identified", "redacted",
        "empty", "blank", "other", "male", "female", "doctor", "physician", "radiologist", "operator",
        "technologist", "user", "admin", "administrator", "default", "sample", "demo", "hospital", "clinic",
        "radiology", "imaging", "medical", "center", "centre", "department", "institution", "yes", "true",
        "false",
    )
)  # fmt: skip

# Identifying keywords collected from raw files, with their category. Every PN element counts too.
IDENTIFYING_KEYWORDS: dict[str, str] = {
    "PatientName": "patient_name",
    "OtherPatientNames": "patient_name",
    "PatientBirthName": "patient_name",
    "PatientMotherBirthName": "patient_name",
    "PatientID": "patient_id",
    "OtherPatientIDs": "patient_id",
    "IssuerOfPatientID": "patient_id",
    "MedicalRecordLocator": "patient_id",
    "PatientBirthDate": "birth_date",
    "PatientAddress": "address",
    "PatientTelephoneNumbers": "phone",
    "PersonTelephoneNumbers": "phone",
    "ReferringPhysicianTelephoneNumbers": "phone",
    "ReferringPhysicianAddress": "address",
    "PersonAddress": "address",
    "InstitutionName": "institution",
    "InstitutionAddress": "institution",
    "InstitutionalDepartmentName": "institution",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
}
PERSON_NAME_CATEGORY = "person_name"  # any other PN element: physicians, operators...

_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_BLOB_VRS = frozenset({"OB", "OW", "UN"})  # may hide text (private blobs); searched for printable runs
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{4,}")
_WHITESPACE = re.compile(r"\s+")
_ALNUM = re.compile(r"[^\W_]")
_DIGIT_SEPARATORS = re.compile(r"[\s\-./()+]")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_CONTROL_RUN = re.compile(r"[\x00-\x1f\x7f]+")
# The same shape as the gate's (dicom_archive.deid_gate), written again on purpose: the audit imports
# nothing of the pipeline it audits, so that a gap in the gate's rules cannot hide a leak from it too.
_NAME_SHAPE = re.compile(r"[^\W\d_][^\^=]*\^|\^\s*[^\W\d_]")  # a letter next to a `^` separator


# ---------------------------------------------------------------------------------------------
# Identifiers


@dataclass(frozen=True)
class Identifier:
    """One identifying value of the raw data and what kind of value it is."""

    value: str
    category: str = "identifier"


@dataclass(frozen=True)
class Finding:
    location: str  # the folder, file, bucket URI or table scanned
    where: str  # object name, archive member name, DICOM header, row, report, JSON file, text
    field: str  # the object / member / element / JSON path that holds the value
    category: str  # the identifier's category
    masked: str  # the identifier, masked, with a fingerprint

    def __str__(self) -> str:
        return f"{self.location}: {self.where}: {self.field}: {self.category} {self.masked}"


def normalize(text: str) -> str:
    """Case-insensitive, DICOM PN `^` as spaces, white space collapsed."""
    return _WHITESPACE.sub(" ", text.replace("^", " ").casefold()).strip()


def is_meaningful(value: str) -> bool:
    """False for values too short or too generic to be evidence of a leak (see the module doc)."""
    norm = normalize(value)
    alnum = _ALNUM.findall(norm)
    if len(alnum) < MIN_CHARS:
        return False
    if _DIGIT_SEPARATORS.sub("", norm).isdigit() and len(alnum) < MIN_DIGITS:
        return False
    if len(set(alnum)) == 1:
        return False
    return norm not in GENERIC_VALUES and norm.strip(".-, ") not in GENERIC_VALUES


def mask(value: str) -> str:
    """The value with all but its first and last character hidden, plus a fingerprint."""
    norm = normalize(value)
    shown = norm[0] + "*" * (len(norm) - 2) + norm[-1] if len(norm) >= 6 else norm[:1] + "*" * (len(norm) - 1)
    return f"{shown} #{hashlib.sha256(norm.encode()).hexdigest()[:8]}"


def _variants(value: str, category: str) -> list[str]:
    value = value.strip()
    found = [value]
    if "^" in value or category in ("patient_name", PERSON_NAME_CATEGORY):
        for group in value.split("="):  # alphabetic, ideographic, phonetic groups
            parts = [p.strip() for p in group.split("^")]
            found.append(group)
            found.extend(p for p in parts if p)
            if len(parts) >= 2 and parts[0] and parts[1]:
                found.append(f"{parts[1]} {parts[0]}")  # "given family"
    if category == "birth_date" or _DATE.fullmatch(value):
        date = _DATE.fullmatch(value)
        if date:
            found.append("-".join(date.groups()))
    if category == "phone":
        digits = re.sub(r"\D", "", value)
        if len(digits) >= 7:
            found.append(digits)
    return found


def expand(identifiers: Iterable[str | Identifier], *, exclude: Iterable[str] = ()) -> list[Identifier]:
    """Variants of each value, without the meaningless ones, deduplicated on their normalised form."""
    excluded = [normalize(e) for e in exclude if e and normalize(e)]
    seen: dict[str, Identifier] = {}
    for item in identifiers:
        ident = item if isinstance(item, Identifier) else Identifier(str(item))
        for variant in _variants(ident.value, ident.category):
            norm = normalize(variant)
            if not is_meaningful(variant) or any(norm in e for e in excluded):
                continue
            seen.setdefault(norm, Identifier(variant, ident.category))
    return list(seen.values())


Element = DataElement | RawDataElement


def _vr(tag: int, element: Element) -> str | None:
    """The element's VR; from the dictionary when the file does not say (implicit VR)."""
    if element.VR:
        return str(element.VR)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None  # a private element of an implicit VR file: searched like a blob


def _iter_elements(ds: Dataset, path: str = "") -> Iterator[tuple[str, Element, str, str | None]]:
    """(path, element, keyword, VR) for every element at any depth; deferred values stay unread."""
    for tag in sorted(ds.keys()):
        element = ds.get_item(tag, keep_deferred=True)
        if element is None:
            continue
        keyword = keyword_for_tag(tag) or ""
        label = f"{path}{Tag(tag)}{' ' + keyword if keyword else ''}"
        vr = _vr(tag, element)
        if vr == "SQ" or isinstance(element.value, DicomSequence):
            try:
                items = ds[tag].value
            except Exception:  # an unparsable sequence: search its bytes instead
                yield label, element, keyword, "UN"
                continue
            for index, item in enumerate(items or []):
                yield from _iter_elements(item, f"{label}[{index}].")
            continue
        yield label, element, keyword, vr


def _element_texts(element: Element, vr: str | None, encodings: list[str]) -> list[str]:
    """The searchable text of an element's value (none for numbers, pixels and big blobs)."""
    if int(element.tag) in _PIXEL_TAGS:
        return []
    value = element.value
    if value is None:  # deferred: larger than what is searched
        return []
    if isinstance(value, bytes | bytearray):
        if len(value) > MAX_VALUE_BYTES:
            return []
        if vr in _TEXT_VRS:
            for encoding in (*encodings, "utf-8", "latin-1"):
                try:
                    return [value.decode(encoding).replace("\x00", " ")]
                except (UnicodeDecodeError, LookupError):
                    continue
        if vr in _BLOB_VRS or vr is None:
            try:
                text = value.decode("utf-8")
                if text.isprintable():
                    return [text]
            except UnicodeDecodeError:
                pass
            return [run.decode("ascii") for run in _PRINTABLE_RUN.findall(value)]
        return []  # binary numbers (US, SL, FD...) hold no text
    if isinstance(value, list | tuple | MultiValue):
        return [str(v) for v in value]
    return [str(value)]


def _raw_elements(stream: BinaryIO) -> Iterator[tuple[str, int, bytes]]:
    """(label, tag, value bytes) for every top-level data element of a Part 10 file, in file order:
    each copy of a duplicated element, and the elements after the pixel data too (whose value is
    skipped by its length, never read). Sequences of defined length come as their raw bytes.

    A parsed dataset holds only the last copy of an element: this walk sees what the parser
    hides. Nothing for a deflated file (its dataset is compressed)."""
    stream.seek(0)
    read_preamble(stream, force=True)
    meta = _read_file_meta_info(stream)
    syntax = meta.get("TransferSyntaxUID")
    if syntax == DeflatedExplicitVRLittleEndian:
        return
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    copies: dict[int, int] = {}
    for element in data_element_generator(stream, implicit, little, defer_size=MAX_VALUE_BYTES):
        tag = int(element.tag)
        copies[tag] = copies.get(tag, 0) + 1
        value = element.value
        if tag in _PIXEL_TAGS or not isinstance(value, bytes | bytearray) or len(value) > MAX_VALUE_BYTES:
            continue
        yield f"raw element {Tag(tag)} (copy {copies[tag]})", tag, bytes(value)


def _raw_texts(value: bytes, encodings: list[str]) -> list[str]:
    """Text runs of an undecoded value: control bytes (lengths, tags of nested items) split runs."""
    text = value.decode("latin-1")
    for encoding in (*encodings, "utf-8"):
        try:
            text = value.decode(encoding)
            break
        except (UnicodeDecodeError, LookupError):
            continue
    return [run for run in _CONTROL_RUN.split(text) if len(run) >= MIN_CHARS]


def _encodings(ds: Dataset) -> list[str]:
    try:
        charset = ds.get("SpecificCharacterSet") or "ISO_IR 6"
        names = [charset] if isinstance(charset, str) else list(charset)
        return [python_encoding[name] for name in names if name in python_encoding]
    except Exception:  # a damaged charset element: fall back to UTF-8 and Latin-1
        return []


def _read_dataset(stream: BinaryIO) -> Dataset | None:
    try:
        return pydicom.dcmread(stream, force=True, defer_size=MAX_VALUE_BYTES)
    except Exception:
        return None


def _dicom_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path} does not exist")


def _is_dicom_prefix(prefix: bytes) -> bool:
    return prefix[128:132] == b"DICM"


def identifiers_from_dicom(paths: Iterable[str | os.PathLike[str]]) -> list[Identifier]:
    """The identifying values of raw DICOM files (folders are searched recursively).

    Files without the DICM marker are ignored. Values that are too short or generic are dropped
    (see the module doc), as are values contained in the file's Manufacturer/ManufacturerModelName.
    """
    found: list[Identifier] = []
    for path in _dicom_files(paths):
        with open(path, "rb") as stream:
            if not _is_dicom_prefix(stream.read(132)):
                continue
            stream.seek(0)
            ds = _read_dataset(stream)
        if ds is None:
            continue
        device = [str(ds.get(k, "") or "") for k in ("Manufacturer", "ManufacturerModelName")]
        raw: list[Identifier] = []
        encodings = _encodings(ds)
        for _label, element, keyword, vr in _iter_elements(ds):
            category = IDENTIFYING_KEYWORDS.get(keyword)
            if category is None and vr == "PN":
                category = PERSON_NAME_CATEGORY
            texts = _element_texts(element, vr, encodings)
            if category is None and Tag(element.tag).is_private:
                # A private element of unknown VR holding something shaped like a name.
                texts = [t for t in texts if _NAME_SHAPE.search(t)]
                category = PERSON_NAME_CATEGORY if texts else None
            if category is None:
                continue
            for text in texts:
                raw.extend(Identifier(v, category) for v in text.split("\\") if v.strip())
        raw.extend(_duplicated_identifiers(path, encodings))
        found.extend(expand(raw, exclude=device))
    return expand(found)


def _duplicated_identifiers(path: Path, encodings: list[str]) -> list[Identifier]:
    """Identifying values of every copy of a top-level element, read raw: of a duplicated
    element the parser keeps one copy only."""
    found: list[Identifier] = []
    try:
        with open(path, "rb") as stream:
            elements = list(_raw_elements(stream))
    except Exception:  # a file the raw walk cannot follow: the parsed walk is all there is
        return found
    for _label, tag, value in elements:
        keyword = keyword_for_tag(tag) or ""
        category = IDENTIFYING_KEYWORDS.get(keyword)
        if category is None and keyword and _dictionary_vr(tag) == "PN":
            category = PERSON_NAME_CATEGORY
        if category is None:
            continue
        for text in _raw_texts(value, encodings):
            found.extend(Identifier(v.strip(), category) for v in text.split("\\") if v.strip())
    return found


def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


# A lookup.json field is identifying when its last `A.B.C` component names an identifying keyword
# (case, `_` and blanks ignored); a value shaped like a person name is identifying whatever its field.
_KEYWORD_LOOSE = {re.sub(r"[^0-9a-z]", "", k.casefold()): k for k in IDENTIFYING_KEYWORDS}


def identifiers_from_lookup(path: str | os.PathLike[str]) -> list[Identifier]:
    """The identifying values of a raw lookup.json (an object of objects, keyed by image path)."""
    doc = json.loads(Path(path).read_text())
    found: list[Identifier] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(str(key), item)
        elif isinstance(value, list):
            for item in value:
                visit(name, item)
        elif value is not None and not isinstance(value, bool):
            text = str(value)
            last = re.sub(r"\[[^\]]*\]", "", name).rsplit(".", 1)[-1]
            keyword = _KEYWORD_LOOSE.get(re.sub(r"[^0-9a-z]", "", last.casefold()))
            if keyword is not None:
                found.append(Identifier(text, IDENTIFYING_KEYWORDS[keyword]))
            elif _NAME_SHAPE.search(text):
                found.append(Identifier(text, PERSON_NAME_CATEGORY))
                found.extend(Identifier(word, PERSON_NAME_CATEGORY) for word in text.split() if "^" in word)

    if isinstance(doc, dict):
        for entry in doc.values():
            visit("", entry)
    return expand(found)


def load_identifiers(sources: Iterable[str | os.PathLike[str]]) -> list[Identifier]:
    """Identifiers from JSON lists (`*.json`) and raw DICOM files or folders."""
    values: list[Identifier] = []
    dicom: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_file() and path.suffix.lower() == ".json":
            doc = json.loads(path.read_text())
            if isinstance(doc, dict):  # a raw lookup.json
                values.extend(identifiers_from_lookup(path))
                continue
            if not isinstance(doc, list):
                raise ValueError(f"{path}: expected a JSON list of identifying values, or a lookup.json object")
            for item in doc:
                if isinstance(item, dict):
                    values.append(Identifier(str(item["value"]), str(item.get("category", "identifier"))))
                elif item is not None:
                    values.append(Identifier(str(item)))
        else:
            dicom.append(path)
            if path.is_dir():
                values.extend(i for lookup in sorted(path.rglob(LOOKUP_NAME)) for i in identifiers_from_lookup(lookup))
    if dicom:
        values.extend(identifiers_from_dicom(dicom))
    return expand(values)


# ---------------------------------------------------------------------------------------------
# Matching


def _loose_pattern(ident: Identifier) -> re.Pattern[str]:
    """The identifier as it may be written in raw text: any case, `^` or white space between words."""
    spellings = {ident.value.strip().replace("^", " "), normalize(ident.value)}  # casefold turns ß into ss
    alternatives = [r"[\s^]+".join(re.escape(word) for word in spelling.split()) for spelling in spellings]
    return re.compile("|".join(alternatives), re.IGNORECASE)


class Matcher:
    """Finds identifiers in a piece of text, by the rules of the module doc."""

    def __init__(self, identifiers: Iterable[str | Identifier]) -> None:
        self.identifiers = expand(identifiers)
        self._compiled: list[tuple[str, re.Pattern[str] | None, Identifier]] = []
        for ident in self.identifiers:
            norm = normalize(ident.value)
            digits_only = _DIGIT_SEPARATORS.sub("", norm).isdigit()
            bounded = digits_only or len(norm) < ANYWHERE_LENGTH
            pattern = re.compile(rf"(?<![^\W_]){re.escape(norm)}(?![^\W_])") if bounded else None
            self._compiled.append((norm, pattern, ident))

    def __bool__(self) -> bool:
        return bool(self._compiled)

    def find(self, text: str) -> list[Identifier]:
        """The identifiers in text; one that is part of another match in the same text is dropped."""
        norm = normalize(text)
        hits = [
            (n, ident)
            for n, pattern, ident in self._compiled
            if n in norm and (pattern is None or pattern.search(norm))
        ]
        return [ident for n, ident in hits if not any(n != other and n in other for other, _ in hits)]

    def redact(self, text: str) -> str:
        """text with every identifier it holds replaced by its mask (without the fingerprint)."""
        for ident in self.find(text):
            text = _loose_pattern(ident).sub(mask(ident.value).split(" #")[0], text)
        return text


# ---------------------------------------------------------------------------------------------
# Scanning


@dataclass
class AuditStats:
    objects: int = 0
    archives: int = 0
    members: int = 0
    dicom_headers: int = 0
    json_documents: int = 0
    rows: int = 0
    skipped: list[str] = field(default_factory=list)


class Auditor:
    """Scans locations for identifiers; collects findings and counts what was scanned."""

    def __init__(self, identifiers: Iterable[str | Identifier]) -> None:
        self.matcher = Matcher(identifiers)
        self.findings: list[Finding] = []
        self.stats = AuditStats()
        self._seen: set[tuple[str, str, str, str]] = set()

    # -- recording

    def check(self, text: str | None, location: str, where: str, field_name: str) -> None:
        if not text:
            return
        for ident in self.matcher.find(text):
            key = (location, where, field_name, normalize(ident.value))
            if key not in self._seen:
                self._seen.add(key)
                # An object or member name can be the leak itself: never print it unmasked.
                self.findings.append(
                    Finding(
                        self.matcher.redact(location),
                        where,
                        self.matcher.redact(field_name),
                        ident.category,
                        mask(ident.value),
                    )
                )

    # -- content kinds

    def scan_json_value(self, value: Any, location: str, where: str, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                self.check(str(key), location, where, f"{path} (key)")
                self.scan_json_value(item, location, where, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                self.scan_json_value(item, location, where, f"{path}[{index}]")
        elif isinstance(value, str) and value[:1] in ("{", "["):
            self.check(value, location, where, path)
            try:
                parsed = json.loads(value)  # a JSON column read back as text: decode its escapes
            except json.JSONDecodeError:
                return
            if isinstance(parsed, dict | list):
                self.scan_json_value(parsed, location, where, path)
        elif value is not None and not isinstance(value, bool):
            self.check(str(value), location, where, path)

    def scan_json_bytes(self, data: bytes, location: str, name: str) -> None:
        where = _json_kind(name)
        text = data.decode("utf-8", errors="replace")
        if name.endswith((".ndjson", ".jsonl")):
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    self.check(line, location, where, f"{name} line {number}")
                    continue
                self.stats.rows += where == "row"
                self.stats.json_documents += 1
                self.scan_json_value(doc, location, where, f"{name} line {number} $")
            return
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            self.scan_text(text, location, where, name)
            return
        self.stats.json_documents += 1
        self.scan_json_value(doc, location, where, f"{name} $")

    def scan_text(self, text: str, location: str, where: str, name: str) -> None:
        for number, line in enumerate(text.splitlines(), start=1):
            self.check(line, location, where, f"{name} line {number}")

    def scan_dicom(self, stream: BinaryIO, location: str, label: str) -> bool:
        """Every element of a DICOM file's header; False if it does not parse."""
        ds = _read_dataset(stream)
        if ds is None:
            return False
        self.stats.dicom_headers += 1
        encodings = _encodings(ds)
        before = len(self.findings)
        for part in (ds.file_meta, ds) if getattr(ds, "file_meta", None) else (ds,):
            for path, element, _keyword, vr in _iter_elements(part):
                for text in _element_texts(element, vr, encodings):
                    self.check(text, location, "DICOM header", f"{label}: {path}")
        # What the parser hides: further copies of an element, bytes it could not place.
        found = {f.masked for f in self.findings[before:]}
        try:
            for raw_label, _tag, value in _raw_elements(stream):
                for text in _raw_texts(value, encodings):
                    if not all(mask(i.value) in found for i in self.matcher.find(text)):
                        self.check(text, location, "DICOM header", f"{label}: {raw_label}")
        except Exception as err:  # the parsed walk has run; say that the raw one could not finish
            self.stats.skipped.append(f"{location}: {label}: raw element walk stopped ({type(err).__name__})")
        # The preamble: no element holds it, no reader shows it, and anything may be written there.
        stream.seek(0)
        for text in _raw_texts(stream.read(PREAMBLE_BYTES), encodings):
            self.check(text, location, "DICOM header", f"{label}: preamble")
        return True

    def scan_blob(self, stream: BinaryIO, size: int, location: str, name: str) -> None:
        """A file of unknown kind: DICOM if it has the marker, else text if it is small enough."""
        prefix = stream.read(132)
        stream.seek(0)
        if _is_dicom_prefix(prefix) and self.scan_dicom(stream, location, name):
            return
        if size > MAX_TEXT_FILE_BYTES:
            self.stats.skipped.append(f"{location}: {name} ({size} bytes, content not searched)")
            return
        data = stream.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = "\n".join(run.decode("ascii") for run in _PRINTABLE_RUN.findall(data))
        self.scan_text(text, location, "file content", name)

    def scan_archive(self, stream: BinaryIO, location: str, name: str) -> None:
        """A tar (gzip or not), read as a stream: member names and member contents."""
        self.stats.archives += 1
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    self.stats.members += 1
                    label = f"{name}!{member.name}"
                    self.check(member.name, location, "archive member name", label)
                    if member.linkname:
                        self.check(member.linkname, location, "archive member name", f"{label} (link)")
                    if not member.isfile():
                        continue
                    source = tar.extractfile(member)
                    if source is None:
                        continue
                    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
                        shutil.copyfileobj(source, spool, 1024 * 1024)
                        spool.seek(0)
                        self.scan_blob(spool, member.size, location, label)  # type: ignore[arg-type]
        except (tarfile.TarError, EOFError, OSError) as err:
            self.stats.skipped.append(f"{location}: {name} is not a readable archive ({type(err).__name__})")

    def scan_object(self, name: str, size: int, opener: Callable[[], BinaryIO], location: str) -> None:
        """One file or object: its name, then its content by kind."""
        self.stats.objects += 1
        self.check(name, location, "object name", name)
        lower = name.lower()
        if lower.endswith(".partial"):
            return
        if lower.endswith((".tar.gz", ".tgz", ".tar")):
            with opener() as stream:
                self.scan_archive(stream, location, name)
        elif lower.endswith((".json", ".ndjson", ".jsonl")):
            with opener() as stream:
                self.scan_json_bytes(stream.read(), location, name)
        else:
            with opener() as stream:
                self.scan_blob(stream, size, location, name)

    # -- locations

    def scan_local(self, root: str | os.PathLike[str], *, only_reports: bool = False) -> None:
        base = Path(root)
        if not base.exists():
            raise FileNotFoundError(f"{base} does not exist")
        location = str(base)
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink())
        for path in files:
            name = path.name if path == base else path.relative_to(base).as_posix()
            if only_reports and path.name != REPORT_NAME:
                continue
            self.scan_object(name, path.stat().st_size, functools.partial(path.open, "rb"), location)

    def scan_gcs(self, uri: str, client: Any = None, *, only_reports: bool = False) -> None:
        bucket_name, _, prefix = uri[len("gs://") :].partition("/")
        if not bucket_name:
            raise ValueError(f"{uri!r} names no bucket")
        client = client or storage_client()
        bucket = client.bucket(bucket_name)
        location = f"gs://{bucket_name}/{prefix}".rstrip("/")
        for blob in client.list_blobs(bucket_name, prefix=prefix or None):
            if blob.name.endswith("/") or (only_reports and not blob.name.endswith("/" + REPORT_NAME)):
                continue
            self.scan_object(
                blob.name, int(blob.size or 0), lambda blob=blob: bucket.blob(blob.name).open("rb"), location
            )

    def scan_bigquery(self, table: str, client: Any = None) -> None:
        project = table.split(".")[0] if table.count(".") == 2 else None
        if project is None:
            raise ValueError(f"{table!r} is not project.dataset.table")
        client = client or bigquery_client(project)
        for number, row in enumerate(client.list_rows(table), start=1):
            self.stats.rows += 1
            self.scan_json_value(_jsonable(dict(row.items())), table, "row", f"row {number} $")

    def scan(self, location: str | os.PathLike[str], *, storage: Any = None, only_reports: bool = False) -> None:
        if str(location).startswith("gs://"):
            self.scan_gcs(str(location), storage, only_reports=only_reports)
        else:
            self.scan_local(location, only_reports=only_reports)


def _json_kind(name: str) -> str:
    base = name.rsplit("!", 1)[-1]
    if base.endswith(REPORT_NAME) or "/Batches/" in f"/{base}":
        return "report"
    if base.endswith((".ndjson", ".jsonl")):
        return "row"
    return "JSON file"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def storage_client() -> Any:
    """A google-cloud-storage client; anonymous against STORAGE_EMULATOR_HOST (which it honours)."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GOOGLE_PROJECT_NAME") or "phi-audit"
        return storage.Client(project=project, credentials=AnonymousCredentials())
    return storage.Client()


def bigquery_client(project: str) -> Any:
    """A google-cloud-bigquery client; anonymous against BIGQUERY_EMULATOR_HOST when it is set."""
    from google.cloud import bigquery

    host = os.environ.get("BIGQUERY_EMULATOR_HOST")
    if host:
        from google.auth.credentials import AnonymousCredentials

        return bigquery.Client(
            project=project, client_options={"api_endpoint": host}, credentials=AnonymousCredentials()
        )
    return bigquery.Client(project=project)


def audit(
    raw_identifiers: Iterable[str | Identifier],
    locations: Iterable[str | os.PathLike[str]] = (),
    *,
    reports: Iterable[str | os.PathLike[str]] = (),
    bigquery_tables: Iterable[str] = (),
    bigquery_client: Any = None,
    storage_client: Any = None,
) -> list[Finding]:
    """Findings of the raw identifiers in the output locations (local folders or files, gs:// URIs),
    in the batch reports under the landing roots `reports`, and in the rows of the BigQuery tables."""
    auditor = Auditor(raw_identifiers)
    run(auditor, locations, reports=reports, bigquery_tables=bigquery_tables, bq=bigquery_client, gcs=storage_client)
    return auditor.findings


def run(
    auditor: Auditor,
    locations: Iterable[str | os.PathLike[str]],
    *,
    reports: Iterable[str | os.PathLike[str]] = (),
    bigquery_tables: Iterable[str] = (),
    bq: Any = None,
    gcs: Any = None,
) -> Auditor:
    for location in locations:
        auditor.scan(location, storage=gcs)
    for root in reports:
        auditor.scan(root, storage=gcs, only_reports=True)
    for table in bigquery_tables:
        auditor.scan_bigquery(table, bq)
    return auditor


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.phi_audit",
        description=__doc__.splitlines()[0],
        epilog="See the module documentation (python -m pydoc tools.phi_audit) for the rules.",
    )
    parser.add_argument(
        "--raw", action="append", required=True, help="raw DICOM folder or file, or a JSON list of values"
    )
    parser.add_argument("--outputs", action="append", default=[], help="local output folder or gs://bucket[/prefix]")
    parser.add_argument("--reports", action="append", default=[], help="landing root: scan its batch reports")
    parser.add_argument("--bigquery", action="append", default=[], help="project.dataset.table")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(argv)
    if not (args.outputs or args.reports or args.bigquery):
        parser.error("give at least one of --outputs, --reports, --bigquery")
    try:
        identifiers = load_identifiers(args.raw)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if not identifiers:
        parser.error("no meaningful identifying value found in --raw")
    auditor = Auditor(identifiers)
    try:
        run(auditor, args.outputs, reports=args.reports, bigquery_tables=args.bigquery)
    except Exception as err:  # an audit that could not look everywhere is no clean bill of health
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    stats = auditor.stats
    if args.json:
        print(json.dumps({"findings": [dataclasses.asdict(f) for f in auditor.findings], "stats": vars(stats)}))
    else:
        for finding in auditor.findings:
            print(f"LEAK {finding}")
        for skipped in stats.skipped:
            print(f"skipped {skipped}", file=sys.stderr)
        print(
            f"{len(auditor.findings)} findings; {len(auditor.matcher.identifiers)} identifying values searched in "
            f"{stats.objects} objects, {stats.archives} archives ({stats.members} members, "
            f"{stats.dicom_headers} DICOM headers), {stats.json_documents} JSON documents, {stats.rows} rows"
        )
    return 1 if auditor.findings else 0


if __name__ == "__main__":
    sys.exit(main())
