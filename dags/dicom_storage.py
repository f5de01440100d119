"""dicom_storage: de-identified DICOM batches -> Cloud Storage archives + BigQuery metadata.

wait_for_batches -> plan_batches -> archive_studies (mapped over chunks of studies)
    -> load_metadata (mapped over batches) -> collection_summary -> batch_report (mapped)

The published batch reports are the ledger: a run processes every complete batch without a report
completed before the end of its data interval (oldest first, up to DICOM_MAX_BATCHES_PER_RUN), a
backfill reprocesses the batches of its interval, and a run with nothing pending ends skipped at
once. Each batch is claimed by one run at a time; every step is idempotent. A manual run with
{"batch_ids": [...]} processes exactly those batches. This file only wires tasks together:
everything heavy is imported inside the tasks, so parsing stays fast.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TriggerRule, task

from operators.archive import DicomStudyArchiveOperator
from operators.assets import ARCHIVES_ALIAS, TABLES_ALIAS
from operators.bigquery import DicomMetadataToBigQueryOperator
from sensors.batches import CompletedBatchSensor

# Pools are a parse-time setting; default_pool exists everywhere, so a fresh Airflow (Composer
# included) needs no manual step. Naming a pool that does not exist is shown on the run's note.
STORAGE_POOL = os.environ.get("DICOM_GCS_POOL") or "default_pool"
BIGQUERY_POOL = os.environ.get("DICOM_BIGQUERY_POOL") or "default_pool"

# Labels of the mapped tasks in the grid (plugins/batches_view/outcomes.py has their Python twins).
CHUNK_LABEL = (
    "{{ task.study_groups['batch_id'] }} studies {{ task.study_groups['start'] + 1 }}-{{ task.study_groups['stop'] }}"
)
BATCH_LABEL = "{{ task.batch['batch_id'] }}"
REPORT_LABEL = "{{ batch_outcome if batch_outcome is defined else task.op_kwargs['batch']['batch_id'] }}"

# `none`: manual runs only (no scheduled runs, and so no backfills).
SCHEDULE = os.environ.get("DICOM_SCHEDULE", "0 * * * *").strip()

default_args = {
    "owner": "radiology-research",
    "retries": int(os.environ.get("DICOM_TASK_RETRIES", "3")),
    "retry_delay": timedelta(seconds=int(os.environ.get("DICOM_RETRY_DELAY_SECONDS", "30"))),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}

with DAG(
    dag_id="dicom_storage",
    description="Archive de-identified DICOM batches to Cloud Storage and their metadata to BigQuery",
    schedule=None if SCHEDULE.lower() == "none" else CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=int(os.environ.get("DICOM_MAX_ACTIVE_RUNS", "2")),
    default_args=default_args,
    params={
        "batch_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            description="Process exactly these batches, whatever their dates (manual runs).",
        ),
    },
    render_template_as_native_obj=True,
    tags=["dicom", "gcs", "bigquery"],
    doc_md=__doc__,
) as dag:
    wait_for_batches = CompletedBatchSensor(task_id="wait_for_batches", batch_ids="{{ params.batch_ids }}")

    @task
    def plan_batches(batch_ids: list[str], run_id: str | None = None) -> list[dict[str, Any]]:
        """Claim each batch, check every image header and group the images into studies; stage
        each plan. A refused id is passed on untouched (batch_report fails it); a batch claimed by
        another live run is left alone; an error inside one batch fails that batch only."""
        import contextlib
        from datetime import timedelta

        from dicom_archive import claims
        from dicom_archive.batch import Staging, chunk_id, chunk_refs, run_key, studies_per_chunk
        from dicom_archive.landing import batch_folder_problem
        from dicom_archive.manifest import REPORT_NAME
        from dicom_archive.naming import batch_id_problem, batch_report_object_name
        from dicom_archive.plan import STATUS_ERROR, BatchPlan, plan_batch, read_manifest
        from dicom_archive.withdraw import hold_back_withdrawn
        from hooks.dicom_storage import DicomStorageHook, load_settings

        settings = load_settings()
        hook = DicomStorageHook()
        zone = hook.landing_zone(settings)
        store = hook.archive_store(settings)
        run_id = run_id or "manual"
        key = run_key(run_id)
        refused: list[dict[str, Any]] = []
        planned = []
        claimed: list[str] = []
        try:
            for batch_id in batch_ids:
                problem = batch_id_problem(batch_id) or batch_folder_problem(zone, batch_id)
                if problem is not None:  # before anything is read or written for it
                    print(f"refused batch id: {problem}; nothing is read or written for it")
                    refused.append(
                        {"batch_id": batch_id, "run_key": key, "collection": None, "status": "REFUSED",
                         "error": problem, "chunk_ids": [], "chunks": []}
                    )  # fmt: skip
                    continue
                with hook.explain_google_errors(f"the claim {store.uri(claims.claim_name(batch_id))}"):
                    claim = claims.acquire(store, batch_id, run_id, timedelta(hours=settings.claim_hours))
                print(f"batch {batch_id}: {claim.message}")
                if not claim.owned:
                    continue
                claimed.append(batch_id)
                try:
                    plan = plan_batch(
                        zone, batch_id, default_collection=settings.default_collection, policy=settings.policy
                    )
                except Exception as err:  # one batch's trouble (a symlink loop, an unreadable folder) is its own
                    problem = f"{zone.describe(batch_id)} could not be planned: {type(err).__name__}: {err}"
                    plan = BatchPlan(batch_id, None, STATUS_ERROR, error=problem)
                    with contextlib.suppress(Exception):  # the bucket copy of the report needs the collection
                        manifest = read_manifest(zone, batch_id, settings.default_collection)
                        plan.collection = manifest.collection if manifest else None
                staging = Staging(store, batch_id, key)
                with hook.explain_google_errors(f"the staging area {store.uri(staging.prefix)}"):
                    hold_back_withdrawn(plan, store)  # withdrawn studies: quarantine reason `withdrawn`
                    staging.write_plan(plan)
                    earlier = staging.earlier_attempts()
                # A batch reported before (beside it, or in the bucket when that copy was removed
                # by hand) is a rerun, not the recovery of an interrupted attempt.
                reported = zone.read_bytes(batch_id, REPORT_NAME) is not None or (
                    plan.collection is not None
                    and store.get(batch_report_object_name(plan.collection, batch_id)) is not None
                )
                planned.append((plan, staging, earlier, reported))
        except BaseException:
            # The task failed as a whole: give this run's claims up, so that no batch stays blocked
            # until its claim expires (a retry of this task claims them again).
            for batch_id in claimed:
                with contextlib.suppress(Exception):
                    claims.release(store, batch_id, run_id)
            raise

        size = studies_per_chunk(
            [len(plan.groups) for plan, *_ in planned], settings.studies_per_task, settings.max_archive_tasks
        )
        batches: list[dict[str, Any]] = []
        for plan, staging, earlier, reported in planned:
            refs = chunk_refs(plan, staging, size)
            batches.append(
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
            print(
                f"batch {plan.batch_id}: {plan.status}, {plan.images_seen} images seen, {plan.images_accepted} "
                f"accepted in {len(plan.groups)} studies ({len(refs)} archive tasks of up to {size} studies), "
                f"quarantined {plan.quarantine_counts()}"
                + (f"; {plan.error}" if plan.error else "")
                + (f"; staging of interrupted attempts found: {', '.join(earlier)}" if earlier else "")
            )
        return batches + refused

    @task
    def study_chunks(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One small reference per archive task (task mapping needs a flat list)."""
        return [chunk for batch in batches for chunk in batch["chunks"]]

    batches = plan_batches(wait_for_batches.output)

    archive_studies = DicomStudyArchiveOperator.partial(
        task_id="archive_studies",
        pool=STORAGE_POOL,
        map_index_template=CHUNK_LABEL,
        outlets=[ARCHIVES_ALIAS],  # mapped: partial() fixes outlets before the operator's default applies
    ).expand(study_groups=study_chunks(batches))

    load_metadata = DicomMetadataToBigQueryOperator.partial(
        task_id="load_metadata",
        pool=BIGQUERY_POOL,
        map_index_template=BATCH_LABEL,
        trigger_rule=TriggerRule.ALL_DONE,  # one batch's failed archive must not hold back the others
        outlets=[TABLES_ALIAS],
    ).expand(batch=batches)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def collection_summary(batches: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Log each touched collection's summary (the old pipeline's __TABLES_SUMMARY__)."""
        from dicom_archive.sql_templates import format_table, run_summary
        from hooks.dicom_storage import DicomStorageHook, load_settings

        settings = load_settings()
        collections = sorted({b["collection"] for b in batches or [] if b["collection"] and b["status"] == "DONE"})
        if not settings.send_to_google:
            from batches_view.task_outcome import log_local_rows

            log_local_rows(batches or [], DicomStorageHook().archive_store(settings))
            return {}
        if not collections:
            print("nothing loaded to BigQuery in this run: no batch ended DONE")
            return {}
        hook = DicomStorageHook()
        client = hook.bigquery_client(settings.project, settings.bigquery_location)
        summaries = {}
        for collection in collections:
            with hook.explain_google_errors(f"the BigQuery dataset {settings.project}.{collection}"):
                rows = run_summary(client, "collection_summary", project=settings.project, dataset=collection)
            print(f"collection {collection}:\n{format_table(rows)}")
            summaries[collection] = rows
        return summaries

    @task(trigger_rule=TriggerRule.ALL_DONE, map_index_template=REPORT_LABEL)
    def batch_report(batch: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
        """Write the batch report, only once upload and load both succeeded for this batch.

        Idempotent: a retry (or a cleared task) after the report was published, even after part
        of the staging area was cleared, finds the published report and finishes the clear.
        The batch's claim is released at the end, whatever the outcome the batch is left in."""
        import json

        from airflow.sdk.exceptions import AirflowFailException

        from dicom_archive import claims
        from dicom_archive.batch import Recovery, Staging, build_report, publish_report
        from dicom_archive.manifest import REPORT_NAME
        from hooks.dicom_storage import DicomStorageHook, load_settings

        if batch["status"] == "REFUSED":  # nothing was read or written for it, and nothing will be
            raise AirflowFailException(f"refused batch id: {batch['error']}")
        settings = load_settings()
        hook = DicomStorageHook()
        zone = hook.landing_zone(settings)
        store = hook.archive_store(settings)
        staging = Staging(store, batch["batch_id"], batch["run_key"])
        owner = run_id or "manual"

        if batch["status"] == "NOT_READY":  # no report, by design: it is processed once it is ready
            with hook.explain_google_errors(f"the staging area {store.uri(staging.batch_prefix)}"):
                error = staging.read_plan().error if store.read_bytes(staging.plan_name) else None
                staging.clear()
                claims.release(store, batch["batch_id"], owner)
            raise AirflowFailException(error or f"batch {batch['batch_id']} is not ready; no report is written")

        published = zone.read_bytes(batch["batch_id"], REPORT_NAME)
        report = json.loads(published) if published else None
        if report is not None and report.get("run_key") == batch["run_key"]:
            # This run's report is out (a retry, or a cleared task): finish the clear and succeed.
            with hook.explain_google_errors(f"the staging area {store.uri(staging.batch_prefix)}"):
                staging.clear()
                claims.release(store, batch["batch_id"], owner)
            print(f"batch {batch['batch_id']}: {report['status']}; its report was already written by this run")
            if report.get("collection") is None:
                raise AirflowFailException(report.get("error") or f"batch {batch['batch_id']} failed")
            return report

        with hook.explain_google_errors(f"the staging area {store.uri(staging.prefix)}"):
            plan = staging.read_plan()
            loaded = staging.read_result("bigquery")
            archives = [a for chunk in staging.read_archive_summaries().values() for a in chunk]
        if plan.status == "DONE" and loaded is None:
            with hook.explain_google_errors(f"the claim of {plan.batch_id}"):
                claims.release(store, plan.batch_id, owner)  # re-processable by the next run at once
            raise AirflowFailException(
                f"batch {plan.batch_id}: its metadata was not loaded (see load_metadata); no report is written "
                "and the batch stays re-processable"
            )
        recovery = None
        if not batch.get("reported_before", True):
            recovery = Recovery(plan.batch_id, earlier_attempts=list(batch.get("earlier_attempts", [])))
            # Counted only after an interrupted attempt (one more query then): rows already present
            # are otherwise images this collection held before (a correction, a re-sent study).
            # The count is needed even when this attempt loaded nothing: archives whose rows the
            # interrupted attempt loaded are skipped by the load (rows_loaded_generation).
            interrupted = recovery.happened([a for a in archives if recovery.wrote_archive(a)])
            if settings.send_to_google and interrupted and loaded is not None:
                recovery = Recovery(plan.batch_id, recovery.earlier_attempts, _rows_of_batch(hook, settings, plan))
        report = build_report(
            plan,
            archives=archives,
            table=(loaded or {}).get("table"),
            rows_loaded=(loaded or {}).get("rows_in_batch"),
            rows_inserted=(loaded or {}).get("rows_inserted"),
            load_seconds=(loaded or {}).get("seconds"),
            run_key=staging.run_key,
            recovered=recovery,
            bigquery={k: (loaded or {}).get(k) for k in ("rows_updated", "rows_deleted") if k in (loaded or {})},
        )
        with hook.explain_google_errors(f"the batch report of {plan.batch_id}"):
            locations = publish_report(report, zone, store, local=not settings.send_to_google)
            staging.clear()
            claims.release(store, plan.batch_id, owner)
        note = f" ({report['note']})" if report.get("note") else ""
        print(f"batch {plan.batch_id}: {report['status']}{note}; report written to {', '.join(locations)}")
        if plan.collection is None:  # the manifest itself is broken: the batch fails, visibly
            raise AirflowFailException(plan.error or f"batch {plan.batch_id} failed")
        from batches_view.task_outcome import finish

        return finish(report)  # labels this instance; an EMPTY or ERROR batch ends skipped

    def _rows_of_batch(hook: Any, settings: Any, plan: Any) -> int | None:
        """Rows of this batch in its table, whichever attempt inserted them."""
        from google.cloud import bigquery

        table = f"{settings.project}.{plan.collection}.dicom"
        with hook.explain_google_errors(f"the BigQuery table {table}"):
            client = hook.bigquery_client(settings.project, settings.bigquery_location)
            job = client.query(
                f"SELECT COUNT(*) AS n FROM `{table}` WHERE batch_id = @batch_id",
                job_config=bigquery.QueryJobConfig(
                    query_parameters=[bigquery.ScalarQueryParameter("batch_id", "STRING", plan.batch_id)]
                ),
            )
            return int(next(iter(job.result()))["n"])

    summary = collection_summary(batches)
    archive_studies >> load_metadata >> summary
    summary >> batch_report.expand(batch=batches)
