"""Paths, subprocess plumbing and process probes shared by the benchmarks."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DIR = REPO_ROOT / "plugins"
# Data, results and scratch; DICOM_BENCH_DIR moves it all (the smoke test runs in a temporary one).
BENCH_DIR = Path(os.environ.get("DICOM_BENCH_DIR") or REPO_ROOT / ".bench")
WORK_DIR = BENCH_DIR / "work"
MB = 1_000_000


def ensure_import_path() -> None:
    """Make `dicom_archive` importable the way Airflow does: plugins/ on sys.path."""
    for path in (str(REPO_ROOT), str(PLUGINS_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(PLUGINS_DIR)])
    return env


def worker_argv(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.worker", mode, *args]


def parse_worker_output(stdout: str) -> dict[str, Any]:
    """A worker prints exactly one JSON document on its last line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("worker printed nothing")
    return json.loads(lines[-1])


def run_worker(mode: str, *args: str, timeout: float = 1800, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m bench.worker MODE ARGS` in a fresh process and return its JSON result."""
    proc = subprocess.run(
        worker_argv(mode, *args),
        cwd=REPO_ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.worker {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return parse_worker_output(proc.stdout)


def proc_io() -> dict[str, int]:
    """This process's I/O counters: rchar counts bytes returned by read(), read_bytes what the
    block layer fetched from the device (0 for a page-cache hit)."""
    with open("/proc/self/io") as stream:
        pairs = (line.split(":", 1) for line in stream if ":" in line)
        return {key.strip(): int(value) for key, value in pairs}


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in ("rchar", "read_bytes")}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set: VmHWM and getrusage's ru_maxrss (both KiB on Linux), in MiB."""
    return {
        "vmhwm_mib": _status_kb("VmHWM") / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict these files from the page cache (POSIX_FADV_DONTNEED; no root needed), so the
    next read comes from the device and shows in read_bytes. Dirty pages of freshly generated
    files cannot be dropped, hence the fdatasync first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(paths: Iterable[Path]) -> int:
    """Read the files once so that every contender starts from a warm cache; returns bytes."""
    total = 0
    for path in paths:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    return total


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def load_average() -> float:
    return os.getloadavg()[0]


def cpu_counters() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, CPU seconds used by this process and its reaped
    children), to tell how much of the machine other processes took during a measurement."""
    with open("/proc/stat") as stream:
        ticks = [int(value) for value in stream.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    mine = os.times()
    own = mine.user + mine.system + mine.children_user + mine.children_system
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own


def others_cpu(before: tuple[float, float], after: tuple[float, float], seconds: float) -> float:
    """Average number of CPUs busy with other processes (other users, the emulators) meanwhile."""
    busy, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, busy - own) / seconds if seconds > 0 else 0.0
