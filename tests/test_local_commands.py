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
