"""The whole header of a DICOM Part 10 file, walked without loading its bulk data.

pydicom's `dcmread(stop_before_pixels=True)` stops at the pixel data and keeps the last copy of a
duplicated element: both hide PHI (a name after the pixel data, a second PatientName). This
walker reads the file element by element in its transfer syntax, at every depth (sequences,
their items, private blocks), and past the pixel data, whose value is skipped by its length
(encapsulated pixel data fragment by fragment), never read. It records

- every person name and identifier it meets, with its tag path, for the gate to judge;
- duplicated or out-of-order elements (a malformed header), naming the tag;
- private data elements and their creators, and, in strip mode, the byte ranges to drop and the
  lengths of enclosing sequences and items to patch, so that the archived copy can be written
  by streaming the file once (`StrippedReader`): the header rewritten, the rest copied as is;
- the bytes of the header that no element's value holds and no check judges, which the copy
  leaves out or zeroes in every mode: the preamble (zeros), the group lengths outside the file
  meta and DataSetTrailingPadding (dropped), the reserved bytes of a long-length VR (zeros), the
  file meta's group length (written as counted). FileMetaInformationVersion must be 00 01 and a
  delimiter's length 0, or the header is malformed.

Memory stays bounded: values longer than `BULK_SKIP` of a bulk VR are skipped, the others count
against the policy's `max_header_bytes`, and nesting against its `max_depth`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import itertools
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VM, dictionary_VR, get_private_entry, keyword_for_tag, private_dictionaries
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_archive.basic_profile import check_basic_profile
from dicom_archive.deid_gate import (
    BURNED_IN_ANNOTATION_OK,
    CODED_ID_ATTRIBUTES,
    IDENTITY_REMOVED_VALUE,
    ITEM_INDEX,
    NAME_MAY_BE_CODED_ID,
    DeidPolicy,
    Reason,
    Verdict,
    check_identity,
    coded_flag,
    coded_id_value_allowed,
    holds_value,
    person_name_holds_value,
    person_value_allowed,
    value_looks_like_person_name,
)

ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Top-level data an object with Rows may carry instead of pixel data: SpectroscopyData (MR
# spectroscopy), an EncapsulatedDocument.
OTHER_BULK_DATA_TAGS = frozenset({0x56000020, 0x00420011})
LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_SKIP = 64 * 1024  # bulk values longer than this are skipped by their length, never read
COPY_CHUNK = 1024 * 1024
READ_AHEAD = 4 * 1024  # a page: most headers in one read, little of the pixel data read twice

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
TRANSFER_SYNTAX_TAG = 0x00020010
FILE_META_VERSION_TAG, FILE_META_VERSION = 0x00020001, b"\x00\x01"  # PS3.10 7.1: this version, no other
# Some writers put the version as a little endian number (pydicom's no_meta_group_length.dcm): the
# same version, two bytes that hold nothing else. The copy carries the standard spelling.
FILE_META_VERSION_SWAPPED = b"\x01\x00"
PREAMBLE_BYTES = 128
# Its value has no meaning (PS3.10 7.2), so nothing judges it: never copied into the archive.
TRAILING_PADDING_TAG = 0xFFFCFFFC
PRIVATE_INFORMATION_TAGS = (0x00020100, 0x00020102)  # PrivateInformationCreatorUID, PrivateInformation

# Top-level attributes whose every copy the gate judges (a duplicate must not hide one).
FLAG_KEYWORDS = frozenset(
    {"PatientID", "PatientName", "AccessionNumber", "StudyDate", "PatientIdentityRemoved", "BurnedInAnnotation"}
)


class WalkError(Exception):
    """The header cannot be walked: the image is quarantined with this reason and detail."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SizeChangedError(WalkError):
    """The file is not the size it was listed with (it changed, or is being written)."""


class DeflatedDatasetError(WalkError):
    """The dataset is deflated (from `data_at` on): it cannot be walked as it is. Unless the caller
    walks its inflated form (deflated.walked_image), the image is quarantined: fail closed.
    `syntax_element`: where the TransferSyntaxUID element is (start, end); `group_length_at`: where
    the file meta group length's value is, if there is one; as the walker read them."""

    def __init__(self, data_at: int, syntax_element: tuple[int, int], group_length_at: int | None) -> None:
        super().__init__(
            Reason.UNREADABLE, "deflated transfer syntax: the header cannot be walked without inflating the file"
        )
        self.data_at, self.syntax_element, self.group_length_at = data_at, syntax_element, group_length_at


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@functools.lru_cache(maxsize=8192)
def _public_vr_and_keyword(tag: int) -> tuple[str, str, tuple[str, ...]]:
    """The dictionary VR, the keyword, and every VR the element may be written with (empty: any,
    for a tag the dictionary does not know)."""
    if tag & 0xFFFF == 0:  # a group length: only the file meta's is in the dictionary
        return "UL", keyword_for_tag(tag) or "", ("UL",)
    try:
        options = tuple(dictionary_VR(tag).split(" or "))
    except KeyError:
        return "UN", "", ()
    return options[0], keyword_for_tag(tag) or "", options


@functools.lru_cache(maxsize=8192)
def _most_values(tag: int) -> int | None:
    """The largest number of values the dictionary allows the element (None: no bound, or unknown)."""
    try:
        multiplicity = dictionary_VM(tag)
    except KeyError:
        return None
    most = multiplicity.rsplit("-", 1)[-1]
    return int(most) if most.isdigit() else None


