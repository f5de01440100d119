"""Publishing one study archive: idempotent, create-only, verified, identified by its content.

An archive's identity is its content digest (archive.content_digest: a sha256 over the sorted
(member name, member sha256) list, with a format version), kept in the object's custom metadata.
The compressed bytes are never compared: a change of DICOM_GZIP_LEVEL, of python-isal or of the
tar layout leaves the identity as it is.

- No object yet: stream the archive with a create-only precondition, compare the md5 and crc32c
  computed while streaming with what the store reports (a mismatch deletes the object and fails),
  then record the content digest in the object's metadata (guarded by its metageneration).
- An object exists: hash each image once, without compressing or uploading anything, and compare
  the digest with the object's. Same: left alone, reported as already present. Different: a
  conflict, or with replacement allowed a replacement guarded by the old generation.
- An object without a digest (written before digests existed, or whose digest update was
  interrupted) is read once: its members are hashed and, if they match, the digest is added by a
  metadata-only update guarded by the metageneration. Later reruns are cheap again.

Newer wins: the object also records the `completed_at` of the batch that wrote it. A batch that
finds other content written by a batch completed after it (a rerun or backfill of an older batch,
or an older batch processed late) leaves the object alone, whatever DICOM_REPLACE_CHANGED_ARCHIVES
says: the study exists in a newer version (outcome `superseded`; it gives no rows, so the MERGE
neither updates nor deletes any row of it). Equal completed_at (the same batch, or a tie) keeps
the conflict-or-replace rule. An object without the field (older code) takes its batch's
completed_at from that batch's published report; when the order cannot be established at all,
nothing is replaced (a conflict): a newer version is never lost.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import tarfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dicom_archive import PIPELINE_VERSION
from dicom_archive.archive import (
    CONTENT_DIGEST_FORMAT,
    ArchiveDigest,
    ArchivedMember,
    RowFields,
    content_digest,
    hash_study_members,
    held_identities,
    members_digest,
    read_archive_members,
    write_study_archive,
)
from dicom_archive.deid_gate import DeidPolicy
from dicom_archive.landing import LandingZone
from dicom_archive.manifest import ManifestError, parse_rfc3339
from dicom_archive.naming import batch_report_object_name
from dicom_archive.plan import StudyGroup
from dicom_archive.settings import DEFAULT_COMPRESSLEVEL
from dicom_archive.stores import (
    ARCHIVE_CONTENT_TYPE,
    ObjectChangedError,
    ObjectExistsError,
    ObjectStore,
    StoredObject,
)

WRITTEN = "written"
ALREADY_PRESENT = "already_present"
REPLACED = "replaced"
SUPERSEDED = "superseded"  # other content, written by a batch completed after this one: left alone

DIGEST_KEY = "content_digest"
DIGEST_FORMAT_KEY = "content_digest_format"
# Set after the MERGE that loaded the archive's rows succeeded: the generation whose rows are in
# the table. A rerun that finds the archive present with its rows loaded builds no rows at all.
ROWS_LOADED_KEY = "rows_loaded_generation"
# The completed_at (RFC 3339, UTC) of the batch that wrote the object: an older batch never replaces it.
COMPLETED_AT_KEY = "batch_completed_at"


class ArchiveConflictError(RuntimeError):
    """The archive's name is taken by other content, and replacement is not allowed."""


class ChecksumMismatchError(RuntimeError):
    """What the store holds is not what was streamed; the object was removed."""


@dataclass
class PublishedArchive:
    outcome: str  # written, already_present, replaced or superseded
    stored: StoredObject
    digest: ArchiveDigest
    members: list[ArchivedMember]
    content_digest: str = ""
    legacy_checked: bool = False  # an object without a digest was read to compare it
    images_before: int | None = None  # replaced: how many images the old object held
    rows_loaded: bool = False  # present, and its rows are known to be in the table: no rows needed
    newer: NewerBatch | None = None  # superseded: the batch whose version the object holds


