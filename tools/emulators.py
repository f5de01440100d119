"""Start, wait for and stop the local Cloud Storage and BigQuery emulators.

One implementation serves both `make emulators` (pid files and logs under `.run/`) and the
test fixtures (free ports, always stopped). The emulators live in their own venvs under
`.emulators/`, built by `scripts/setup.sh`.

    python -m tools.emulators start|stop|status|airflow-stop [--run-dir .run]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMULATORS_DIR = REPO_ROOT / ".emulators"
DEFAULT_PROJECT = "local-project"


@dataclass
class EmulatorProcess:
    name: str
    port: int
    pid: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_background(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> int:
    """Start a server process in the background, its output appended to `log_path`; returns its pid.
    It runs in a process group of its own, so that stopping the group takes its children too."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return proc.pid


def _spawn(name: str, argv: list[str], port: int, log_path: Path, env: dict[str, str]) -> EmulatorProcess:
    return EmulatorProcess(name=name, port=port, pid=start_background(argv, log_path, env), log_path=log_path)


def start_gcs(port: int, log_path: Path, data_dir: Path | None = None) -> EmulatorProcess:
    exe = EMULATORS_DIR / "gcs" / "bin" / "gcp-storage-emulator"
    argv = [str(exe)]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["-d", str(data_dir)]
    argv += ["start", "--host", "127.0.0.1", "--port", str(port)]
    if data_dir is None:
        argv.append("--in-memory")
    return _spawn("gcs", argv, port, log_path, dict(os.environ))


def bigquery_emulator_kind() -> str:
    kind_file = EMULATORS_DIR / "bq-kind"
    return kind_file.read_text().strip() if kind_file.exists() else "local-bigquery"


def start_bigquery(
    port: int, log_path: Path, data_dir: Path, project: str = DEFAULT_PROJECT, grpc_port: int | None = None
) -> EmulatorProcess:
    grpc_port = grpc_port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = EMULATORS_DIR / "bq" / "bin"
    if bigquery_emulator_kind() == "bqemulator":
        argv = [
            str(bin_dir / "bqemulator"),
            "start",
            "--rest-port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--persistent",
            "--data-dir",
            str(data_dir),
            "--project",
            project,
        ]
    else:
        # Through our launcher, which makes its creates answer concurrent requests as BigQuery does.
        argv = [
            str(bin_dir / "python"),
            "-I",  # the script's folder (tools/) stays off its import path
            str(Path(__file__).with_name("local_bigquery_serve.py")),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--project",
            project,
            "--data-dir",
            str(data_dir),
        ]
    # DuckDB finds its pre-installed extensions under $HOME/.duckdb (see scripts/setup.sh).
    env = dict(os.environ, HOME=str(EMULATORS_DIR / "bq-home"))
    return _spawn("bigquery", argv, port, log_path, env)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500
    except OSError:
        return False


def readiness_url(emulator: EmulatorProcess, project: str = DEFAULT_PROJECT) -> str:
    if emulator.name == "gcs":
        return f"{emulator.url}/storage/v1/b?project={project}"
    return f"{emulator.url}/bigquery/v2/projects/{project}/datasets"


def wait_ready(emulator: EmulatorProcess, timeout: float = 60.0, project: str = DEFAULT_PROJECT) -> None:
    deadline = time.monotonic() + timeout
    url = readiness_url(emulator, project)
    while time.monotonic() < deadline:
        if not is_alive(emulator.pid):
            raise RuntimeError(f"{emulator.name} emulator exited; see {emulator.log_path}")
        if _answers(url):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{emulator.name} emulator did not answer {url} within {timeout:.0f}s; see {emulator.log_path}")


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


def stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the emulator's process group, then SIGKILL what is left after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not is_alive(pid):
                return
            time.sleep(0.1)


# --- command line (make emulators / emulators-stop) -----------------------------------------


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def _running(run_dir: Path, name: str) -> int | None:
    pid_file = _pid_file(run_dir, name)
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().split()[0])
    return pid if is_alive(pid) else None


def cli_start(run_dir: Path) -> int:
    project = os.environ.get("GOOGLE_PROJECT_NAME", DEFAULT_PROJECT)
    gcs_port = int(os.environ.get("GCS_EMULATOR_PORT", "9023"))
    bq_port = int(os.environ.get("BQ_EMULATOR_PORT", "9050"))
    started = []
    if _running(run_dir, "gcs") is None:
        started.append(start_gcs(gcs_port, run_dir / "gcs.log", data_dir=run_dir / "gcs-data"))
    if _running(run_dir, "bigquery") is None:
        started.append(start_bigquery(bq_port, run_dir / "bigquery.log", run_dir / "bigquery-data", project))
    for emulator in started:
        _pid_file(run_dir, emulator.name).write_text(f"{emulator.pid} {emulator.port}\n")
        wait_ready(emulator, project=project)
    bucket = os.environ.get("GOOGLE_CLOUD_STORAGE")
    if bucket:
        ensure_bucket(f"http://127.0.0.1:{gcs_port}", bucket, project)
    return 1 if _print_status(run_dir) else 0


def ensure_bucket(gcs_url: str, bucket: str, project: str) -> None:
    """The configured bucket, in the emulator: in production it is provisioned beforehand."""
    os.environ["STORAGE_EMULATOR_HOST"] = gcs_url
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project=project, credentials=AnonymousCredentials())
    if client.lookup_bucket(bucket) is None:
        client.create_bucket(bucket)
        print(f"gcs: created bucket {bucket}")


def cli_stop(run_dir: Path) -> int:
    for name in ("gcs", "bigquery"):
        pid = _running(run_dir, name)
        if pid is not None:
            stop(pid)
            print(f"{name}: stopped (pid {pid})")
        _pid_file(run_dir, name).unlink(missing_ok=True)
    return 0


def cli_status(run_dir: Path) -> int:
    """Print each emulator's state. "not running" is an answer, not an error: exit 0."""
    down = _print_status(run_dir)
    return 0 if down in (0, 2) else 1  # one of the two down means something went wrong


def _print_status(run_dir: Path) -> int:
    down = 0
    for name in ("gcs", "bigquery"):
        pid_file = _pid_file(run_dir, name)
        pid = _running(run_dir, name)
        if pid is None:
            print(f"{name}: not running")
            down += 1
        else:
            port = pid_file.read_text().split()[1]
            print(f"{name}: running (pid {pid}) on http://127.0.0.1:{port}")
    return down


def _descendants(pid: int) -> list[int]:
    """Child processes of pid, recursively, from /proc (what `airflow standalone` started)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_airflow(pid_file: Path, timeout: float = 30.0) -> bool:
    """Stop the `airflow standalone` of `make airflow` (its pid file names it): SIGINT, which it
    handles by stopping its components, then SIGTERM/SIGKILL whatever is left. True if one ran."""
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    pid_file.unlink()
    if not is_alive(pid):
        return False
    family = _descendants(pid)
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive(pid):
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in [pid, *family] if is_alive(p)]
        for proc in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(is_alive(p) for p in left):
            time.sleep(0.2)
    return True


def cli_airflow_stop(run_dir: Path) -> int:
    home = Path(os.environ.get("AIRFLOW_HOME") or REPO_ROOT / ".airflow")
    if stop_airflow(home / "standalone.pid"):
        print(f"airflow standalone ({home}): stopped")
    else:
        print(f"airflow standalone ({home}): not running")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status", "airflow-stop"])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    args = parser.parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    actions = {"start": cli_start, "stop": cli_stop, "status": cli_status, "airflow-stop": cli_airflow_stop}
    return actions[args.action](args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
