"""Measurements that need a process of their own: `python -m bench.worker MODE ...`.

Each mode prints one JSON document on its last stdout line. I/O counters and peak memory are
read from /proc/self, so the parent learns exactly what this one task did.

    plan    --root R --batch B --out PLAN.json        plan a batch, save the plan
    archive --root R --batch B [--plan PLAN.json]     plan (unless given) and archive a batch
            [--images N] [--groups 0,2] [--sink none|task] [--level L] [--wait]
    load    --rows-dir D --endpoint URL --project P --dataset DS --feed chunks|whole
                                                      load a batch's staged rows into BigQuery
    dag-parse [--via importlib|dagbag]                time `import airflow`, then the DAG file
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, ensure_import_path, io_delta, peak_rss_mb, proc_io, rss_mb

DAG_FILE = REPO_ROOT / "dags" / "dicom_storage.py"


class Phase:
    """Wall time, CPU time and I/O counters of one step of the task."""

    def __init__(self) -> None:
        self.io = proc_io()
        self.cpu = time.process_time()
        self.started = time.monotonic()

    def done(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        cpu = time.process_time() - self.cpu
        return {"seconds": seconds, "cpu_seconds": cpu, **io_delta(self.io, proc_io())}


def _zone(root: str) -> Any:
    from dicom_archive.landing import LocalLandingZone

    return LocalLandingZone(root)


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from dicom_archive.plan import plan_batch

    phase = Phase()
    plan = plan_batch(_zone(args.root), args.batch)
    result = {"phases": {"plan": phase.done()}, "images": plan.images_accepted, "studies": len(plan.groups)}
    Path(args.out).write_text(plan.to_json())
    return result


def _select(plan: Any, groups: str | None, images: int | None) -> list[Any]:
    """The plan's study groups, optionally a subset of them, optionally cut to the first N images."""
    chosen = plan.groups if groups is None else [plan.groups[int(i)] for i in groups.split(",")]
    if images is None:
        return chosen
    cut, left = [], images
    for group in chosen:
        if left <= 0:
            break
        group.images = group.images[:left]
        left -= len(group.images)
        cut.append(group)
    return cut


def _archive(groups: list[Any], zone: Any, sink: str, level: int) -> int:
    """Archive the groups; returns the compressed bytes produced."""
    from dicom_archive.archive import write_study_archive

    if sink == "none":
        return sum(write_study_archive(group, zone, None, compresslevel=level)[0].size for group in groups)
    from bench.nullstore import NullObjectStore
    from dicom_archive.batch import Staging, archive_groups_spooled, run_key
    from dicom_archive.ndjson import NdjsonSpool
    from dicom_archive.rows import RunContext
    from dicom_archive.settings import ArchiveSettings

    # As the archive task does: rows spooled to a file, then staged from it.
    store = NullObjectStore()
    with NdjsonSpool() as rows:
        summaries = archive_groups_spooled(
            groups,
            zone,
            store,
            rows=rows,
            deid={},
            context=RunContext(upload_agent="bench"),
            settings=ArchiveSettings(compresslevel=level),
        )
        assert len(rows) == sum(len(group.images) for group in groups)
        Staging(store, groups[0].batch_id, run_key("bench")).write_chunk("0000000", summaries, rows)
    return sum(summary["size"] for summary in summaries)


def _preload() -> None:
    """Import what the archive step uses before measuring it, so module reads do not count."""
    for name in ("bench.nullstore", "dicom_archive.archive", "dicom_archive.batch", "dicom_archive.rows"):
        importlib.import_module(name)


