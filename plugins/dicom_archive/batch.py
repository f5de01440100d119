"""A batch's journey between tasks: staging layout, archiving a chunk of studies, the report.

Tasks hand each other only small references; the plan, the per-image rows and the archive
summaries travel through a staging area in the archive store (the bucket, or the local output
folder), one folder per batch and run: `_staging/<batch_id>/<run_key>/`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dicom_archive.deid import DeidPolicy
from dicom_archive.landing import LandingZone
from dicom_archive.manifest import LOCAL_REPORT_NAME, REPORT_NAME
from dicom_archive.naming import batch_report_object_name
from dicom_archive.plan import STATUS_NOT_READY, BatchPlan, StudyGroup
from dicom_archive.publish import ALREADY_PRESENT, publish_study_archive
from dicom_archive.rows import DEFAULT_HEADER_ALLOW_LIST, RunContext, build_row, image_fields, rows_to_ndjson
from dicom_archive.stores import ObjectStore

STAGING_ROOT = "_staging"
JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"


def run_key(run_id: str) -> str:
    """A name-safe, collision-free form of an Airflow run id."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", run_id).strip("_")[:80]
    return f"{safe}_{hashlib.sha1(run_id.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Staging:
    store: ObjectStore
    batch_id: str
    run_key: str

    @property
    def prefix(self) -> str:
        return f"{STAGING_ROOT}/{self.batch_id}/{self.run_key}/"

    @property
    def plan_name(self) -> str:
        return f"{self.prefix}plan.json"

    def chunk_name(self, kind: str, chunk_id: str, suffix: str) -> str:
        return f"{self.prefix}{kind}/{chunk_id}.{suffix}"

    def write_plan(self, plan: BatchPlan) -> str:
        self.store.write_bytes(self.plan_name, plan.to_json().encode(), JSON_TYPE)
        return self.plan_name

    def read_plan(self) -> BatchPlan:
        raw = self.store.read_bytes(self.plan_name)
        if raw is None:
            raise FileNotFoundError(f"no staged plan at {self.store.uri(self.plan_name)}")
        return BatchPlan.from_json(raw.decode())

    def write_chunk(self, chunk_id: str, summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        # Rows first: the summary file is the marker that the chunk is complete.
        self.store.write_bytes(self.chunk_name("rows", chunk_id, "ndjson"), rows_to_ndjson(rows), NDJSON_TYPE)
        body = json.dumps(summaries, sort_keys=True).encode()
        self.store.write_bytes(self.chunk_name("archives", chunk_id, "json"), body, JSON_TYPE)

    def read_archive_summaries(self) -> dict[str, list[dict[str, Any]]]:
        names = self.store.list_names(f"{self.prefix}archives/")
        return {
            name.rsplit("/", 1)[1].removesuffix(".json"): json.loads(self.store.read_bytes(name) or b"[]")
            for name in names
        }

    def clear(self) -> None:
        """Remove this run's staging files (after the report is written)."""
        for name in self.store.list_names(self.prefix):
            self.store.delete(name, None)

    def read_rows(self, chunk_ids: Iterable[str]) -> bytes:
        parts = []
        for chunk_id in sorted(chunk_ids):
            raw = self.store.read_bytes(self.chunk_name("rows", chunk_id, "ndjson"))
            if raw is None:
                raise FileNotFoundError(f"rows of chunk {chunk_id} are missing from {self.store.uri(self.prefix)}")
            parts.append(raw)
        return b"".join(parts)

    def write_result(self, name: str, doc: dict[str, Any]) -> None:
        self.store.write_bytes(f"{self.prefix}{name}.json", json.dumps(doc, sort_keys=True).encode(), JSON_TYPE)

    def read_result(self, name: str) -> dict[str, Any] | None:
        raw = self.store.read_bytes(f"{self.prefix}{name}.json")
        return None if raw is None else json.loads(raw)


def chunk_refs(plan: BatchPlan, staging: Staging, studies_per_chunk: int) -> list[dict[str, Any]]:
    """Small references for task mapping: a slice of the staged plan's study groups."""
    size = max(1, studies_per_chunk)
    return [
        {
            "batch_id": plan.batch_id,
            "run_key": staging.run_key,
            "start": start,
            "stop": min(start + size, len(plan.groups)),
        }
        for start in range(0, len(plan.groups), size)
    ]


def studies_per_chunk(study_counts: list[int], preferred: int, max_chunks: int) -> int:
    """The chunk size for a run: `preferred`, or larger when the run's batches would otherwise need
    more than `max_chunks` mapped archive tasks (Airflow caps a mapping at max_map_length, and
    every mapped task costs the scheduler). Each batch rounds its last chunk up, hence the margin."""
    total = sum(study_counts)
    budget = max(1, max_chunks - len(study_counts))
    return max(1, preferred, math.ceil(total / budget))


def chunk_id(start: int) -> str:
    return f"{start:07d}"


@dataclass
class ArchiveSettings:
    policy: DeidPolicy = field(default_factory=DeidPolicy)
    compresslevel: int = 1
    replace_changed: bool = False
    header_allow_list: tuple[str, ...] = DEFAULT_HEADER_ALLOW_LIST


ProgressCallback = Callable[[int, int, int, float], None]  # done, total, bytes, seconds


def archive_groups(
    groups: list[StudyGroup],
    zone: LandingZone,
    store: ObjectStore,
    *,
    deid: dict[str, Any],
    context: RunContext,
    settings: ArchiveSettings,
    progress: ProgressCallback | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Publish each group's archive; return the per-archive summaries and the per-image rows."""
    summaries: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    describe = functools.partial(image_fields, allow_list=settings.header_allow_list)
    started = time.monotonic()
    done_bytes = 0
    for done, group in enumerate(groups, start=1):
        t0 = time.monotonic()
        published = publish_study_archive(
            group,
            zone,
            store,
            policy=settings.policy,
            compresslevel=settings.compresslevel,
            replace_changed=settings.replace_changed,
            describe=describe,
        )
        rows.extend(
            build_row(group=group, member=member, stored=published.stored, deid=deid, context=context)
            for member in published.members
        )
        done_bytes += group.size
        summaries.append(
            {
                **published.stored.as_xcom(),
                "outcome": published.outcome,
                "image_count": len(published.members),
                "quarantined_count": group.quarantined,
                "input_bytes": group.size,
                "seconds": round(time.monotonic() - t0, 3),
            }
        )
        if progress is not None:
            progress(done, len(groups), done_bytes, time.monotonic() - started)
    return summaries, rows


def build_report(
    plan: BatchPlan,
    *,
    archives: list[dict[str, Any]],
    table: str | None,
    rows_loaded: int | None,
    rows_inserted: int | None,
    load_seconds: float | None = None,
) -> dict[str, Any]:
    """The batch report of the outputs spec. Paths and reasons only: never a header value."""
    written = [a for a in archives if a.get("outcome") != ALREADY_PRESENT]
    archive_seconds = round(sum(a.get("seconds", 0.0) for a in archives), 3)
    input_bytes = sum(a.get("input_bytes", 0) for a in archives)
    timings = {
        "plan_seconds": plan.plan_seconds,
        "archive_seconds": archive_seconds,  # summed over the archive tasks, which may run in parallel
        "archive_MB_per_s": round(input_bytes / 1e6 / archive_seconds, 1) if archive_seconds else None,
        "load_seconds": load_seconds,
    }
    return {
        "batch_id": plan.batch_id,
        "collection": plan.collection,
        "status": plan.status,
        "error": plan.error,
        "completed_at": plan.completed_at,
        "reported_at": datetime.now(UTC).isoformat(),
        "images": {
            "seen": plan.images_seen,
            "archived": sum(a.get("image_count", 0) for a in archives),
            "quarantined": len(plan.quarantined),
            "quarantined_by_reason": plan.quarantine_counts(),
        },
        "quarantined": [{"path": q.relpath, "reason": q.reason, "detail": q.detail} for q in plan.quarantined],
        "archives": {
            "total": len(archives),
            "written": len(written),
            "already_present": len(archives) - len(written),
            "bytes": sum(a.get("size", 0) for a in archives),
            "input_bytes": input_bytes,
            "objects": sorted(a["uri"] for a in archives),
        },
        "bigquery": {"table": table, "rows_in_batch": rows_loaded, "rows_inserted": rows_inserted},
        "timings": timings,
    }


def changed_anything(report: dict[str, Any]) -> bool:
    return bool(report["archives"]["written"] or report["bigquery"].get("rows_inserted"))


def publish_report(
    report: dict[str, Any], zone: LandingZone, store: ObjectStore | None, *, local: bool = False
) -> list[str]:
    """Write the report next to the batch and, when the collection is known, to the bucket.

    The bucket copy records the run that archived the batch: a rerun that changed nothing
    leaves it as it is, so a no-op rerun leaves the bucket untouched. A batch that is not ready
    gets no report at all. A local run (SEND_TO_GOOGLE=false; `store` is the local output
    folder) writes `batch.report.local.json` beside the batch: it never replaces the report of
    a run that sent the batch to Google, and it does not mark the batch as handled."""
    if report["status"] == STATUS_NOT_READY:
        return []  # a report would make the batch look handled: it is processed once it is ready
    body = json.dumps(report, indent=2, sort_keys=True).encode()
    locations = [zone.write_bytes(report["batch_id"], LOCAL_REPORT_NAME if local else REPORT_NAME, body)]
    if store is not None and report.get("collection"):
        name = batch_report_object_name(report["collection"], report["batch_id"])
        if changed_anything(report) or store.get(name) is None:
            store.write_bytes(name, body, JSON_TYPE)
        locations.append(store.uri(name))
    return locations
