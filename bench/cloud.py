"""The benchmark's own emulators (free ports, started once per run) and an HTTP call counter."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.common import BENCH_DIR
from tools import emulators

PROJECT = "bench-project"


@dataclass
class Emulators:
    gcs: emulators.EmulatorProcess
    bigquery: emulators.EmulatorProcess

    def storage_client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        # STORAGE_EMULATOR_HOST (set by running_emulators) sends the client to the emulator.
        return storage.Client(project=PROJECT, credentials=AnonymousCredentials())

    def bigquery_client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(
            project=PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.bigquery.url},
        )


@contextlib.contextmanager
def running_emulators() -> Iterator[Emulators]:
    """Cloud Storage (in memory) and BigQuery emulators on free ports, stopped on exit."""
    run_dir = BENCH_DIR / "emulators" / str(os.getpid())
    shutil.rmtree(run_dir, ignore_errors=True)
    started: list[emulators.EmulatorProcess] = []
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        gcs = emulators.start_gcs(emulators.free_port(), run_dir / "gcs.log")
        started.append(gcs)
        bigquery = emulators.start_bigquery(
            emulators.free_port(), run_dir / "bigquery.log", run_dir / "bigquery-data", project=PROJECT
        )
        started.append(bigquery)
        for emulator in started:
            emulators.wait_ready(emulator, timeout=120, project=PROJECT)
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        yield Emulators(gcs, bigquery)
    finally:
        for emulator in started:
            emulators.stop(emulator.pid)
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        shutil.rmtree(run_dir, ignore_errors=True)


def route(method: str, url: str) -> str:
    """`GET datasets/*/tables/*`: the REST resource of a call, ids replaced by `*`."""
    path = urlsplit(url).path
    upload = "upload " if path.startswith("/upload/") else ""
    parts = path.strip("/").split("/")
    if "projects" in parts:
        parts = parts[parts.index("projects") + 2 :]
    shape = [part if index % 2 == 0 else "*" for index, part in enumerate(parts)]
    return f"{method} {upload}{'/'.join(shape)}"


class HttpCallCounter:
    """Counts every HTTP request a Google client sends through its `_http` session (JSON API
    calls and resumable upload requests alike), by route."""

    def __init__(self, client: Any) -> None:
        self.session = client._http
        self.calls: Counter[str] = Counter()

    def __enter__(self) -> HttpCallCounter:
        original = self.session.request

        def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            self.calls[route(method, url)] += 1
            return original(method, url, *args, **kwargs)

        self.session.request = request  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc: object) -> None:
        del self.session.request

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def job_count(client: Any) -> int:
    return sum(1 for _ in client.list_jobs(all_users=True))
