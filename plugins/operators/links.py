"""Extra links from the task page: the archives, the table and the batch report.

They name buckets, collections, tables and batch ids only, never an entity (patient) id. In
Airflow 3 the worker asks each link for its URL right after `execute` and stores it in XCom, so
a link just returns what the operator recorded in `console_links` while it ran. (The provider's
link base class would pull in the whole Google hook stack at DAG parse time: about 0.9 s.)

Where they point is a setting, DICOM_LINKS_TO (environment, then Airflow Variable):

- `console` (default): the Google Cloud console (Cloud Storage browser, BigQuery).
- `batches-view`: the "DICOM batches" view of this Airflow (plugins/batches_view), for places
  the console cannot show, such as the local emulators (scripts/airflow-env.sh sets it).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from airflow.sdk import BaseOperatorLink

CONSOLE = "https://console.cloud.google.com"
BATCHES_VIEW = "/dicom-batches"  # the batches view's URL prefix in the Airflow API server
LINKS_SETTING = "DICOM_LINKS_TO"
TO_CONSOLE, TO_VIEW = "console", "batches-view"


def links_to_view() -> bool:
    """True when the links should open the batches view rather than the Cloud console."""
    from hooks.dicom_storage import setting_value

    return (setting_value(LINKS_SETTING) or TO_CONSOLE).strip().lower() == TO_VIEW


def view_url(page: str = "", **params: str | None) -> str:
    query = urlencode({k: v for k, v in params.items() if v})
    return f"{BATCHES_VIEW}/{page}" + (f"?{query}" if query else "")


class _RecordedLink(BaseOperatorLink):
    name = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return getattr(operator, "console_links", {}).get(self.name, "")


class CollectionArchivesLink(_RecordedLink):
    name = "Archives in Cloud Storage"

    @staticmethod
    def url(*, bucket: str | None, collection: str, project: str | None, batch_id: str | None = None) -> str:
        if links_to_view():
            return view_url(f"objects/{quote(batch_id)}") if batch_id else view_url(collection=collection)
        return f"{CONSOLE}/storage/browser/{bucket}/Collection/{collection}?project={project or ''}"


class CollectionTableLink(_RecordedLink):
    name = "Metadata table in BigQuery"

    @staticmethod
    def url(*, project: str | None, dataset: str, table: str) -> str:
        if links_to_view():
            return view_url(collection=dataset)
        return f"{CONSOLE}/bigquery?project={project}&p={project}&d={dataset}&t={table}&page=table"


class BatchReportLink(_RecordedLink):
    name = "Batch report"

    @staticmethod
    def url(*, bucket: str | None, collection: str, batch_id: str, project: str | None) -> str:
        if links_to_view():
            return view_url(f"report/{quote(batch_id)}")
        return (
            f"{CONSOLE}/storage/browser/_details/{bucket}/Collection/{collection}/Batches/{batch_id}.json"
            f"?project={project or ''}"
        )


def record_links(
    operator: Any,
    settings: Any,
    *,
    collection: str | None,
    batch_id: str,
    table: str | None = None,
    archives: bool = True,
) -> None:
    """Fill `operator.console_links` for a batch: its archives, its report, and the table if loaded.
    `archives=False`: a batch that stored nothing (EMPTY, ERROR) links its report only.

    Towards the console only when the run sends to Google (otherwise there is nothing there to
    see), and only under a collection (a report filed under none stays beside its batch); towards
    the batches view always."""
    if not (settings.send_to_google or links_to_view()):
        return
    if collection is None and not links_to_view():
        return
    links = operator.console_links
    if archives:
        links[CollectionArchivesLink.name] = CollectionArchivesLink.url(
            bucket=settings.bucket, collection=collection, project=settings.project, batch_id=batch_id
        )
    links[BatchReportLink.name] = BatchReportLink.url(
        bucket=settings.bucket, collection=collection, batch_id=batch_id, project=settings.project
    )
    if table:
        links[CollectionTableLink.name] = CollectionTableLink.url(
            project=settings.project, dataset=collection, table=table
        )
