"""The end of the batch_report task: label the mapped instance with the batch's outcome.

- The label (`map_index_template` of batch_report renders the context key filled here) reads
  `20240106-0001: EMPTY, 3 of 3 quarantined`, in the grid and in the task list.
- A batch that stored nothing (EMPTY: every image quarantined; ERROR: the anonymizer gave up)
  ends **skipped**, so it stands out from the green DONE batches. Its report is written first
  and stays the task's XCom (`return_value`), as for every other batch.
- A batch whose report says its task must fail (its batch.json cannot be used) gets its label
  and keeps its report in XCom too, then fails: Airflow keeps a failed try's XComs (they are
  cleared when the next try starts), so the UI and the run's note show the ERROR report.
"""

from __future__ import annotations

import logging
from typing import Any

from batches_view.outcomes import LABEL_KEY, batch_label
from dicom_archive.plan import STATUS_EMPTY, STATUS_ERROR

log = logging.getLogger(__name__)


def finish(report: dict[str, Any], failure: str | None = None) -> dict[str, Any]:
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    context = get_current_context()
    label = batch_label(report)
    context[LABEL_KEY] = label  # type: ignore[literal-required]
    if failure is not None:
        context["ti"].xcom_push(key="return_value", value=report)
        raise AirflowFailException(failure)
    if report["status"] in (STATUS_EMPTY, STATUS_ERROR):
        context["ti"].xcom_push(key="return_value", value=report)
        raise AirflowSkipException(f"{label}: nothing of this batch was stored; the report says why")
    return report


def log_local_rows(plan_refs: list[dict[str, Any]], store: Any) -> None:
    """SEND_TO_GOOGLE=false: say where each batch's rows went, with the counts its report will show."""
    from dicom_archive.batch import Staging
    from dicom_archive.run_steps import REFUSED

    log.info("SEND_TO_GOOGLE=false: nothing was sent to BigQuery; the rows were written to local files")
    for plan_ref in plan_refs:
        if plan_ref["status"] == REFUSED:  # no staging name is ever built from a refused id
            log.info("refused batch id %r: nothing read or written", plan_ref["batch_id"])
            continue
        loaded = Staging(store, plan_ref["batch_id"], plan_ref["run_key"]).read_result("bigquery")
        if loaded is None:
            log.info("batch %s: %s, no rows written", plan_ref["batch_id"], plan_ref["status"])
        else:
            log.info(
                "batch %s: %s rows in %s (%s new)",
                plan_ref["batch_id"],
                loaded.get("rows_in_batch"),
                loaded.get("table"),
                loaded.get("rows_inserted"),
            )