def archive_metadata(group: StudyGroup, members: list[ArchivedMember] | None = None) -> dict[str, str]:
    metadata = {
        "batch_id": group.batch_id,
        "collection": group.collection,
        "image_count": str(len(members) if members is not None else len(group.images)),
        "pipeline_version": PIPELINE_VERSION,
    }
    completed_at = _instant(group.completed_at)
    if completed_at is not None:
        metadata[COMPLETED_AT_KEY] = completed_at.isoformat()
    if members is not None:
        metadata[DIGEST_KEY] = members_digest(members)
        metadata[DIGEST_FORMAT_KEY] = CONTENT_DIGEST_FORMAT
    return metadata


def stored_digest(stored: StoredObject) -> str | None:
    """The object's content digest, if it carries one of the current format."""
    if stored.metadata.get(DIGEST_FORMAT_KEY) != CONTENT_DIGEST_FORMAT:
        return None
    return stored.metadata.get(DIGEST_KEY) or None


def _instant(value: object) -> datetime | None:
    """An RFC 3339 timestamp as a UTC datetime; None when absent or not one."""
    try:
        return parse_rfc3339(value, "archive metadata", COMPLETED_AT_KEY) if value else None
    except ManifestError:
        return None


@dataclass(frozen=True)
class NewerBatch:
    """The batch, completed after this one, whose version of the study the object holds."""

    batch_id: str
    completed_at: str  # RFC 3339, UTC


def writer_completed_at(store: ObjectStore, existing: StoredObject) -> datetime | None:
    """The completed_at of the batch that wrote `existing`: from its metadata or, for an object
    written before the field existed, from that batch's published report (the ledger). None when
    neither tells."""
    recorded = existing.metadata.get(COMPLETED_AT_KEY)
    if recorded is not None:
        return _instant(recorded)
    batch_id, collection = existing.metadata.get("batch_id"), existing.metadata.get("collection")
    if not batch_id or not collection:
        return None
    try:
        raw = store.read_bytes(batch_report_object_name(collection, batch_id))
        report = json.loads(raw) if raw is not None else None
    except (ValueError, OSError):  # a refused id or collection, or an unreadable report
        return None
    if not isinstance(report, dict) or report.get("batch_id") != batch_id:
        return None
    return _instant(report.get("completed_at"))


def newer_batch(store: ObjectStore, existing: StoredObject, group: StudyGroup) -> NewerBatch | bool | None:
    """Which batch wins when `existing` holds other content than `group`'s batch gives.

    A NewerBatch: the object was written by a batch completed after this one; it is left alone.
    None: it was written by this batch, an older one or one completed at the same instant; the
    conflict-or-replace rule applies. False: the order cannot be established (a field or a report
    missing, on either side); nothing may be replaced."""
    writer = existing.metadata.get("batch_id")
    if writer is not None and writer == group.batch_id:
        return None
    ours, theirs = _instant(group.completed_at), writer_completed_at(store, existing)
    if ours is None or theirs is None:
        return False
    if theirs > ours:
        return NewerBatch(writer or "?", theirs.isoformat())
    return None


@dataclass
class _Judgement:
    same: bool
    stored: StoredObject  # possibly with its digest just added
    legacy_checked: bool
    images: int | None  # images in the stored object, when known


