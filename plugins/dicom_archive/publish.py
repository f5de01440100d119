"""Publishing one study archive: idempotent, create-only, verified.

- No object yet: stream the archive with a create-only precondition, then compare the md5 and
  crc32c computed while streaming with what the store reports; on a mismatch the object is
  deleted and the task fails.
- An object exists: build the archive again into nothing but the hashes. Same md5: left alone,
  reported as already present. Different: a clear failure, unless replacement is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_archive import PIPELINE_VERSION
from dicom_archive.archive import ArchiveDigest, ArchivedMember, Describe, write_study_archive
from dicom_archive.deid import DeidPolicy
from dicom_archive.landing import LandingZone
from dicom_archive.plan import StudyGroup
from dicom_archive.stores import ARCHIVE_CONTENT_TYPE, ObjectExistsError, ObjectStore, StoredObject

WRITTEN = "written"
ALREADY_PRESENT = "already_present"
REPLACED = "replaced"


class ArchiveConflictError(RuntimeError):
    """The archive's name is taken by different bytes, and replacement is not allowed."""


class ChecksumMismatchError(RuntimeError):
    """What the store holds is not what was streamed; the object was removed."""


@dataclass
class PublishedArchive:
    outcome: str  # written, already_present or replaced
    stored: StoredObject
    digest: ArchiveDigest
    members: list[ArchivedMember]


def archive_metadata(group: StudyGroup) -> dict[str, str]:
    return {
        "batch_id": group.batch_id,
        "collection": group.collection,
        "image_count": str(len(group.images)),
        "pipeline_version": PIPELINE_VERSION,
    }


def _conflict_message(store: ObjectStore, existing: StoredObject, digest: ArchiveDigest, n_images: int) -> str:
    return (
        f"{store.uri(existing.name)} already exists with different bytes: stored md5 {existing.md5}, "
        f"{existing.size} bytes, generation {existing.generation}, written by batch "
        f"{existing.metadata.get('batch_id', '?')} with {existing.metadata.get('image_count', '?')} images; "
        f"this batch gives md5 {digest.md5}, {digest.size} bytes, {n_images} images. "
        "Nothing was overwritten. Set DICOM_REPLACE_CHANGED_ARCHIVES=true to replace it."
    )


def publish_study_archive(
    group: StudyGroup,
    zone: LandingZone,
    store: ObjectStore,
    *,
    policy: DeidPolicy | None = None,
    compresslevel: int = 1,
    replace_changed: bool = False,
    describe: Describe | None = None,
) -> PublishedArchive:
    name = group.object_name
    existing = store.get(name)
    precondition = 0
    if existing is not None:
        digest, members = write_study_archive(
            group, zone, None, policy=policy, compresslevel=compresslevel, describe=describe
        )
        if digest.md5 == existing.md5:
            return PublishedArchive(ALREADY_PRESENT, existing, digest, members)
        if not replace_changed:
            raise ArchiveConflictError(_conflict_message(store, existing, digest, len(group.images)))
        precondition = existing.generation or 0

    try:
        with store.writer(
            name,
            metadata=archive_metadata(group),
            content_type=ARCHIVE_CONTENT_TYPE,
            if_generation_match=precondition,
        ) as stream:
            digest, members = write_study_archive(
                group, zone, stream, policy=policy, compresslevel=compresslevel, describe=describe
            )
    except ObjectExistsError:
        # Another writer won the race between our look and our write (the precondition may
        # fail before the stream ends): judge its object against a fresh digest of ours.
        raced = store.get(name)
        if raced is None:
            raise
        digest, members = write_study_archive(
            group, zone, None, policy=policy, compresslevel=compresslevel, describe=describe
        )
        if raced.md5 == digest.md5:
            return PublishedArchive(ALREADY_PRESENT, raced, digest, members)
        raise ArchiveConflictError(_conflict_message(store, raced, digest, len(group.images))) from None

    stored = store.get(name)
    if stored is None or (stored.md5, stored.crc32c, stored.size) != (digest.md5, digest.crc32c, digest.size):
        if stored is not None:
            store.delete(name, stored.generation)
        seen = "nothing" if stored is None else f"md5 {stored.md5}, crc32c {stored.crc32c}, {stored.size} bytes"
        raise ChecksumMismatchError(
            f"{store.uri(name)}: streamed md5 {digest.md5}, crc32c {digest.crc32c}, {digest.size} bytes, "
            f"but the store reports {seen}; the object was removed"
        )
    return PublishedArchive(REPLACED if existing is not None else WRITTEN, stored, digest, members)
