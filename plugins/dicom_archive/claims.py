"""One owner per batch: a claim object in the archive store, created only if there is none.

`_claims/<batch_id>.json` names the run that owns the batch and when the claim expires. It is
written create-only (`if_generation_match=0`: Cloud Storage answers 412 to the second writer),
renewed by its own run (a retried task), taken over only once expired (a compare-and-swap on
the expired claim's generation, so two runs cannot both take it over), and deleted by its run
once the batch's report is written.

A run that leaves its batch without a report (its load failed) gives the claim up instead of
deleting it: the claim stays, marked released, with the number of attempts so far. It no longer
holds the batch (the next run takes it over at once), and it tells the ledger when the batch was
last tried, so that a batch that keeps failing queues behind the batches that came before its
last attempt instead of taking a run's slot every time (`dicom_archive.ledger`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from dicom_archive.naming import require_batch_id
from dicom_archive.stores import ObjectChangedError, ObjectExistsError, ObjectStore

CLAIM_ROOT = "_claims"
JSON_TYPE = "application/json"

log = logging.getLogger(__name__)


def claim_name(batch_id: str) -> str:
    return f"{CLAIM_ROOT}/{require_batch_id(batch_id)}.json"


@dataclass(frozen=True)
class Claim:
    batch_id: str
    run_id: str
    claimed_at: datetime
    expires_at: datetime
    generation: int | None = None
    attempts: int = 1  # runs that took the batch since its last report, this claim's included
    released_at: datetime | None = None  # given up by its run, without a report: no longer held

    def is_held(self, now: datetime) -> bool:
        """The claim still holds the batch (an expired or released one can be taken over)."""
        return self.released_at is None and self.expires_at > now

    def body(self) -> bytes:
        doc = {
            "batch_id": self.batch_id,
            "run_id": self.run_id,
            "claimed_at": self.claimed_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "attempts": self.attempts,
        }
        if self.released_at is not None:
            doc["released_at"] = self.released_at.isoformat()
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def parse(cls, batch_id: str, raw: bytes, generation: int) -> Claim:
        try:
            doc = json.loads(raw)
            released = doc.get("released_at")
            return cls(
                batch_id,
                str(doc["run_id"]),
                _moment(doc["claimed_at"]),
                _moment(doc["expires_at"]),
                generation,
                max(1, int(doc.get("attempts", 1))),  # a claim of the version before: one attempt
                None if released is None else _moment(released),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            # A claim we cannot read is treated as expired: it can be taken over, never trusted.
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            return cls(batch_id, "<unreadable claim>", epoch, epoch, generation)

    def describe(self) -> str:
        stamp = "%Y-%m-%d %H:%M:%S UTC"
        if self.released_at is not None:
            return (
                f"run {self.run_id!r} (attempt {self.attempts}, claimed {self.claimed_at:{stamp}}, "
                f"left without a report {self.released_at:{stamp}})"
            )
        return f"run {self.run_id!r} (claimed {self.claimed_at:{stamp}}, expires {self.expires_at:{stamp}})"


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return moment


@dataclass(frozen=True)
class ClaimOutcome:
    owned: bool
    holder: Claim | None = None  # the live claim of another run, when not owned
    took_over: Claim | None = None  # the expired or released claim this run replaced
    attempts: int = 1  # this run's attempt at the batch since its last report

    @property
    def message(self) -> str:
        if self.owned and self.took_over is not None and self.took_over.released_at is not None:
            return f"claimed for attempt {self.attempts}; the last one, by {self.took_over.describe()}"
        if self.owned and self.took_over is not None:
            return f"took over the expired claim of {self.took_over.describe()}"
        if self.owned and self.attempts > 1:
            return f"claimed for attempt {self.attempts}"
        if self.owned:
            return "claimed"
        assert self.holder is not None
        return f"left alone: it is claimed by {self.holder.describe()}"


def acquire(
    store: ObjectStore, batch_id: str, run_id: str, ttl: timedelta, now: datetime | None = None
) -> ClaimOutcome:
    """Claim `batch_id` for `run_id`. At most one run owns a batch at any time."""
    name = claim_name(batch_id)
    now = now or datetime.now(UTC)
    mine = Claim(batch_id, run_id, now, now + ttl)
    for _ in range(3):  # the claim may vanish or change between our reads: look again
        try:
            store.write_bytes_if_generation(name, mine.body(), JSON_TYPE, 0)
            return ClaimOutcome(True)
        except ObjectExistsError:
            pass
        current = store.read_versioned(name)
        if current is None:
            continue
        holder = Claim.parse(batch_id, *current)
        if holder.run_id != run_id and holder.is_held(now):
            return ClaimOutcome(False, holder=holder)
        # Our own claim (a retried task) is renewed; an expired or released one is taken over,
        # and counts as one more attempt.
        renewed = holder.run_id == run_id and holder.released_at is None
        attempts = holder.attempts if renewed else holder.attempts + 1
        try:
            store.write_bytes_if_generation(
                name, replace(mine, attempts=attempts).body(), JSON_TYPE, holder.generation or 0
            )
        except ObjectExistsError:
            continue  # another run renewed or took it first: look again
        return ClaimOutcome(True, took_over=None if holder.run_id == run_id else holder, attempts=attempts)
    current = store.read_versioned(name)
    holder = Claim.parse(batch_id, *current) if current is not None else None
    return ClaimOutcome(False, holder=holder or Claim(batch_id, "<another run>", now, now))


def holder_of(store: ObjectStore, batch_id: str) -> Claim | None:
    current = store.read_versioned(claim_name(batch_id))
    return None if current is None else Claim.parse(batch_id, *current)


def claims_of(store: ObjectStore, batch_ids: Iterable[str]) -> dict[str, Claim]:
    """The claims (held, expired or released) of these batches: one listing of the claims, then
    one read per batch that has one."""
    names = set(store.list_names(f"{CLAIM_ROOT}/"))
    found = {}
    for batch_id in batch_ids:
        if claim_name(batch_id) in names:
            claim = holder_of(store, batch_id)
            if claim is not None:  # released for good (a report) since the listing: not tried
                found[batch_id] = claim
    return found


def give_up(store: ObjectStore, batch_id: str, run_id: str, now: datetime | None = None) -> bool:
    """Leave the batch re-processable without a report: the claim, if still this run's, is kept
    but marked released (a compare-and-swap on its generation), so that it no longer holds the
    batch and still tells when the batch was last tried, and how often."""
    holder = holder_of(store, batch_id)
    if holder is None or holder.run_id != run_id or holder.released_at is not None:
        return False
    now = now or datetime.now(UTC)
    released = replace(holder, expires_at=min(holder.expires_at, now), released_at=now)
    try:
        store.write_bytes_if_generation(claim_name(batch_id), released.body(), JSON_TYPE, holder.generation or 0)
    except ObjectExistsError:
        log.warning("batch %s: the claim was taken over meanwhile; left as it is", batch_id)
        return False
    return True


def release(store: ObjectStore, batch_id: str, run_id: str) -> bool:
    """Delete the claim if it is still this run's (a claim taken over since is left alone)."""
    holder = holder_of(store, batch_id)
    if holder is None or holder.run_id != run_id:
        return False
    try:
        store.delete(claim_name(batch_id), holder.generation)
    except ObjectChangedError as err:  # a refusal or an outage is raised: the task's retry releases the claim
        log.warning("batch %s: the claim was taken over meanwhile; left as it is (%s)", batch_id, err)
        return False
    return True
