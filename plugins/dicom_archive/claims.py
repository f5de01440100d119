"""One owner per batch: a claim object in the archive store, created only if there is none.

`_claims/<batch_id>.json` names the run that owns the batch and when the claim expires. It is
written create-only (`if_generation_match=0`: Cloud Storage answers 412 to the second writer),
renewed by its own run (a retried task), taken over only once expired (a compare-and-swap on
the expired claim's generation, so two runs cannot both take it over), and deleted by its run
once the batch's report is written or the batch is left re-processable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dicom_archive.naming import require_batch_id
from dicom_archive.stores import ObjectExistsError, ObjectStore

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

    def body(self) -> bytes:
        doc = {
            "batch_id": self.batch_id,
            "run_id": self.run_id,
            "claimed_at": self.claimed_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def parse(cls, batch_id: str, raw: bytes, generation: int) -> Claim:
        try:
            doc = json.loads(raw)
            return cls(
                batch_id,
                str(doc["run_id"]),
                datetime.fromisoformat(doc["claimed_at"]),
                datetime.fromisoformat(doc["expires_at"]),
                generation,
            )
        except (ValueError, KeyError, TypeError):
            # A claim we cannot read is treated as expired: it can be taken over, never trusted.
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            return cls(batch_id, "<unreadable claim>", epoch, epoch, generation)

    def describe(self) -> str:
        stamp = "%Y-%m-%d %H:%M:%S UTC"
        return f"run {self.run_id!r} (claimed {self.claimed_at:{stamp}}, expires {self.expires_at:{stamp}})"


@dataclass(frozen=True)
class ClaimOutcome:
    owned: bool
    holder: Claim | None = None  # the live claim of another run, when not owned
    took_over: Claim | None = None  # the expired claim this run replaced

    @property
    def message(self) -> str:
        if self.owned and self.took_over is not None:
            return f"took over the expired claim of {self.took_over.describe()}"
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
        if holder.run_id != run_id and holder.expires_at > now:
            return ClaimOutcome(False, holder=holder)
        try:  # our own claim (a retried task) is renewed; an expired one is taken over
            store.write_bytes_if_generation(name, mine.body(), JSON_TYPE, holder.generation or 0)
        except ObjectExistsError:
            continue  # another run renewed or took it first: look again
        return ClaimOutcome(True, took_over=None if holder.run_id == run_id else holder)
    current = store.read_versioned(name)
    holder = Claim.parse(batch_id, *current) if current is not None else None
    return ClaimOutcome(False, holder=holder or Claim(batch_id, "<another run>", now, now))


def holder_of(store: ObjectStore, batch_id: str) -> Claim | None:
    current = store.read_versioned(claim_name(batch_id))
    return None if current is None else Claim.parse(batch_id, *current)


def release(store: ObjectStore, batch_id: str, run_id: str) -> bool:
    """Delete the claim if it is still this run's (a claim taken over since is left alone)."""
    holder = holder_of(store, batch_id)
    if holder is None or holder.run_id != run_id:
        return False
    try:
        store.delete(claim_name(batch_id), holder.generation)
    except Exception as err:
        if type(err).__name__ not in ("PreconditionFailed", "NotFound"):
            raise  # a refusal or an outage: the task fails and its retry releases the claim
        log.warning("batch %s: the claim was taken over meanwhile; left as it is (%s)", batch_id, err)
        return False
    return True
