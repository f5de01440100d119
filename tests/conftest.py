"""Shared fixtures: a throwaway Airflow home and real emulator servers on free loopback ports.

Airflow reads its configuration when it is first imported, so the environment is set here,
at conftest import time, before any test module imports airflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT = "test-project"

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="airflow-home-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "DICOM_TASK_RETRIES": "0",  # a failing task in a test fails at once
        "GOOGLE_PROJECT_NAME": PROJECT,
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": PROJECT}}
        ),
    }
)
# Settings from the developer's shell must not leak into tests.
for _name in (
    "STORAGE_EMULATOR_HOST",
    "BIGQUERY_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "DICOM_GCS_POOL",
    "DICOM_BIGQUERY_POOL",
    "DICOM_LINKS_TO",
):
    os.environ.pop(_name, None)

from tools import emulators  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A fresh SQLite metadata database for this test session."""
    from airflow.utils import db

    db.resetdb()
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emulators")


@pytest.fixture(scope="session")
def gcs_emulator(run_dir: Path) -> Iterator[emulators.EmulatorProcess]:
    """The Cloud Storage emulator on a free port; clients reach it via STORAGE_EMULATOR_HOST."""
    emulator = emulators.start_gcs(emulators.free_port(), run_dir / "gcs.log")
    try:
        emulators.wait_ready(emulator, project=PROJECT)
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        yield emulator
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        emulators.stop(emulator.pid)


@pytest.fixture(scope="session")
def bigquery_emulator(run_dir: Path) -> Iterator[emulators.EmulatorProcess]:
    """The BigQuery emulator on a free port; clients reach it via BIGQUERY_EMULATOR_HOST."""
    emulator = emulators.start_bigquery(
        emulators.free_port(), run_dir / "bigquery.log", run_dir / "bigquery-data", project=PROJECT
    )
    try:
        emulators.wait_ready(emulator, project=PROJECT)
        os.environ["BIGQUERY_EMULATOR_HOST"] = emulator.url
        yield emulator
    finally:
        os.environ.pop("BIGQUERY_EMULATOR_HOST", None)
        emulators.stop(emulator.pid)


@pytest.fixture
def bucket_name(gcs_emulator: emulators.EmulatorProcess) -> str:
    """A new, empty bucket in the emulator, created through the provider hook."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    name = f"test-{uuid.uuid4().hex[:12]}"
    GCSHook(gcp_conn_id="google_cloud_default").create_bucket(bucket_name=name, project_id=PROJECT)
    return name


@pytest.fixture
def bigquery_client(bigquery_emulator: emulators.EmulatorProcess):
    """A google.cloud.bigquery.Client obtained the production way, through BigQueryHook."""
    from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

    hook = BigQueryHook(gcp_conn_id="google_cloud_default", use_legacy_sql=False)
    return hook.get_client(project_id=hook.project_id)


@pytest.fixture
def dataset_id() -> str:
    return f"IRB_{uuid.uuid4().hex[:10]}"
