"""The local demo: a realistic landing zone, the DAG end to end on the emulators, and what it made.

    make demo                       (sets up, starts the emulators, then runs this)
    python -m tools.demo [--prepare-only]

Uses the settings of scripts/airflow-env.sh (SEND_TO_GOOGLE=true towards the emulators). It runs
the DAG exactly as a user would, with `airflow dags test dicom_storage --conf {"batch_ids": [...]}`,
then prints the objects, the rows per table, the quarantined images with their reasons and the
collection summary. Running it again changes nothing in the bucket or the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set: run through `make demo` (it sources scripts/airflow-env.sh)")
    return value


def _hook():
    """The hook the DAG's tasks use: the settings' identity (DICOM_IMPERSONATION_CHAIN), if any."""
    from hooks.dicom_storage import DicomStorageHook, load_settings

    return DicomStorageHook.of_settings(load_settings())


def prepare() -> list[str]:
    """The demo landing zone (`make emulators` made the bucket); returns the batch ids."""
    from tools.landing_zone import demo_landing_zone

    root = Path(_setting("DICOM_LANDING_ROOT"))
    if not root.is_dir() or not any(root.iterdir()):
        batches = demo_landing_zone(root, days=3)
        identifiers = root.parent / "raw_identifiers.json"
        from tools.landing_zone import raw_identifiers

        identifiers.write_text(json.dumps(raw_identifiers(batches), indent=1))
    return sorted(p.name for p in root.iterdir() if (p / "batch.json").exists())


def run_dag(batch_ids: list[str], log_path: Path) -> int:
    conf = json.dumps({"batch_ids": batch_ids})
    with open(log_path, "wb") as log:
        proc = subprocess.run(
            ["airflow", "dags", "test", "dicom_storage", "--conf", conf], stdout=log, stderr=subprocess.STDOUT
        )
    return proc.returncode


def show(batch_ids: list[str]) -> None:
    from dicom_archive.sql_templates import format_table, run_summary

    project = _setting("GOOGLE_PROJECT_NAME")
    bucket = _setting("GOOGLE_CLOUD_STORAGE")
    root = Path(_setting("DICOM_LANDING_ROOT"))
    reports = {b: json.loads((root / b / "batch.report.json").read_text()) for b in batch_ids}

    hook = _hook()
    print(f"\n== Objects in gs://{bucket}")
    for blob in hook.storage_client().list_blobs(bucket):
        print(f"  {blob.size:>9}  gen {blob.generation}  {blob.name}")

    print("\n== Batches")
    for batch_id, report in reports.items():
        archives = report["archives"]
        print(
            f"  {batch_id}: {report['status']}, {report['images']['seen']} images seen, "
            f"{report['images']['archived']} archived ({report['images'].get('stripped', 0)} with private "
            f"elements stripped) in {archives['total']} archives "
            f"({archives['written']} written, {archives['already_present']} already present), "
            f"{report['bigquery']['rows_inserted']} new rows"
        )

    print("\n== Quarantined images (never uploaded)")
    for batch_id, report in reports.items():
        for held in report["quarantined"]:
            print(f"  {batch_id}/{held['path']}: {held['reason']} ({held['detail']})")
        lookup = report.get("lookup") or {}
        for key in lookup.get("keys_matching_no_image", []):
            print(f"  {batch_id}/lookup.json: key {key!r} matches no image")

    client = hook.bigquery_client(project)
    collections = sorted({r["collection"] for r in reports.values() if r["collection"]})
    print("\n== Rows per table")
    for collection in collections:
        rows = list(client.query(f"SELECT COUNT(*) AS n FROM `{project}.{collection}.dicom`").result())
        print(f"  {project}.{collection}.dicom: {rows[0]['n']} rows")

    for collection in collections:
        print(f"\n== Collection summary: {collection} (include/sql/collection_summary.sql)")
        print(format_table(run_summary(client, "collection_summary", project=project, dataset=collection)))
        print(f"\n== Studies: {collection} (include/sql/study_summary.sql)")
        print(format_table(run_summary(client, "study_summary", project=project, dataset=collection)))

    from tools.phi_audit import audit, load_identifiers

    identifiers = load_identifiers([root.parent / "raw_identifiers.json"])
    findings = audit(
        identifiers,
        [f"gs://{bucket}"],
        reports=[root],
        bigquery_tables=[f"{project}.{c}.dicom" for c in collections],
        bigquery_client=client,
        storage_client=hook.storage_client(),
    )
    print(f"\n== PHI audit (make phi-audit): {len(identifiers)} raw identifiers, {len(findings)} findings")
    for finding in findings:
        print(f"  {finding}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare-only", action="store_true", help="create the bucket and landing zone, then stop")
    args = parser.parse_args(argv)

    batch_ids = prepare()
    print(f"landing zone {_setting('DICOM_LANDING_ROOT')}: {len(batch_ids)} batches ({', '.join(batch_ids)})")
    if args.prepare_only:
        return 0
    log_path = Path(_setting("DICOM_LANDING_ROOT")).parent / "dags-test.log"
    started = time.monotonic()
    print(f"running: airflow dags test dicom_storage --conf '{json.dumps({'batch_ids': batch_ids})}'")
    code = run_dag(batch_ids, log_path)
    print(
        f"the DAG run {'succeeded' if code == 0 else 'FAILED'} in {time.monotonic() - started:.0f}s (log: {log_path})"
    )
    if code != 0:
        return code
    show(batch_ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
