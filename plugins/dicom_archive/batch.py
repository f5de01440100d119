"""A batch's journey between tasks: staging layout, archiving a chunk of studies, the report.

Tasks hand each other only small references; the plans, the per-image rows and the archive
summaries travel through a staging area in the archive store (the bucket, or the local output
folder), one folder per batch and run: `_staging/<batch_id>/<run_key>/`.

- `plan.json`: the whole plan of the batch, read once by the report step;
- `plans/<chunk_id>.json`: one chunk plan per archive task (its studies and the batch's
  de-identification provenance), so that each task reads its own studies only;
- `rows/<chunk_id>.ndjson`, `archives/<chunk_id>.json`: what each archive task wrote;
- `bigquery.json`: the load step's result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset

from dicom_archive.archive import ArchivedMember, held_identities
from dicom_archive.landing import LOCAL_REPORT_NAME, REPORT_NAME, LandingZone, shown_path
from dicom_archive.manifest import check_deid
from dicom_archive.naming import batch_report_object_name, require_batch_id
from dicom_archive.ndjson import NdjsonSpool, to_ndjson
from dicom_archive.plan import STATUS_NOT_READY, WITHDRAWN, BatchPlan, ImageRecord, StudyGroup
from dicom_archive.publish import ALREADY_PRESENT, REPLACED, SUPERSEDED, PublishedArchive, publish_study_archive
from dicom_archive.rows import RunContext, build_row, image_fields
from dicom_archive.settings import ArchiveSettings
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

    def __post_init__(self) -> None:
        # No name under _staging/ is ever built from an id that could leave it.
        require_batch_id(self.batch_id)
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", self.run_key):
            raise ValueError(f"run key {self.run_key!r} is not a run_key() value")

    @property
    def batch_prefix(self) -> str:
        return f"{STAGING_ROOT}/{self.batch_id}/"

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

    def stage_plan(self, plan: BatchPlan, studies_per_chunk: int) -> list[dict[str, Any]]:
        """Stage the batch's plan for the tasks: one chunk plan per archive task, then the whole
        plan (for the report step); return the chunk references that task mapping hands out.
        Written again as a whole by a retried plan step (same run key, same names)."""
        refs = chunk_refs(plan, self, studies_per_chunk)
        for ref in refs:
            chunk = ChunkPlan(plan.batch_id, chunk_id(ref["start"]), plan.deid, plan.groups[ref["start"] : ref["stop"]])
            self.store.write_bytes(
                self.chunk_name("plans", chunk.chunk_id, "json"), chunk.to_json().encode(), JSON_TYPE
            )
        self.write_plan(plan)
        return refs

    def read_chunk_plan(self, ref: dict[str, Any]) -> ChunkPlan:
        """The studies of one chunk reference, from its own chunk plan. A reference handed out
        before chunk plans were staged (a run planned by the previous version) is read from the
        batch's whole plan."""
        chunk = chunk_id(ref["start"])
        raw = self.store.read_bytes(self.chunk_name("plans", chunk, "json"))
        if raw is not None:
            return ChunkPlan.from_json(raw.decode())
        plan = self.read_plan()
        return ChunkPlan(plan.batch_id, chunk, plan.deid, plan.groups[ref["start"] : ref["stop"]])

    def read_plan(self) -> BatchPlan:
        raw = self.store.read_bytes(self.plan_name)
        if raw is None:
            raise FileNotFoundError(f"no staged plan at {self.store.uri(self.plan_name)}")
        return BatchPlan.from_json(raw.decode())

    def write_chunk(
        self, chunk_id: str, summaries: list[dict[str, Any]], rows: NdjsonSpool | list[dict[str, Any]]
    ) -> None:
        """Stage an archive task's rows (streamed from their spool file, or from a list) and
        archive summaries."""
        # Rows first: the summary file is the marker that the chunk is complete.
        name = self.chunk_name("rows", chunk_id, "ndjson")
        if isinstance(rows, NdjsonSpool):
            with rows.stream() as stream:
                self.store.write_file(name, stream, NDJSON_TYPE)
        else:
            self.store.write_bytes(name, to_ndjson(rows), NDJSON_TYPE)
        body = json.dumps(summaries, sort_keys=True).encode()
        self.store.write_bytes(self.chunk_name("archives", chunk_id, "json"), body, JSON_TYPE)

    def read_archive_summaries(self) -> dict[str, list[dict[str, Any]]]:
        names = self.store.list_names(f"{self.prefix}archives/")
        return {
            name.rsplit("/", 1)[1].removesuffix(".json"): json.loads(self.store.read_bytes(name) or b"[]")
            for name in names
        }

    def earlier_attempts(self) -> list[str]:
        """Run keys of other attempts whose staging files are still there (interrupted runs)."""
        keys = {name[len(self.batch_prefix) :].split("/", 1)[0] for name in self.store.list_names(self.batch_prefix)}
        return sorted(keys - {self.run_key})

    def clear(self) -> None:
        """Remove the batch's staging files once its report is written: earlier interrupted
        attempts' first, then this run's chunks, its load result, and its plan last, so that a
        retry after any partial clear still finds what it needs (or the published report)."""
        names = self.store.list_names(self.batch_prefix)
        last = [f"{self.prefix}bigquery.json", self.plan_name]
        for name in [n for n in names if not n.startswith(self.prefix)]:
            self.store.delete(name, None)
        for name in [n for n in names if n.startswith(self.prefix) and n not in last]:
            self.store.delete(name, None)
        for name in last:
            if name in names:
                self.store.delete(name, None)

    def read_rows(self, chunk_ids: Iterable[str]) -> Iterator[bytes]:
        """Each chunk's staged rows (NDJSON) in turn, read when asked for: the batch's rows are
        never in memory together."""
        for chunk_id in sorted(chunk_ids):
            raw = self.store.read_bytes(self.chunk_name("rows", chunk_id, "ndjson"))
            if raw is None:
                raise FileNotFoundError(f"rows of chunk {chunk_id} are missing from {self.store.uri(self.prefix)}")
            yield raw

    def write_result(self, name: str, doc: dict[str, Any]) -> None:
        self.store.write_bytes(f"{self.prefix}{name}.json", json.dumps(doc, sort_keys=True).encode(), JSON_TYPE)

    def read_result(self, name: str) -> dict[str, Any] | None:
        raw = self.store.read_bytes(f"{self.prefix}{name}.json")
        return None if raw is None else json.loads(raw)


