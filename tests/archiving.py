"""Archiving study groups the way an archive task does, with the rows handed back in memory.

Production has one entry point, `archive_groups_spooled`, which writes the rows to a spool file
(an archive task stages them from there); tests want to look at the rows, so this runs that
entry point and reads the spool back.
"""

from __future__ import annotations

from typing import Any

from dicom_archive.batch import ProgressCallback, archive_groups_spooled
from dicom_archive.landing import LandingZone
from dicom_archive.ndjson import NdjsonSpool
from dicom_archive.plan import StudyGroup
from dicom_archive.rows import RunContext
from dicom_archive.settings import ArchiveSettings
from dicom_archive.stores import ObjectStore


def archive_groups(
    groups: list[StudyGroup],
    zone: LandingZone,
    store: ObjectStore,
    *,
    deid: dict[str, Any],
    context: RunContext,
    settings: ArchiveSettings,
    progress: ProgressCallback | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The per-archive summaries and the per-image rows of `archive_groups_spooled`."""
    with NdjsonSpool() as rows:
        summaries = archive_groups_spooled(
            groups, zone, store, rows=rows, deid=deid, context=context, settings=settings, progress=progress
        )
        return summaries, list(rows)
