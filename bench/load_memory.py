"""5b. Peak RSS of one load task vs the rows of its batch: the staged rows handed over chunk by
chunk (the product) vs read whole and checked into a list (the load step before 2026-11-28)."""

from __future__ import annotations

import shutil
from typing import Any

from bench.bigquery_calls import batch_rows, template_rows
from bench.cloud import PROJECT
from bench.common import WORK_DIR, run_worker
from bench.context import Context
from bench.results import Result, Target, fmt, ratio
from dicom_archive.ndjson import to_ndjson

UPLOAD_CHUNK_MIB = 100  # google-cloud-bigquery reads a resumable upload's file in chunks this big
# Peak growth allowed at any batch size: the upload holds a chunk read from the file and a copy of it.
BOUND_GOAL_MIB = 2 * UPLOAD_CHUNK_MIB + 32
RATIO_GOAL = 4  # the baseline's growth over ours, at the largest batch
ROWS_PER_CHUNK = 500  # one archive task's rows: 25 studies of 20 images


def stage_rows(template: list[dict[str, Any]], count: int) -> tuple[str, int]:
    """The rows of a batch as the archive tasks stage them: one NDJSON file per chunk."""
    folder = WORK_DIR / f"load-rows-{count}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows, size = batch_rows(template, count, f"load-memory-{count}"), 0
    for index, start in enumerate(range(0, count, ROWS_PER_CHUNK)):
        part = to_ndjson(rows[start : start + ROWS_PER_CHUNK])
        (folder / f"{index:07d}.ndjson").write_bytes(part)
        size += len(part)
    return str(folder), size


def run(ctx: Context) -> Result:
    endpoint = ctx.emulators().bigquery.url
    template = template_rows(ctx)
    measured: dict[int, dict[str, Any]] = {}
    for count in ctx.sizes.load_rows:
        folder, size = stage_rows(template, count)
        measured[count] = {"ndjson_bytes": size}
        for mode in ("chunks", "whole"):
            args = ["--rows-dir", folder, "--endpoint", endpoint, "--project", PROJECT, "--feed", mode]
            measured[count][mode] = run_worker("load", *args, "--dataset", f"bench_load_memory_{count}_{mode}")
        shutil.rmtree(folder, ignore_errors=True)
    rows, growths = [], {}
    for count, m in measured.items():
        ours, base = m["chunks"], m["whole"]
        growths[count] = (base["vmhwm_mib"] - base["rss_setup_mib"], ours["vmhwm_mib"] - ours["rss_setup_mib"])
        rows.append(
            [
                count,
                fmt(m["ndjson_bytes"] / 2**20),
                fmt(base["vmhwm_mib"]),
                fmt(ours["vmhwm_mib"]),
                fmt(growths[count][0]),
                fmt(growths[count][1]),
                f"{ratio(growths[count][0], max(growths[count][1], 1.0)):.1f}x",
                fmt(base["seconds"], 2),
                fmt(ours["seconds"], 2),
            ]
        )
    largest = max(measured)
    worst = max(ours for _, ours in growths.values())
    at_largest = ratio(growths[largest][0], max(growths[largest][1], 1.0)) or 0.0
    return Result(
        name="load-memory",
        title="5b. Peak RSS of one load task vs the rows of its batch",
        columns=[
            "rows",
            "staged NDJSON MiB",
            "baseline peak MiB",
            "ours peak MiB",
            "baseline growth MiB",
            "ours growth MiB",
            "growth, baseline / ours",
            "baseline s",
            "ours s",
        ],
        rows=rows,
        targets=[
            Target(
                "load task memory bounded in batch rows",
                f"growth <= {BOUND_GOAL_MIB} MiB (2 x the client's {UPLOAD_CHUNK_MIB} MiB upload chunk + 32)",
                f"{worst:.0f} MiB",
                worst <= BOUND_GOAL_MIB,
            ),
            Target(
                f"load task memory vs rows read whole, {largest} rows",
                f">= {RATIO_GOAL}x less growth",
                f"{at_largest:.1f}x",
                at_largest >= RATIO_GOAL,
            ),
        ],
        notes=[
            "One worker process per size and mode runs `load_rows_exactly_once` (row checks, scratch-table "
            "load, MERGE) against the BigQuery emulator on loopback, from a batch's rows staged as the archive "
            f"tasks stage them ({ROWS_PER_CHUNK} rows per chunk file; real rows of one archived CT study, "
            "repeated with distinct instance_sha256).",
            "Ours: the chunk files handed over one at a time (`Staging.read_rows`), checked rows spooled to a "
            "temporary file. Baseline, the load step before 2026-11-28: the chunks joined into one bytes object, "
            "every row checked into a list, the list serialized again, then loaded.",
            "Peak is the worker's VmHWM; growth is VmHWM minus the RSS after imports and the client's setup. "
            f"The client's resumable upload reads its file in chunks of {UPLOAD_CHUNK_MIB} MiB (and holds a copy "
            "of the chunk while sending it), so ours grows with the rows up to about twice that size, and no "
            "further; the baseline grows about 6x the rows, without bound.",
        ],
        data={str(count): m for count, m in measured.items()},
    )