MAX_CREATOR_BYTES = 64  # a private creator is an LO
# Binary VRs of one fixed width: a value is whole values of it, no more than the dictionary allows,
# so that no text (a name) can ride in an AcquisitionMatrix or a group length.
FIXED_WIDTH_VRS = {"AT": 4, "FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}
# VRs whose values hold digits and signs (a DS exponent, an AS unit: one letter at most): a run of
# letters in one is text that no reader of that VR would show, e.g. a name hidden in a number.
LETTERLESS_VRS = frozenset({"DA", "DS", "DT", "IS", "TM", "UI"})
LETTER_RUN = re.compile(rb"[A-Za-z]{2}")
# The words a number may be spelled with when it is not finite, as writers print them (C `nan`,
# `-inf`; Java `NaN`, `Infinity`): a closed list of three words, no room for a name.
NON_FINITE_NUMBER = re.compile(rb"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
NUMBER_VRS = frozenset({"DS", "IS"})
# A code string is capitals, digits, blanks and underscores (any case taken, as scanners write
# some in lower case). Real data also puts the punctuation of terms in one (`L-SPINE`, `ABD/PELVIS`,
# `T1+C`): taken in capitals only, since a capital term with punctuation says no more than with a
# blank, while `Hercule.Poirot` is how a name or a mailbox is written. Never `^` or `=` (a person
# name's delimiters), a comma (`DOE, JOHN`), `@` or a quote.
CODE_STRING = re.compile(rb"[A-Za-z0-9 _]*")
CODE_TERM = re.compile(rb"[A-Z0-9 _./()+-]*")
# An age is up to three digits and its unit (D, W, M or Y); writers also leave the unit out (the
# public RSNA pneumonia images hold `58`) or write it in lower case: still a number, no name.
AGE_STRING = re.compile(rb"\d{1,3}[DWMYdwmy]?")
GROUP_LENGTH_BYTES = 4  # a group length is one UL
FREE_TEXT_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UR", "UT"})
# The VRs an element the dictionary does not know may be written with: those whose values the walk
# judges (a sequence's items, a name, text by its shape, numbers, dates and codes by their characters).
JUDGED_UNKNOWN_VRS = FREE_TEXT_VRS | {"SQ", "PN", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}


@functools.lru_cache(maxsize=8192)
def _private_vr(creator: str | None, tag: int) -> str:
    if creator is None:
        return "UN"
    try:
        return get_private_entry(tag, creator)[0].split(" or ")[0]
    except KeyError:
        return "UN"


@dataclass
class PrivateElement:
    path: str
    group: int
    element: int
    creator: str | None  # as reports may show it: None when absent, or not a known creator

    def __str__(self) -> str:
        return f"({self.group:04X},{self.element:04X}, {self.creator or 'no known creator'})"


@dataclass
class HeaderWalk:
    """What the walk found; `judge_header` turns it into a verdict."""

    size: int
    transfer_syntax: str = ""
    implicit: bool = False
    little: bool = True
    top: dict[int, RawDataElement] = field(default_factory=dict)  # first copy of each top-level value
    copies: dict[str, list[str]] = field(default_factory=dict)  # every copy of FLAG_KEYWORDS
    # path, keyword, text, is PN; text None: the attribute is a sequence with items (content, not a value)
    persons: list[tuple[str, str, str | None, bool]] = field(default_factory=list)
    id_values: list[tuple[str, str | None]] = field(default_factory=list)  # path, text (None: as persons)
    malformed: list[str] = field(default_factory=list)
    private: list[PrivateElement] = field(default_factory=list)  # not on the allow list
    # Basic profile: path, tag, dictionary VR, keyword, holds a value.
    public_values: list[tuple[str, int, str, str, bool]] = field(default_factory=list)
    deid_codes: list[str] = field(default_factory=list)  # CodeValues of DeidentificationMethodCodeSequence
    removals: list[tuple[int, int]] = field(default_factory=list)  # byte ranges dropped from the copy
    # offset -> the bytes the copy holds there instead (lengths, a zeroed preamble, reserved bytes)
    patches: dict[int, bytes] = field(default_factory=dict)
    skipped: list[tuple[int, int]] = field(default_factory=list)  # ranges never read (bulk data)
    read_sha256: str = ""  # of every byte read (the file less `skipped`)
    # Values at the keyword paths walk_header was asked to record: path without item numbers -> each.
    recorded: dict[str, list[RawDataElement]] = field(default_factory=dict)
    pixel_offset: int | None = None
    other_bulk_data: bool = False  # a top-level OTHER_BULK_DATA_TAGS element (no pixel data needed)
    private_removed: int = 0  # private data elements dropped (creators and group lengths not counted)

    @property
    def output_size(self) -> int:
        return self.size - sum(end - start for start, end in self.removals)

    @property
    def rewritten(self) -> bool:
        return bool(self.removals or self.patches)

    @property
    def header_length(self) -> int:
        return self.pixel_offset if self.pixel_offset is not None else self.size

    def dataset(self) -> Dataset:
        """The top level as a pydicom Dataset (sequences and bulk data left out)."""
        return Dataset(dict(self.top))

    def text(self, keyword: str) -> str | None:
        """The single value of a top-level flag, None when absent or not single."""
        values = self.copies.get(keyword, [])
        if len(values) != 1 or "\\" in values[0]:
            return None
        return values[0].strip(" \0")


@dataclass
class _Container:
    """A sequence or item of defined length whose length field may need a patch."""

    length_offset: int
    length: int
    little: bool
    removed: int = 0


@dataclass(frozen=True, slots=True)
class _Frame:
    """Where the walk is: a dataset (or a sequence) with its tag path, depth and encoding, and
    what becomes of it in the archived copy."""

    depth: int  # 0: the top level; an item of a sequence is one deeper than the sequence
    path: str  # "" at the top level, `Seq[0].Inner` below
    implicit: bool
    little: bool
    discard: bool  # inside a dropped element: walked for its length only, nothing recorded
    rewrite: bool  # strip mode, and not inside an allow-listed element: private elements are dropped
    # Read as implicit VR where pydicom decides by the first element's bytes (the top level of an
    # implicit file, the items of a UN sequence in an explicit one): they must not look explicit.
    guessed: bool = False

    def item(self, index: int) -> _Frame:
        """The frame of item `index` of this sequence."""
        path = f"{self.path}[{index}]"
        return _Frame(self.depth + 1, path, self.implicit, self.little, self.discard, self.rewrite, self.guessed)


@dataclass
class _Scope:
    """One dataset (the top level, or an item): its order and its private blocks."""

    previous: int = -1
    creators: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # (group<<8|block) -> creator, start, end
    kept_blocks: set[int] = field(default_factory=set)
    used_blocks: set[int] = field(default_factory=set)
    changed: bool = False


class _Walker:
    def __init__(
        self,
        stream: BinaryIO,
        size: int,
        policy: DeidPolicy,
        check_end: bool = True,
        record: frozenset[str] = frozenset(),
    ) -> None:
        self.record = record
        self.stream = stream
        self.size = size
        self.check_end = check_end
        self.seek_pending = False  # the stream is not at window_start + len(window) yet
        self.policy = policy
        self.strip = policy.private_tags == "strip"
        self.profile = policy.profile == "basic"
        self.pos = 0
        self.hashed = 0  # walked bytes before this offset are in `sha`
        self.window = b""  # bytes of the file from window_start on, read but not all parsed yet
        self.window_start = 0
        self.loaded = 0
        self.sha = hashlib.sha256()
        self.containers: list[_Container] = []
        self.all_containers: list[_Container] = []
        self.walk = HeaderWalk(size=size)
        # Where the file meta's TransferSyntaxUID is (start, end), and its group length's value.
        self.syntax_element, self.group_length_at = (0, 0), None

    # --- reading ---------------------------------------------------------------------
    # The file is read in windows of READ_AHEAD bytes and parsed from memory; the digest of the
    # walked bytes is taken in runs (between skips), not element by element.

    def _hash_pending(self) -> None:
        if self.hashed < self.pos:
            base = self.window_start
            self.sha.update(self.window[self.hashed - base : self.pos - base])
            self.hashed = self.pos

    def _fill(self, end: int) -> None:
        self._hash_pending()
        base = self.window_start
        kept = self.window[self.pos - base :]
        wanted = max(end - self.pos, READ_AHEAD) - len(kept)
        if self.seek_pending:
            self.stream.seek(self.pos)
            self.seek_pending = False
        if not self.check_end:
            # Never past the listed size: a read at the end of a buffered stream drops its buffer,
            # and the archiver reads the same file again from it (StrippedReader checks the end).
            wanted = min(wanted, self.size - self.pos - len(kept))
        self.window = kept + self.stream.read(wanted) if wanted > 0 else kept
        self.window_start = self.pos

    def read(self, n: int, what: str = "header") -> bytes:
        end = self.pos + n
        if end > self.window_start + len(self.window):
            self._fill(end)
            if end > self.window_start + len(self.window):
                raise SizeChangedError(Reason.NOT_DICOM, f"does not parse as DICOM (truncated {what})")
        base = self.window_start
        data = self.window[self.pos - base : end - base]
        self.pos = end
        return data

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise SizeChangedError(Reason.NOT_DICOM, f"does not parse as DICOM (truncated {what})")
        if not n:
            return
        self._hash_pending()
        self.walk.skipped.append((self.pos, self.pos + n))
        self.pos += n
        self.hashed = self.pos
        if self.pos > self.window_start + len(self.window):
            # The stream moves on the next read only: a buffered stream asked to go back to 0
            # right after a seek to its buffer's end forgets the buffer and reads the file again.
            self.window, self.window_start, self.seek_pending = b"", self.pos, True

    def at_end(self) -> bool:
        """Whether the file ends where it was listed to end (no byte past `size`)."""
        self._hash_pending()
        if self.window_start + len(self.window) > self.size:
            return False
        self.stream.seek(self.window_start + len(self.window))
        return not self.stream.read(1)

    def load(self, n: int) -> bytes:
        self.loaded += n
        if self.loaded > self.policy.max_header_bytes:
            raise WalkError(
                Reason.UNREADABLE, f"the header is larger than the limit of {self.policy.max_header_bytes} bytes"
            )
        return self.read(n)

    # --- structure ----------------------------------------------------------------------

    def run(self) -> HeaderWalk:
        self._fill(132)
        head = self.window[:132]
        if len(head) < 132 or head[128:132] != b"DICM":
            raise WalkError(Reason.NOT_DICOM, "not a DICOM Part 10 file (no DICM preamble)")
        if head[:PREAMBLE_BYTES].count(0) != PREAMBLE_BYTES:
            # Nothing judges the preamble (text, a TIFF header, an executable: the DICOM/PE polyglot of
            # CVE-2019-11687), and PS3.10 7.1 lets it be all zeros: the copy carries zeros.
            self.walk.patches[0] = bytes(PREAMBLE_BYTES)
        self.pos = 132
        first = self._file_meta()
        syntax = self.walk.transfer_syntax
        if syntax == DEFLATED:
            data_at = self.pos - 4 if first is not None else self.pos
            raise DeflatedDatasetError(data_at, self.syntax_element, self.group_length_at)
        implicit, little = syntax == IMPLICIT_LITTLE, syntax != EXPLICIT_BIG
        self.walk.implicit, self.walk.little = implicit, little
        top = _Frame(0, "", implicit, little, discard=False, rewrite=self.strip, guessed=implicit)
        self._dataset(_Scope(), None, top, first=first)
        if self.check_end and not self.at_end():
            raise SizeChangedError(Reason.UNREADABLE, "the file grew: it is longer than its listed size")
        self._hash_pending()
        self.walk.read_sha256 = self.sha.hexdigest()
        self.walk.removals.sort()
        for container in self.all_containers:
            if container.removed:
                order = "<" if container.little else ">"
                self.walk.patches[container.length_offset] = struct.pack(
                    f"{order}L", container.length - container.removed
                )
        return self.walk

    def _file_meta(self) -> bytes | None:
        """Group 0002, always explicit VR little endian. Returns the next element's tag bytes.

        Only the elements the standard defines, written with their VR, pass. The private information
        (0002,0100 and 0002,0102) is private data: in strip mode it is dropped and the group length
        patched."""
        previous = -1
        group_length: tuple[int, int] | None = None  # where its value is, and the value
        removed = 0
        meta_end = self.size
        while self.pos < self.size:
            start = self.pos
            raw = self.read(4, "file meta")
            group, element = struct.unpack("<HH", raw)
            if group != 0x0002:
                meta_end = start
                break
            tag = group << 16 | element
            vr, length, _ = self._explicit_header(tag, "<", start)
            _, keyword, written_as = _public_vr_and_keyword(tag)
            name = keyword or tag_text(tag)
            if tag <= previous:
                self.walk.malformed.append(f"{name} in the file meta is duplicated or out of order")
            previous = tag
            if not written_as:
                self.walk.malformed.append(f"{name} is not a file meta element")
            elif vr not in written_as:
                self.walk.malformed.append(f"{name} is written as {vr}, not {' or '.join(written_as)}")
            if element == 0x0000 and length != GROUP_LENGTH_BYTES:
                self.walk.malformed.append(f"{name} is {length} bytes long, not {GROUP_LENGTH_BYTES}")
            value = self.load(length)
            self._check_shape(tag, vr, value, name)
            if tag == FILE_META_VERSION_TAG and value != FILE_META_VERSION:
                if value == FILE_META_VERSION_SWAPPED:
                    self.walk.patches[self.pos - length] = FILE_META_VERSION
                else:
                    self.walk.malformed.append(f"{name} is not 00 01, the only version PS3.10 defines")
            if vr in FREE_TEXT_VRS and b"^" in value:
                # The file meta names software and stations; a name's components would be a person's.
                self.walk.malformed.append(f"{name} holds a ^, as a person's name does")
            if tag == 0x00020000 and length == 4:
                group_length = (self.pos - 4, struct.unpack("<L", value)[0])
            elif tag == TRANSFER_SYNTAX_TAG:
                self.walk.transfer_syntax = _decode(value)
                self.syntax_element = (start, self.pos)
            elif tag in PRIVATE_INFORMATION_TAGS:
                self.walk.private.append(PrivateElement(name, group, element, "file meta"))
                if self.strip:
                    self.walk.removals.append((start, self.pos))
                    removed += self.pos - start
                    self.walk.private_removed += tag == PRIVATE_INFORMATION_TAGS[-1]
        else:
            raw = None
        if group_length is not None:
            at, value = group_length
            self.group_length_at = at
            # Its value is what follows it: written so, whatever the file said (four bytes are not
            # for carrying anything else), less what strip mode drops.
            counted = meta_end - at - 4 - removed
            if counted != value:
                self.walk.patches[at] = struct.pack("<L", counted)
        if not self.walk.transfer_syntax:
            raise WalkError(Reason.NOT_DICOM, "does not parse as DICOM (truncated or corrupt header)")
        return raw

    def _explicit_header(self, tag: int, order: str, start: int) -> tuple[str, int, int]:
        code = self.read(2)
        if not (0x41 <= code[0] <= 0x5A and 0x41 <= code[1] <= 0x5A):
            raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (no valid VR at {tag_text(tag)})")
        vr = code.decode("ascii")
        if vr in LONG_LENGTH_VRS:
            self._reserved(start, self.read(2))
            (length,) = struct.unpack(f"{order}L", self.read(4))
            return vr, length, self.pos - 4
        (length,) = struct.unpack(f"{order}H", self.read(2))
        return vr, length, self.pos - 2

    def _reserved(self, start: int, reserved: bytes) -> None:
        """The two bytes after the VR of an element of long length (`start`), which readers skip and
        PS3.5 7.1.2 sets to zero: zeros in the copy, whatever they held."""
        if reserved != b"\0\0":
            self.walk.patches[start + 6] = b"\0\0"

    def _delimiter(self, frame: _Frame, length: int, what: str) -> None:
        """A delimiter's length is zero (PS3.5 7.5): four bytes that no reader shows must hold nothing."""
        if length and not frame.discard:
            self.walk.malformed.append(f"{what} has a delimiter whose length is not 0")

    def _dataset(self, scope: _Scope, end: int | None, frame: _Frame, *, first: bytes | None = None) -> bool:
        """Walk one dataset: the top level (end None, depth 0: to the end of the file), an item
        of defined length (up to `end`), or of undefined length (up to its delimiter).
        Returns whether anything inside it is dropped from the archived copy."""
        order = "<" if frame.little else ">"
        implicit, path = frame.implicit, frame.path
        unpack_tag = struct.Struct(f"{order}HH").unpack_from
        unpack_length = struct.Struct(f"{order}4xL").unpack_from
        unpack_short = struct.Struct(f"{order}6xH").unpack_from
        unpack_long = struct.Struct(f"{order}L").unpack
        top = frame.depth == 0
        while True:
            if end is not None and self.pos >= end:
                if self.pos > end:
                    raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (an item overruns {path})")
                break
            if top and self.pos >= self.size:
                break
            if first is not None:
                start = self.pos - 4
                head = first + self.read(4)
                first = None
            else:
                start = self.pos
                head = self.read(8)
            group, element = unpack_tag(head)
            tag = group << 16 | element
            if frame.guessed and not frame.discard and scope.previous < 0 and _looks_explicit(head):
                where = f"{path} is" if path else "the dataset is"
                self.walk.malformed.append(
                    f"{where} read as implicit VR but its first element reads as explicit VR too"
                    " (readers differ on what it holds)"
                )
            if group == 0xFFFE:
                if tag == ITEM_DELIMITER and end is None and not top:
                    self._delimiter(frame, unpack_length(head)[0], path)
                    break
                where = path or "the dataset"
                raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (unexpected {tag_text(tag)} in {where})")
            if implicit:
                (length,) = unpack_length(head)
                vr, length_offset = None, self.pos - 4
            else:
                if not _looks_explicit(head):
                    raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (no valid VR at {tag_text(tag)})")
                vr = head[4:6].decode("ascii")
                if vr in LONG_LENGTH_VRS:
                    self._reserved(start, head[6:8])
                    (length,) = unpack_long(self.read(4))
                    length_offset = self.pos - 4
                else:
                    (length,) = unpack_short(head)
                    length_offset = self.pos - 2
            self._element(scope, frame, tag, vr, length, start, length_offset)
        if not frame.discard:
            self._close_scope(scope, frame)
        return scope.changed

    def _close_scope(self, scope: _Scope, frame: _Frame) -> None:
        """The creators of blocks that keep nothing: dropped in strip mode. In quarantine mode a
        creator that reserves no element is reported, as a creator is a value like any other, unless
        the allow list names it."""
        for key, (creator, start, stop) in scope.creators.items():
            if key in scope.kept_blocks:
                continue
            if frame.rewrite:
                self._remove(start, stop, scope)
            elif key not in scope.used_blocks and self._shown(creator) not in self.policy.allowed_creators:
                group, element = key >> 8, key & 0xFF
                name = tag_text(group << 16 | element)
                path = f"{frame.path}.{name}" if frame.path else name
                self.walk.private.append(PrivateElement(path, group, element, self._shown(creator)))

    def _shown(self, creator: str | None) -> str | None:
        """A creator as reports may show it: only one that pydicom's private dictionary or the allow
        list knows, since the value of any other could be an identifier."""
        if creator in private_dictionaries or creator in self.policy.allowed_creators:
            return creator
        return None

    def _remove(self, start: int, stop: int, scope: _Scope) -> None:
        self.walk.removals.append((start, stop))
        for container in self.containers:
            container.removed += stop - start
        scope.changed = True

    def _element(
        self, scope: _Scope, frame: _Frame, tag: int, vr: str | None, length: int, start: int, length_offset: int
    ) -> None:
        path, discard, rewrite = frame.path, frame.discard, frame.rewrite
        implicit, little = frame.implicit, frame.little
        group, element = tag >> 16, tag & 0xFFFF
        private = group % 2 == 1
        creator: str | None = None
        block_key = -1
        dictionary_vr = keyword = ""
        written_as: tuple[str, ...] = ()  # the VRs it may be written with; empty: any
        if private:
            if element >= 0x1000:
                block_key = group << 8 | element >> 8
                known = scope.creators.get(block_key)
                creator = known[0] if known is not None else None
            semantic = _private_vr(creator, tag) if block_key >= 0 else "UN"
            name = tag_text(tag)
        else:
            dictionary_vr, keyword, written_as = _public_vr_and_keyword(tag)
            semantic = dictionary_vr
            name = keyword or tag_text(tag)
        element_path = f"{path}.{name}" if path else name

        if not discard:
            if tag > scope.previous:
                scope.previous = tag
            elif tag == scope.previous:
                self.walk.malformed.append(f"{element_path} is duplicated")
            else:
                self.walk.malformed.append(f"{element_path} is out of order")

        if vr is not None and vr != "UN":
            semantic = vr
        is_sequence = semantic == "SQ" or (
            length == UNDEFINED and tag not in PIXEL_DATA_TAGS and vr in (None, "UN", "SQ")
        )
        # A sequence where the dictionary says a value (a PN, an LO...): walked as one, it would never
        # be judged as the value a reader takes it for (pydicom reads a PatientName of undefined length
        # as a name made of the items' bytes). Private and unknown elements have no dictionary VR.
        sequence_shaped = is_sequence and bool(written_as) and "SQ" not in written_as
        if not discard and written_as:
            if sequence_shaped:
                self.walk.malformed.append(
                    f"{element_path} is encoded as a sequence, but its dictionary VR is {' or '.join(written_as)}"
                )
            elif vr is not None and vr != "UN" and vr not in written_as:
                # Judged by the VR it is written with, a PN written as LO or as OB would pass unread.
                self.walk.malformed.append(f"{element_path} is written as {vr}, not {' or '.join(written_as)}")
        guessed = False
        if vr == "UN" and is_sequence:
            implicit, little = True, True  # PS3.5 6.2.2: a UN sequence is encoded implicit VR little endian
            guessed = not frame.implicit  # pydicom takes an item for explicit VR if it looks it
            if not frame.little and not discard:
                # pydicom reads it big endian: the two readings of one item cannot both be judged.
                self.walk.malformed.append(f"{element_path} is a sequence written as UN in a big endian file")
        if not private and not discard:
            if element == 0x0000:
                if length != GROUP_LENGTH_BYTES:
                    self.walk.malformed.append(f"{element_path} is {length} bytes long, not {GROUP_LENGTH_BYTES}")
            elif not written_as and vr not in JUDGED_UNKNOWN_VRS:
                # Nothing says what such an element holds, so nothing could judge it: no VR (implicit),
                # bytes or binary numbers (text passes for them), or no VR of DICOM's. One written
                # with a VR whose values the walk judges (a newer edition's element) is judged by it.
                self.walk.malformed.append(f"{element_path} is not an element the DICOM dictionary knows")

        # Private data elements: dropped (strip), reported (quarantine), or kept (allow list). Every
        # element of a private group is data but a creator: an LO of at most 64 bytes in a creator slot
        # (a slot holding a sequence names no block: deid-data's ctbrain2 has them).
        is_creator = (
            private
            and 0x0010 <= element <= 0x00FF
            and vr in (None, "UN", "LO")
            and not is_sequence
            and length <= MAX_CREATOR_BYTES
        )
        drop = False
        inner_discard = discard
        if private and not is_creator and not discard:
            if block_key >= 0:
                scope.used_blocks.add(block_key)
            if self.policy.private_allowed(creator, group, element):
                if block_key >= 0:
                    scope.kept_blocks.add(block_key)
            else:
                self.walk.private.append(PrivateElement(element_path, group, element, self._shown(creator)))
                if rewrite:
                    drop = True
                    inner_discard = True

        if is_sequence:
            if inner_discard and length != UNDEFINED:
                self.skip(length, f"value of {element_path}")
            else:
                inner = _Frame(frame.depth, element_path, implicit, little, inner_discard, rewrite, guessed)
                items = self._sequence(inner, length, length_offset, frame.little)
                if sequence_shaped and items and not discard:
                    self._content(keyword, dictionary_vr, element_path)
            if not discard and self.profile and not private:
                self.walk.public_values.append((element_path, tag, dictionary_vr, keyword, length != 0))
        elif length == UNDEFINED:
            if tag not in PIXEL_DATA_TAGS:
                raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (undefined length of {element_path})")
            self._fragments(frame, little, element_path)
        elif tag == TRAILING_PADDING_TAG:
            self.skip(length, f"value of {element_path}")
            drop = not discard
        elif inner_discard or (length > BULK_SKIP and (semantic in BULK_VRS or tag in PIXEL_DATA_TAGS)):
            self.skip(length, f"value of {element_path}")
        else:
            value = self.load(length)
            if is_creator and not discard:
                scope.creators[group << 8 | element] = (_decode(value), start, self.pos)
            elif not discard:
                if not private:
                    self._check_shape(tag, semantic, value, element_path)
                    if not written_as and semantic in FREE_TEXT_VRS and value_looks_like_person_name(_decode(value)):
                        # No meaning is known that would let its text hold a `^`: a name, for all anyone knows.
                        self.walk.malformed.append(
                            f"{element_path} is not an element the DICOM dictionary knows, and holds text "
                            "shaped like a person's name"
                        )
                is_name = "PN" in (semantic, dictionary_vr)
                self._value(frame, tag, is_name, vr, value, length, start, element_path, keyword)
                if self.profile and not private:
                    if semantic == "PN":
                        filled = person_name_holds_value(value)  # `^` or `=` alone: an empty name
                    else:
                        filled = holds_value(value) if semantic not in BULK_VRS else bool(value)
                    self.walk.public_values.append((element_path, tag, dictionary_vr, keyword, filled))
                    if keyword == "CodeValue" and element_path.startswith("DeidentificationMethodCodeSequence["):
                        self.walk.deid_codes.append(_decode(value))

        if frame.depth == 0 and tag in PIXEL_DATA_TAGS and self.walk.pixel_offset is None:
            self.walk.pixel_offset = start
        self.walk.other_bulk_data |= frame.depth == 0 and tag in OTHER_BULK_DATA_TAGS and length > 0
        if discard:
            return
        if drop:
            self._remove(start, self.pos, scope)
            self.walk.private_removed += private and element != 0x0000
        elif element == 0x0000 and not private and group != 0x0002:
            # Retired outside the file meta (PS3.5 7.2), and four bytes nothing judges: never copied.
            self._remove(start, self.pos, scope)

    def _check_shape(self, tag: int, vr: str, value: bytes, path: str) -> None:
        """A value of a number, date, UID, code string or age VR holds nothing else: a name cannot
        hide in it. What real writers spell that holds no name passes (NaN in a DS, L-SPINE in a CS,
        an age without its unit)."""
        if vr in LETTERLESS_VRS:
            number = vr in NUMBER_VRS
            parts = value.split(b"\\") if number else [value]
            if any(
                LETTER_RUN.search(part) and not (number and NON_FINITE_NUMBER.fullmatch(part.strip(b" \0")))
                for part in parts
            ):
                self.walk.malformed.append(f"{path} holds letters, which no {vr} value has")
        elif vr == "CS":
            parts = [part.strip(b" \0") for part in value.split(b"\\")]
            if not all(CODE_STRING.fullmatch(part) or CODE_TERM.fullmatch(part) for part in parts):
                detail = "letters, digits, blanks, _; or capitals with - . / + ( )"
                self.walk.malformed.append(f"{path} holds a character no CS value has ({detail})")
        elif vr == "AS":
            parts = [part.strip(b" \0") for part in value.split(b"\\")]
            if not all(not part or AGE_STRING.fullmatch(part) for part in parts):
                self.walk.malformed.append(f"{path} is not an age (up to three digits, and D, W, M or Y)")
        width = FIXED_WIDTH_VRS.get(vr)
        if width is not None and tag & 0xFFFF:
            most = _most_values(tag)
            if len(value) % width:
                self.walk.malformed.append(f"{path} is {len(value)} bytes long, not whole {vr} values")
            elif most is not None and len(value) > most * width:
                self.walk.malformed.append(f"{path} holds {len(value) // width} {vr} values, more than {most}")

    def _value(
        self,
        frame: _Frame,
        tag: int,
        is_name: bool,
        vr: str | None,
        value: bytes,
        length: int,
        start: int,
        path: str,
        keyword: str,
    ) -> None:
        """A loaded value of an element (not a private creator) of the dataset `frame` (`path`: the
        element's own); `is_name`: its dictionary VR or the VR it is written with is PN."""
        private, depth = (tag >> 16) % 2 == 1, frame.depth
        if self.record and not private and (where := ITEM_INDEX.sub("", path)) in self.record:
            element = RawDataElement(tag, vr, length, value, start, frame.implicit, frame.little, True, False)
            self.walk.recorded.setdefault(where, []).append(element)
        if depth == 0 and not private:
            if tag not in self.walk.top:
                self.walk.top[tag] = RawDataElement(
                    tag, vr, length, value, start, frame.implicit, frame.little, True, False
                )
            if keyword in FLAG_KEYWORDS:
                self.walk.copies.setdefault(keyword, []).append(value.decode("latin-1"))
        if is_name or keyword in self.policy.person_keywords:
            self.walk.persons.append((path, keyword, _decode(value), is_name))
        elif keyword in CODED_ID_ATTRIBUTES and (depth > 0 or keyword not in FLAG_KEYWORDS):
            # A top-level OtherPatientIDs too, whatever the person list says: check 7 is no setting.
            self.walk.id_values.append((path, _decode(value)))

    def _content(self, keyword: str, dictionary_vr: str, path: str) -> None:
        """A person or identifier attribute encoded as a sequence with items: whatever they hold is
        content, which its rules (empty, or a coded id) never allow."""
        if dictionary_vr == "PN" or keyword in self.policy.person_keywords:
            self.walk.persons.append((path, keyword, None, dictionary_vr == "PN"))
        elif keyword in CODED_ID_ATTRIBUTES:
            self.walk.id_values.append((path, None))

    def _sequence(self, frame: _Frame, length: int, length_offset: int, length_little: bool) -> int:
        """The items of the sequence `frame` (its path is the sequence's), and how many there are; its
        length is written in the enclosing dataset's byte order, `length_little`."""
        depth, path, little = frame.depth, frame.path, frame.little
        if depth + 1 > self.policy.max_depth:
            raise WalkError(Reason.UNREADABLE, f"sequences nested deeper than {self.policy.max_depth} at {path}")
        order = "<" if little else ">"
        end = None
        if length != UNDEFINED:
            end = self.pos + length
            self._push(length_offset, length, length_little)
        index = 0
        while end is None or self.pos < end:
            group, element, item_length = struct.unpack(f"{order}HHL", self.read(8))
            tag = group << 16 | element
            if tag == SEQUENCE_DELIMITER:
                if end is not None:
                    raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (stray delimiter in {path})")
                self._delimiter(frame, item_length, path)
                break
            if tag != ITEM:
                raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (no item in {path})")
            if item_length == UNDEFINED:
                self._dataset(_Scope(), None, frame.item(index))
            else:
                self._push(self.pos - 4, item_length, little)
                self._dataset(_Scope(), self.pos + item_length, frame.item(index))
                self.containers.pop()
            index += 1
        if end is not None:
            if self.pos != end:
                raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM (an item overruns {path})")
            self.containers.pop()
        return index

    def _push(self, length_offset: int, length: int, little: bool) -> None:
        container = _Container(length_offset, length, little)
        self.containers.append(container)
        self.all_containers.append(container)

    def _fragments(self, frame: _Frame, little: bool, path: str) -> None:
        """Encapsulated pixel data: items skipped by their lengths, up to the delimiter."""
        order = "<" if little else ">"
        while True:
            group, element, length = struct.unpack(f"{order}HHL", self.read(8, "pixel data"))
            tag = group << 16 | element
            if tag == SEQUENCE_DELIMITER:
                self._delimiter(frame, length, path)
                return
            if tag != ITEM or length == UNDEFINED:
                raise WalkError(Reason.NOT_DICOM, "does not parse as DICOM (corrupt pixel data)")
            self.skip(length, "pixel data")


def _looks_explicit(head: bytes) -> bool:
    """Whether an element's bytes 4-5 read as a VR (two capitals): pydicom's test for explicit VR."""
    return 0x41 <= head[4] <= 0x5A and 0x41 <= head[5] <= 0x5A


def _within_ranges(ranges: list[tuple[int, int]], start: int, stop: int) -> bool:
    """Whether [start, stop) lies within one of the sorted, disjoint `ranges`."""
    index = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return index >= 0 and ranges[index][0] <= start and stop <= ranges[index][1]


def _decode(value: bytes) -> str:
    return value.decode("latin-1").strip(" \0")


def walk_header(
    stream: BinaryIO, size: int, policy: DeidPolicy, *, check_end: bool = True, record: frozenset[str] = frozenset()
) -> HeaderWalk:
    """Walk a whole Part 10 file from its first byte. Raises WalkError (quarantine the image).

    `check_end=False` reads nothing past `size` (the caller checks that the file ends there).
    `record`: keyword paths without item numbers (`Seq.Keyword`) whose values to keep, at any item
    (HeaderWalk.recorded)."""
    try:
        return _Walker(stream, size, policy, check_end, record).run()
    except (struct.error, UnicodeDecodeError) as err:
        raise WalkError(Reason.NOT_DICOM, f"does not parse as DICOM ({type(err).__name__})") from err
    except RecursionError as err:
        raise WalkError(Reason.UNREADABLE, "the header is nested too deeply to walk") from err


def _image_kind(walk: HeaderWalk) -> str | None:
    """What the object is, when it must hold pixel data (None: it need not): an image storage
    class, or any object with Rows unless its data is elsewhere (MR spectroscopy's
    SpectroscopyData, an encapsulated document: OTHER_BULK_DATA_TAGS, not empty)."""
    sop_class = walk.top.get(0x00080016)
    name = UID(_decode(sop_class.value)).name if sop_class is not None else ""
    if "Image Storage" in name or (0x00280010 in walk.top and not walk.other_bulk_data):  # Rows
        return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name} object" if name else "an image"
    return None


def judge_header(walk: HeaderWalk, policy: DeidPolicy) -> Verdict:
    """Checks 3 to 9 of the contract on a walked header; every failing check is listed."""
    verdict = Verdict()
    kind = _image_kind(walk) if walk.pixel_offset is None else None
    if kind is not None:
        detail = f"does not parse as DICOM ({kind} without pixel data: truncated, or written without it)"
        verdict.fail(Reason.NOT_DICOM, detail)
        return verdict
    if walk.malformed:
        verdict.fail(Reason.MALFORMED_HEADER, "; ".join(walk.malformed))

    why = coded_flag(walk.copies.get("PatientIdentityRemoved", []), IDENTITY_REMOVED_VALUE)
    if why is not None:
        verdict.fail(Reason.IDENTITY_NOT_REMOVED, f"PatientIdentityRemoved {why}")

    check_identity(walk.text("PatientID"), walk.text("AccessionNumber"), walk.text("StudyDate"), verdict)

    if "BurnedInAnnotation" in walk.copies:
        why = coded_flag(walk.copies["BurnedInAnnotation"], BURNED_IN_ANNOTATION_OK)
        if why is not None:
            said = "is YES" if (walk.text("BurnedInAnnotation") or "").upper() == "YES" else why
            verdict.fail(Reason.BURNED_IN_ANNOTATION, f"BurnedInAnnotation {said}")

    entity_id = walk.text("PatientID")
    item_id = walk.text("AccessionNumber")
    filled: list[str] = []
    for path, keyword, text, is_name in walk.persons:
        if text is None:  # a sequence with items: content, whatever it holds
            allowed = False
        elif is_name or keyword in NAME_MAY_BE_CODED_ID:
            allowed = person_value_allowed(text, entity_id, person_name=is_name)
        else:
            allowed = not holds_value(text)
        if not allowed and path not in filled:
            filled.append(path)
    if filled:
        verdict.fail(Reason.IDENTIFYING_ATTRIBUTE, "holds a value: " + ", ".join(filled))
    foreign = [
        path for path, text in walk.id_values if text is None or not coded_id_value_allowed(text, (entity_id, item_id))
    ]
    if foreign:
        detail = "holds an identifier other than the coded ids: " + ", ".join(foreign)
        verdict.fail(Reason.IDENTIFYING_ATTRIBUTE, detail)

    if policy.private_tags == "quarantine" and walk.private:
        listed = ", ".join(str(p) for p in walk.private[:20])
        more = f" and {len(walk.private) - 20} more" if len(walk.private) > 20 else ""
        verdict.fail(Reason.PRIVATE_ATTRIBUTE, f"private elements not on DICOM_PRIVATE_ALLOW: {listed}{more}")

    if policy.profile == "basic":
        check_basic_profile(walk, policy, verdict)
    return verdict


def _update_hashes(source_sha: Any, data: bytes, out_sha: Any, out: bytes) -> None:
    source_sha.update(data)
    if out_sha is not source_sha:
        out_sha.update(out)


class StrippedReader(io.RawIOBase):
    """The archived copy of a walked file, read once from its start: dropped ranges left out,
    patches put in (lengths, a zeroed preamble, zeroed reserved bytes), everything else (the pixel
    data) copied as it is.

    Hashes the source (source_sha256), the copy (instance_sha256), and the bytes the walk read,
    so that `verify` can tell whether the file changed between the walk and the copy.

    The two whole-file hashes are updated by one job a window, handed to `run_hashing` (by default
    run at once; the archiver runs them in a background thread): read `source_sha` and `out_sha`
    only once every job has run. `read_sha`, which `verify` needs, is updated here."""

    def __init__(
        self,
        source: BinaryIO,
        walk: HeaderWalk,
        chunk: int = COPY_CHUNK,
        run_hashing: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.source = source
        self.walk = walk
        self.chunk = chunk
        self.source_sha = hashlib.sha256()
        self.out_sha = hashlib.sha256() if walk.rewritten else self.source_sha
        self.read_sha = hashlib.sha256()
        self._run_hashing = run_hashing or (lambda job: job())
        self._pieces = self._intervals()
        self._index = 0  # of the first piece not wholly read
        self._offset = 0  # in the source
        self._window, self._window_at = b"", 0  # the copy's current window, and how much was passed on

    def readable(self) -> bool:
        return True

    def _intervals(self) -> list[tuple[int, int, bool, bool, bytes | None]]:
        """[start, stop) pieces of the source: dropped?, walked (read by the walk)?, the bytes the
        copy holds instead (None: its own)."""
        walk = self.walk
        points = {0, walk.size}
        for start, stop in walk.removals + walk.skipped:
            points.update((start, stop))
        patches = sorted(walk.patches.items())
        for offset, patch in patches:
            points.update((offset, offset + len(patch)))
        offsets = [offset for offset, _ in patches]
        edges = sorted(p for p in points if 0 <= p <= walk.size)
        pieces = []
        for start, stop in itertools.pairwise(edges):
            dropped = _within_ranges(walk.removals, start, stop)
            skipped = _within_ranges(walk.skipped, start, stop)
            replaced = None
            index = bisect.bisect_right(offsets, start) - 1
            if index >= 0 and start < offsets[index] + len(patches[index][1]):
                offset, patch = patches[index]
                replaced = patch[start - offset : stop - offset]  # a piece never straddles a patch's end
            pieces.append((start, stop, dropped, not skipped, replaced))
        return pieces

    def _next_window(self) -> bytes | None:
        """The copy of the next `chunk` bytes of the source (None at its end). The source is read
        in order, once, a window at a time, and hashed whole; dropped ranges are not passed on."""
        start = self._offset
        if start >= self.walk.size:
            return None
        n = min(self.chunk, self.walk.size - start)
        data = self.source.read(n)
        if len(data) != n:
            raise SizeChangedError(Reason.UNREADABLE, "the file ended early")
        self._offset = stop = start + n
        view, parts, unchanged = memoryview(data), [], True
        while self._index < len(self._pieces):
            piece_start, piece_stop, dropped, walked, patch = self._pieces[self._index]
            if piece_start >= stop:
                break
            a, b = max(piece_start, start), min(piece_stop, stop)
            if walked:
                self.read_sha.update(view[a - start : b - start])
            if dropped or patch is not None:
                unchanged = False
            if not dropped:
                parts.append(view[a - start : b - start] if patch is None else patch[a - piece_start : b - piece_start])
            if piece_stop > stop:
                break
            self._index += 1
        out = data if unchanged else b"".join(parts)
        self._run_hashing(functools.partial(_update_hashes, self.source_sha, data, self.out_sha, out))
        return out

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        # Pulled in the sizes tarfile asks for: a window that fits is passed on without a copy.
        need = (1 << 62) if size is None or size < 0 else size
        parts = []
        while need > 0:
            if self._window_at >= len(self._window):
                window = self._next_window()
                if window is None:
                    break
                self._window, self._window_at = window, 0
                continue
            if self._window_at == 0 and len(self._window) <= need:
                part = self._window
            else:
                part = self._window[self._window_at : self._window_at + need]
            self._window_at += len(part)
            parts.append(part)
            need -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def verify(self) -> str | None:
        """Why the copy cannot be trusted (None: it can): the bytes the walk judged changed."""
        while self._next_window() is not None:  # dropped ranges at the end are not read yet
            pass
        if self.source.read(1):
            return "grew"
        if self.read_sha.hexdigest() != self.walk.read_sha256:
            return "changed"
        return None
