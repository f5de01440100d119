"""`make bench` itself still runs: every benchmark, at the quick sizes, in a directory of its own.

Benchmarks run by hand and seldom, so they rot unseen: one run once crashed on a method the null
object store lacked, and another measured a table left full by the benchmark before it. This test
runs them all end to end and checks that each one measured and judged its targets. It never checks
a figure: timings belong in bench/RESULTS.md, not in assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_every_benchmark_runs_and_reports_figures(tmp_path):
    results_md = (REPO_ROOT / "bench" / "RESULTS.md").read_bytes()
    own_results = REPO_ROOT / ".bench" / "results-quick.json"
    own_before = own_results.stat().st_mtime_ns if own_results.exists() else None
    bench_dir = tmp_path / "bench"
    env = dict(os.environ, DICOM_BENCH_DIR=str(bench_dir))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    from bench.run import BENCHMARKS

    results = json.loads((bench_dir / "results-quick.json").read_text())["results"]
    assert sorted(results) == sorted(BENCHMARKS)
    for name, result in results.items():
        assert result["rows"], f"{name} measured nothing"
        assert all(len(row) == len(result["columns"]) for row in result["rows"]), name
        assert all(t["met"] in (True, False) for t in result["targets"]), f"{name} left a target unjudged"
        assert result["meta"]["quick"] is True
    assert sum(len(r["targets"]) for r in results.values()) >= 15
    assert "targets met" in proc.stdout
    # A quick run never rewrites the measured figures, and leaves the repository's own bench data alone.
    assert (REPO_ROOT / "bench" / "RESULTS.md").read_bytes() == results_md
    assert (own_results.stat().st_mtime_ns if own_results.exists() else None) == own_before
    assert any((bench_dir / "data").iterdir())
