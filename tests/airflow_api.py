"""The Airflow REST API of an `airflow standalone` started by a test, over plain urllib."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def request(
    base: str, method: str, path: str, token: str | None = None, body: dict | None = None, timeout: float = 60
) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def status(base: str, path: str, token: str | None = None) -> int:
    try:
        request(base, "GET", path, token)
        return 200
    except urllib.error.HTTPError as err:
        return err.code


def wait(
    what: str, check: Callable[[], Any], timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> Any:
    """Poll `check` every second until it returns something true; the server must stay up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"airflow standalone exited while waiting for {what}; see {log}")
        try:
            value = check()
            if value:
                return value
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s" + (f"; see {log}" if log else ""))


def trigger_run(base: str, token: str, dag_id: str, run_id: str, conf: dict, timeout: float = 300) -> dict:
    """Trigger a run under a run id of our choosing, so that a POST which timed out on a busy
    standalone (SQLite is one writer at a time) can be retried without starting a second run:
    the retry finds the first one (409, or a GET) instead."""
    runs = f"/api/v2/dags/{dag_id}/dagRuns"

    def created() -> dict | None:
        try:
            return request(base, "POST", runs, token, {"dag_run_id": run_id, "logical_date": None, "conf": conf})
        except urllib.error.HTTPError as err:
            if err.code != 409:
                raise RuntimeError(f"triggering {run_id}: HTTP {err.code} {err.read()[:500]!r}") from err
        except OSError:  # a timeout: the run may or may not exist yet
            pass
        try:
            return request(base, "GET", f"{runs}/{run_id}", token)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise RuntimeError(f"reading {run_id}: HTTP {err.code} {err.read()[:500]!r}") from err

    return wait(f"run {run_id} to be created", created, timeout)


def healthy(base: str) -> bool:
    health = request(base, "GET", "/api/v2/monitor/health")
    return all(health[part]["status"] == "healthy" for part in ("metadatabase", "scheduler"))


def failed_try_logs(home: Path, dag_id: str, run_id: str) -> str:
    """The end of the log of every failed try of a run, and of the standalone log, to say why a
    run failed in an assertion message."""
    run_folder = home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    tails = []
    for log in sorted(run_folder.rglob("attempt=*.log")):
        text = log.read_text(errors="replace")
        if '"level":"error"' in text or "ERROR" in text or "Traceback" in text:
            tails.append(f"--- {log.relative_to(run_folder)}\n" + "\n".join(text.splitlines()[-40:]))
    standalone = home / "standalone.log"
    if standalone.exists():
        lines = standalone.read_text(errors="replace").splitlines()
        tails.append(
            "--- standalone.log, lines naming errors or failures\n"
            + "\n".join(
                line for line in lines if any(word in line for word in ("ERROR", "error", "failed", "Traceback"))
            )[-6000:]
        )
    return "\n".join(tails) or f"no failed try logged under {run_folder}"
