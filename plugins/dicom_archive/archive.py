"""Deterministic study archives, built and hashed in one streaming pass.

tar (stream mode) -> gzip (python-isal, mtime 0, no file name) -> hashing sink -> any writable
(a Cloud Storage resumable upload, a local file, or nothing but the hashes). Each image's whole
header is walked and judged again (header_walk; the pixel data skipped by its length), then the
file is streamed once into the tar: private elements dropped from the header (DICOM_PRIVATE_TAGS
=strip), everything else copied as it is, the source and archived sha256 taken on the way.
Memory stays bounded by the copy buffers and the header, whatever the study size.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import google_crc32c
from isal import igzip
from pydicom.dataset import Dataset

from dicom_archive.deid import DeidPolicy, StudyIdentity
from dicom_archive.header_walk import SizeChangedError, StrippedReader, WalkError, judge_header, walk_header
from dicom_archive.landing import LandingZone
from dicom_archive.plan import ImageRecord, StudyGroup

COPY_CHUNK = 1024 * 1024
DEFAULT_COMPRESSLEVEL = 1  # python-isal levels are 0 to 3
FILE_MODE = 0o644
DIR_MODE = 0o755


class ArchiveIntegrityError(RuntimeError):
    """An image changed between planning and archiving; the archive must not be kept."""


@dataclass
class ArchivedMember:
    relpath: str
    member_name: str
    size: int
    sha256: str  # of the archived copy (private elements stripped): with the collection, the row key
    fields: dict[str, Any]  # what `describe` took from the header; the header itself is not kept
    source_sha256: str = ""  # of the file in the landing zone
    private_elements_removed: int = 0


# What to keep of an archived image's parsed header (rows.image_fields in the pipeline).
Describe = Callable[[Dataset, ImageRecord], dict[str, Any]]


@dataclass
class ArchiveDigest:
    size: int
    md5: str  # base64, as Cloud Storage reports it
    crc32c: str  # base64 of the big-endian value, as Cloud Storage reports it


class HashingSink(io.RawIOBase):
    """Counts and hashes everything written, then passes it on (or drops it if target is None)."""

    def __init__(self, target: BinaryIO | None) -> None:
        self.target = target
        self.size = 0
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._crc32c = google_crc32c.Checksum()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._md5.update(data)
        self._crc32c.update(data)
        self.size += len(data)
        if self.target is not None:
            try:
                self.target.write(data)
            except BaseException:
                # The archive is void. Drop what the tar and gzip streams still flush on their
                # way out, so that the sink's first error is the one reported, not a follow-up.
                self.target = None
                raise
        return len(data)

    def digest(self) -> ArchiveDigest:
        return ArchiveDigest(
            size=self.size,
            md5=base64.b64encode(self._md5.digest()).decode(),
            crc32c=base64.b64encode(self._crc32c.digest()).decode(),
        )


def member_name(stem: str, ordinal: int, image: ImageRecord) -> str:
    """Unique by the ordinal; the series folder keeps the archive pleasant to browse.
    Nothing of the anonymizer's file names goes in: names come from validated ids."""
    series = f"S{image.series_number}" if image.series_number is not None else "S-unknown"
    return f"{stem}/{series}/{ordinal:05d}.dcm"


def _tar_info(name: str, size: int, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = DIR_MODE if is_dir else FILE_MODE
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_study_archive(
    group: StudyGroup,
    zone: LandingZone,
    sink: BinaryIO | None,
    *,
    policy: DeidPolicy | None = None,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
    describe: Describe | None = None,
) -> tuple[ArchiveDigest, list[ArchivedMember]]:
    """Write the group's tar.gz to `sink` (None: only compute the digest) and describe it.

    The bytes depend only on the images and their order (sorted by series, instance, UIDs,
    then path), never on time, user or machine. Memory stays flat in the study size: each
    image's header is parsed, checked, passed to `describe`, and dropped.
    """
    policy = policy or DeidPolicy()
    if group.deid_options:
        policy = dataclasses.replace(policy, profile_options=tuple(group.deid_options))
    hashing = HashingSink(sink)
    members: list[ArchivedMember] = []
    stem = group.stem
    with (
        igzip.GzipFile(filename="", mode="wb", compresslevel=compresslevel, fileobj=hashing, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_CHUNK) as tar,
    ):
        tar.copybufsize = COPY_CHUNK
        tar.addfile(_tar_info(stem, 0, is_dir=True))
        for ordinal, image in enumerate(group.sorted_images(), start=1):
            members.append(_add_image(tar, zone, group, stem, ordinal, image, policy, describe))
    return hashing.digest(), members


def _add_image(
    tar: tarfile.TarFile,
    zone: LandingZone,
    group: StudyGroup,
    stem: str,
    ordinal: int,
    image: ImageRecord,
    policy: DeidPolicy,
    describe: Describe | None,
) -> ArchivedMember:
    name = member_name(stem, ordinal, image)
    where = zone.describe(group.batch_id, image.relpath)
    with zone.open(group.batch_id, image.relpath, chunk_size=COPY_CHUNK) as stream:
        # The whole header is walked and judged again here: a file swapped after planning must
        # never be uploaded unchecked, nor under another study's name.
        try:
            walk = walk_header(stream, image.size, policy)
        except SizeChangedError as err:
            change = "grew" if "grew" in err.detail else "changed size"
            raise ArchiveIntegrityError(f"{where} {change} since it was checked ({err.detail})") from err
        except WalkError as err:
            raise ArchiveIntegrityError(f"{where} no longer passes the de-identification check ({err.reason})") from err
        verdict = judge_header(walk, policy)
        if verdict.failures:
            reasons = ", ".join(sorted({str(f.reason) for f in verdict.failures}))
            raise ArchiveIntegrityError(f"{where} no longer passes the de-identification check ({reasons})")
        planned = StudyIdentity(group.entity_id, group.study_date, group.item_id)
        if verdict.identity != planned:
            raise ArchiveIntegrityError(
                f"{where}: PatientID, StudyDate or AccessionNumber differ from the plan's (the file was "
                "replaced after planning); nothing of this archive is kept"
            )
        stream.seek(0)
        reader = StrippedReader(stream, walk, COPY_CHUNK)
        try:
            tar.addfile(_tar_info(name, walk.output_size), reader)
        except SizeChangedError as err:
            raise ArchiveIntegrityError(f"{where} changed size since it was checked ({err.detail})") from err
        except OSError as err:
            raise ArchiveIntegrityError(f"{where} changed size since it was checked ({err})") from err
        problem = reader.verify()
        if problem == "grew":
            raise ArchiveIntegrityError(f"{where} grew since it was checked")
        if problem is not None:
            raise ArchiveIntegrityError(f"{where} changed while it was archived")
    fields = describe(walk.dataset(), image) if describe is not None else {}
    return ArchivedMember(
        image.relpath,
        name,
        walk.output_size,
        reader.out_sha.hexdigest(),
        fields,
        source_sha256=reader.source_sha.hexdigest(),
        private_elements_removed=walk.private_removed,
    )
