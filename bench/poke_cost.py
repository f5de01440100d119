"""8. Poke cost: what one poke of the sensor costs in a `gs://` landing zone with a long history.

The landing zone holds N reported batches (batch.json, batch.report.json and one image each)
and 10 new ones (batch.json and one image). Today's code (the baseline, kept here as it was:
`find_completed_batches` before the ledger) lists the batch folders, then fetches every
batch.json ever written, with a metadata GET and a download each. The ledger
(`dicom_archive.ledger.select_batches`) lists batch.json and batch.report.json names once, by
a glob, and reads only the manifests of the batches without a report.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.cloud import PROJECT, HttpCallCounter
from bench.common import median
from bench.context import Context
from bench.results import Result, Target, fmt, ratio
from dicom_archive.landing import GCSLandingZone
from dicom_archive.ledger import select_batches
from dicom_archive.manifest import MANIFEST_NAME, ManifestError, parse_manifest

NEW_BATCHES = 10
PAGE_SIZE = 1000  # Cloud Storage's page of a listing (the emulator answers in one page)
SPEEDUP_GOAL = 20
PREFIX = "landing"
START = datetime(2024, 1, 1, tzinfo=UTC)


def manifest(batch_id: str, completed: datetime) -> bytes:
    doc = {
        "batch_id": batch_id,
        "collection": "IRB_bench",
        "status": "DONEPROCESSING",
        "completed_at": completed.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return json.dumps(doc).encode()


def populate(bucket: Any, reported: int) -> list[str]:
    """Upload the landing zone: `reported` reported batches and NEW_BATCHES new ones."""
    jobs: list[tuple[str, bytes]] = []
    new_ids = []
    for n in range(reported + NEW_BATCHES):
        batch_id = f"{n:06d}-batch"
        completed = START + timedelta(minutes=n)
        jobs.append((f"{PREFIX}/{batch_id}/{MANIFEST_NAME}", manifest(batch_id, completed)))
        jobs.append((f"{PREFIX}/{batch_id}/images/0001.dcm", b"\0" * 1024))
        if n < reported:
            jobs.append((f"{PREFIX}/{batch_id}/batch.report.json", b'{"status": "DONE"}'))
        else:
            new_ids.append(batch_id)

    def upload(job: tuple[str, bytes]) -> None:
        bucket.blob(job[0]).upload_from_string(job[1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(upload, jobs))
    return new_ids


def baseline_poke(bucket: Any, start: datetime, end: datetime) -> list[str]:
    """Today's scheduled poke, as it was before the ledger (plan.find_completed_batches over
    GCSLandingZone.batch_ids/read_bytes): one listing of the folders, then for every batch a
    metadata GET and a download of its batch.json."""
    iterator = bucket.list_blobs(prefix=f"{PREFIX}/", delimiter="/")
    for _ in iterator:
        pass
    found = []
    for folder in sorted(iterator.prefixes):
        batch_id = folder[len(PREFIX) + 1 :].rstrip("/")
        blob = bucket.get_blob(f"{folder}{MANIFEST_NAME}")
        if blob is None:
            continue
        try:
            parsed = parse_manifest(blob.download_as_bytes(), folder_name=batch_id)
        except ManifestError:
            continue
        if parsed.is_ready and start <= parsed.completed_at < end:
            found.append(batch_id)
    return found


def measure(client: Any, poke: Any, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        with HttpCallCounter(client) as counter:
            started = time.perf_counter()
            found = poke()
            seconds = time.perf_counter() - started
        runs.append({"seconds": seconds, "requests": counter.total, "calls": dict(counter.calls), "found": found})
    return {**runs[0], "seconds": median([r["seconds"] for r in runs]), "all_seconds": [r["seconds"] for r in runs]}


def run(ctx: Context) -> Result:
    reported = 1_000 if ctx.quick else 10_000
    repeats = 1 if ctx.quick else 3
    emulators = ctx.emulators()
    client = emulators.storage_client()
    bucket = client.create_bucket(f"bench-poke-{uuid.uuid4().hex[:8]}", project=PROJECT)
    t0 = time.monotonic()
    new_ids = populate(bucket, reported)
    setup_s = time.monotonic() - t0
    end = START + timedelta(minutes=reported + NEW_BATCHES + 1)  # every new batch is before it
    zone = GCSLandingZone(bucket, PREFIX)

    ours = measure(client, lambda: select_batches(zone, end=end).batch_ids, repeats)
    # Today's scheduled run of the interval holding the 10 new batches reads every manifest too.
    first_new = START + timedelta(minutes=reported)
    base = measure(client, lambda: baseline_poke(bucket, first_new, end), 1 if ctx.quick else 2)
    assert sorted(ours["found"]) == sorted(base["found"]) == new_ids, "both pokes find the same new batches"

    matching = 2 * reported + NEW_BATCHES  # batch.json and batch.report.json names
    pages = -(-matching // PAGE_SIZE)
    budget = pages + NEW_BATCHES
    speedup = ratio(base["seconds"], ours["seconds"])
    list_calls = sum(n for route, n in ours["calls"].items() if route.startswith("GET b/*/o") and route.count("/") == 2)
    rows = [
        ["today (every batch.json)", f"{base['requests']:,}", fmt(base["seconds"], 2) + " s", _calls(base["calls"])],
        ["ledger (one listing + new manifests)", f"{ours['requests']:,}", fmt(ours["seconds"], 3) + " s",
         _calls(ours["calls"])],
    ]  # fmt: skip
    return Result(
        name="poke",
        title=f"8. Sensor poke cost: {reported:,} reported + {NEW_BATCHES} new batches in a gs:// landing zone",
        columns=["poke", "HTTP requests", "time (median)", "requests by route"],
        rows=rows,
        targets=[
            Target(
                "requests per poke",
                f"<= list pages + new manifests ({pages} + {NEW_BATCHES} on Cloud Storage)",
                f"{ours['requests']} ({list_calls} list, on the emulator's single page)",
                ours["requests"] <= budget,
            ),
            Target(
                f"poke at {reported:,} reported batches vs today",
                f">= {SPEEDUP_GOAL}x faster",
                f"{speedup:.0f}x" if speedup else "n/a",
                speedup is not None and speedup >= SPEEDUP_GOAL,
            ),
        ],
        notes=[
            f"Cloud Storage emulator in memory, one request at a time; {3 * reported + 2 * NEW_BATCHES:,} objects "
            f"uploaded in {setup_s:.0f} s. Requests are counted on the storage client's HTTP session.",
            "The emulator ignores maxResults and answers a listing in one page; real Cloud Storage pages by 1,000 "
            f"names, so the same poke there costs {pages} list pages + {NEW_BATCHES} manifest downloads.",
            "Only the ledger's listing is narrowed by a matchGlob; the images of each batch never appear in it.",
        ],
        data={"ours": ours, "baseline": base, "reported": reported, "setup_s": setup_s},
    )


def _calls(calls: dict[str, int]) -> str:
    return ", ".join(f"{route}: {n:,}" for route, n in sorted(calls.items()))
