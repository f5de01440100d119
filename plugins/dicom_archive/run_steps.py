"""The plan and report steps of a run, without Airflow: dags/dicom_storage.py only wires them.

- `plan_run`: claim each requested batch, plan it, hold back withdrawn studies and stage its
  plans (one per archive task); hand on one small *plan reference* per batch.
- `report_run_batch`: decide what a batch's report step does (fail, finish an earlier clear,
  or build, publish and clear), count what an interrupted attempt wrote, release the claim
  (or give it up, keeping the attempt, when the batch is left without a report).

A plan reference (the plan step's XCom, one per batch; "batch" names only the landing batch):

    {"batch_id", "run_key", "collection", "status",   # status: a plan status, or REFUSED
     "chunk_ids", "chunks",        # the archive tasks' chunk ids and references (task mapping)
     "earlier_attempts",           # run keys of interrupted attempts whose staging is left
     "reported_before",            # the batch had a report: a rerun, not a recovery
     "error"}                      # REFUSED only: why the id was refused
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from dicom_archive import claims
from dicom_archive.batch import Recovery, Staging, build_report, chunk_id, publish_report, run_key, studies_per_chunk
from dicom_archive.google_errors import Explain, is_transient, no_explanation
from dicom_archive.landing import REPORT_NAME, LandingZone, batch_folder_problem, is_batch_problem
from dicom_archive.manifest import BatchManifest, ManifestError
from dicom_archive.naming import batch_id_problem, batch_report_object_name
from dicom_archive.plan import (
    STATUS_DONE,
    STATUS_ERROR,
    STATUS_NOT_READY,
    BatchPlan,
    broken_manifest_plan,
    plan_batch,
    read_manifest,
)
from dicom_archive.settings import Settings
from dicom_archive.stores import ObjectStore
from dicom_archive.withdraw import hold_back_withdrawn

log = logging.getLogger(__name__)

REFUSED = "REFUSED"  # a plan reference's status: the requested id was refused, nothing read or written


def plan_run(
    zone: LandingZone,
    store: ObjectStore,
    batch_ids: list[str],
    run_id: str,
    settings: Settings,
    *,
    explain: Explain = no_explanation,
) -> list[dict[str, Any]]:
    """The plan step: one plan reference per requested batch this run owns, plus the refused ids.

    A refused id is passed on untouched (its report step fails it); a batch claimed by another
    live run is left alone; an error inside one batch gives that batch an ERROR plan, except an
    outage (a transient error), which fails the step: a retry may end it. If the step fails as a
    whole, this run's claims are given up, so that no batch stays blocked until its claim expires
    (a retry of the step claims them again, and stages its plans again under the same names)."""
    key = run_key(run_id)
    refused: list[dict[str, Any]] = []
    planned: list[tuple[BatchPlan, Staging, list[str], bool]] = []
    claimed: list[str] = []
    try:
        for batch_id in batch_ids:
            problem = batch_id_problem(batch_id) or batch_folder_problem(zone, batch_id)
            if problem is not None:  # before anything is read or written for it
                log.warning("refused batch id: %s; nothing is read or written for it", problem)
                refused.append(
                    {"batch_id": batch_id, "run_key": key, "collection": None, "status": REFUSED,
                     "error": problem, "chunk_ids": [], "chunks": []}
                )  # fmt: skip
                continue
            with explain(f"the claim {store.uri(claims.claim_name(batch_id))}"):
                claim = claims.acquire(store, batch_id, run_id, timedelta(hours=settings.claim_hours))
            log.info("batch %s: %s", batch_id, claim.message)
            if not claim.owned:
                continue
            claimed.append(batch_id)
            with explain(f"the batch {zone.describe(batch_id)}"):  # only an outage leaves _plan_one
                plan = _plan_one(zone, batch_id, settings)
            staging = Staging(store, batch_id, key)
            with explain(f"the staging area {store.uri(staging.prefix)}"):
                hold_back_withdrawn(plan, store)  # withdrawn studies: quarantine reason `withdrawn`
                earlier = staging.earlier_attempts()
            planned.append((plan, staging, earlier, _reported_before(zone, store, plan)))

        size = studies_per_chunk(
            [len(plan.groups) for plan, *_ in planned], settings.studies_per_task, settings.max_archive_tasks
        )
        plan_refs = []
        for plan, staging, earlier, reported in planned:
            with explain(f"the staging area {store.uri(staging.prefix)}"):
                refs = staging.stage_plan(plan, size)
            plan_refs.append(
                {
                    "batch_id": plan.batch_id,
                    "run_key": staging.run_key,
                    "collection": plan.collection,
                    "status": plan.status,
                    "chunk_ids": [chunk_id(ref["start"]) for ref in refs],
                    "chunks": refs,
                    "earlier_attempts": [] if reported else earlier,
                    "reported_before": reported,
                }
            )
            log.info(
                "batch %s: %s, %d images seen, %d accepted in %d studies (%d archive tasks of up to %d studies), "
                "quarantined %s%s%s",
                plan.batch_id,
                plan.status,
                plan.images_seen,
                plan.images_accepted,
                len(plan.groups),
                len(refs),
                size,
                plan.quarantine_counts(),
                f"; {plan.error}" if plan.error else "",
                f"; staging of interrupted attempts found: {', '.join(earlier)}" if earlier else "",
            )
    except BaseException:
        for batch_id in claimed:
            with contextlib.suppress(Exception):
                claims.release(store, batch_id, run_id)
        raise
    return plan_refs + refused


def _plan_one(zone: LandingZone, batch_id: str, settings: Settings) -> BatchPlan:
    """The batch's plan; one batch's trouble (a symlink loop, an unreadable folder, even a bug
    that only its content meets) is its own: an ERROR plan, so that it never blocks the others.
    An outage (a transient error) is not the batch's: it fails the step, whose claims are then
    given up, and the retry (or the next run) plans the batch again; an ERROR report would have
    ended the batch for good."""
    try:
        return plan_batch(zone, batch_id, default_collection=settings.default_collection, policy=settings.policy)
    except Exception as err:
        if is_transient(err):
            raise
        problem = f"{zone.describe(batch_id)} could not be planned: {type(err).__name__}: {err}"
        manifest, broken = None, None
        try:
            manifest = read_manifest(zone, batch_id, settings.default_collection)
        except ManifestError as manifest_err:
            broken = manifest_err
        except Exception as again:  # unreadable again (a looping link): `problem` already says why
            if is_transient(again):
                raise
        if isinstance(manifest, BatchManifest):  # the manifest is fine: the batch ends ERROR, the run goes on
            completed = manifest.completed_at.isoformat()
            return BatchPlan(batch_id, manifest.collection, STATUS_ERROR, completed_at=completed, error=problem)
        return broken_manifest_plan(batch_id, problem, settings.default_collection, broken)


def _reported_before(zone: LandingZone, store: ObjectStore, plan: BatchPlan) -> bool:
    """A batch reported before (beside it, or in the bucket when that copy was removed by hand)
    is a rerun, not the recovery of an interrupted attempt. A report beside it that cannot be read
    (a looping link) is the batch's trouble: its plan fails, the other batches go on."""
    try:
        beside = zone.read_bytes(plan.batch_id, REPORT_NAME) is not None
    except OSError as err:
        if not is_batch_problem(err):
            raise
        plan.groups, plan.status = [], STATUS_ERROR
        plan.error = f"{zone.describe(plan.batch_id, REPORT_NAME)} cannot be read ({err.strerror})"
        return False
    return beside or (
        plan.collection is not None and store.get(batch_report_object_name(plan.collection, plan.batch_id)) is not None
    )