def _judge(store: ObjectStore, existing: StoredObject, digest: str) -> _Judgement:
    """Does `existing` hold the content whose digest is `digest`?"""
    known = stored_digest(existing)
    count = existing.metadata.get("image_count")
    if known is not None:
        return _Judgement(known == digest, existing, False, int(count) if count and count.isdigit() else None)
    # No digest: read the members of exactly the generation that was looked at.
    try:
        with store.open_reader(existing.name, existing.generation) as stream:
            members = read_archive_members(stream)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile):
        return _Judgement(False, existing, True, None)  # not an archive of ours at all
    theirs = content_digest(members)
    if theirs != digest:
        return _Judgement(False, existing, True, len(members))
    metadata = {**existing.metadata, DIGEST_KEY: theirs, DIGEST_FORMAT_KEY: CONTENT_DIGEST_FORMAT}
    metadata.setdefault("image_count", str(len(members)))
    try:
        updated = store.update_metadata(existing.name, metadata, if_metageneration_match=existing.metageneration)
    except ObjectChangedError:
        updated = existing  # someone else updated it first; what we compared is still that generation
    return _Judgement(True, updated if updated.generation == existing.generation else existing, True, len(members))


def _conflict_message(store: ObjectStore, existing: StoredObject, judged: _Judgement, digest: str, n: int) -> str:
    theirs = stored_digest(existing) or "none (an object without a digest: its members were read)"
    images = judged.images if judged.images is not None else "?"
    return (
        f"{store.uri(existing.name)} already exists with different content: stored content digest {theirs}, "
        f"generation {existing.generation}, written by batch {existing.metadata.get('batch_id', '?')} with "
        f"{images} images; this batch gives content digest {digest}, {n} images. "
        "Nothing was overwritten. Set DICOM_REPLACE_CHANGED_ARCHIVES=true to replace it."
    )


def _unordered_message(store: ObjectStore, existing: StoredObject, digest: str, n: int) -> str:
    return (
        f"{store.uri(existing.name)} already exists with different content (generation {existing.generation}, "
        f"written by batch {existing.metadata.get('batch_id', '?')}), and which of the two batches completed "
        f"later cannot be established (no {COMPLETED_AT_KEY} on the object and no published report of its "
        f"batch, or no completed_at for this batch); this batch gives content digest {digest}, {n} images. "
        "Nothing was overwritten, so that a newer version is never lost."
    )


def _kept(
    outcome: str, judged: _Judgement, members: list[ArchivedMember], digest: str, **fields: Any
) -> PublishedArchive:
    """The archive already stored, left as it is (ALREADY_PRESENT or SUPERSEDED)."""
    stored = judged.stored
    return PublishedArchive(
        outcome,
        stored,
        ArchiveDigest(stored.size, stored.md5, stored.crc32c),
        members,
        content_digest=digest,
        legacy_checked=judged.legacy_checked,
        **fields,
    )


def _superseded(judged: _Judgement, members: list[ArchivedMember], digest: str, newer: NewerBatch) -> PublishedArchive:
    return _kept(SUPERSEDED, judged, members, digest, images_before=judged.images, newer=newer)


def _differs(
    store: ObjectStore,
    existing: StoredObject,
    judged: _Judgement,
    group: StudyGroup,
    members: list[ArchivedMember],
    digest: str,
    replace_changed: bool,
) -> PublishedArchive | None:
    """`existing` holds other content: superseded (a newer batch wrote it), a conflict, or None
    when it may be replaced."""
    order = newer_batch(store, existing, group)
    if isinstance(order, NewerBatch):
        return _superseded(judged, members, digest, order)
    if not replace_changed:
        raise ArchiveConflictError(_conflict_message(store, existing, judged, digest, len(members)))
    if order is False:
        raise ArchiveConflictError(_unordered_message(store, existing, digest, len(members)))
    return None


def rows_loaded(stored: StoredObject) -> bool:
    """Whether the rows of this very generation were loaded (see ROWS_LOADED_KEY)."""
    return stored.generation is not None and stored.metadata.get(ROWS_LOADED_KEY) == str(stored.generation)


def _present(judged: _Judgement, members: list[ArchivedMember], digest: str) -> PublishedArchive:
    loaded = rows_loaded(judged.stored) and stored_digest(judged.stored) == digest
    return _kept(ALREADY_PRESENT, judged, members, digest, rows_loaded=loaded)


