"""DicomMetadataToBigQueryOperator: one row per archived image, exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from airflow.sdk import Context

from operators.assets import TABLES_ALIAS, table_asset
from operators.destination import DicomStorageBaseOperator
from operators.failures import fail_at_once_on_permanent_errors
from operators.links import BatchReportLink, CollectionArchivesLink, CollectionTableLink, record_links


class DicomMetadataToBigQueryOperator(DicomStorageBaseOperator):
    """Load a batch's staged rows into `<project>.<collection>.dicom`, exactly once.

    The rows go to a per-run scratch table under a deterministic job id, then one MERGE on
    (collection, instance_sha256) adds the new ones: a rerun, a retry or a backfill of the same
    batch never duplicates a row. With SEND_TO_GOOGLE=false the rows are merged by the same rule
    into a file of the local output folder instead (`BigQuery/<collection>/dicom/<batch_id>.ndjson`).

    :param plan_ref: the plan step's reference to one batch (see dicom_archive.run_steps):
        ``{"batch_id", "run_key", "collection", "status", "chunk_ids"}``.
    :param location: the BigQuery location of the dataset and jobs; default: the
        DICOM_BIGQUERY_LOCATION setting.
    :param bucket, project, gcp_conn_id, impersonation_chain: see DicomStorageBaseOperator.

    Returns a small summary: table, rows in the batch, rows inserted. A killed task cancels the
    BigQuery job it was waiting for (on_kill).
    """

    template_fields: Sequence[str] = ("plan_ref", "location", *DicomStorageBaseOperator.template_fields)
    destination_fields: ClassVar[Mapping[str, str]] = {
        **DicomStorageBaseOperator.destination_fields,
        "location": "bigquery_location",
    }
    operator_extra_links = (CollectionTableLink(), CollectionArchivesLink(), BatchReportLink())
    ui_color = "#e6f2e6"

    def __init__(self, *, plan_ref: dict[str, Any], location: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [TABLES_ALIAS])
        super().__init__(**kwargs)
        self.plan_ref = plan_ref
        self.location = location
        self.console_links: dict[str, str] = {}

    def execute(self, context: Context) -> dict[str, Any]:
        with fail_at_once_on_permanent_errors():
            return self._load(context)

    def _load(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from dicom_archive.batch import Staging
        from dicom_archive.bigquery_tables import DEFAULT_TABLE
        from dicom_archive.plan import STATUS_DONE, STATUS_EMPTY, STATUS_ERROR

        settings = self.destination_settings()
        hook = self.storage_hook()
        store = hook.archive_store(settings)
        if self.plan_ref["status"] != STATUS_DONE:  # before any name is built from the id (it may be a refused one)
            self.log.info("batch %s is %s: nothing to load", self.plan_ref["batch_id"], self.plan_ref["status"])
            if self.plan_ref["status"] in (STATUS_EMPTY, STATUS_ERROR):  # stored nothing; its report says why
                batch_id, collection = self.plan_ref["batch_id"], self.plan_ref["collection"]
                record_links(self, settings, collection=collection, batch_id=batch_id, archives=False)
            return {"table": None, "rows_in_batch": 0, "rows_inserted": 0}
        staging = Staging(store, self.plan_ref["batch_id"], self.plan_ref["run_key"])

        expected = set(self.plan_ref["chunk_ids"])
        missing = sorted(expected - set(staging.read_archive_summaries()))
        if missing:
            # Loading part of a batch would make the report lie; the batch stays re-processable.
            raise AirflowFailException(
                f"batch {self.plan_ref['batch_id']}: {len(missing)} of {len(expected)} archive chunks did not "
                f"complete ({', '.join(missing)}); see archive_studies. Nothing was loaded."
            )
        collection = self.plan_ref["collection"]
        started = time.monotonic()

        if settings.send_to_google:
            result = self._load_to_bigquery(hook, settings, collection, staging.read_rows(expected))
            result["archives_marked"] = self._mark_rows_loaded(store, staging)
            context["outlet_events"][TABLES_ALIAS].add(
                table_asset(settings.project, collection, DEFAULT_TABLE),
                extra={
                    "batch_id": self.plan_ref["batch_id"],
                    "rows_inserted": result["rows_inserted"],
                    "rows_updated": result.get("rows_updated", 0),
                    "rows_deleted": result.get("rows_deleted", 0),
                },
            )
        else:
            from dicom_archive.ndjson import merge_rows

            name = f"BigQuery/{collection}/{DEFAULT_TABLE}/{self.plan_ref['batch_id']}.ndjson"
            ndjson = b"".join(staging.read_rows(expected))  # a local run's rows file holds them all anyway
            merged, counts = merge_rows(store.read_bytes(name), ndjson)
            stored = store.write_bytes(name, merged, "application/x-ndjson")
            result = {"table": stored.uri, "rows_in_batch": ndjson.count(b"\n"), **counts}
        record_links(self, settings, collection=collection, batch_id=self.plan_ref["batch_id"], table=DEFAULT_TABLE)
        result["seconds"] = round(time.monotonic() - started, 3)
        staging.write_result("bigquery", result)
        self.log.info(
            "batch %s: %d rows, %d new, %d updated (replaced archives), %d deleted in %s",
            self.plan_ref["batch_id"],
            result["rows_in_batch"],
            result["rows_inserted"],
            result.get("rows_updated", 0),
            result.get("rows_deleted", 0),
            result["table"],
        )
        return result

    def _mark_rows_loaded(self, store: Any, staging: Any) -> int:
        """After the MERGE: mark each archive whose rows it loaded, so that a no-op rerun builds
        no rows and runs no BigQuery job for it."""
        from dicom_archive.batch import needs_rows_mark
        from dicom_archive.publish import mark_rows_loaded

        marked = 0
        for chunk in staging.read_archive_summaries().values():
            for summary in chunk:
                if not needs_rows_mark(summary):
                    continue
                marked += mark_rows_loaded(store, summary["name"], summary.get("generation"))
        return marked

    def _load_to_bigquery(self, hook: Any, settings: Any, collection: str, ndjson: Iterable[bytes]) -> dict[str, Any]:
        from dicom_archive.bigquery_load import load_rows_exactly_once
        from dicom_archive.bigquery_tables import DEFAULT_TABLE, WITHDRAWALS_TABLE, ensure_table, table_ref

        table_id = table_ref(settings.project, collection, DEFAULT_TABLE)
        with hook.explain_google_errors(f"the BigQuery table {table_id}"):
            client = self.bigquery_client(hook, settings)
            # The summary SQL reads it too.
            ensure_table(client, collection, WITHDRAWALS_TABLE, location=settings.bigquery_location)
            loaded = load_rows_exactly_once(
                client,
                dataset_id=collection,
                ndjson=ndjson,
                run_key=self.plan_ref["run_key"],
                location=settings.bigquery_location,
            )
        return {
            "table": loaded.table_id,
            "rows_in_batch": loaded.rows_in_batch,
            "rows_inserted": loaded.rows_inserted,
            "rows_updated": loaded.rows_updated,
            "rows_deleted": loaded.rows_deleted,
            "jobs": [job for job in (loaded.load_job_id, loaded.merge_job_id) if job],
            "columns_added": loaded.columns_added,
        }