def cmd_archive(args: argparse.Namespace) -> dict[str, Any]:
    from dicom_archive.plan import BatchPlan, plan_batch

    zone = _zone(args.root)
    phases: dict[str, Any] = {}
    if args.plan:
        plan = BatchPlan.from_json(Path(args.plan).read_text())
    else:
        phase = Phase()
        plan = plan_batch(zone, args.batch)
        phases["plan"] = phase.done()
    groups = _select(plan, args.groups, args.images)
    _preload()
    rss_setup = rss_mb()
    if args.wait:
        print("ready", flush=True)
        sys.stdin.readline()
    phase = Phase()
    start = phase.started
    output = _archive(groups, zone, args.sink, args.level)
    phases["archive"] = phase.done()
    return {
        "phases": phases,
        "input_bytes": sum(group.size for group in groups),
        "output_bytes": output,
        "images": sum(len(group.images) for group in groups),
        "studies": len(groups),
        "rss_setup_mib": rss_setup,
        "start": start,
        "end": time.monotonic(),
        **peak_rss_mb(),
    }


def cmd_load(args: argparse.Namespace) -> dict[str, Any]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    from dicom_archive.bigquery_load import load_rows_exactly_once
    from dicom_archive.bigquery_rows import check_rows
    from dicom_archive.bigquery_tables import ensure_table, load_schema
    from dicom_archive.ndjson import to_ndjson

    options = {"api_endpoint": args.endpoint}
    client = bigquery.Client(project=args.project, credentials=AnonymousCredentials(), client_options=options)
    ensure_table(client, args.dataset)  # the client's first calls, outside the measure
    files = sorted(Path(args.rows_dir).glob("*.ndjson"))
    rss_setup = rss_mb()
    phase = Phase()
    parts: Any = (path.read_bytes() for path in files)
    if args.feed == "whole":  # the load step before 2026-11-28
        parts = to_ndjson(list(check_rows([b"".join(parts)], load_schema())))
    loaded = load_rows_exactly_once(client, dataset_id=args.dataset, ndjson=parts, run_key=f"bench-{args.feed}")
    return {
        "rows": loaded.rows_inserted,
        "rss_setup_mib": rss_setup,
        "seconds": phase.done()["seconds"],
        **peak_rss_mb(),
    }


def cmd_dag_parse(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    import airflow  # noqa: F401

    imported = time.perf_counter()
    result: dict[str, Any] = {"import_airflow_s": imported - started}
    if args.via == "importlib":
        spec = importlib.util.spec_from_file_location("dicom_storage_dag", DAG_FILE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result["dag_s"] = time.perf_counter() - imported
        result["tasks"] = len(module.dag.tasks)
        return result
    from airflow.dag_processing.dagbag import DagBag

    ready = time.perf_counter()
    bag = DagBag(dag_folder=str(DAG_FILE))
    result["dagbag_import_s"] = ready - imported
    result["dag_s"] = time.perf_counter() - ready
    result["import_errors"] = {str(k): str(v) for k, v in bag.import_errors.items()}
    result["tasks"] = sum(len(dag.tasks) for dag in bag.dags.values())
    return result


def main(argv: list[str] | None = None) -> int:
    ensure_import_path()
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    modes = parser.add_subparsers(dest="mode", required=True)
    plan = modes.add_parser("plan")
    plan.add_argument("--root", required=True)
    plan.add_argument("--batch", required=True)
    plan.add_argument("--out", required=True)
    archive = modes.add_parser("archive")
    archive.add_argument("--root", required=True)
    archive.add_argument("--batch", required=True)
    archive.add_argument("--plan")
    archive.add_argument("--images", type=int)
    archive.add_argument("--groups")
    archive.add_argument("--sink", choices=["none", "task"], default="none")
    archive.add_argument("--level", type=int, default=1)
    archive.add_argument("--wait", action="store_true")
    load = modes.add_parser("load")
    for option in ("--rows-dir", "--endpoint", "--project", "--dataset"):
        load.add_argument(option, required=True)
    load.add_argument("--feed", choices=["chunks", "whole"], default="chunks")
    parse = modes.add_parser("dag-parse")
    parse.add_argument("--via", choices=["importlib", "dagbag"], default="importlib")
    args = parser.parse_args(argv)
    handler = {"plan": cmd_plan, "archive": cmd_archive, "load": cmd_load, "dag-parse": cmd_dag_parse}[args.mode]
    print(json.dumps(handler(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
