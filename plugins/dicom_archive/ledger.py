"""Which batches a run processes: the published batch reports are the ledger.

A run processes every complete batch that has no report yet and whose `completed_at` is before
the end of its data interval, oldest first, up to a per-run cap; the rest wait for the next run.
A backfill of a past interval reprocesses exactly the batches completed in that interval.
A local run (SEND_TO_GOOGLE=false) counts its own report (`batch.report.local.json`) as a report
too, so that it takes the next batches; a run that sends to Google counts only
`batch.report.json`, so it still sends a batch that was only handled locally.

One listing of the landing zone tells which folders hold a batch.json and which a report; only
the manifests of batches without a report are read (plus, for a backfill, those of the
reported ones), so a poke costs O(new batches), not O(history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from dicom_archive.landing import BatchFolder, LandingZone
from dicom_archive.manifest import MANIFEST_NAME, ManifestError
from dicom_archive.naming import batch_id_problem
from dicom_archive.plan import read_manifest

DEFAULT_MAX_BATCHES_PER_RUN = 200


@dataclass
class Selection:
    """What one poke found, and why anything else was left."""

    batch_ids: list[str] = field(default_factory=list)  # to process, oldest completed_at first
    deferred: list[str] = field(default_factory=list)  # pending, over the per-run cap: the next run
    rejected: dict[str, str] = field(default_factory=dict)  # folder name -> why it is not a batch id
    not_ready: int = 0  # batch.json present, but the anonymizer is not done
    later: int = 0  # pending, but completed at or after the end of this run's interval
    unreadable: dict[str, str] = field(default_factory=dict)  # taken, with the manifest's problem

    def describe(self) -> str:
        parts = [f"{len(self.batch_ids)} to process"]
        if self.deferred:
            parts.append(f"{len(self.deferred)} more pending over the per-run cap (left for the next runs)")
        if self.later:
            parts.append(f"{self.later} completed after this run's interval (left for a later run)")
        if self.not_ready:
            parts.append(f"{self.not_ready} not ready yet")
        if self.rejected:
            parts.append(f"{len(self.rejected)} folders refused as batch ids")
        return ", ".join(parts)


def select_batches(
    zone: LandingZone,
    *,
    end: datetime | None,
    start: datetime | None = None,
    default_collection: str | None = None,
    limit: int = DEFAULT_MAX_BATCHES_PER_RUN,
    local: bool = False,
) -> Selection:
    """The batches of a run.

    - `start` is None (a scheduled or manual run): every complete batch without a report whose
      completed_at is before `end` (None: any).
    - `start` given (a backfill of [start, end)): every complete batch completed in that
      interval, reported or not: reprocessing it is a no-op where nothing changed.

    `local` (a SEND_TO_GOOGLE=false run): a local report counts as a report.

    A manifest that cannot be read is taken (its plan reports the problem, once), ordered and
    windowed by its file's modification time. Folder names that are not valid batch ids are
    refused and never read.
    """
    selection = Selection()
    dated: list[tuple[datetime, str]] = []
    for folder in zone.list_batch_folders():
        problem = batch_id_problem(folder.name)
        if problem is not None:
            selection.rejected[folder.name] = problem
            continue
        reported = folder.has_report or (local and folder.has_local_report)
        if not folder.has_manifest or (start is None and reported):
            continue
        moment = _completed_at(zone, folder, default_collection, selection)
        if moment is None:
            continue
        if end is not None and moment >= end:
            selection.later += 1
            continue
        if start is not None and moment < start:
            continue
        dated.append((moment, folder.name))
    dated.sort()
    cap = max(1, limit)
    selection.batch_ids = [name for _, name in dated[:cap]]
    selection.deferred = [name for _, name in dated[cap:]]
    return selection


def _completed_at(
    zone: LandingZone, folder: BatchFolder, default_collection: str | None, selection: Selection
) -> datetime | None:
    try:
        manifest = read_manifest(zone, folder.name, default_collection)
    except (ManifestError, OSError) as err:
        selection.unreadable[folder.name] = str(err)
        if folder.manifest_modified is not None:
            return folder.manifest_modified
        try:
            return zone.modified(folder.name, MANIFEST_NAME)
        except OSError:  # the batch's own trouble: its plan reports it; it sorts first
            return datetime.min.replace(tzinfo=UTC)
    if manifest is None:  # removed since the listing
        return None
    if not manifest.is_ready:
        selection.not_ready += 1
        return None
    return manifest.completed_at


def check_requested(batch_ids: list[object]) -> tuple[list[str], dict[str, str]]:
    """A run's requested ids: the valid ones (sorted, once each) and the refused ones with why.
    Nothing is read or written for a refused id; an empty id is refused, never read as "all"."""
    valid: set[str] = set()
    refused: dict[str, str] = {}
    for batch_id in batch_ids:
        problem = batch_id_problem(batch_id)
        if problem is None:
            valid.add(batch_id)  # type: ignore[arg-type]
        else:
            refused[repr(batch_id)] = problem
    return sorted(valid), refused
