"""dicom_storage: de-identified DICOM batches -> Cloud Storage archives + BigQuery metadata.

wait_for_batches -> plan_batches -> archive_studies (mapped over chunks of studies)
    -> load_metadata (mapped over batches) -> collection_summary -> batch_report (mapped)

Each scheduled run owns the batches completed in its data interval, so a backfill reprocesses
historical batches; every step is idempotent. A manual run with {"batch_ids": [...]} processes
exactly those batches. This file only wires tasks together: everything heavy is imported
inside the tasks, so parsing stays fast.
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

default_args = {
    "owner": "radiology-research",
    "retries": int(os.environ.get("DICOM_TASK_RETRIES", "3")),
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}

with DAG(
    dag_id="dicom_storage",
    description="Archive de-identified DICOM batches to Cloud Storage and their metadata to BigQuery",
    schedule=CronDataIntervalTimetable(os.environ.get("DICOM_SCHEDULE", "0 * * * *"), timezone="UTC"),
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
        """Check every image header and group the images into studies; stage each plan."""
        from dicom_archive.batch import Staging, chunk_id, chunk_refs, run_key, studies_per_chunk
        from dicom_archive.plan import plan_batch
        from hooks.dicom_storage import DicomStorageHook, load_settings

        settings = load_settings()
        hook = DicomStorageHook()
        zone = hook.landing_zone(settings)
        store = hook.archive_store(settings)
        planned = []
        for batch_id in batch_ids:
            plan = plan_batch(zone, batch_id, default_collection=settings.default_collection, policy=settings.policy)
            staging = Staging(store, batch_id, run_key(run_id or "manual"))
            with hook.explain_google_errors(f"the staging area {store.uri(staging.prefix)}"):
                staging.write_plan(plan)
            planned.append((plan, staging))

        size = studies_per_chunk(
            [len(plan.groups) for plan, _ in planned], settings.studies_per_task, settings.max_archive_tasks
        )
        batches: list[dict[str, Any]] = []
        for plan, staging in planned:
            refs = chunk_refs(plan, staging, size)
            batches.append(
                {
                    "batch_id": plan.batch_id,
                    "run_key": staging.run_key,
                    "collection": plan.collection,
                    "status": plan.status,
                    "chunk_ids": [chunk_id(ref["start"]) for ref in refs],
                    "chunks": refs,
                }
            )
            print(
                f"batch {plan.batch_id}: {plan.status}, {plan.images_seen} images seen, {plan.images_accepted} "
                f"accepted in {len(plan.groups)} studies ({len(refs)} archive tasks of up to {size} studies), "
                f"quarantined {plan.quarantine_counts()}" + (f"; {plan.error}" if plan.error else "")
            )
        return batches

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
    def batch_report(batch: dict[str, Any]) -> dict[str, Any]:
        """Write the batch report, only once upload and load both succeeded for this batch."""
        from airflow.sdk.exceptions import AirflowFailException

        from dicom_archive.batch import Staging, build_report, publish_report
        from hooks.dicom_storage import DicomStorageHook, load_settings

        settings = load_settings()
        hook = DicomStorageHook()
        zone = hook.landing_zone(settings)
        store = hook.archive_store(settings)
        staging = Staging(store, batch["batch_id"], batch["run_key"])
        with hook.explain_google_errors(f"the staging area {store.uri(staging.prefix)}"):
            plan = staging.read_plan()
            loaded = staging.read_result("bigquery")
            archives = [a for chunk in staging.read_archive_summaries().values() for a in chunk]
        if plan.status == "DONE" and loaded is None:
            raise AirflowFailException(
                f"batch {plan.batch_id}: its metadata was not loaded (see load_metadata); no report is written "
                "and the batch stays re-processable"
            )
        report = build_report(
            plan,
            archives=archives,
            table=(loaded or {}).get("table"),
            rows_loaded=(loaded or {}).get("rows_in_batch"),
            rows_inserted=(loaded or {}).get("rows_inserted"),
            load_seconds=(loaded or {}).get("seconds"),
        )
        with hook.explain_google_errors(f"the batch report of {plan.batch_id}"):
            locations = publish_report(report, zone, store, local=not settings.send_to_google)
            staging.clear()
        print(f"batch {plan.batch_id}: {report['status']}; report written to {', '.join(locations)}")
        if plan.collection is None:  # the manifest itself is broken: the batch fails, visibly
            raise AirflowFailException(plan.error or f"batch {plan.batch_id} failed")
        from batches_view.task_outcome import finish

        return finish(report)  # labels this instance; an EMPTY or ERROR batch ends skipped

    summary = collection_summary(batches)
    archive_studies >> load_metadata >> summary
    summary >> batch_report.expand(batch=batches)
