"""DicomWithdrawOperator: carry out one withdrawal request, in Cloud Storage and BigQuery."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from airflow.sdk import Context

from operators.assets import ARCHIVES_ALIAS, TABLES_ALIAS, archive_prefix_asset, table_asset
from operators.destination import DicomStorageBaseOperator
from operators.failures import fail_at_once_on_permanent_errors


class DicomWithdrawOperator(DicomStorageBaseOperator):
    """Withdraw an entity (patient) or one study: mark it withdrawn, delete its archives (every
    version) and its rows, log it and write the record `Collection/<c>/Withdrawals/<id>.json`.

    Idempotent: a retry, or a rerun after a failure at any step, resumes and completes; a
    completed request is a no-op. See dicom_archive.withdraw.

    :param request: ``WithdrawalRequest.to_dict()`` (request_id, collection, entity_id, item_id,
        reason, requested_at, source).
    :param location: the BigQuery location; default: the DICOM_BIGQUERY_LOCATION setting.
    :param bucket, project, gcp_conn_id, impersonation_chain: see DicomStorageBaseOperator.

    Returns the record (coded ids, counts, timestamps; no header value). A killed task cancels
    the BigQuery job it was waiting for; a rerun resumes the withdrawal.
    """

    template_fields: Sequence[str] = ("request", "location", *DicomStorageBaseOperator.template_fields)
    destination_fields: ClassVar[Mapping[str, str]] = {
        **DicomStorageBaseOperator.destination_fields,
        "location": "bigquery_location",
    }
    ui_color = "#fdecea"

    def __init__(self, *, request: dict[str, Any], location: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [ARCHIVES_ALIAS, TABLES_ALIAS])
        super().__init__(**kwargs)
        self.request = request
        self.location = location

    def execute(self, context: Context) -> dict[str, Any]:
        with fail_at_once_on_permanent_errors():
            return self._withdraw(context)

    def _withdraw(self, context: Context) -> dict[str, Any]:
        import functools
        from dataclasses import asdict

        from dicom_archive.bigquery_tables import DEFAULT_TABLE
        from dicom_archive.bigquery_withdrawals import log_withdrawal
        from dicom_archive.withdraw import delete_local_rows, make_request, process_withdrawal

        settings = self.destination_settings()
        request = make_request(
            dict(self.request), where="the withdrawal request", source=self.request.get("source", "manual")
        )
        hook = self.storage_hook()
        store = hook.archive_store(settings)
        if settings.send_to_google:
            client = self.bigquery_client(hook, settings)
            delete_rows = functools.partial(self._delete_rows, client, settings.bigquery_location)

            def log(record: Any) -> None:
                log_withdrawal(
                    client, dataset_id=record.collection, record=asdict(record), location=settings.bigquery_location
                )

        else:
            delete_rows, log = delete_local_rows(store, DEFAULT_TABLE), None  # type: ignore[assignment]
        with hook.explain_google_errors(f"the archives and rows of collection {request.collection}"):
            record = process_withdrawal(
                request, store, delete_rows=delete_rows, log=log, dag_run_id=context["run_id"], progress=self.log.info
            )
        self.log.info(
            "withdrawal %s complete: %d archives and %d noncurrent versions deleted, %d rows deleted; record %s",
            record.request_id,
            record.objects_deleted or 0,
            record.versions_deleted or 0,
            record.rows_deleted or 0,
            store.uri(f"Collection/{record.collection}/Withdrawals/{record.request_id}.json"),
        )
        if settings.send_to_google:
            extra = {"request_id": record.request_id, "withdrawal": True, "scope": record.scope}
            context["outlet_events"][ARCHIVES_ALIAS].add(
                archive_prefix_asset(settings.bucket, record.collection),
                extra={**extra, "objects_deleted": record.objects_deleted},
            )
            context["outlet_events"][TABLES_ALIAS].add(
                table_asset(settings.project, record.collection, DEFAULT_TABLE),
                extra={**extra, "rows_deleted": record.rows_deleted},
            )
        return asdict(record)

    @staticmethod
    def _delete_rows(client: Any, location: str | None, request: Any) -> int:
        from dicom_archive.bigquery_withdrawals import delete_withdrawn_rows

        return delete_withdrawn_rows(
            client,
            collection=request.collection,
            request_id=request.request_id,
            entity_id=request.entity_id,
            item_id=request.item_id,
            location=location,
        )
