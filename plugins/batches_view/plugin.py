"""The AirflowPlugin: the "DICOM batches" view (a FastAPI app + UI entries) and the run notes.

- `/dicom-batches/` in the navigation ("DICOM batches"), rendered inside the Airflow UI;
- a "DICOM batches" tab on every DAG run, listing that run's batches;
- the listener that writes each dicom_storage run's note (batches_view/listener.py).

Nothing heavy is imported here: the web app is built on first access of `fastapi_apps`,
which only the API server makes. The DAG file never imports this package.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from batches_view import listener
from operators.links import BATCHES_VIEW


class DicomBatchesPlugin(AirflowPlugin):
    name = "dicom_batches"
    listeners = [listener]
    external_views = [
        {
            "name": "DICOM batches",
            "href": f"{BATCHES_VIEW.lstrip('/')}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "dicom-batches",
        },
        {
            "name": "DICOM batches",
            "href": f"{BATCHES_VIEW.lstrip('/')}/run?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "dicom-batches-run",
        },
    ]

    @property  # type: ignore[override]
    def fastapi_apps(self) -> list[dict[str, Any]]:
        from batches_view.app import get_app

        return [{"app": get_app(), "url_prefix": BATCHES_VIEW, "name": "DICOM batches"}]
