"""Withdrawing an entity (patient) or one study of it: consent withdrawn, an IRB decision, PHI
found after the fact.

A request names a collection, an entity and optionally an item (study). It comes as a file in the
landing zone, `_withdrawals/<request_id>.json` (written last, like batch.json), or as a manual run
of the `dicom_withdraw` DAG. Processing it, in this order, every step idempotent so that a retry
after a failure at any point completes the job:

1. mark: `Collection/<c>/Withdrawn/<entity>.json` (or `.../<entity>/<item>.json` for a study).
   From here on the archiver holds the study back as quarantine reason `withdrawn`, so a rerun
   or backfill of an old batch never uploads it again;
2. plan: the object versions to delete are counted into the record, `in_progress`;
3. delete every version (noncurrent ones too, where the bucket keeps them) of the archives;
4. delete the rows (BigQuery, under a deterministic job id, or the local NDJSON files);
5. log the request in the collection's `withdrawals` table (BigQuery only);
6. the record `Collection/<c>/Withdrawals/<request_id>.json` says `complete`.

The record holds coded ids (the same ones the bucket's object names use), a reason code, counts
and timestamps: never a header value or free text. No Airflow import here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from dicom_archive.naming import (
    ARCHIVE_SUFFIX,
    BATCH_ID_RE,
    CODED_ID_RE,
    COLLECTION_RE,
    InvalidIdentifierError,
    collection_prefix,
    require,
)
from dicom_archive.stores import ObjectStore

REQUESTS_FOLDER = "_withdrawals"  # in the landing zone; not a batch id, so never taken for a batch
REQUEST_ID_RE = BATCH_ID_RE
REASONS = ("consent_withdrawn", "irb_decision", "phi_found", "other")
JSON_TYPE = "application/json"

STATUS_IN_PROGRESS = "in_progress"
STATUS_COMPLETE = "complete"


class WithdrawalRequestError(ValueError):
    """A request that breaks a rule; retrying cannot fix it."""


@dataclass(frozen=True)
class WithdrawalRequest:
    request_id: str
    collection: str
    entity_id: str
    item_id: str | None = None
    reason: str = "other"
    requested_at: str | None = None  # RFC 3339
    source: str = "manual"  # "landing_zone" or "manual"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def scope(self) -> str:
        return "study" if self.item_id else "entity"


def _check(value: Any, pattern: re.Pattern[str], what: str, where: str) -> str:
    try:
        return require(value, pattern, what)
    except InvalidIdentifierError as err:
        raise WithdrawalRequestError(f"{where}: {err}") from None


def make_request(
    doc: dict[str, Any], *, where: str, source: str, default_request_id: str | None = None
) -> WithdrawalRequest:
    """Validate a request (a file's JSON or a manual run's params). Raises WithdrawalRequestError."""
    if not isinstance(doc, dict):
        raise WithdrawalRequestError(f"{where}: a withdrawal request is a JSON object")
    request_id = doc.get("request_id") or default_request_id
    item = doc.get("item_id") or None
    reason = doc.get("reason") or "other"
    if reason not in REASONS:
        raise WithdrawalRequestError(f"{where}: reason must be one of {', '.join(REASONS)} (a code, never free text)")
    requested_at = doc.get("requested_at")
    if requested_at is not None:
        try:
            stamp = datetime.fromisoformat(str(requested_at).replace("Z", "+00:00"))
        except ValueError:
            raise WithdrawalRequestError(f"{where}: requested_at must be an RFC 3339 timestamp") from None
        requested_at = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    return WithdrawalRequest(
        request_id=_check(request_id, REQUEST_ID_RE, "request_id", where),
        collection=_check(doc.get("collection"), COLLECTION_RE, "collection", where),
        entity_id=_check(doc.get("entity_id"), CODED_ID_RE, "entity_id", where),
        item_id=_check(item, CODED_ID_RE, "item_id", where) if item is not None else None,
        reason=reason,
        requested_at=requested_at,
        source=source,
    )


def parse_request_file(raw: bytes, *, file_name: str, where: str) -> WithdrawalRequest:
    """A request file `_withdrawals/<request_id>.json`; its name is its request id."""
    request_id = file_name.removesuffix(".json")
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise WithdrawalRequestError(f"{where}: not valid JSON ({err})") from None
    if isinstance(doc, dict) and doc.get("request_id") not in (None, request_id):
        raise WithdrawalRequestError(f"{where}: request_id differs from the file name")
    return make_request(doc, where=where, source="landing_zone", default_request_id=request_id)


# ------------------------------------------------------------------------------------------- names


def withdrawals_prefix(collection: str) -> str:
    return f"{collection_prefix(collection)}Withdrawals/"


def record_name(collection: str, request_id: str) -> str:
    return f"{withdrawals_prefix(collection)}{require(request_id, REQUEST_ID_RE, 'request id')}.json"


def markers_prefix(collection: str) -> str:
    return f"{collection_prefix(collection)}Withdrawn/"


def marker_name(collection: str, entity_id: str, item_id: str | None) -> str:
    """`Withdrawn/<entity>.json` for a patient, `Withdrawn/<entity>/<item>.json` for a study:
    the two forms never collide (only the second has a '/')."""
    entity = require(entity_id, CODED_ID_RE, "entity id")
    if item_id is None:
        return f"{markers_prefix(collection)}{entity}.json"
    return f"{markers_prefix(collection)}{entity}/{require(item_id, CODED_ID_RE, 'item id')}.json"


def entity_prefix(collection: str, entity_id: str) -> str:
    return f"{collection_prefix(collection)}Entity/{require(entity_id, CODED_ID_RE, 'entity id')}/"


def is_archive_of(name: str, collection: str, entity_id: str, item_id: str | None) -> bool:
    """Whether object `name` is an archive of the entity (and of the item, when given)."""
    prefix = entity_prefix(collection, entity_id)
    if not name.startswith(prefix) or not name.endswith(ARCHIVE_SUFFIX):
        return False
    stem = name[len(prefix) : -len(ARCHIVE_SUFFIX)]
    match = re.fullmatch(rf"{re.escape(entity_id)}_(\d{{8}})_(.+)", stem)
    return match is not None and (item_id is None or match.group(2) == item_id)


# --------------------------------------------------------------------------- what the archiver reads


@dataclass
class WithdrawnIndex:
    """The withdrawn entities and studies of one collection, from one listing of its markers."""

    store: ObjectStore
    collection: str
    names: frozenset[str] = frozenset()

    @classmethod
    def load(cls, store: ObjectStore, collection: str) -> WithdrawnIndex:
        return cls(store, collection, frozenset(store.list_names(markers_prefix(collection))))

    def withdrawn_by(self, entity_id: str, item_id: str) -> str | None:
        """The request that withdrew this study (or its entity), or None."""
        for name in (marker_name(self.collection, entity_id, None), marker_name(self.collection, entity_id, item_id)):
            if name in self.names:
                raw = self.store.read_bytes(name)
                doc = json.loads(raw) if raw else {}
                return str(doc.get("request_id") or "unknown")
        return None


# ----------------------------------------------------------------------------------------- processing


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class WithdrawalRecord:
    request_id: str
    collection: str
    entity_id: str
    item_id: str | None
    scope: str
    reason: str
    source: str
    requested_at: str | None
    status: str = STATUS_IN_PROGRESS
    started_at: str = field(default_factory=_now)
    completed_at: str | None = None
    objects_found: int | None = None  # archives, counted before anything was deleted
    versions_found: int | None = None  # their noncurrent versions, likewise
    # What this request's tries deleted, added up as they go: an archive counts once its last
    # (live) version is gone, a version that was gone already counts nothing.
    objects_deleted: int | None = None
    versions_deleted: int | None = None
    rows_deleted: int | None = None
    logged: bool = False
    dag_run_id: str | None = None
    steps: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WithdrawalRecord:
        return cls(**json.loads(raw))


DeleteRows = Callable[[WithdrawalRequest], int]
LogWithdrawal = Callable[[WithdrawalRecord], None]


def read_record(store: ObjectStore, collection: str, request_id: str) -> WithdrawalRecord | None:
    raw = store.read_bytes(record_name(collection, request_id))
    return None if raw is None else WithdrawalRecord.from_json(raw)


def process_withdrawal(
    request: WithdrawalRequest,
    store: ObjectStore,
    *,
    delete_rows: DeleteRows,
    log: LogWithdrawal | None = None,
    dag_run_id: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> WithdrawalRecord:
    """Carry out a request (see the module's docstring); resumes where an earlier try stopped."""
    name = record_name(request.collection, request.request_id)
    record = read_record(store, request.collection, request.request_id)
    if record is not None and record.status == STATUS_COMPLETE:
        progress(f"withdrawal {request.request_id} was completed at {record.completed_at}: nothing to do")
        return record
    if record is None:
        record = WithdrawalRecord(
            request_id=request.request_id,
            collection=request.collection,
            entity_id=request.entity_id,
            item_id=request.item_id,
            scope=request.scope,
            reason=request.reason,
            source=request.source,
            requested_at=request.requested_at,
        )
    record.dag_run_id = dag_run_id

    def done(step: str) -> None:
        record.steps.append(step)
        store.write_bytes(name, record.to_json(), JSON_TYPE)

    # 1. The marker first: whatever happens next, no archive run uploads the study again.
    marker = marker_name(request.collection, request.entity_id, request.item_id)
    if store.get(marker) is None:
        body = {"request_id": request.request_id, "scope": request.scope, "withdrawn_at": record.started_at}
        store.write_bytes(marker, json.dumps(body, sort_keys=True).encode(), JSON_TYPE)
    progress(f"withdrawal {request.request_id}: marked {request.scope} as withdrawn")

    # 2. Count what is to go, once, before deleting anything: the record's counts survive retries.
    versions = [
        v
        for v in store.list_versions(entity_prefix(request.collection, request.entity_id))
        if is_archive_of(v.name, request.collection, request.entity_id, request.item_id)
    ]
    if record.objects_found is None:
        live = {v.name for v in versions}
        record.objects_found = len(live)
        record.versions_found = len(versions) - len(live)
        done("planned")

    # 3. Every version of every archive, oldest first, so that the live version of an archive goes
    #    last: it is still the newest listed on a retry, and the archive is counted once. The
    #    record is written after each deletion, so a retry adds to what earlier tries counted
    #    (a try killed between a deletion and that write leaves that one version uncounted).
    record.objects_deleted = record.objects_deleted or 0
    record.versions_deleted = record.versions_deleted or 0
    newest = {v.name: v.generation for v in sorted(versions, key=lambda v: v.generation or 0)}
    for version in sorted(versions, key=lambda v: (v.name, v.generation or 0)):
        if not store.delete_version(version.name, version.generation):
            continue
        if version.generation == newest[version.name]:
            record.objects_deleted += 1
        else:
            record.versions_deleted += 1
        store.write_bytes(name, record.to_json(), JSON_TYPE)
    if "objects_deleted" not in record.steps:
        done("objects_deleted")
    progress(
        f"withdrawal {request.request_id}: {record.objects_deleted} archives and "
        f"{record.versions_deleted} noncurrent versions deleted"
    )

    # 4. The rows (a retry re-attaches to the job that already ran, and reports its count).
    if record.rows_deleted is None:
        record.rows_deleted = delete_rows(request)
        done("rows_deleted")
    progress(f"withdrawal {request.request_id}: {record.rows_deleted} rows deleted")

    # 5. The log row for the summary queries.
    if log is not None and not record.logged:
        record.completed_at = record.completed_at or _now()
        log(record)
        record.logged = True
        done("logged")

    # 6. Complete.
    record.status = STATUS_COMPLETE
    record.completed_at = record.completed_at or _now()
    done("complete")
    return record


def pending_requests(zone: Any, store: ObjectStore) -> tuple[list[WithdrawalRequest], list[str]]:
    """Requests in the landing zone's `_withdrawals/` folder whose record is not complete, and
    the problems of the files that are not valid requests (reported, not processed)."""
    requests, problems = [], []
    for file in zone.list_files(REQUESTS_FOLDER):
        if "/" in file.relpath or not file.relpath.endswith(".json") or file.relpath.startswith("."):
            continue  # temp names of a request being written, and anything else
        where = zone.describe(REQUESTS_FOLDER, file.relpath)
        try:
            request = parse_request_file(
                zone.read_bytes(REQUESTS_FOLDER, file.relpath) or b"", file_name=file.relpath, where=where
            )
        except WithdrawalRequestError as err:
            problems.append(str(err))
            continue
        record = read_record(store, request.collection, request.request_id)
        if record is None or record.status != STATUS_COMPLETE:
            requests.append(request)
    return requests, problems


def delete_local_rows(store: ObjectStore, table: str) -> DeleteRows:
    """Row deletion for SEND_TO_GOOGLE=false: the rows are NDJSON files under
    `BigQuery/<collection>/<table>/` in the local output folder."""

    def delete(request: WithdrawalRequest) -> int:
        deleted = 0
        for name in store.list_names(f"BigQuery/{request.collection}/{table}/"):
            raw = store.read_bytes(name) or b""
            kept = []
            for line in raw.splitlines():
                row = json.loads(line) if line.strip() else None
                if row is None:
                    continue
                if row.get("entity_id") == request.entity_id and request.item_id in (None, row.get("item_id")):
                    deleted += 1
                else:
                    kept.append(line + b"\n")
            if len(kept) != len(raw.splitlines()):
                store.write_bytes(name, b"".join(kept), "application/x-ndjson")
        return deleted

    return delete


def hold_back_withdrawn(plan: Any, store: ObjectStore) -> Any:
    """The plan step's part: withdrawn studies become quarantine reason `withdrawn`."""
    from dicom_archive.plan import apply_withdrawals

    if plan.collection and plan.groups:
        apply_withdrawals(plan, WithdrawnIndex.load(store, plan.collection).withdrawn_by)
    return plan
