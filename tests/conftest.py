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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT = "test-project"
STORAGE_DAG_ID = "dicom_storage"

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


@contextmanager
def pipeline_settings(
    root: Path | str,
    *,
    bucket: str | None = None,
    collection: str | None = None,
    proxies: bool = False,
    create_bucket: bool = True,
    **extra: str,
) -> Iterator[dict]:
    """The settings of a run that sends to the emulators, as environment variables until the end.

    A new bucket is created (a fresh random name unless `bucket` is given; `create_bucket=False`
    when the caller made it). Each caller passes a
    collection of its own (random by default): the emulators are shared by the whole session, and a
    module counting the rows of a collection must not see another module's. With `proxies`, both
    emulators are reached through fault proxies (env["gcs"], env["bq"]). `extra` adds settings.
    Needs the gcs_emulator and bigquery_emulator fixtures."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from tests.faultproxy import proxied

    suffix = uuid.uuid4().hex[:8]
    bucket = bucket or f"pipeline-{suffix}"
    collection = collection or f"IRB_{suffix}"
    if create_bucket:
        GCSHook().create_bucket(bucket_name=bucket, project_id=PROJECT)
    if isinstance(root, Path):  # else a gs:// landing root
        root.mkdir(parents=True, exist_ok=True)
    settings = {
        "SEND_TO_GOOGLE": "true",
        "GOOGLE_CLOUD_STORAGE": bucket,
        "GOOGLE_PROJECT_NAME": PROJECT,
        "GOOGLE_STORAGE_COLLECTION": collection,
        "DICOM_LANDING_ROOT": str(root),
        **extra,
    }
    with pytest.MonkeyPatch.context() as mp, ExitStack() as stack:
        for name, value in settings.items():
            mp.setenv(name, value)
        env: dict = {"bucket": bucket, "collection": collection, "root": root}
        if proxies:
            env["gcs"] = stack.enter_context(proxied(os.environ["STORAGE_EMULATOR_HOST"], "STORAGE_EMULATOR_HOST"))
            env["bq"] = stack.enter_context(proxied(os.environ["BIGQUERY_EMULATOR_HOST"], "BIGQUERY_EMULATOR_HOST"))
        yield env


def run_dag(batch_ids: list[str] | None = None, *, dag_id: str = STORAGE_DAG_ID, conf: dict | None = None):
    """One `dag.test()` run of a DAG from dags/, with `batch_ids` as its conf; returns the DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).get_dag(dag_id)
    return dag.test(run_conf=conf if conf is not None else {"batch_ids": batch_ids or []})
