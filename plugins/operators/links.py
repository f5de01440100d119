"""Extra links from the task page to the Cloud console.

They name buckets, collections and tables only, never an entity (patient) id. In Airflow 3 the
worker asks each link for its URL right after `execute` and stores it in XCom, so a link just
returns what the operator recorded in `console_links` while it ran. (The provider's link base
class would pull in the whole Google hook stack at DAG parse time: about 0.9 s.)
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink

CONSOLE = "https://console.cloud.google.com"


class _RecordedLink(BaseOperatorLink):
    name = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return getattr(operator, "console_links", {}).get(self.name, "")


class CollectionArchivesLink(_RecordedLink):
    name = "Archives in Cloud Storage"

    @staticmethod
    def url(*, bucket: str, collection: str, project: str | None) -> str:
        return f"{CONSOLE}/storage/browser/{bucket}/Collection/{collection}?project={project or ''}"


class CollectionTableLink(_RecordedLink):
    name = "Metadata table in BigQuery"

    @staticmethod
    def url(*, project: str, dataset: str, table: str) -> str:
        return f"{CONSOLE}/bigquery?project={project}&p={project}&d={dataset}&t={table}&page=table"
