"""What a batch report means at a glance: a label for the grid and a note for the run.

Pure functions of the batch reports (no Airflow import), used by the DAG's batch_report task
(the label of its mapped instance), by the listener that writes the run's note, and by the
batches view. They use the report's counts, states and ids only: never a header value, never
an image path.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dicom_archive.plan import STATUS_DONE

# The context key batch_report fills in; its map_index_template renders it.
LABEL_KEY = "batch_outcome"


def quarantined(report: dict[str, Any]) -> int:
    return int((report.get("images") or {}).get("quarantined") or 0)


def needs_attention(report: dict[str, Any]) -> bool:
    """A batch an operator should look at: not DONE, or DONE with quarantined images."""
    return report.get("status") != STATUS_DONE or quarantined(report) > 0


def batch_label(report: dict[str, Any]) -> str:
    """`20240106-0001: EMPTY, 3 of 3 quarantined` - the label of the batch's report task."""
    status = report.get("status") or "?"
    label = f"{report.get('batch_id')}: {status}"
    held = quarantined(report)
    if held:
        seen = (report.get("images") or {}).get("seen")
        label += f", {held} of {seen} quarantined" if seen else f", {held} quarantined"
    if status == STATUS_DONE:
        rows = (report.get("bigquery") or {}).get("rows_inserted")
        archives = report.get("archives") or {}
        label += f", {archives.get('written', 0)} archives written"
        if rows is not None:
            label += f", {rows} new rows"
    return label


def run_note(
    reports: list[dict[str, Any]], unreported: list[str] | None = None, failed: list[str] | None = None
) -> str:
    """The Markdown note of a dicom_storage run: batches and states, archives, rows, quarantined.
    `unreported`: batches planned without a report; `failed`: batches whose report task failed
    after writing their report (a batch.json that cannot be used)."""
    unreported = sorted(unreported or [])
    failed_ids = set(failed or [])
    if not reports and not unreported:
        return "No batch in this run."

    def state_of(report: dict[str, Any]) -> str:
        status = str(report.get("status") or "?")
        return f"{status} (task failed)" if report.get("batch_id") in failed_ids else status

    states = Counter(state_of(r) for r in reports)
    if unreported:
        states["no report"] = len(unreported)
    written = sum((r.get("archives") or {}).get("written", 0) for r in reports)
    present = sum((r.get("archives") or {}).get("already_present", 0) for r in reports)
    rows = sum((r.get("bigquery") or {}).get("rows_inserted") or 0 for r in reports)
    held = sum(quarantined(r) for r in reports)
    attention = [r for r in reports if needs_attention(r)]
    headline = "⚠ " if attention or unreported or failed_ids else ""
    count = len(reports) + len(unreported)
    lines = [
        f"{headline}**{count} {'batch' if count == 1 else 'batches'}**: "
        + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        + f"; {written} archives written, {present} already present; {rows} rows inserted; "
        f"{held} images quarantined.",
        "",
        "| batch | state | images | archived | quarantined | archives written | rows inserted |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(reports, key=lambda r: str(r.get("batch_id"))):
        images = r.get("images") or {}
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((images.get("quarantined_by_reason") or {}).items()))
        lines.append(
            f"| {r.get('batch_id')} | {state_of(r)} | {images.get('seen', 0)} | {images.get('archived', 0)} | "
            f"{quarantined(r)}{f' ({reasons})' if reasons else ''} | {(r.get('archives') or {}).get('written', 0)} | "
            f"{(r.get('bigquery') or {}).get('rows_inserted') or 0} |"
        )
    for batch_id in unreported:
        lines.append(f"| {batch_id} | no report (see the failed task) | | | | | |")
    return "\n".join(lines)
