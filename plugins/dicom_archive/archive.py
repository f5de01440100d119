"""Deterministic study archives, built and hashed in one streaming pass.

tar (stream mode) -> gzip (python-isal, mtime 0, no file name) -> hashing sink -> any writable
(a Cloud Storage resumable upload, a local file, or nothing but the hashes). Each image's whole
header is walked and judged again (header_walk; the pixel data skipped by its length), then the
file is streamed once into the tar: private elements dropped from the header (DICOM_PRIVATE_TAGS
=strip), everything else copied as it is, the source and archived sha256 taken on the way.
Memory stays bounded by the copy buffers and the header, whatever the study size.

Three threads share a build, as `tar | gzip` shares it between two processes: the caller's reads,
walks and tars the images; one hashes them (HashingThread); one compresses the tar and hashes the
output (isal's threaded gzip writer). isal and hashlib release the GIL, so a build uses two cores
where it has them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from isal import igzip_threaded
from pydicom.dataset import Dataset

from dicom_archive.deflated import walked_image
from dicom_archive.deid_gate import DeidPolicy, StudyIdentity
from dicom_archive.header_walk import SizeChangedError, StrippedReader, WalkError, judge_header
from dicom_archive.landing import HeldImagesError, LandingZone, file_identity_of
from dicom_archive.plan import ImageRecord, StudyGroup
from dicom_archive.settings import DEFAULT_COMPRESSLEVEL
from dicom_archive.stores import Checksums

COPY_CHUNK = 1024 * 1024
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
    # What `row_fields` returned for the header (the header itself is not kept); empty when the
    # caller keeps the fields elsewhere (an archive task spools them: batch.StudyFields).
    fields: dict[str, Any]
    source_sha256: str = ""  # of the file in the landing zone
    private_elements_removed: int = 0


# The row columns an archived image's parsed header gives (rows.image_fields in the pipeline).
RowFields = Callable[[Dataset, ImageRecord], dict[str, Any]]


@dataclass
class ArchiveDigest:
    size: int
    md5: str  # base64, as Cloud Storage reports it
    crc32c: str  # base64 of the big-endian value, as Cloud Storage reports it


class HashingSink(io.RawIOBase):
    """Counts and hashes everything written, then passes it on (or drops it if target is None)."""

    def __init__(self, target: BinaryIO | None) -> None:
        self.target = target
        self.checksums = Checksums()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.checksums.update(data)
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
        return ArchiveDigest(size=self.checksums.size, md5=self.checksums.md5, crc32c=self.checksums.crc32c)


class HashingThread:
    """Runs the images' sha256 updates in one background thread, in the order given (hashlib
    releases the GIL on large buffers), while the calling thread reads and checks the next bytes.
    At most `backlog` jobs wait, so memory stays bounded; `drain` waits for all and re-raises."""

    def __init__(self, backlog: int = 4) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="archive-sha256")
        self._jobs: collections.deque[Future[None]] = collections.deque()
        self._backlog = backlog

    def run(self, job: Callable[[], None]) -> None:
        self._jobs.append(self._pool.submit(job))
        while len(self._jobs) > self._backlog:
            self._jobs.popleft().result()

    def drain(self) -> None:
        while self._jobs:
            self._jobs.popleft().result()

    @classmethod
    @contextlib.contextmanager
    def started(cls) -> Iterator[HashingThread]:
        hashing = cls()
        try:
            yield hashing
        finally:
            hashing._pool.shutdown(wait=True, cancel_futures=True)


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


def study_policy(group: StudyGroup, policy: DeidPolicy | None) -> DeidPolicy:
    """The policy an archive's images are judged by: the batch's declared de-identification
    options (batch.json deid.options) apply to the basic profile."""
    policy = policy or DeidPolicy()
    if group.deid_options:
        policy = dataclasses.replace(policy, profile_options=tuple(group.deid_options))
    return policy


def write_study_archive(
    group: StudyGroup,
    zone: LandingZone,
    sink: BinaryIO | None,
    *,
    policy: DeidPolicy | None = None,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
    row_fields: RowFields | None = None,
    held: set[str] | None = None,
) -> tuple[ArchiveDigest, list[ArchivedMember]]:
    """Write the group's tar.gz to `sink` (None: only compute the digest); return its digest and members.

    The bytes depend only on the images and their order (sorted by series, instance, UIDs,
    then path), never on time, user or machine. Memory stays flat in the study size: each
    image's header is parsed, checked, passed to `row_fields`, and dropped. `held`: the batch's
    held identities (held_identities), when the caller has them; None: they are found now.
    """
    policy = study_policy(group, policy)
    output = HashingSink(sink)
    stem = group.stem
    with (
        HashingThread.started() as hashing,
        # The gzip header is fixed (mtime 0, no file name), and the blocks follow the writes,
        # which follow the images: the same images give the same bytes.
        igzip_threaded.open(output, "wb", compresslevel=compresslevel, threads=1, block_size=COPY_CHUNK) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_CHUNK) as tar,
    ):
        tar.copybufsize = COPY_CHUNK
        tar.addfile(_tar_info(stem, 0, is_dir=True))
        held = held_identities(zone, group.batch_id) if held is None else held
        hashed_members = [
            _add_image(tar, zone, group, stem, ordinal, image, policy, row_fields, hashing, held)
            for ordinal, image in enumerate(group.sorted_images(), start=1)
        ]
        hashing.drain()
    return output.digest(), [member() for member in hashed_members]


def _add_image(
    tar: tarfile.TarFile,
    zone: LandingZone,
    group: StudyGroup,
    stem: str,
    ordinal: int,
    image: ImageRecord,
    policy: DeidPolicy,
    row_fields: RowFields | None,
    hashing: HashingThread,
    held: set[str],
) -> Callable[[], ArchivedMember]:
    """Checks the image again and streams it into `tar`; returns its member, to be read once
    `hashing` has drained."""
    name = member_name(stem, ordinal, image)
    where = zone.describe(group.batch_id, image.relpath)
    try:
        stream = zone.open(group.batch_id, image.relpath, chunk_size=COPY_CHUNK, source=image.source_identity)
    except FileNotFoundError as err:
        raise ArchiveIntegrityError(f"{where} no longer exists (removed after planning); {_VOID}") from err
    with stream, contextlib.ExitStack() as inflated:
        # A file swapped after planning must never be uploaded unchecked, nor under another
        # study's name: only the very file the plan judged is read (its identity, taken from
        # the opened file), and its whole header is walked and judged again.
        opened = _check_same_file(zone, stream, image, where, held)
        try:
            # The reader's verify checks the end (a deflated image's inflating checks it too).
            walked = inflated.enter_context(walked_image(stream, image.size, policy, check_end=False))
        except SizeChangedError as err:
            change = "grew" if "grew" in err.detail else "changed size"
            raise ArchiveIntegrityError(f"{where} {change} since it was checked ({err.detail})") from err
        except WalkError as err:
            raise ArchiveIntegrityError(f"{where} no longer passes the de-identification check ({err.reason})") from err
        except FileNotFoundError as err:  # a bucket's object: its planned generation is gone
            raise ArchiveIntegrityError(f"{where} no longer exists as planned (replaced or removed); {_VOID}") from err
        walk = walked.walk
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
        walked.stream.seek(0)
        reader = StrippedReader(walked.stream, walk, COPY_CHUNK, hashing.run)
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
        if dict(zone.source_identity(stream)) != opened:
            # Written to after the identity check, while it was read (a rewrite in place).
            raise ArchiveIntegrityError(f"{where} changed while it was archived; {_VOID}")
    fields = row_fields(walk.dataset(), image) if row_fields is not None else {}
    # Only the hash objects wait for the drain: the reader (its last window is the image, for a
    # small one) and the walk must not live until the end of the study.
    relpath, size, removed = image.relpath, walk.output_size, walk.private_removed
    out_sha, source_sha, landing_sha256 = reader.out_sha, reader.source_sha, walked.landing_sha256
    return lambda: ArchivedMember(
        relpath,
        name,
        size,
        out_sha.hexdigest(),
        fields,
        source_sha256=landing_sha256 or source_sha.hexdigest(),
        private_elements_removed=removed,
    )


_VOID = "nothing of this archive is kept"


def held_identities(zone: LandingZone, batch_id: str) -> set[str]:
    """The identities of the batch's images held back under PHI/, found again at archive time
    (the plan's may be out of date). Walking the batch's folders costs a listing each: a caller
    that archives many studies of one batch finds them once and passes them on."""
    try:
        return zone.held_identities(batch_id)
    except HeldImagesError as err:
        raise ArchiveIntegrityError(
            f"{zone.describe(batch_id, err.relpath)}: {err.problem}; the images held under PHI/ cannot all "
            f"be found, so no image of the batch is known not to be one of them: {_VOID}"
        ) from err


# What still tells one file from another when the plan ran on another machine: its device and inode
# numbers are that machine's (an NFS or gcsfuse mount numbers them per client).
PORTABLE_IDENTITY = ("size", "mtime_ns")


def _check_same_file(
    zone: LandingZone, stream: BinaryIO, image: ImageRecord, where: str, held: set[str]
) -> dict[str, int]:
    """Refuses (ArchiveIntegrityError) an opened file that is not the one the plan judged, or
    that is one of the images held under PHI/ (on this machine); returns its identity. The
    contract lets no file change once the batch is complete: an archive holding a changed image
    cannot be trusted, whatever it holds now."""
    if not image.source_identity:
        raise ArchiveIntegrityError(
            f"{where}: the plan does not record which file it checked (a plan staged by an earlier version), so "
            f"the file cannot be told from one swapped since; {_VOID} (plan the batch again)"
        )
    opened = dict(zone.source_identity(stream))
    if file_identity_of(opened) in held:
        raise ArchiveIntegrityError(f"{where} now leads to an image held back under PHI/; {_VOID}")
    planned = image.source_identity
    keys = set(planned) | set(opened)
    if opened.get("host") != planned.get("host"):
        keys = set(PORTABLE_IDENTITY)
    changed = ", ".join(key for key in sorted(keys) if opened.get(key) != planned.get(key))
    if changed:
        raise ArchiveIntegrityError(
            f"{where} is not the file that was planned (changed after planning: {changed}); {_VOID}"
        )
    return opened


# ------------------------------------------------------------------------------------ content identity
#
# An archive is identified by what it holds, not by its compressed bytes: a sha256 over the sorted
# (member name, member sha256) list, with a format version. The compression level, the gzip
# library and the tar layout can change without changing it.

CONTENT_DIGEST_FORMAT = "1"


def content_digest(members: Iterable[tuple[str, str]]) -> str:
    """The content digest of an archive's images: (member name, sha256 hex) pairs, any order."""
    h = hashlib.sha256(f"dicom-archive-content/{CONTENT_DIGEST_FORMAT}\n".encode())
    for name, sha256 in sorted(members):
        h.update(f"{name}\0{sha256}\n".encode())
    return h.hexdigest()


def members_digest(members: Iterable[ArchivedMember]) -> str:
    return content_digest((m.member_name, m.sha256) for m in members)


class _DigestOnlyTar:
    """Stands in for the tar stream when only the members' hashes are wanted: each member's
    bytes are read (and so hashed by the reader that _add_image wraps around the image) and
    dropped. Nothing is compressed and nothing is written."""

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: BinaryIO | None = None) -> None:
        remaining = tarinfo.size
        while remaining > 0 and fileobj is not None:
            data = fileobj.read(min(COPY_CHUNK, remaining))
            if not data:
                raise OSError("unexpected end of data")  # what tarfile says for a short file
            remaining -= len(data)


