"""Which batches a run processes: the published batch reports are the ledger.

A run processes every complete batch that has no report yet and whose `completed_at` is before
the end of its data interval, oldest first, up to a per-run cap; the rest wait for the next run.
A backfill of a past interval reprocesses exactly the batches completed in that interval.
A local run (SEND_TO_GOOGLE=false) counts its own report (`batch.report.local.json`) as a report
too, so that it takes the next batches; a run that sends to Google counts only
`batch.report.json`, so it still sends a batch that was only handled locally.

The cap is filled from the batches the run can take, in a fair order (`select_batches` with the
archive store): a batch that another run's live claim holds is left alone and takes no slot, and
a batch tried before without a report (its claim expired, or was released by a run that failed
it) queues as of its last attempt instead of its `completed_at`. A batch that keeps failing so
goes behind the batches that came before its last attempt, and is still retried once they are
taken: no batch starves another, and none is dropped.

One listing of the landing zone tells which folders hold a batch.json and which a report; only
the manifests of batches without a report are read (plus, for a backfill, those of the
reported ones), so a poke costs O(new batches), not O(history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from dicom_archive import claims
from dicom_archive.google_errors import Explain, no_explanation
from dicom_archive.landing import MANIFEST_NAME, BatchFolder, LandingZone
from dicom_archive.manifest import ManifestError
from dicom_archive.naming import batch_id_problem
from dicom_archive.plan import read_manifest
from dicom_archive.stores import ObjectStore

DEFAULT_MAX_BATCHES_PER_RUN = 200
_UNDATED = datetime.min.replace(tzinfo=UTC)  # a batch.json whose modification time cannot be read


@dataclass
class Selection:
    """What one poke found, and why anything else was left."""

    batch_ids: list[str] = field(default_factory=list)  # to process, in turn (oldest completed_at first)
    deferred: list[str] = field(default_factory=list)  # pending, over the per-run cap: the next run
    held: dict[str, str] = field(default_factory=dict)  # pending, held by another run's live claim: who
    tried: dict[str, str] = field(default_factory=dict)  # pending, tried before without a report: the last try
    rejected: dict[str, str] = field(default_factory=dict)  # folder name -> why it is not a batch id
    not_ready: int = 0  # batch.json present, but the anonymizer is not done
    later: int = 0  # pending, but completed at or after the end of this run's interval
    unreadable: dict[str, str] = field(default_factory=dict)  # taken, with the manifest's problem
    # Those batches' dates: their batch.json's (else their folder's) modification time; None: unknown.
    unreadable_dated: dict[str, datetime | None] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{len(self.batch_ids)} to process"]
        if self.tried:
            parts.append(f"{len(self.tried)} pending tried before without a report (queued as of their last attempt)")
        if self.deferred:
            parts.append(f"{len(self.deferred)} more pending over the per-run cap (left for the next runs)")
        if self.held:
            parts.append(f"{len(self.held)} held by another run's claim (left alone, outside the cap)")
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
    store: ObjectStore | None = None,
    run_id: str | None = None,
    now: datetime | None = None,
    explain: Explain = no_explanation,
) -> Selection:
    """The batches of a run.

    - `start` is None (a scheduled or manual run): every complete batch without a report whose
      completed_at is before `end` (None: any).
    - `start` given (a backfill of [start, end)): every complete batch completed in that
      interval, reported or not: reprocessing it is a no-op where nothing changed.

    `local` (a SEND_TO_GOOGLE=false run): a local report counts as a report.

    `store` (the archive store, where the claims are) makes the cap fair: a batch held by the
    live claim of a run other than `run_id` is left out (its owner reports it), and a batch with
    an expired or released claim (tried before, without a report) takes its turn as of its last
    attempt, `max(completed_at, claimed_at)`, instead of its `completed_at`. Ties go by
    `completed_at`, then batch id: the same landing zone and claims give the same selection.
    `explain` wraps the claims' reads (the hook's explain_google_errors).

    A manifest that cannot be read is taken (its plan reports the problem, once), ordered and
    windowed by its file's modification time; `unreadable` names those this run takes. Folder
    names that are not valid batch ids are refused and never read.
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
    found = {}
    if store is not None and dated:
        with explain(f"the claims {store.uri(claims.CLAIM_ROOT + '/')}"):
            found = claims.claims_of(store, [name for _, name in dated])
    now = now or datetime.now(UTC)
    queue: list[tuple[datetime, datetime, str]] = []
    for moment, name in dated:
        claim = found.get(name)
        if claim is None:
            queue.append((moment, moment, name))
        elif claim.run_id != run_id and claim.is_held(now):
            selection.held[name] = claim.describe()
        else:
            selection.tried[name] = claim.describe()
            queue.append((max(moment, claim.claimed_at), moment, name))
    queue.sort()
    cap = max(1, limit)
    selection.batch_ids = [name for *_, name in queue[:cap]]
    selection.deferred = [name for *_, name in queue[cap:]]
    # Only a batch this run takes is reported by its plan; the others wait for the run that takes them.
    moments = {name: moment for moment, name in dated}
    selection.unreadable = {name: why for name, why in selection.unreadable.items() if name in selection.batch_ids}
    selection.unreadable_dated = {
        name: None if moments[name] == _UNDATED else moments[name] for name in selection.unreadable
    }
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
            return _UNDATED
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
