"""8. Poke cost: what one poke of the sensor costs in a `gs://` landing zone with a long history.

The landing zone holds N reported batches (batch.json, batch.report.json and one image each)
and 10 new ones (batch.json and one image). Today's code (the baseline, kept here as it was:
`plan.find_completed_batches` before the ledger, removed since) lists the batch folders, then fetches every
batch.json ever written, with a metadata GET and a download each. The ledger
(`dicom_archive.ledger.select_batches`) lists batch.json and batch.report.json names once, by
a glob, and reads only the manifests of the batches without a report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.cloud import PROJECT, HttpCallCounter
from bench.common import BENCH_DIR, median
from bench.context import Context
from bench.results import Result, Target, fmt, ratio
from dicom_archive.landing import MANIFEST_NAME, GCSLandingZone
from dicom_archive.ledger import select_batches
from dicom_archive.manifest import ManifestError, parse_manifest
from dicom_archive.stores import Checksums, GCSObjectStore
from tools import emulators

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


def landing_objects(reported: int) -> list[tuple[str, bytes]]:
    objects: list[tuple[str, bytes]] = []
    for n in range(reported + NEW_BATCHES):
        batch_id = f"{n:06d}-batch"
        objects.append((f"{PREFIX}/{batch_id}/{MANIFEST_NAME}", manifest(batch_id, START + timedelta(minutes=n))))
        objects.append((f"{PREFIX}/{batch_id}/images/0001.dcm", b"\0" * 1024))
        if n < reported:
            objects.append((f"{PREFIX}/{batch_id}/batch.report.json", b'{"status": "DONE"}'))
    return objects


@contextlib.contextmanager
def seeded_emulator(reported: int) -> Iterator[tuple[Any, str, list[str]]]:
    """A Cloud Storage emulator (on disk) that starts with the landing zone already in it.

    One object of each kind is uploaded through the client; the emulator's object resources for
    them are the templates of the rest, written into its data folder with their own name, size,
    md5 and crc32c; then the emulator is restarted on that folder and reads them all."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    data_dir = BENCH_DIR / "poke-gcs"
    shutil.rmtree(data_dir, ignore_errors=True)
    bucket_name = "bench-poke"
    objects = landing_objects(reported)
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        port = emulators.free_port()  # the same port after the restart: the resources' links name it
        emulator = emulators.start_gcs(port, BENCH_DIR / "poke-gcs.log", data_dir)
        emulators.wait_ready(emulator, timeout=120, project=PROJECT)
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
        bucket = client.create_bucket(bucket_name)
        for name, data in objects[:3]:
            bucket.blob(name).upload_from_string(data)
        emulators.stop(emulator.pid)
        store = data_dir / ".cloudstorage"
        meta = json.loads((store / ".meta").read_text())
        templates = {name.rsplit("/", 1)[1]: meta["objects"][bucket_name][name] for name, _ in objects[:3]}
        for name, data in objects[3:]:
            resource = json.loads(json.dumps(templates[name.rsplit("/", 1)[1]]))
            first = next(n for n, _ in objects[:3] if n.rsplit("/", 1)[1] == name.rsplit("/", 1)[1])
            for key, value in list(resource.items()):
                if isinstance(value, str) and first in value:
                    resource[key] = value.replace(first, name)
                elif isinstance(value, str) and urllib.parse.quote(first, safe="") in value:
                    resource[key] = value.replace(urllib.parse.quote(first, safe=""), urllib.parse.quote(name, safe=""))
            resource["size"] = str(len(data))
            checksums = Checksums()
            checksums.update(data)
            resource["md5Hash"], resource["crc32c"] = checksums.md5, checksums.crc32c
            meta["objects"][bucket_name][name] = resource
            path = store / bucket_name / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (store / ".meta").write_text(json.dumps(meta))
        emulator = emulators.start_gcs(port, BENCH_DIR / "poke-gcs.log", data_dir)
        emulators.wait_ready(emulator, timeout=300, project=PROJECT)
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
        try:
            new_ids = [name.split("/")[1] for name, _ in objects if name.endswith(MANIFEST_NAME)][-NEW_BATCHES:]
            yield client, bucket_name, new_ids
        finally:
            emulators.stop(emulator.pid)
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        shutil.rmtree(data_dir, ignore_errors=True)


