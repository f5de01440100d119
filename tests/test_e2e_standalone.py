"""End to end under `airflow standalone`: a backfill of three historical days processes exactly
the batches completed on those days (reported or not: the ledger), and the REST API shows the runs.

Its own AIRFLOW_HOME, port and bucket; the emulators of this test session. The landing zone
also holds batches of the day before and the day after, which the backfill must not touch.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import date

import pytest

from tests import airflow_api as api
from tests.conftest import PROJECT, REPO_ROOT
from tools import emulators
from tools.landing_zone import demo_batches, write_batch

pytestmark = pytest.mark.e2e

DAG_ID = "dicom_storage"
PASSWORD = "e2e-password"
COLLECTION = "IRB_e2e_standalone"  # its own: the emulators are shared by the whole session
BACKFILL_DAYS = ("20240105-0001", "20240106-0001", "20240107-0001")
OUTSIDE_DAYS = ("20240104-0001", "20240108-0001")
EARLIER_REPORT = json.dumps({"status": "DONE", "run_key": "an-earlier-run"})


@pytest.fixture(scope="module")
def standalone(tmp_path_factory, gcs_emulator, bigquery_emulator) -> Iterator[dict]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    home = tmp_path_factory.mktemp("standalone-home")
    landing = tmp_path_factory.mktemp("standalone-landing")
    bucket = "e2e-standalone"
    GCSHook().create_bucket(bucket_name=bucket, project_id=PROJECT)
    # Five consecutive days of batches, all in the ledger already (reported by an earlier run): the
    # backfill reprocesses the middle three, and the scheduled run of unpausing has nothing pending.
    for batch in demo_batches(days=5, start=date(2024, 1, 4), collection=COLLECTION):
        write_batch(landing, batch)
        (landing / batch.batch_id / "batch.report.json").write_text(EARLIER_REPORT)

    port = emulators.free_port()
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "PATH": f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        # The CLI below competes with the running components for SQLite's write lock.
        "PYTHONPATH": str(REPO_ROOT),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "tools.airflow_sqlite.CONNECT_ARGS",
        "DICOM_SCHEDULE": "0 0 * * *",
        "SEND_TO_GOOGLE": "true",
        "GOOGLE_CLOUD_STORAGE": bucket,
        "GOOGLE_PROJECT_NAME": PROJECT,
        "GOOGLE_STORAGE_COLLECTION": COLLECTION,
        "DICOM_LANDING_ROOT": str(landing),
    }
    airflow = str(REPO_ROOT / ".venv" / "bin" / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    for pool in ("dicom_storage_gcs", "dicom_storage_bigquery"):
        subprocess.run([airflow, "pools", "set", pool, "4", "e2e"], env=env, check=True, capture_output=True)

    log = open(home / "standalone.log", "wb")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        [airflow, "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        api.wait("a healthy airflow standalone", lambda: api.healthy(base), 300, proc)  # migrates its own db
        token = api.request(base, "POST", "/auth/token", body={"username": "admin", "password": PASSWORD})[
            "access_token"
        ]
        yield {
            "env": env,
            "base": base,
            "token": token,
            "landing": landing,
            "home": home,
            "bucket": bucket,
            "airflow": airflow,
        }
    finally:
        emulators.stop(proc.pid, timeout=30)
        log.close()


def create_backfill(standalone: dict, from_date: str, to_date: str, attempts: int = 5) -> None:
    """`airflow backfill create`, as a user runs it. On SQLite the CLI can lose the write lock to
    the running scheduler ("database is locked", raised at once: SQLite refuses to upgrade a read
    transaction while another connection writes); it is retried only while the REST API shows
    that no backfill was created."""
    command = [standalone["airflow"], "backfill", "create", "--dag-id", DAG_ID,
               "--from-date", from_date, "--to-date", to_date]  # fmt: skip
    for _ in range(attempts):
        result = subprocess.run(command, env=standalone["env"], capture_output=True, text=True)
        if result.returncode == 0:
            return
        backfills = api.request(standalone["base"], "GET", f"/api/v2/backfills?dag_id={DAG_ID}", standalone["token"])
        assert "database is locked" in result.stderr + result.stdout, result.stderr[-3000:]
        assert backfills["total_entries"] == 0, "a failed create must leave nothing behind"
        time.sleep(2)
    raise AssertionError(f"airflow backfill create failed {attempts} times: {result.stderr[-3000:]}")


def test_backfill_of_three_days_processes_exactly_their_batches(standalone):
    base, token, landing = standalone["base"], standalone["token"], standalone["landing"]
    api.wait(f"{DAG_ID} parsed", lambda: api.request(base, "GET", f"/api/v2/dags/{DAG_ID}", token), 90)
    # Created while the DAG is paused (a paused DAG's backfill waits), then unpaused.
    create_backfill(standalone, "2024-01-05", "2024-01-07")
    api.wait(
        "the DAG unpaused",
        lambda: api.request(base, "PATCH", f"/api/v2/dags/{DAG_ID}", token, {"is_paused": False}),
        180,
    )

    deadline = time.monotonic() + 300
    runs: list[dict] = []
    while time.monotonic() < deadline:
        runs = api.request(base, "GET", f"/api/v2/dags/{DAG_ID}/dagRuns?run_type=backfill", token)["dag_runs"]
        if len(runs) == 3 and all(r["state"] in ("success", "failed") for r in runs):
            break
        time.sleep(3)
    assert sorted(r["logical_date"][:10] for r in runs) == ["2024-01-05", "2024-01-06", "2024-01-07"]
    for run in runs:
        assert run["state"] == "success", api.failed_try_logs(standalone["home"], DAG_ID, run["dag_run_id"])

    for batch_id in BACKFILL_DAYS:
        report = json.loads((landing / batch_id / "batch.report.json").read_text())
        assert report["status"] == "DONE"
        assert report["run_key"] != "an-earlier-run", "reprocessed by the backfill"
        assert report["archives"]["total"] >= 3

    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    names = [b.name for b in GCSHook().get_conn().list_blobs(standalone["bucket"])]
    assert sorted(n for n in names if "/Batches/" in n) == [
        f"Collection/{COLLECTION}/Batches/{b}.json" for b in BACKFILL_DAYS
    ]
    for outside in OUTSIDE_DAYS:
        assert (landing / outside / "batch.report.json").read_text() == EARLIER_REPORT

    # Each run's sensor handed over exactly the batch of its own day.
    for run in runs:
        xcom = api.request(
            base,
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/wait_for_batches/xcomEntries/return_value",
            token,
        )
        day = run["logical_date"][:10].replace("-", "")
        assert xcom["value"] == [f"{day}-0001"]
