"""Run the benchmarks: `python -m bench.run [--quick] [--only NAME ...] [--sizes GB ...]`.

Each benchmark measures the product code against its baseline on the same synthetic data in the
same run. Prints a table per benchmark and writes `.bench/results.json`; a full run (not --quick)
also rewrites the generated part of `bench/RESULTS.md`. Quick runs write `.bench/results-quick.json`.
Synthetic data is generated once into `.bench/data/` and reused (`make clean` removes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from bench.common import cpu_counters, ensure_import_path, load_average, others_cpu

ensure_import_path()

from bench import (  # noqa: E402  (dicom_archive needs plugins/ on sys.path first)
    archive_build,
    bigquery_calls,
    dag_parse,
    end_to_end,
    load_memory,
    memory,
    poke_cost,
    read_amplification,
    report,
    rerun,
    scaling,
)
from bench.config import FULL, QUICK  # noqa: E402
from bench.context import Context  # noqa: E402
from bench.results import Result  # noqa: E402

BENCHMARKS: dict[str, Callable[[Context], Result]] = {
    "archive": archive_build.run,
    "e2e": end_to_end.run,
    "io": read_amplification.run,
    "memory": memory.run,
    "bigquery": bigquery_calls.run,
    "load-memory": load_memory.run,
    "dag": dag_parse.run,
    "scaling": scaling.run,
    "poke": poke_cost.run,
    "rerun": rerun.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )  # fmt: skip
    parser.add_argument("--sizes", nargs="+", type=float, metavar="GB", help="study sizes of the memory benchmark")
    return parser.parse_args(argv)


def run_one(name: str, ctx: Context, command: str) -> Result:
    print(f"\n[{name}] running ...", flush=True)
    load_before, cpu_before, started = load_average(), cpu_counters(), time.monotonic()
    result = BENCHMARKS[name](ctx)
    seconds = time.monotonic() - started
    result.meta = {
        "measured_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "command": command,
        "quick": ctx.quick,
        "seconds": seconds,
        "load_before": load_before,
        "load_after": load_average(),
        "others_cpus": others_cpu(cpu_before, cpu_counters(), seconds),
    }
    print(report.console(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.sizes:
        sizes = dataclasses.replace(sizes, memory_gb=tuple(sorted(args.sizes)))
    names = [name for name in BENCHMARKS if not args.only or name in args.only]
    command = shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    ctx = Context(sizes=sizes, quick=args.quick)
    machine = report.machine_info()
    path = report.QUICK_JSON if args.quick else report.RESULTS_JSON
    results = []
    try:
        for name in names:
            results.append(run_one(name, ctx, command))
            # Kept as each one ends: a benchmark that crashes does not take the others' figures along.
            everything = report.merged(results, path)
            report.write_json(everything, machine, path)
    finally:
        ctx.close()
    everything = report.merged(results, path)
    print(f"\nwrote {path}")
    missing = [name for name in BENCHMARKS if name not in everything]
    if not args.quick and not missing:
        report.update_results_md(everything, machine, list(BENCHMARKS))
        print(f"updated {report.RESULTS_MD}")
    elif not args.quick:  # rewriting the generated block now would drop the sections not measured
        print(f"{report.RESULTS_MD} left alone: {path} holds no result of {', '.join(missing)} (run them once)")
    failed = [t for r in results for t in r.targets if t.met is False]
    print(f"\n{sum(len(r.targets) for r in results) - len(failed)} targets met, {len(failed)} missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