def mark_rows_loaded(store: ObjectStore, name: str, generation: int | None) -> bool:
    """Record on the archive that the rows of `generation` are in the table (after the MERGE).
    Metadata only, guarded by the metageneration; False if the object moved on meanwhile."""
    stored = store.get(name)
    if stored is None or generation is None or stored.generation != generation:
        return False
    if rows_loaded(stored):
        return True
    try:
        store.update_metadata(
            name,
            {**stored.metadata, ROWS_LOADED_KEY: str(generation)},
            if_metageneration_match=stored.metageneration,
        )
    except ObjectChangedError:
        return False
    return True


def publish_study_archive(
    group: StudyGroup,
    zone: LandingZone,
    store: ObjectStore,
    *,
    policy: DeidPolicy | None = None,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
    replace_changed: bool = False,
    row_fields: RowFields | None = None,
    held: set[str] | None = None,
) -> PublishedArchive:
    name = group.object_name
    held = held_identities(zone, group.batch_id) if held is None else held  # one walk for all passes
    existing = store.get(name)
    precondition = 0
    judged: _Judgement | None = None
    if existing is not None:
        # A rerun: hash each image once, compress nothing, upload nothing. When the rows of this
        # generation are known to be loaded, not even the rows' header fields are taken.
        needs_rows = not (rows_loaded(existing) and stored_digest(existing) is not None)
        members = hash_study_members(
            group, zone, policy=policy, row_fields=row_fields if needs_rows else None, held=held
        )
        digest = members_digest(members)
        judged = _judge(store, existing, digest)
        if judged.same:
            return _present(judged, members, digest)
        superseded = _differs(store, existing, judged, group, members, digest, replace_changed)
        if superseded is not None:
            return superseded
        precondition = existing.generation or 0

    try:
        with store.writer(
            name,
            metadata=archive_metadata(group),
            content_type=ARCHIVE_CONTENT_TYPE,
            if_generation_match=precondition,
        ) as stream:
            archived, members = write_study_archive(
                group, zone, stream, policy=policy, compresslevel=compresslevel, row_fields=row_fields, held=held
            )
    except ObjectExistsError:
        # Another writer won the race between our look and our write (the precondition may
        # fail before the stream ends): judge its object by content.
        raced = store.get(name)
        if raced is None:
            raise
        members = hash_study_members(group, zone, policy=policy, row_fields=row_fields, held=held)
        digest = members_digest(members)
        raced_judged = _judge(store, raced, digest)
        if raced_judged.same:
            return _present(raced_judged, members, digest)
        order = newer_batch(store, raced, group)
        if isinstance(order, NewerBatch):
            return _superseded(raced_judged, members, digest, order)
        raise ArchiveConflictError(_conflict_message(store, raced, raced_judged, digest, len(members))) from None

    stored = store.get(name)
    if stored is None or (stored.md5, stored.crc32c, stored.size) != (archived.md5, archived.crc32c, archived.size):
        if stored is not None:
            store.delete(name, stored.generation)
        seen = "nothing" if stored is None else f"md5 {stored.md5}, crc32c {stored.crc32c}, {stored.size} bytes"
        raise ChecksumMismatchError(
            f"{store.uri(name)}: streamed md5 {archived.md5}, crc32c {archived.crc32c}, {archived.size} bytes, "
            f"but the store reports {seen}; the object was removed"
        )
    # The digest is known only once every image went through; a resumable upload fixes its
    # metadata when it starts, so it is added now. Interrupted here, the object is judged like
    # one without a digest on the next run (its members are read once) and repaired then.
    with contextlib.suppress(ObjectChangedError):
        stored = store.update_metadata(
            name, archive_metadata(group, members), if_metageneration_match=stored.metageneration
        )
    return PublishedArchive(
        REPLACED if existing is not None else WRITTEN,
        stored,
        archived,
        members,
        content_digest=members_digest(members),
        legacy_checked=bool(judged and judged.legacy_checked),
        images_before=judged.images if judged is not None else None,
    )
