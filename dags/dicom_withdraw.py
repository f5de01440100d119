"""dicom_withdraw: remove a withdrawn patient or study from Cloud Storage and BigQuery.

find_requests -> withdraw (mapped, one task per request)

Requests come from the landing zone, `_withdrawals/<request_id>.json` (written last, like
batch.json): {"collection": "IRB41449", "entity_id": "GL664ba0", "item_id": "GL71cfb7" (optional:
without it the whole patient), "reason": "consent_withdrawn" | "irb_decision" | "phi_found" |
"other", "requested_at": "..."}; a request whose record says complete is not taken again.
Or from a manual run with params (collection, entity_id, optional item_id, reason, request_id).
Each request deletes the archives (every version) and rows, records
`Collection/<c>/Withdrawals/<request_id>.json`, and marks the study withdrawn so that no rerun or
backfill of the dicom_storage DAG uploads it again. This file only wires tasks together.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, CronTriggerTimetable, Param, task

from dicom_archive import parse_time_settings
from operators.assets import ARCHIVES_ALIAS, TABLES_ALIAS
from operators.withdraw import DicomWithdrawOperator

log = logging.getLogger(__name__)


with DAG(
    dag_id="dicom_withdraw",
    description="Withdraw patients or studies: delete their archives and rows, record it, never upload them again",
    schedule=parse_time_settings.schedule("DICOM_WITHDRAW_SCHEDULE", CronTriggerTimetable),  # `none`: manual
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # two runs never work on the same request at once
    default_args=parse_time_settings.task_defaults(),
    params={
        "collection": Param(None, type=["null", "string"], description="Collection (IRB number)."),
        "entity_id": Param(None, type=["null", "string"], description="Coded patient id to withdraw."),
        "item_id": Param(None, type=["null", "string"], description="Coded study id (empty: the whole patient)."),
        "reason": Param("other", enum=["consent_withdrawn", "irb_decision", "phi_found", "other"]),
        "request_id": Param(None, type=["null", "string"], description="Default: derived from the run id."),
    },
    tags=["dicom", "gcs", "bigquery", "withdrawal"],
    doc_md=__doc__,
) as dag:

    @task
    def find_requests(params: dict[str, Any] | None = None, run_id: str | None = None) -> list[dict[str, Any]]:
        """The manual run's request, or the landing zone's pending ones (none: skipped)."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from dicom_archive.batch import run_key
        from dicom_archive.withdraw import WithdrawalRequestError, make_request, pending_requests
        from hooks.dicom_storage import DicomStorageHook, load_settings

        params = params or {}
        if params.get("entity_id") or params.get("collection"):
            try:
                request = make_request(
                    {k: params.get(k) for k in ("collection", "entity_id", "item_id", "reason", "request_id")},
                    where="the run's params",
                    source="manual",
                    default_request_id=f"manual-{run_key(run_id or 'manual')}",
                )
            except WithdrawalRequestError as err:
                raise AirflowFailException(str(err)) from err
            return [request.to_dict()]
        settings = load_settings()
        hook = DicomStorageHook.of_settings(settings)
        # A refusal (401/403, 404) is explained, and fails at once: a retry cannot change it.
        with hook.explain_google_errors(f"the withdrawal requests in {settings.landing_root}"):
            requests, problems = pending_requests(hook.landing_zone(settings), hook.archive_store(settings))
        for problem in problems:
            log.warning("not a valid withdrawal request, left alone: %s", problem)
        if not requests:
            raise AirflowSkipException("no pending withdrawal request")
        log.info("%d pending withdrawal requests: %s", len(requests), ", ".join(r.request_id for r in requests))
        return [r.to_dict() for r in requests]

    DicomWithdrawOperator.partial(
        task_id="withdraw",
        outlets=[ARCHIVES_ALIAS, TABLES_ALIAS],
        map_index_template="{{ task.request['request_id'] }}",  # the grid shows each request by its id
    ).expand(request=find_requests())