def baseline_poke(bucket: Any, start: datetime, end: datetime) -> list[str]:
    """The scheduled poke as it was before the ledger (plan.find_completed_batches, removed since, over
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
        kinds: dict[str, int] = {}
        for route, n in counter.calls.items():
            kinds[_kind(route)] = kinds.get(_kind(route), 0) + n
        runs.append({"seconds": seconds, "requests": counter.total, "calls": kinds, "routes": dict(counter.calls),
                     "found": found})  # fmt: skip
    return {**runs[0], "seconds": median([r["seconds"] for r in runs]), "all_seconds": [r["seconds"] for r in runs]}


def run(ctx: Context) -> Result:
    reported = 1_000 if ctx.quick else 10_000
    repeats = 1 if ctx.quick else 3
    t0 = time.monotonic()
    with seeded_emulator(reported) as (client, bucket_name, new_ids):
        setup_s = time.monotonic() - t0
        return _measure_both(client, client.bucket(bucket_name), new_ids, reported, repeats, setup_s, ctx.quick)


def _measure_both(
    client: Any, bucket: Any, new_ids: list[str], reported: int, repeats: int, setup_s: float, quick: bool
) -> Result:
    end = START + timedelta(minutes=reported + NEW_BATCHES + 1)  # every new batch is before it
    zone = GCSLandingZone(bucket, PREFIX)

    # As the sensor pokes: with the archive store, whose claims it lists once (none here).
    store = GCSObjectStore(bucket)
    ours = measure(
        client, lambda: select_batches(zone, end=end, store=store, run_id="scheduled__bench").batch_ids, repeats
    )
    # Today's scheduled run of the interval holding the 10 new batches reads every manifest too.
    first_new = START + timedelta(minutes=reported)
    base = measure(client, lambda: baseline_poke(bucket, first_new, end), 1)
    assert sorted(ours["found"]) == sorted(base["found"]) == new_ids, "both pokes find the same new batches"

    matching = 2 * reported + NEW_BATCHES  # batch.json and batch.report.json names
    pages = -(-matching // PAGE_SIZE)
    budget = pages + NEW_BATCHES + 1  # and the listing of the claims
    speedup = ratio(base["seconds"], ours["seconds"])
    list_calls = ours["calls"].get("list", 0)
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
                f"<= list pages + new manifests + the claims' listing ({pages} + {NEW_BATCHES} + 1 on Cloud Storage)",
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
            f"Cloud Storage emulator on disk, one request at a time, started with {3 * reported + 2 * NEW_BATCHES:,} "
            f"objects already in it (written into its data folder from templates it made itself, in {setup_s:.0f} s: "
            "it rewrites its whole metadata file on every upload). Requests are counted on the storage client's "
            "HTTP session.",
            "The emulator ignores maxResults and answers a listing in one page; real Cloud Storage pages by 1,000 "
            f"names, so the same poke there costs {pages} list pages + {NEW_BATCHES} manifest downloads.",
            "Only the ledger's listing is narrowed by a matchGlob; the images of each batch never appear in it.",
            "Requests by route are in `.bench/results.json` (data.ours.routes): beside the listing and the manifest "
            "downloads, the client library issues one bucket metadata GET.",
        ],
        data={"ours": ours, "baseline": base, "reported": reported, "setup_s": setup_s},
    )


def _kind(route: str) -> str:
    if " download/" in route:
        return "download"
    if route.endswith("/o"):
        return "list"
    return "metadata GET" if route.startswith("GET ") else route


def _calls(calls: dict[str, int]) -> str:
    return ", ".join(f"{route}: {n:,}" for route, n in sorted(calls.items()))
