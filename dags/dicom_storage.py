"""dicom_storage: de-identified DICOM batches -> Cloud Storage archives + BigQuery metadata.

wait_for_batches -> plan_batches -> archive_studies (mapped over chunks of studies)
    -> load_metadata (mapped over batches) -> collection_summary -> batch_report (mapped)

The published batch reports are the ledger: a run processes every complete batch without a report
completed before the end of its data interval (oldest first, up to DICOM_MAX_BATCHES_PER_RUN), a
backfill reprocesses the batches of its interval, and a run with nothing pending ends at once
(its tasks skipped, the run a success noted "No batch in this run."). Each batch is claimed by
one run at a time; every step is idempotent. A manual run with {"batch_ids": [...]} processes
exactly those batches.

plan_batches hands on one *plan reference* per batch (dicom_archive.run_steps) and stages one
chunk plan per archive task, so each archive task reads its own studies only. This file only
wires tasks together (the logic is in dicom_archive.run_steps and the operators): everything
heavy is imported inside the tasks, so parsing stays fast.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TriggerRule, task

from dicom_archive import parse_time_settings
from operators.archive import DicomStudyArchiveOperator
from operators.assets import ARCHIVES_ALIAS, TABLES_ALIAS
from operators.bigquery import DicomMetadataToBigQueryOperator
from sensors.batches import CompletedBatchSensor

log = logging.getLogger(__name__)

# Parse-time settings, from the environment only (dicom_archive.parse_time_settings). Pools default to
# default_pool, which exists everywhere, so a fresh Airflow (Composer included) needs no manual
# step. Naming a pool that does not exist is shown on the run's note.
STORAGE_POOL = parse_time_settings.pool("DICOM_GCS_POOL")
BIGQUERY_POOL = parse_time_settings.pool("DICOM_BIGQUERY_POOL")

# Labels of the mapped tasks in the grid; REPORT_LABEL shows the label batch_report sets
# (plugins/batches_view/outcomes.py: batch_label).
CHUNK_LABEL = (
    "{{ task.study_groups['batch_id'] }} studies {{ task.study_groups['start'] + 1 }}-{{ task.study_groups['stop'] }}"
)
BATCH_LABEL = "{{ task.plan_ref['batch_id'] }}"
REPORT_LABEL = "{{ batch_outcome if batch_outcome is defined else task.op_kwargs['plan_ref']['batch_id'] }}"


# `none`: manual runs only (no scheduled runs, and so no backfills).
TIMETABLE = parse_time_settings.schedule("DICOM_SCHEDULE", CronDataIntervalTimetable)

with DAG(
    dag_id="dicom_storage",
    description="Archive de-identified DICOM batches to Cloud Storage and their metadata to BigQuery",
    schedule=TIMETABLE,
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=parse_time_settings.whole_number("DICOM_MAX_ACTIVE_RUNS", minimum=1),
    default_args=parse_time_settings.task_defaults(),
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
        """Claim each batch, check every image header, group the images into studies and stage
        one plan per archive task; return one plan reference per batch (dicom_archive.run_steps)."""
        from dicom_archive.run_steps import plan_run
        from hooks.dicom_storage import DicomStorageHook, load_settings, warn_of_ignored_variables
        from operators.failures import fail_at_once_on_permanent_errors

        settings = load_settings()
        warn_of_ignored_variables()
        hook = DicomStorageHook.of_settings(settings)
        zone, store = hook.landing_zone(settings), hook.archive_store(settings)
        with fail_at_once_on_permanent_errors():
            return plan_run(zone, store, batch_ids, run_id or "manual", settings, explain=hook.explain_google_errors)

    @task
    def study_chunks(plan_refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One small chunk reference per archive task (task mapping needs a flat list)."""
        return [chunk for plan_ref in plan_refs for chunk in plan_ref["chunks"]]

    plan_refs = plan_batches(wait_for_batches.output)

    archive_studies = DicomStudyArchiveOperator.partial(
        task_id="archive_studies",
        pool=STORAGE_POOL,
        map_index_template=CHUNK_LABEL,
        outlets=[ARCHIVES_ALIAS],  # mapped: partial() fixes outlets before the operator's default applies
    ).expand(study_groups=study_chunks(plan_refs))

    load_metadata = DicomMetadataToBigQueryOperator.partial(
        task_id="load_metadata",
        pool=BIGQUERY_POOL,
        map_index_template=BATCH_LABEL,
        trigger_rule=TriggerRule.ALL_DONE,  # one batch's failed archive must not hold back the others
        outlets=[TABLES_ALIAS],
    ).expand(plan_ref=plan_refs)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def collection_summary(plan_refs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Log each touched collection's summary (the old pipeline's __TABLES_SUMMARY__)."""
        from dicom_archive.plan import STATUS_DONE
        from dicom_archive.sql_templates import format_table, run_summary
        from hooks.dicom_storage import DicomStorageHook, load_settings
        from operators.failures import fail_at_once_on_permanent_errors

        settings = load_settings()
        hook = DicomStorageHook.of_settings(settings)
        plan_refs = plan_refs or []
        collections = sorted({p["collection"] for p in plan_refs if p["collection"] and p["status"] == STATUS_DONE})
        if not settings.send_to_google:
            from batches_view.task_outcome import log_local_rows

            log_local_rows(plan_refs, hook.archive_store(settings))
            return {}
        if not collections:
            log.info("nothing loaded to BigQuery in this run: no batch ended DONE")
            return {}
        client = hook.bigquery_client(settings.project, settings.bigquery_location)
        summaries = {}
        for collection in collections:
            with (
                fail_at_once_on_permanent_errors(),
                hook.explain_google_errors(f"the BigQuery dataset {settings.project}.{collection}"),
            ):
                rows = run_summary(client, "collection_summary", project=settings.project, dataset=collection)
            log.info("collection %s:\n%s", collection, format_table(rows))
            summaries[collection] = rows
        return summaries

    @task(trigger_rule=TriggerRule.ALL_DONE, map_index_template=REPORT_LABEL)
    def batch_report(plan_ref: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
        """Write the batch report, only once upload and load both succeeded for this batch; then
        clear its staging and release its claim (idempotent: dicom_archive.run_steps)."""
        from airflow.sdk.exceptions import AirflowFailException

        from batches_view.task_outcome import finish
        from dicom_archive.bigquery_tables import DEFAULT_TABLE, table_ref
        from dicom_archive.run_steps import count_rows_of_batch, report_run_batch
        from hooks.dicom_storage import DicomStorageHook, load_settings
        from operators.failures import fail_at_once_on_permanent_errors

        settings = load_settings()
        hook = DicomStorageHook.of_settings(settings)

        def rows_of_batch(plan: Any) -> int:
            table = table_ref(settings.project, plan.collection, DEFAULT_TABLE)
            with hook.explain_google_errors(f"the BigQuery table {table}"):
                client = hook.bigquery_client(settings.project, settings.bigquery_location)
                return count_rows_of_batch(client, table, plan.batch_id)

        with fail_at_once_on_permanent_errors():
            outcome = report_run_batch(
                hook.landing_zone(settings),
                hook.archive_store(settings),
                plan_ref,
                run_id or "manual",
                settings,
                rows_of_batch=rows_of_batch if settings.send_to_google else None,
                explain=hook.explain_google_errors,
            )
        if outcome.report is None:
            raise AirflowFailException(outcome.failure or f"batch {plan_ref['batch_id']}: no report")
        # Labels this instance and keeps the report in XCom; an EMPTY or ERROR batch ends skipped,
        # a batch whose report comes with a failure (an unusable batch.json) fails after that.
        return finish(outcome.report, outcome.failure)

    summary = collection_summary(plan_refs)
    archive_studies >> load_metadata >> summary
    summary >> batch_report.expand(plan_ref=plan_refs)
