"""The batches view's web app, mounted by the Airflow API server under /dicom-batches.

Built on first use (`build_app`), never at import: the API server is the only process that
asks for it. Every route requires the same sign-in as the rest of the UI (the UI's session
cookie or an API bearer token) and read access to dicom_storage's runs.

    /                 every batch: state, counts, timings, links; filters collection/state/date
    /run?run_id=...   the batches of one run (the "DICOM batches" tab of a dicom_storage run)
    /report/<id>      the batch report (JSON), as written by the pipeline
    /objects/<id>     the objects the report lists
    /api/batches      the rows as JSON (same filters)
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations,
# and Request is imported inside build_app, where a string annotation could not be resolved.
import html
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from batches_view.model import REPORTED, STATES, BatchRow, filter_rows
from batches_view.outcomes import needs_attention
from operators.links import BATCHES_VIEW, CollectionArchivesLink, CollectionTableLink, links_to_view

DAG_ID = "dicom_storage"
UI_RUN = "/dags/" + DAG_ID + "/runs/{run_id}"

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1a202c}
h1{font-size:20px;margin:0 0 12px}
form{display:flex;gap:8px;align-items:end;flex-wrap:wrap;margin-bottom:12px}
label{display:flex;flex-direction:column;font-size:12px;color:#4a5568}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f7fafc;font-size:12px;text-transform:uppercase;color:#4a5568}
td.n{text-align:right;font-variant-numeric:tabular-nums}
td:first-child{white-space:nowrap}
.state{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.s-DONE{background:#c6f6d5;color:#22543d}.s-EMPTY{background:#fed7e2;color:#702459}
.s-ERROR,.s-failed{background:#fed7d7;color:#742a2a}.s-running,.s-claimed{background:#bee3f8;color:#2a4365}
.s-pending,.s-waiting,.s-NOT_READY{background:#edf2f7;color:#4a5568}
tr.attention td:first-child{border-left:4px solid #d69e2e}
.warn{background:#fffaf0;border:1px solid #d69e2e;padding:8px;margin-bottom:12px}
.muted{color:#718096;font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any) -> str:
    return "" if value is None else f"{value:,}" if isinstance(value, int) else _e(value)


def _a(href: str, text: str, top: bool = True) -> str:
    target = ' target="_top"' if top else ' target="_blank" rel="noopener"'
    return f'<a href="{_e(href)}"{target}>{_e(text)}</a>'


def _seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else ""


def _links(row: BatchRow, settings: Any) -> list[str]:
    links = []
    run = row.last_run
    if run is not None:
        base = UI_RUN.format(run_id=quote(run.run_id, safe=""))
        links.append(_a(base, "run"))
        links.append(_a(f"{base}/tasks/batch_report/mapped/{run.map_index}", "report task log"))
        if run.chunks:
            links.append(_a(f"{base}/tasks/archive_studies", f"archive logs ({run.chunks})"))
    if row.report_source:
        links.append(_a(f"{BATCHES_VIEW}/report/{quote(row.batch_id)}", "report", top=False))
    if row.collection and row.archives_written is not None:
        if links_to_view() or settings is None or not settings.send_to_google:
            links.append(_a(f"{BATCHES_VIEW}/objects/{quote(row.batch_id)}", "objects", top=False))
        else:
            url = CollectionArchivesLink.url(
                bucket=settings.bucket, collection=row.collection, project=settings.project
            )
            links.append(_a(url, "objects", top=False))
    if row.table and row.collection:
        if settings is not None and settings.send_to_google and not links_to_view():
            from dicom_archive.bigquery_tables import DEFAULT_TABLE

            url = CollectionTableLink.url(project=settings.project, dataset=row.collection, table=DEFAULT_TABLE)
            links.append(_a(url, "table", top=False))
        else:
            links.append(f'<span class="muted" title="table">{_e(row.table)}</span>')
    return links


def render_rows(rows: list[BatchRow], settings: Any) -> str:
    head = (
        "<tr><th>batch</th><th>state</th><th>collection</th><th>completed</th><th>images</th><th>archived</th>"
        "<th>quarantined</th><th>archives written / present</th><th>rows inserted</th><th>timings</th>"
        "<th>links</th></tr>"
    )
    body = []
    for row in rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(row.quarantined_by_reason.items()))
        timings = " · ".join(
            f"{name} {_seconds(row.timings.get(key))}"
            for name, key in (("plan", "plan_seconds"), ("archive", "archive_seconds"), ("load", "load_seconds"))
            if row.timings.get(key) is not None
        )
        attention = row.state in REPORTED and needs_attention(
            {"status": row.state, "images": {"quarantined": row.quarantined}}
        )
        archives = (
            f"{_num(row.archives_written)} / {_num(row.archives_present)}" if row.archives_written is not None else ""
        )
        reported = f"reported {row.reported_at}" if row.reported_at else ""
        state = f'<span class="state s-{_e(row.state)}" data-state="{_e(row.state)}">{_e(row.state)}</span>'
        if row.local_report:
            state += ' <span class="muted">local run</span>'
        if row.claimed and row.state != "claimed":
            state += ' <span class="muted">claimed by a run</span>'
        if row.withdrawn_images:
            state += f'<div class="muted">{_num(row.withdrawn_images)} images withdrawn</div>'
        if row.error:
            state += f'<div class="muted">{_e(row.error)}</div>'
        body.append(
            f'<tr class="batch{" attention" if attention else ""}" data-batch="{_e(row.batch_id)}">'
            f"<td>{_e(row.batch_id)}</td><td>{state}</td><td>{_e(row.collection)}</td>"
            f'<td>{_e(row.completed_at)}<div class="muted">{_e(reported)}</div></td>'
            f'<td class="n">{_num(row.images_seen)}</td><td class="n">{_num(row.images_archived)}</td>'
            f'<td class="n" title="{_e(reasons)}">{_num(row.quarantined)}'
            f"{f'<div class=muted>{_e(reasons)}</div>' if reasons else ''}</td>"
            f'<td class="n">{archives}</td><td class="n">{_num(row.rows_inserted)}</td>'
            f'<td class="muted">{_e(timings)}</td><td>{" · ".join(_links(row, settings))}</td></tr>'
        )
    if not body:
        body.append('<tr><td colspan="11" class="muted">No batch matches.</td></tr>')
    return f'<table id="batches"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def render_page(
    title: str, rows: list[BatchRow], settings: Any, params: dict[str, str], warnings: list[str], form: bool
) -> str:
    filters = ""
    if form:
        collections = sorted({r.collection for r in rows if r.collection})
        states = "".join(
            f'<option value="{s}"{" selected" if params.get("state") == s else ""}>{s}</option>' for s in STATES
        )
        options = "".join(
            f"<option{' selected' if params.get('collection') == c else ''}>{_e(c)}</option>" for c in collections
        )
        filters = (
            '<form method="get">'
            f'<label>collection<select name="collection"><option value="">all</option>{options}</select></label>'
            f'<label>state<select name="state"><option value="">all</option>{states}</select></label>'
            f'<label>completed from<input type="date" name="date_from" value="{_e(params.get("date_from"))}"></label>'
            f'<label>to<input type="date" name="date_to" value="{_e(params.get("date_to"))}"></label>'
            '<button type="submit">Filter</button></form>'
        )
        rows = filter_rows(
            rows,
            collection=params.get("collection"),
            state=params.get("state"),
            date_from=params.get("date_from"),
            date_to=params.get("date_to"),
        )
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    notes = "".join(f'<div class="warn">{_e(w)}</div>' for w in warnings)
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title><style>{STYLE}</style></head>"
        f'<body><main id="view"><h1>{_e(title)}</h1>{notes}{filters}<p class="muted" id="summary">{len(rows)} batches: '
        f"{_e(summary)}</p>{render_rows(rows, settings)}</main></body></html>"
    )


def render_objects(batch_id: str, found: dict[str, Any]) -> str:
    """The objects page of a batch: the archives and the table its report names."""
    items = "".join(f"<li><code>{_e(uri)}</code></li>" for uri in (found.get("archives") or {}).get("objects", []))
    table = (found.get("bigquery") or {}).get("table")
    loaded = f"table {_e(table)}" if table else "no table (nothing loaded)"
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Objects of {_e(batch_id)}</title>"
        f"<style>{STYLE}</style></head><body><h1>Objects of batch {_e(batch_id)}</h1>"
        f'<p class="muted">From the batch report; {loaded}.</p>'
        f"<ul>{items or '<li class=muted>none</li>'}</ul></body></html>"
    )


def build_app() -> Any:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    signed_in = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))
    app = FastAPI(title="DICOM batches", dependencies=[signed_in], docs_url=None, redoc_url=None, openapi_url=None)

    def filters(request: Request) -> dict[str, str]:
        keys = ("collection", "state", "date_from", "date_to")
        return {k: v for k in keys if (v := request.query_params.get(k))}

    @app.get("/", response_class=HTMLResponse)
    def batches(request: Request) -> str:
        settings, rows, warnings = _collect()
        return render_page("DICOM batches", rows, settings, filters(request), warnings, form=True)

    @app.get("/run", response_class=HTMLResponse)
    def run(run_id: str, dag_id: str = DAG_ID) -> str:
        if dag_id != DAG_ID:
            return render_page(f"{dag_id} is not {DAG_ID}", [], None, {}, [], form=False)
        settings, rows, warnings = _collect()
        return render_page(f"Batches of run {run_id}", filter_rows(rows, run_id=run_id), settings, {}, warnings, False)

    @app.get("/api/batches")
    def api_batches(request: Request) -> JSONResponse:
        _, rows, warnings = _collect()
        params = filters(request)
        run_id = request.query_params.get("run_id")
        rows = filter_rows(rows, run_id=run_id, **params)
        return JSONResponse({"batches": [r.as_dict() for r in rows], "warnings": warnings})

    @app.get("/report/{batch_id}")
    def report(batch_id: str) -> JSONResponse:
        return JSONResponse(_report(batch_id))

    @app.get("/objects/{batch_id}", response_class=HTMLResponse)
    def objects(batch_id: str) -> str:
        return render_objects(batch_id, _report(batch_id))

    def _report(batch_id: str) -> dict[str, Any]:
        from batches_view.model import read_report
        from dicom_archive.naming import batch_id_problem

        if batch_id_problem(batch_id) is not None:
            raise HTTPException(status_code=404, detail="no such batch")
        settings, zone, store, _ = _sources()
        manifest_collection = None
        if zone is not None:
            from batches_view.model import _json
            from dicom_archive.landing import MANIFEST_NAME

            manifest_collection = (_json(zone.read_bytes(batch_id, MANIFEST_NAME)) or {}).get("collection")
        collection = manifest_collection or (settings.default_collection if settings else None)
        found = read_report(zone, store, batch_id, collection)[0] if zone is not None else None
        if found is None:
            raise HTTPException(status_code=404, detail=f"batch {batch_id} has no report")
        return found

    return app


def _sources() -> tuple[Any, Any, Any, list[str]]:
    """Settings, landing zone and archive store, as the tasks build them; problems as warnings."""
    warnings: list[str] = []
    try:
        from hooks.dicom_storage import DicomStorageHook, load_settings

        settings = load_settings()
        hook = DicomStorageHook.of_settings(settings)
        zone = hook.landing_zone(settings)
        try:  # else a missing root would read as an empty landing zone
            zone.check_root()
        except Exception as err:
            warnings.append(f"The landing zone cannot be read, so no batch is listed: {err}")
        try:
            store = hook.archive_store(settings)
        except Exception as err:
            store = None
            warnings.append(
                f"The archive store cannot be read ({type(err).__name__}): reports beside the batches only."
            )
        return settings, zone, store, warnings
    except Exception as err:
        return None, None, None, [f"The settings cannot be read: {err}"]


def _collect() -> tuple[Any, list[BatchRow], list[str]]:
    from batches_view.model import batch_rows

    settings, zone, store, warnings = _sources()
    warnings += _missing_pool_warnings()
    if zone is None:
        return settings, [], warnings
    return settings, batch_rows(zone, store, _runs_by_batch(), settings.default_collection), warnings


def _runs_by_batch() -> dict[str, list[Any]]:
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from batches_view.model import runs_from_plans

    with create_session() as session:
        found = session.execute(
            select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, XComModel.value)
            .join(
                XComModel,
                (XComModel.dag_id == DagRun.dag_id) & (XComModel.run_id == DagRun.run_id),
            )
            .where(DagRun.dag_id == DAG_ID, XComModel.task_id == "plan_batches", XComModel.key == "return_value")
            .order_by(DagRun.start_date, DagRun.id)
        ).all()
        plans = [
            (
                run_id,
                str(getattr(state, "value", state)) if state is not None else None,
                start.isoformat() if start else None,
                end.isoformat() if end else None,
                XComModel.deserialize_value(SimpleNamespace(value=value)),
            )
            for run_id, state, start, end, value in found
        ]
    return runs_from_plans(plans)


def _missing_pool_warnings() -> list[str]:
    """Pools dicom_storage's tasks name that do not exist: those tasks would wait forever."""
    from airflow.models.pool import Pool
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    try:
        with create_session() as session:
            dag = SerializedDagModel.get_dag(DAG_ID, session=session)
            if dag is None:
                return []
            named = {task.pool for task in dag.tasks}
            existing = set(session.scalars(select(Pool.pool).where(Pool.pool.in_(named))).all())
    except Exception:
        return []
    return [
        f"Pool {name!r} does not exist: dicom_storage's tasks in it stay 'scheduled' until it is created "
        "(Admin → Pools) or DICOM_GCS_POOL / DICOM_BIGQUERY_POOL name an existing pool."
        for name in sorted(named - existing)
    ]


_APP: Any = None


def get_app() -> Any:
    global _APP
    if _APP is None:
        _APP = build_app()
    return _APP