@dataclass(frozen=True)
class ReportOutcome:
    """What the report step of one batch ends with: a report (published, unless the batch is
    not ready or refused), and, when the batch fails its task, why (a retry cannot change it)."""

    report: dict[str, Any] | None
    failure: str | None = None


RowCounter = Callable[[BatchPlan], int | None]


def report_run_batch(
    zone: LandingZone,
    store: ObjectStore,
    plan_ref: dict[str, Any],
    run_id: str,
    settings: Settings,
    *,
    rows_of_batch: RowCounter | None = None,
    explain: Explain = no_explanation,
) -> ReportOutcome:
    """The report step of one batch: write its report only once upload and load both succeeded.

    Idempotent: a retry (or a cleared task) after the report was published, even after part of
    the staging area was cleared, finds the published report and finishes the clear. The claim
    is released at the end, whatever the outcome the batch is left in (given up, keeping the
    attempt, when the batch is left without a report). `rows_of_batch` counts
    the batch's rows in its table (sending to Google only), after an interrupted attempt."""
    batch_id = plan_ref["batch_id"]
    if plan_ref["status"] == REFUSED:  # nothing was read or written for it, and nothing will be
        return ReportOutcome(None, f"refused batch id: {plan_ref['error']}")
    staging = Staging(store, batch_id, plan_ref["run_key"])

    if plan_ref["status"] == STATUS_NOT_READY:  # no report, by design: it is processed once it is ready
        with explain(f"the staging area {store.uri(staging.batch_prefix)}"):
            error = staging.read_plan().error if store.read_bytes(staging.plan_name) else None
            staging.clear()
            claims.release(store, batch_id, run_id)
        return ReportOutcome(None, error or f"batch {batch_id} is not ready; no report is written")

    try:
        published = zone.read_bytes(batch_id, REPORT_NAME)
    except OSError as err:
        if not is_batch_problem(err):
            raise
        published = None  # a looping link, say: this run's report takes its place
    report = json.loads(published) if published else None
    if report is not None and report.get("run_key") == plan_ref["run_key"]:
        # This run's report is out (a retry, or a cleared task): finish the clear and succeed.
        with explain(f"the staging area {store.uri(staging.batch_prefix)}"):
            staging.clear()
            claims.release(store, batch_id, run_id)
        log.info("batch %s: %s; its report was already written by this run", batch_id, report["status"])
        return ReportOutcome(report, _failure_of(report))

    with explain(f"the staging area {store.uri(staging.prefix)}"):
        plan = staging.read_plan()
        loaded = staging.read_result("bigquery")
        archives = [a for chunk in staging.read_archive_summaries().values() for a in chunk]
    if plan.status == STATUS_DONE and loaded is None:
        with explain(f"the claim of {batch_id}"):
            # Re-processable by the next run at once; the released claim keeps this attempt, so
            # that the next runs take the batches that came before it first (dicom_archive.ledger).
            claims.give_up(store, batch_id, run_id)
        return ReportOutcome(
            None,
            f"batch {batch_id}: its metadata was not loaded (see load_metadata); no report is written "
            "and the batch stays re-processable",
        )
    recovery = None
    if not plan_ref.get("reported_before", True):
        recovery = Recovery(batch_id, earlier_attempts=list(plan_ref.get("earlier_attempts", [])))
        # Counted only after an interrupted attempt (one more query then): rows already present
        # are otherwise images this collection held before (a correction, a re-sent study).
        # The count is needed even when this attempt loaded nothing: archives whose rows the
        # interrupted attempt loaded are skipped by the load (rows_loaded_generation).
        interrupted = recovery.happened([a for a in archives if recovery.wrote_archive(a)])
        if rows_of_batch is not None and interrupted and loaded is not None:
            recovery = Recovery(batch_id, recovery.earlier_attempts, rows_of_batch(plan))
    loaded = loaded or {}
    report = build_report(
        plan,
        archives=archives,
        table=loaded.get("table"),
        rows_loaded=loaded.get("rows_in_batch"),
        rows_inserted=loaded.get("rows_inserted"),
        load_seconds=loaded.get("seconds"),
        run_key=staging.run_key,
        recovered=recovery,
        bigquery={k: loaded[k] for k in ("rows_updated", "rows_deleted") if k in loaded},
    )
    with explain(f"the batch report of {batch_id}"):
        locations = publish_report(report, zone, store, local=not settings.send_to_google)
        staging.clear()
        claims.release(store, batch_id, run_id)
    note = f" ({report['note']})" if report.get("note") else ""
    log.info("batch %s: %s%s; report written to %s", batch_id, report["status"], note, ", ".join(locations))
    return ReportOutcome(report, _failure_of(report))


def _failure_of(report: dict[str, Any]) -> str | None:
    """A batch whose manifest itself is unusable fails, visibly, even when its ERROR report was
    filed under a collection. A report without a collection fails too: it reached no bucket, and
    a report built from a plan staged before `manifest_unusable` existed tells a broken manifest
    only that way."""
    if not report.get("manifest_unusable") and report.get("collection") is not None:
        return None
    return report.get("error") or f"batch {report['batch_id']} failed"


def count_rows_of_batch(client: Any, table: str, batch_id: str) -> int:
    """Rows of this batch in `table` (`project.dataset.table`), whichever attempt inserted them."""
    from google.cloud import bigquery

    job = client.query(
        f"SELECT COUNT(*) AS n FROM `{table}` WHERE batch_id = @batch_id",
        job_config=bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("batch_id", "STRING", batch_id)]
        ),
    )
    return int(next(iter(job.result()))["n"])
