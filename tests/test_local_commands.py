"""The local commands' edges: `make emulators-status` when nothing runs, and stopping `make airflow`
(an `airflow standalone` and everything it started) by its pid file, as `make clean` does."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO_ROOT
from tools import emulators

# Stands in for `airflow standalone`: a child that ignores SIGINT (a component that does not stop).
PARENT = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
print(child.pid, flush=True)
try:
    time.sleep(600)
except KeyboardInterrupt:
    sys.exit(0)
"""


def test_status_of_stopped_emulators_is_an_answer_not_an_error(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.emulators", "status", "--run-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gcs: not running", "bigquery: not running"]


def test_airflow_stop_ends_standalone_and_what_it_started(tmp_path: Path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    pid_file = tmp_path / "standalone.pid"
    pid_file.write_text(f"{parent.pid}\n")
    try:
        assert emulators.stop_airflow(pid_file, timeout=5) is True
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while emulators.is_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not emulators.is_alive(child), "a component left behind is stopped too"
        assert not pid_file.exists()
        assert emulators.stop_airflow(pid_file) is False, "nothing to stop: not an error"
    finally:
        for pid in (parent.pid, child):
            if emulators.is_alive(pid):
                emulators.stop(pid)


# Stands in for the real airflow in a copy of the scripts: `standalone` only records the DAGs'
# paused state at the moment it would start; everything else goes to the real airflow.
PAUSED_STATES = "import sqlite3, sys; print(sorted(sqlite3.connect(sys.argv[1]).execute(sys.argv[2])))"
FAKE_AIRFLOW = """#!/usr/bin/env bash
if [ "$1" = standalone ]; then
  exec {python} -c "{query}" "$AIRFLOW_HOME/airflow.db" "SELECT dag_id, is_paused FROM dag"
fi
exec {airflow} "$@"
"""


def test_make_airflow_unpauses_the_dags_that_make_demo_left_paused(airflow_db, tmp_path: Path):
    """`make demo` (airflow dags test) creates the DAGs paused in the same database; `make airflow`
    must still start them unpaused, as it does on a fresh AIRFLOW_HOME, before the scheduler runs."""
    import ast
    import os
    import shutil
    import sqlite3

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(airflow_db / "airflow.db") as src, sqlite3.connect(home / "airflow.db") as dst:
        src.backup(dst)
        dst.execute("UPDATE dag SET is_paused = 1")  # as `make demo` leaves them
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "scripts", repo / "scripts")
    (repo / ".venv" / "bin").mkdir(parents=True)
    fake = repo / ".venv" / "bin" / "airflow"
    fake.write_text(
        FAKE_AIRFLOW.format(python=sys.executable, query=PAUSED_STATES, airflow=REPO_ROOT / ".venv" / "bin" / "airflow")
    )
    fake.chmod(0o755)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
    landing = tmp_path / "landing"
    (landing / "20240105-0001").mkdir(parents=True)  # not empty: no demo zone is prepared
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW__CORE__DAGS_ARE_PAUSED")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO_ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO_ROOT / "plugins"),
        PYTHONPATH=str(REPO_ROOT),
        DICOM_LANDING_ROOT=str(landing),
    )
    result = subprocess.run(
        ["bash", str(repo / "scripts" / "airflow-standalone.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paused = dict(ast.literal_eval(result.stdout.splitlines()[-1]))  # when the scheduler would start
    assert (paused["dicom_storage"], paused["dicom_withdraw"]) == (0, 0), result.stdout
