"""The rows of the batches view, from what the pipeline already writes.

Sources: the landing zone (batch folders, `batch.json`, the reports written beside each batch),
the published reports in the archive store, its staging area (`_staging/<batch_id>/<run>/`:
a batch being processed), and the runs of dicom_storage that planned each batch (their
plan_batches XCom). A row carries states, counts, timings and ids only: a batch report never
holds a header value, and neither does a row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dicom_archive.plan import STATUS_DONE, STATUS_EMPTY, STATUS_ERROR, STATUS_NOT_READY

WAITING = "waiting"  # a folder without batch.json: the anonymizer is not done
PENDING = "pending"  # complete, no report, nobody working on it
RUNNING = "running"  # a run has staged its plan and not yet reported
CLAIMED = "claimed"  # a run holds the batch's claim (`_claims/<batch_id>.json`) and has staged nothing yet
FAILED = "failed"  # the last run that took it failed before its report
# A row's state is also STATUS_NOT_READY (batch.json says the anonymizer is not done), or what the
# batch's report says (REPORTED).
REPORTED = (STATUS_DONE, STATUS_EMPTY, STATUS_ERROR)
STATES = (WAITING, STATUS_NOT_READY, PENDING, CLAIMED, RUNNING, FAILED, *REPORTED)


@dataclass
class RunRef:
    run_id: str
    state: str | None
    start_date: str | None
    end_date: str | None
    map_index: int  # the batch's instance of load_metadata / batch_report in this run
    chunks: int  # its archive_studies instances


@dataclass
class BatchRow:
    batch_id: str
    state: str
    collection: str | None = None
    completed_at: str | None = None
    reported_at: str | None = None
    report_source: str | None = None  # where the report was read
    local_report: bool = False  # written by a SEND_TO_GOOGLE=false run
    images_seen: int | None = None
    images_archived: int | None = None
    quarantined: int | None = None
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    archives_written: int | None = None
    archives_present: int | None = None
    archive_bytes: int | None = None
    rows_inserted: int | None = None
    withdrawn_images: int | None = None  # held back because their study was withdrawn
    claimed: bool = False  # a run holds the batch's claim now
    table: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    runs: list[RunRef] = field(default_factory=list)

    @property
    def day(self) -> str:
        return (self.completed_at or "")[:10]

    @property
    def last_run(self) -> RunRef | None:
        return self.runs[-1] if self.runs else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _json(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _error_summary(error: object) -> str | None:
    # A report's error names a file and a rule, never a value; keep the first line.
    return str(error).splitlines()[0][:300] if error else None


def row_from_report(batch_id: str, report: dict[str, Any], source: str, local: bool) -> BatchRow:
    images = report.get("images") or {}
    archives = report.get("archives") or {}
    bigquery = report.get("bigquery") or {}
    return BatchRow(
        batch_id=batch_id,
        state=str(report.get("status") or "?"),
        collection=report.get("collection"),
        completed_at=report.get("completed_at"),
        reported_at=report.get("reported_at"),
        report_source=source,
        local_report=local,
        images_seen=images.get("seen"),
        images_archived=images.get("archived"),
        quarantined=images.get("quarantined"),
        quarantined_by_reason=dict(images.get("quarantined_by_reason") or {}),
        archives_written=archives.get("written"),
        archives_present=archives.get("already_present"),
        archive_bytes=archives.get("bytes"),
        rows_inserted=bigquery.get("rows_inserted"),
        withdrawn_images=(report.get("withdrawn") or {}).get("images"),
        table=bigquery.get("table"),
        timings=dict(report.get("timings") or {}),
        error=_error_summary(report.get("error")),
    )


def read_report(zone: Any, store: Any, batch_id: str, collection: str | None) -> tuple[dict | None, str, bool]:
    """The batch's report: beside the batch, else the published copy; else a local run's."""
    from dicom_archive.landing import LOCAL_REPORT_NAME, REPORT_NAME
    from dicom_archive.naming import batch_report_object_name

    report = _json(zone.read_bytes(batch_id, REPORT_NAME))
    if report is not None:
        return report, zone.describe(batch_id, REPORT_NAME), False
    if store is not None and collection:
        name = batch_report_object_name(collection, batch_id)
        report = _json(store.read_bytes(name))
        if report is not None:
            return report, store.uri(name), False
    report = _json(zone.read_bytes(batch_id, LOCAL_REPORT_NAME))
    if report is not None:
        return report, zone.describe(batch_id, LOCAL_REPORT_NAME), True
    return None, "", False


def batch_rows(
    zone: Any, store: Any, runs_by_batch: dict[str, list[RunRef]], default_collection: str | None
) -> list[BatchRow]:
    """One row per batch folder of the landing zone, newest first."""
    from dicom_archive.landing import MANIFEST_NAME
    from dicom_archive.manifest import MANIFEST_STATUS_DONE, MANIFEST_STATUS_ERROR

    staged = _staged_batches(store)
    claimed = _claimed_batches(store)
    rows = []
    for batch_id in zone.batch_ids():
        manifest = _json(zone.read_bytes(batch_id, MANIFEST_NAME))
        collection = (manifest or {}).get("collection") or default_collection
        collection = collection if isinstance(collection, str) else None
        completed_at = (manifest or {}).get("completed_at")
        report, source, local = read_report(zone, store, batch_id, collection)
        runs = runs_by_batch.get(batch_id, [])
        last = runs[-1] if runs else None
        if report is not None:
            row = row_from_report(batch_id, report, source, local)
        else:
            row = BatchRow(batch_id=batch_id, state=PENDING, collection=collection)
            row.completed_at = completed_at if isinstance(completed_at, str) else None
            if manifest is None and zone.read_bytes(batch_id, MANIFEST_NAME) is None:
                row.state = WAITING
            elif manifest is not None and manifest.get("status") not in (MANIFEST_STATUS_DONE, MANIFEST_STATUS_ERROR):
                row.state = STATUS_NOT_READY
            elif last is not None and last.state == "failed":
                row.state = FAILED
            elif batch_id in staged or (last is not None and last.state in ("running", "queued")):
                row.state = RUNNING
            elif batch_id in claimed:
                row.state = CLAIMED
        if report is not None and last is not None and last.state in ("running", "queued"):
            row.state = RUNNING  # being processed again
        row.claimed = batch_id in claimed
        row.runs = runs
        rows.append(row)
    rows.sort(key=lambda r: (r.completed_at or "", r.batch_id), reverse=True)
    return rows


def _staged_batches(store: Any) -> set[str]:
    if store is None:
        return set()
    try:
        names = store.list_names("_staging/")
    except Exception:
        return set()
    return {name.split("/")[1] for name in names if name.count("/") >= 2}


def _claimed_batches(store: Any) -> set[str]:
    """Batches a run holds a claim on (an expired claim still shows until taken over; one given up
    by a run that left its batch without a report does not)."""
    from dicom_archive.claims import CLAIM_ROOT, claims_of

    if store is None:
        return set()
    try:
        names = store.list_names(f"{CLAIM_ROOT}/")
        batch_ids = [name.rsplit("/", 1)[-1].removesuffix(".json") for name in names if name.endswith(".json")]
        return {batch_id for batch_id, claim in claims_of(store, batch_ids).items() if claim.released_at is None}
    except Exception:
        return set()


def filter_rows(
    rows: list[BatchRow],
    *,
    collection: str | None = None,
    state: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    run_id: str | None = None,
) -> list[BatchRow]:
    def keep(row: BatchRow) -> bool:
        if collection and row.collection != collection:
            return False
        if state and row.state != state:
            return False
        if date_from and row.day < date_from:
            return False
        if date_to and (not row.day or row.day > date_to):
            return False
        return not run_id or any(run.run_id == run_id for run in row.runs)

    return [row for row in rows if keep(row)]


def runs_from_plans(plans: list[tuple[str, str | None, str | None, str | None, Any]]) -> dict[str, list[RunRef]]:
    """batch id -> the runs that planned it, oldest first, from (run_id, state, start, end, plan
    XCom) tuples ordered by run start."""
    runs: dict[str, list[RunRef]] = {}
    for run_id, state, start, end, planned in plans:
        for index, batch in enumerate(planned or []):
            if isinstance(batch, dict) and batch.get("batch_id"):
                runs.setdefault(batch["batch_id"], []).append(
                    RunRef(run_id, state, start, end, index, len(batch.get("chunk_ids") or []))
                )
    return runs