def hash_study_members(
    group: StudyGroup,
    zone: LandingZone,
    *,
    policy: DeidPolicy | None = None,
    row_fields: RowFields | None = None,
    held: set[str] | None = None,
) -> list[ArchivedMember]:
    """The members `write_study_archive` would write, from one read of each image, without
    building the archive: the same per-image code path (checks included), into no tar."""
    policy = study_policy(group, policy)
    tar: Any = _DigestOnlyTar()
    held = held_identities(zone, group.batch_id) if held is None else held
    with HashingThread.started() as hashing:
        hashed_members = [
            _add_image(tar, zone, group, group.stem, ordinal, image, policy, row_fields, hashing, held)
            for ordinal, image in enumerate(group.sorted_images(), start=1)
        ]
        hashing.drain()
    return [member() for member in hashed_members]


def read_archive_members(stream: BinaryIO) -> list[tuple[str, str]]:
    """(member name, sha256 hex) of every file in a tar.gz stream (an archive written before
    objects carried their content digest). Folders are not members."""
    found = []
    with tarfile.open(fileobj=stream, mode="r|gz", bufsize=COPY_CHUNK) as tar:
        for info in tar:
            if not info.isfile():
                continue
            source = tar.extractfile(info)
            sha256 = hashlib.sha256()
            while source is not None and (chunk := source.read(COPY_CHUNK)):
                sha256.update(chunk)
            found.append((info.name, sha256.hexdigest()))
    return found