@dataclass
class ChunkPlan:
    """What one archive task needs: its studies, and the batch's de-identification provenance
    for the rows."""

    batch_id: str
    chunk_id: str
    deid: dict[str, Any]
    groups: list[StudyGroup]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChunkPlan:
        doc = json.loads(text)
        return cls(doc["batch_id"], doc["chunk_id"], doc["deid"], [StudyGroup.from_dict(g) for g in doc["groups"]])


def chunk_refs(plan: BatchPlan, staging: Staging, studies_per_chunk: int) -> list[dict[str, Any]]:
    """Small references for task mapping, one per chunk plan: the slice [start, stop) of the
    plan's study groups (also the label of the mapped task)."""
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


ProgressCallback = Callable[[int, int, int, float], None]  # done, total, bytes, seconds


def archive_groups_spooled(
    groups: list[StudyGroup],
    zone: LandingZone,
    store: ObjectStore,
    *,
    rows: NdjsonSpool,
    deid: dict[str, Any],
    context: RunContext,
    settings: ArchiveSettings,
    progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """Publish each group's archive; write the per-image rows to `rows` as each study ends, and
    return the per-archive summaries. Memory does not grow with the images: each image's row
    fields wait in a spool file until its study's archive is stored (a row names the object and
    its generation), and the rows go to `rows`, a file too (see Staging.write_chunk)."""
    check_deid(deid)  # checked when the manifest was read; again here, for a deid given otherwise
    summaries: list[dict[str, Any]] = []
    started = time.monotonic()
    done_bytes = 0
    held: dict[str, set[str]] = {}  # the images held under PHI/, walked once per batch (archive.held_identities)
    with StudyFields(settings.header_allow_list) as study_fields:
        for done, group in enumerate(groups, start=1):
            t0 = time.monotonic()
            if group.batch_id not in held:
                held[group.batch_id] = held_identities(zone, group.batch_id)
            study_fields.start(group)
            published = publish_study_archive(
                group,
                zone,
                store,
                policy=settings.policy,
                compresslevel=settings.compresslevel,
                replace_changed=settings.replace_changed,
                row_fields=study_fields.take,
                held=held[group.batch_id],
            )
            # Rows loaded already (see publish.py), or a newer batch's version: no rows, so the MERGE
            # neither updates nor deletes anything of the study.
            if not published.rows_loaded and published.outcome != SUPERSEDED:
                stored = published.stored
                for member in study_fields.members_with_fields(published.members):
                    rows.write(build_row(group=group, member=member, stored=stored, deid=deid, context=context))
            done_bytes += group.size
            summaries.append(
                {
                    **published.stored.as_xcom(),
                    "outcome": published.outcome,
                    "written_by_batch": published.stored.metadata.get("batch_id"),
                    "image_count": len(published.members),
                    "images_stripped": sum(1 for m in published.members if m.private_elements_removed),
                    "private_elements_removed": sum(m.private_elements_removed for m in published.members),
                    "quarantined_count": group.quarantined,
                    "input_bytes": group.size,
                    "seconds": round(time.monotonic() - t0, 3),
                    **_content_fields(published),
                }
            )
            if progress is not None:
                progress(done, len(groups), done_bytes, time.monotonic() - started)
    return summaries


class StudyFields:
    """Each image's row fields (rows.image_fields), spooled to a file as the image is archived
    and read back, in member order, once the study's archive is stored.

    `take` is the `row_fields` of publish_study_archive. A study may be read more than once (a
    rerun hashes it first, then replaces a changed archive; a lost race hashes it again); each
    pass starts with the study's first image, and so starts the spool over: it holds the last
    pass's images, those of the members published."""

    def __init__(self, allow_list: Iterable[str]) -> None:
        self._fields = functools.partial(image_fields, allow_list=tuple(allow_list))
        self._spool = NdjsonSpool()
        self._first: str | None = None

    def __enter__(self) -> StudyFields:
        return self

    def __exit__(self, *exc: object) -> None:
        self._spool.close()

    def start(self, group: StudyGroup) -> None:
        self._spool.clear()
        images = group.sorted_images()
        self._first = images[0].relpath if images else None

    def take(self, ds: Dataset, image: ImageRecord) -> dict[str, Any]:
        if image.relpath == self._first:
            self._spool.clear()
        self._spool.write([image.relpath, self._fields(ds, image)])
        return {}  # the member keeps nothing: its fields are in the spool

    def members_with_fields(self, members: list[ArchivedMember]) -> Iterator[ArchivedMember]:
        """Each member with its row fields, read back from the spool."""
        if len(self._spool) != len(members):
            raise RuntimeError(f"{len(self._spool)} images' row fields were taken for {len(members)} members")
        for member, (relpath, fields) in zip(members, self._spool, strict=True):
            if relpath != member.relpath:
                raise RuntimeError(f"row fields of {relpath} were taken for the member of {member.relpath}")
            yield dataclasses.replace(member, fields=fields)


def _content_fields(published: PublishedArchive) -> dict[str, Any]:
    """What the summary says of the archive's content identity (and of a replacement)."""
    fields: dict[str, Any] = {"content_digest": published.content_digest, "name": published.stored.name}
    if published.rows_loaded:
        fields["rows_loaded"] = True
    if published.legacy_checked:
        fields["legacy_checked"] = True
    if published.outcome == REPLACED:
        fields["images_before"] = published.images_before
    if published.newer is not None:
        fields["images_in_archive"] = published.images_before
        fields["newer_batch"] = published.newer.batch_id
        fields["newer_completed_at"] = published.newer.completed_at
    return fields


def wrote(summary: dict[str, Any]) -> bool:
    """Whether the archive of this summary was written (or replaced) by the batch."""
    return summary.get("outcome") not in (ALREADY_PRESENT, SUPERSEDED)


def needs_rows_mark(summary: dict[str, Any]) -> bool:
    """After the MERGE: whether the archive is to be marked as having its rows loaded. Never a
    superseded one (this batch loaded no rows of it; the newer batch's load marks it)."""
    return "name" in summary and not summary.get("rows_loaded") and summary.get("outcome") != SUPERSEDED


def supersessions(archives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The archives of a batch left alone because a batch completed later holds the study in
    another version: the batch's images of the study, the archive's, and which batch wrote it."""
    return [
        {
            "uri": a["uri"],
            "images_in_batch": a.get("image_count"),
            "images_in_archive": a.get("images_in_archive"),
            "newer_batch": a.get("newer_batch"),
            "newer_completed_at": a.get("newer_completed_at"),
        }
        for a in sorted(archives, key=lambda a: a["uri"])
        if a.get("outcome") == SUPERSEDED
    ]


def replacements(archives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The replaced archives of a batch, with their image counts before and after."""
    return [
        {"uri": a["uri"], "images_before": a.get("images_before"), "images_after": a.get("image_count")}
        for a in sorted(archives, key=lambda a: a["uri"])
        if a.get("outcome") == REPLACED
    ]


def build_report(
    plan: BatchPlan,
    *,
    archives: list[dict[str, Any]],
    table: str | None,
    rows_loaded: int | None,
    rows_inserted: int | None,
    load_seconds: float | None = None,
    run_key: str | None = None,
    recovered: Recovery | None = None,
    bigquery: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The batch report of the outputs spec. Paths and reasons only: never a header value.

    With `recovered`, this run completed an attempt that was interrupted after it wrote
    archives or rows: they count as written by this batch, and the report says so."""
    superseded = [a for a in archives if a.get("outcome") == SUPERSEDED]
    kept = [a for a in archives if a.get("outcome") != SUPERSEDED]  # the batch's version is archived
    written = [a for a in archives if wrote(a)]
    earlier = [] if recovered is None else [a for a in archives if recovered.wrote_archive(a)]
    archive_seconds = round(sum(a.get("seconds", 0.0) for a in archives), 3)
    input_bytes = sum(a.get("input_bytes", 0) for a in archives)
    timings = {
        "plan_seconds": plan.plan_seconds,
        "archive_seconds": archive_seconds,  # summed over the archive tasks, which may run in parallel
        "archive_MB_per_s": round(input_bytes / 1e6 / archive_seconds, 1) if archive_seconds else None,
        "load_seconds": load_seconds,
    }
    report = {
        "batch_id": plan.batch_id,
        "collection": plan.collection,
        "status": plan.status,
        "error": plan.error,
        # batch.json itself could not be used: the batch fails its run (run_steps._failure_of).
        "manifest_unusable": plan.manifest_unusable,
        "run_key": run_key,
        "completed_at": plan.completed_at,
        "reported_at": datetime.now(UTC).isoformat(),
        "images": {
            "seen": plan.images_seen,
            # Not the images of superseded studies: archives.superseded_images counts those.
            "archived": sum(a.get("image_count", 0) for a in kept),
            "quarantined": len(plan.quarantined),
            "quarantined_by_reason": plan.quarantine_counts(),
            # Archived with private data elements stripped (DICOM_PRIVATE_TAGS=strip).
            "stripped": sum(a.get("images_stripped", 0) for a in archives),
            "private_elements_removed": sum(a.get("private_elements_removed", 0) for a in archives),
        },
        # Every check each image fails (reason codes and tag paths, never values).
        "quarantined": [
            {"path": shown_path(q.relpath), "reason": q.reason, "detail": q.detail, "failures": q.all_failures()}
            for q in plan.quarantined
        ],
        "deid_gate": plan.gate,
        # Second names of an image (hard or symbolic links): counted and archived once, under the first.
        "aliases": [
            {"path": shown_path(path), "same_as": shown_path(first)} for path, first in sorted(plan.aliases.items())
        ],
        "lookup": {
            "keys_matching_no_image": plan.lookup_unmatched,
            "keys_matching_several_images": plan.lookup_ambiguous,
            # Archived images whose entry's identifying fields (a birth date, an issuer) were kept
            # out of their row: named by DICOM keyword, never with their values.
            "fields_withheld_from_rows": [
                {"path": shown_path(image.relpath), "fields": image.lookup_withheld}
                for group in plan.groups
                for image in group.images
                if image.lookup_withheld
            ],
        },
        "archives": {
            "total": len(archives),
            "written": len(written) + len(earlier),
            "already_present": len(kept) - len(written) - len(earlier),
            "replaced": len(replacements(archives)),
            "replacements": replacements(archives),
            # Studies a batch completed later holds in another version: left alone, no rows.
            "superseded": len(superseded),
            "superseded_images": sum(a.get("image_count", 0) for a in superseded),
            "superseded_by": supersessions(archives),
            "bytes": sum(a.get("size", 0) for a in kept),
            "input_bytes": input_bytes,
            "objects": sorted(a["uri"] for a in kept),
        },
        "bigquery": {"table": table, "rows_in_batch": rows_loaded, "rows_inserted": rows_inserted, **(bigquery or {})},
        "withdrawn": withdrawn_summary(plan),
        "timings": timings,
    }
    if recovered is not None and recovered.happened(earlier):
        rows_earlier = recovered.rows_of_batch - (rows_inserted or 0) if recovered.rows_of_batch is not None else 0
        report["note"] = RECOVERED_NOTE
        report["recovery"] = {
            "earlier_attempts": recovered.earlier_attempts,
            "archives_written_by_interrupted_attempt": len(earlier),
            "rows_inserted_by_interrupted_attempt": max(0, rows_earlier),
        }
        if recovered.rows_of_batch is not None:
            report["bigquery"]["rows_inserted"] = max(rows_inserted or 0, recovered.rows_of_batch)
    return report


RECOVERED_NOTE = "completed after an interrupted attempt"


@dataclass(frozen=True)
class Recovery:
    """What an earlier, interrupted attempt of a batch without a report left behind.

    An archive already present whose metadata names this batch, while the batch has no report
    yet, was written by that attempt; `rows_of_batch` is the table's count of this batch's rows
    (None when it was not counted)."""

    batch_id: str
    earlier_attempts: list[str] = field(default_factory=list)  # run keys with staging left
    rows_of_batch: int | None = None

    def wrote_archive(self, archive: dict[str, Any]) -> bool:
        return archive.get("outcome") == ALREADY_PRESENT and archive.get("written_by_batch") == self.batch_id

    def happened(self, earlier_archives: list[dict[str, Any]]) -> bool:
        return bool(self.earlier_attempts or earlier_archives)


def withdrawn_summary(plan: BatchPlan) -> dict[str, int]:
    """Studies and images of the batch held back because they were withdrawn (counts only)."""
    held = [q for q in plan.quarantined if q.reason == WITHDRAWN]
    return {"studies": len({q.study for q in held}), "images": len(held)}


def changed_anything(report: dict[str, Any]) -> bool:
    bq = report["bigquery"]
    return bool(
        report["archives"]["written"] or bq.get("rows_inserted") or bq.get("rows_updated") or bq.get("rows_deleted")
    )


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
    require_batch_id(report["batch_id"])  # never a path: a refused id gets no report anywhere
    body = json.dumps(report, indent=2, sort_keys=True).encode()
    locations = []
    if store is not None and report.get("collection"):
        name = batch_report_object_name(report["collection"], report["batch_id"])
        if changed_anything(report) or store.get(name) is None:
            store.write_bytes(name, body, JSON_TYPE)
        locations.append(store.uri(name))
    # Last: the copy beside the batch marks it reported (the ledger), so a retry after a failed
    # bucket write writes both again, never skipping the bucket's.
    locations.insert(0, zone.write_bytes(report["batch_id"], LOCAL_REPORT_NAME if local else REPORT_NAME, body))
    return locations
