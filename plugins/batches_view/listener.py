"""Scheduler-side notes on dicom_storage runs: the run's summary, and missing pools.

- When a run ends, its note summarises it (batches and states, archives, rows, quarantined),
  from the batch reports the run's batch_report tasks returned (or kept in XCom before they
  failed: a batch.json that cannot be used). A note a user wrote is kept.
- When a run starts and a pool its tasks name does not exist, the note says so at once:
  Airflow would otherwise leave those tasks "scheduled" forever without a word.

Listeners run where the scheduler runs. Cloud Composer 3 does not give the scheduler the
plugins folder, so there the notes are not written; the labels, task states and the batches
view do not depend on them (docs/composer.md).
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

DAG_ID = "dicom_storage"
log = logging.getLogger(__name__)


def _session(dag_run: Any) -> Any:
    from sqlalchemy.orm import object_session

    return object_session(dag_run)


def _ours_to_write(note: Any) -> bool:
    """No note yet, or one this listener wrote (a user's note has a user id)."""
    return note is None or not note.content or note.user_id is None


def _write_note(dag_run: Any, text: str, session: Any) -> None:

    attached = session.merge(dag_run, load=True) if _session(dag_run) is not session else dag_run
    if _ours_to_write(attached.dag_run_note):
        attached.note = text


def _with_session(dag_run: Any, work: Any) -> None:
    """In the scheduler the run belongs to its session, which commits the note with the run's
    new state; `dag.test()` hands over a detached run, so the note gets its own transaction."""
    session = _session(dag_run)
    if session is not None:
        work(session)
        return
    from airflow.utils.session import create_session

    with create_session() as own:
        work(own)


def _return_values(dag_run: Any, session: Any, task_id: str) -> list[Any]:
    return [value for _, value in _indexed_return_values(dag_run, session, task_id)]


def _indexed_return_values(dag_run: Any, session: Any, task_id: str) -> list[tuple[int, Any]]:
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    rows = session.execute(
        select(XComModel.map_index, XComModel.value)
        .where(
            XComModel.dag_id == dag_run.dag_id,
            XComModel.run_id == dag_run.run_id,
            XComModel.task_id == task_id,
            XComModel.key == "return_value",
        )
        .order_by(XComModel.map_index)
    ).all()
    return [(row.map_index, XComModel.deserialize_value(row)) for row in rows]


def _failed_map_indexes(dag_run: Any, session: Any, task_id: str) -> set[int]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    return set(
        session.scalars(
            select(TaskInstance.map_index).where(
                TaskInstance.dag_id == dag_run.dag_id,
                TaskInstance.run_id == dag_run.run_id,
                TaskInstance.task_id == task_id,
                TaskInstance.state == TaskInstanceState.FAILED,
            )
        ).all()
    )


def summarise(dag_run: Any) -> None:
    from batches_view.outcomes import run_note

    def work(session: Any) -> None:
        indexed = [(i, r) for i, r in _indexed_return_values(dag_run, session, "batch_report") if isinstance(r, dict)]
        reports = [r for _, r in indexed]
        # A batch whose batch.json cannot be used keeps its ERROR report in XCom and fails its task.
        failed_indexes = _failed_map_indexes(dag_run, session, "batch_report")
        failed = [r.get("batch_id") for i, r in indexed if i in failed_indexes]
        planned = [b for value in _return_values(dag_run, session, "plan_batches") for b in (value or [])]
        reported = {r.get("batch_id") for r in reports}
        unreported = [b["batch_id"] for b in planned if isinstance(b, dict) and b.get("batch_id") not in reported]
        _write_note(dag_run, run_note(reports, unreported, failed), session)

    _with_session(dag_run, work)


def missing_pools(dag_run: Any, session: Any) -> list[str]:
    from airflow.models.pool import Pool
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    named = set(
        session.scalars(
            select(TaskInstance.pool).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        ).all()
    )
    existing = set(session.scalars(select(Pool.pool).where(Pool.pool.in_(named))).all())
    return sorted(named - existing)


@hookimpl
def on_dag_run_running(dag_run: Any, msg: str) -> None:
    if dag_run.dag_id != DAG_ID:
        return

    def work(session: Any) -> None:
        missing = missing_pools(dag_run, session)
        if missing:
            names = ", ".join(repr(p) for p in missing)
            log.error("dicom_storage run %s names pools that do not exist: %s", dag_run.run_id, names)
            _write_note(
                dag_run,
                f"⚠ **Pool {names} does not exist**: the tasks that use it stay *scheduled* until it is "
                "created (Admin → Pools), or until DICOM_GCS_POOL / DICOM_BIGQUERY_POOL name existing pools "
                "(unset, they use default_pool).",
                session,
            )

    try:
        _with_session(dag_run, work)
    except Exception:  # a note must never disturb the scheduler
        log.exception("could not check the pools of %s", dag_run.run_id)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    if dag_run.dag_id == DAG_ID:
        _safely_summarise(dag_run)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    if dag_run.dag_id == DAG_ID:
        _safely_summarise(dag_run)


def _safely_summarise(dag_run: Any) -> None:
    try:
        summarise(dag_run)
    except Exception:
        log.exception("could not write the note of %s", dag_run.run_id)
