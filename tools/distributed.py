"""A distributed Airflow on this machine, without containers: the shape of Cloud Composer.

    make distributed          start it, run the demo's batches on it, print where the UI is
    make distributed-stop     stop every process it started
    python -m tools.distributed start|stop|status [--run-dir .run/distributed] [--no-demo]

What runs, every port free-picked on 127.0.0.1:
  - PostgreSQL (the metadata database and Celery's result backend), in its own data folder;
  - Redis (the Celery broker);
  - the Cloud Storage and BigQuery emulators (tools/emulators.py); the landing zone is
    `gs://<landing bucket>/incoming` there, the archive store and its `_staging/` in the
    archive bucket, as on Composer;
  - the "control" node: scheduler, dag-processor and api-server, sharing one AIRFLOW_HOME;
  - N Celery workers (CeleryExecutor, apache-airflow-providers-celery), each started from its own
    copy of dags/, plugins/ and include/ in its own folder, with its own AIRFLOW_HOME and logs: no
    worker sees another's files, and none sees the control node's. They share nothing but the
    network services above; the venv plays the part of the container image.

PostgreSQL and Redis come from the Debian packages `postgresql` and `redis-server`, installed
with apt-get by `ensure_system_packages()` when their programs are missing (as root; `apt-get
update` only when apt does not know the package yet).

Every process gets the marker variable DICOM_DISTRIBUTED_STACK=<stack id> in its environment, so
`stop()` also finds the processes that left their process group (a task process that the Airflow
supervisor put in a group of its own, or one orphaned by a killed worker): nothing is left behind.

The test (tests/test_distributed.py) uses the same class; it puts a fault proxy in front of the
Cloud Storage emulator (the `storage_url` argument of `start_airflow`) and SIGKILLs a worker.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from tools import emulators

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
DEFAULT_RUN_DIR = REPO_ROOT / ".run" / "distributed"
MARKER = "DICOM_DISTRIBUTED_STACK"
DAG_ID = "dicom_storage"
ADMIN = "admin"
# The folders a node (the control node or a worker) gets its own copy of.
CODE_FOLDERS = ("dags", "plugins", "include")
# The DAG's pools, as scripts/setup.sh creates them for the local run.
POOLS = {
    "dicom_storage_gcs": (4, "Concurrent archive uploads"),
    "dicom_storage_bigquery": (2, "Concurrent BigQuery loads"),
}
DEBIAN_PACKAGES = ("postgresql", "redis-server")
# How the executor recovers from a dead worker; docker-compose.yaml has the same values (its test
# checks). As the Celery provider documents: a task is acknowledged only when it ends
# (task_acks_late), so the broker redelivers the task of a worker that died, after the visibility
# timeout, which must exceed the longest task (here the provider's default, made explicit); one
# message reserved per free slot. A running task whose worker stops heartbeating is failed by the
# scheduler after the heartbeat timeout, then retried: that, not the redelivery, resumes the work
# (the redelivered message names a try that is over, and the execution API refuses it).
EXECUTOR_SETTINGS = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "300",
}


# --- Debian packages ---------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, pg_ctl and postgres."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists() and (d / "postgres").exists()]
    return max(found, key=lambda d: int(d.parent.name)) if found else None


def redis_server() -> str | None:
    return shutil.which("redis-server") or next(iter(glob.glob("/usr/bin/redis-server")), None)


def ensure_system_packages(log: Any = print) -> None:
    """Install PostgreSQL and Redis from Debian packages when their programs are missing."""
    present = {"postgresql": postgres_bin_dir(), "redis-server": redis_server()}
    missing = [package for package in DEBIAN_PACKAGES if not present[package]]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise SystemExit(f"the distributed stack needs the Debian packages {missing}: run `sudo {' '.join(command)}`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"[distributed] installing {' '.join(missing)} with apt-get")
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if first.returncode != 0:
        # The package lists are missing or stale ("Unable to locate package"): update them once.
        log("[distributed] apt-get update")
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, check=True)
        subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    if postgres_bin_dir() is None or redis_server() is None:
        raise SystemExit(f"apt-get installed {missing}, but initdb/pg_ctl or redis-server is still missing")


# --- processes ---------------------------------------------------------------------------------


def _marked_pids(stack_id: str) -> list[int]:
    """Every live process whose environment carries this stack's marker."""
    needle = f"{MARKER}={stack_id}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:
            continue
        if needle in environ and emulators.is_alive(int(entry)):
            pids.append(int(entry))
    return pids


def mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in_namespaces(namespaces: set[str]) -> list[int]:
    """Every live process in one of these mount namespaces (those of the stack's isolated nodes).
    Airflow's components rewrite their process title, which also wipes /proc/<pid>/environ, so
    the marker variable alone cannot find them; their namespace can."""
    if not namespaces:
        return []
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) != os.getpid() and mount_namespace(int(entry)) in namespaces
        if emulators.is_alive(int(entry))
    ]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a snapshot of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send sig to pid, its process group and every descendant (whatever their group): a machine
    that dies takes all of them at once."""
    tree = process_tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, sig)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return tree


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        for pid in alive:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        alive = [pid for pid in alive if emulators.is_alive(pid)]
        if alive:
            time.sleep(0.2)
    return alive


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Node:
    """A machine of the cluster: its own folder with dags/, plugins/, include/ and AIRFLOW_HOME."""

    name: str
    root: str

    @property
    def home(self) -> Path:
        return Path(self.root) / "airflow-home"

    def folder(self, name: str) -> Path:
        return Path(self.root) / name


@dataclass
class StackState:
    stack_id: str
    run_dir: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    pg_data: str = ""
    pg_user: str = ""
    storage_url: str = ""
    namespaces: list[str] = field(default_factory=list)  # mount namespaces of the isolated nodes
    secrets: dict[str, str] = field(default_factory=dict)
    password: str = ""
    project: str = "local-project"
    bucket: str = "radiology"
    landing_bucket: str = "radiology-landing"
    landing_prefix: str = "incoming"
    collection: str = "IRB41449"
    settings: dict[str, str] = field(default_factory=dict)


class DistributedStack:
    """Start, use and stop the stack. The state (ports, pids, folders) is kept in
    <run_dir>/state.json, so that another process (`make distributed-stop`) can stop it."""

    def __init__(self, run_dir: Path, state: StackState | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.state = state or StackState(stack_id=uuid.uuid4().hex[:12], run_dir=str(self.run_dir))

    # -- state --

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(asdict(self.state), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> DistributedStack | None:
        state_file = Path(run_dir) / "state.json"
        if not state_file.exists():
            return None
        return cls(Path(run_dir), StackState(**json.loads(state_file.read_text())))

    def log_path(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    # -- URLs --

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.state.ports['api']}"

    @property
    def gcs_url(self) -> str:
        return f"http://127.0.0.1:{self.state.ports['gcs']}"

    @property
    def bigquery_url(self) -> str:
        return f"http://127.0.0.1:{self.state.ports['bigquery']}"

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg2://{self.state.pg_user}@127.0.0.1:{self.state.ports['postgres']}/airflow"

    @property
    def landing_root(self) -> str:
        return f"gs://{self.state.landing_bucket}/{self.state.landing_prefix}"

    def worker_names(self) -> list[str]:
        return sorted(name for name in self.state.nodes if name.startswith("worker-"))

    def node(self, name: str) -> Node:
        return Node(**self.state.nodes[name])

    # -- infrastructure --

    def start_services(self) -> None:
        """PostgreSQL, Redis, and the two emulators (with the archive and landing buckets)."""
        ensure_system_packages()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.save()
        self._start_postgres()
        self._start_redis()
        self._start_emulators()
        self.save()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
        pid = emulators.start_background(argv, self.log_path(name), {**env, MARKER: self.state.stack_id}, cwd=cwd)
        self.state.pids[name] = pid
        if argv[0].endswith("unshare"):
            deadline = time.monotonic() + 10  # until unshare has made the namespace and exec'd
            while time.monotonic() < deadline and mount_namespace(pid) == mount_namespace(os.getpid()):
                time.sleep(0.05)
            namespace = mount_namespace(pid)
            if namespace and namespace != mount_namespace(os.getpid()):
                self.state.namespaces.append(namespace)
        self.save()
        return pid

    def _base_env(self) -> dict[str, str]:
        return {
            "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": os.environ.get("HOME", "/root"),
            MARKER: self.state.stack_id,
        }

    def _as_postgres_user(self, argv: list[str]) -> list[str]:
        # initdb and postgres refuse to run as root: run them as the Debian package's `postgres`.
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _start_postgres(self) -> None:
        bin_dir = postgres_bin_dir()
        assert bin_dir is not None
        # Under /tmp (world-traversable), owned by the server's user: the run dir may be private.
        data = Path(tempfile.mkdtemp(prefix=f"dicom-pg-{self.state.stack_id}-"))
        self.state.pg_data = str(data)
        self.state.pg_user = "airflow"
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        env = self._base_env()
        initdb = [str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "airflow", "-A", "trust", "-E", "UTF8",
                  "--no-sync"]  # fmt: skip
        subprocess.run(
            self._as_postgres_user(initdb),
            env=env,
            check=True,
            capture_output=True,
        )
        port = emulators.free_port()
        self.state.ports["postgres"] = port
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        log = data / "postgres.log"
        pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(log), "-w", "-t", "60",
                  "start"]  # fmt: skip
        subprocess.run(
            self._as_postgres_user(pg_ctl),
            env=env,
            check=True,
            capture_output=True,
        )
        pid = int((data / "db" / "postmaster.pid").read_text().split()[0])
        self.state.pids["postgres"] = pid
        self.save()
        subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", "airflow"],
            env=env,
            check=True,
            capture_output=True,
        )

    def _start_redis(self) -> None:
        port = emulators.free_port()
        self.state.ports["redis"] = port
        folder = self.run_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        argv = [redis_server() or "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no", "--dir", str(folder), "--protected-mode", "yes"]  # fmt: skip
        self._spawn("redis", argv, self._base_env())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            time.sleep(0.2)
        raise TimeoutError(f"redis did not answer on port {port}; see {self.log_path('redis')}")

    def _start_emulators(self) -> None:
        # tools.emulators passes this process's environment on: the marker goes with it, for a while.
        previous = os.environ.get(MARKER)
        os.environ[MARKER] = self.state.stack_id
        try:
            gcs = emulators.start_gcs(emulators.free_port(), self.log_path("gcs"))
            self.state.pids["gcs"], self.state.ports["gcs"] = gcs.pid, gcs.port
            self.save()
            bigquery = emulators.start_bigquery(
                emulators.free_port(), self.log_path("bigquery"), self.run_dir / "bigquery-data", self.state.project
            )
        finally:
            if previous is None:
                os.environ.pop(MARKER, None)
            else:
                os.environ[MARKER] = previous
        self.state.pids["bigquery"], self.state.ports["bigquery"] = bigquery.pid, bigquery.port
        self.save()
        emulators.wait_ready(gcs, project=self.state.project)
        emulators.wait_ready(bigquery, timeout=120, project=self.state.project)
        with self.google_env():
            client = self.storage_client()
            for bucket in (self.state.bucket, self.state.landing_bucket):
                if client.lookup_bucket(bucket) is None:
                    client.create_bucket(bucket)

    @contextlib.contextmanager
    def google_env(self) -> Iterator[None]:
        """STORAGE_EMULATOR_HOST / BIGQUERY_EMULATOR_HOST of this stack, in this process, for a while."""
        names = {"STORAGE_EMULATOR_HOST": self.gcs_url, "BIGQUERY_EMULATOR_HOST": self.bigquery_url}
        previous = {name: os.environ.get(name) for name in names}
        os.environ.update(names)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def storage_client(self) -> Any:
        """A Cloud Storage client on this stack's emulator (use inside google_env())."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=self.state.project, credentials=AnonymousCredentials())

    def bigquery_client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(
            project=self.state.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.bigquery_url},
        )

    # -- Airflow --

    def airflow_env(self, node: Node, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of an Airflow process on `node`: its own folders, the shared services."""
        s = self.state
        passwords = Path(self.node("control").home) / "simple_auth_passwords.json"
        env = {
            **self._base_env(),
            "AIRFLOW_HOME": str(node.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(node.folder("dags")),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(node.folder("plugins")),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            **EXECUTOR_SETTINGS,
            "AIRFLOW__CORE__FERNET_KEY": s.secrets["fernet"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(s.ports["api"]),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": s.secrets["api"],
            "AIRFLOW__API_AUTH__JWT_SECRET": s.secrets["jwt"],
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{s.ports['redis']}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.database_url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",  # a small machine
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # --- the pipeline's settings (the outputs spec), as on Composer ---
            "SEND_TO_GOOGLE": "true",
            "GOOGLE_PROJECT_NAME": s.project,
            "GOOGLE_CLOUD_STORAGE": s.bucket,
            "GOOGLE_STORAGE_COLLECTION": s.collection,
            "DICOM_LANDING_ROOT": self.landing_root,
            "DICOM_TASK_RETRIES": s.settings.get("task_retries", "3"),
            # Manual runs only: the storage emulator ignores ifGenerationMatch, so the claims that
            # keep a scheduled run off the batches of a running manual run cannot work here (they
            # do on Cloud Storage, and tests/test_ledger.py shows it through the fault proxy).
            "DICOM_SCHEDULE": "none",
            "STORAGE_EMULATOR_HOST": s.storage_url or self.gcs_url,
            "BIGQUERY_EMULATOR_HOST": self.bigquery_url,
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
                {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": s.project}}
            ),
        }
        if "visibility_timeout" in s.settings:  # the test shortens both, to see them at work
            env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"] = s.settings["visibility_timeout"]
        if "heartbeat_timeout" in s.settings:
            env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] = s.settings["heartbeat_timeout"]
        env.update({k: v for k, v in s.settings.items() if k.isupper()})
        env.update(extra or {})
        return env

    def _make_node(self, name: str) -> Node:
        """A fresh folder with its own copies of dags/, plugins/ and include/, and an AIRFLOW_HOME."""
        root = self.run_dir / "nodes" / name
        if root.exists():
            shutil.rmtree(root)
        for folder in CODE_FOLDERS:
            shutil.copytree(REPO_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        node = Node(name=name, root=str(root))
        node.home.mkdir(parents=True)
        # The node's name is its host name in Airflow (task instances, logs): the hostname_callable.
        identity = root / "identity"
        identity.mkdir()
        (identity / "dicom_node_identity.py").write_text(
            f'"""The host name of the node {name} of the distributed stack."""\n\n\n'
            f"def hostname() -> str:\n    return {name!r}\n"
        )
        self.state.nodes[name] = asdict(node)
        self.save()
        return node

    def hidden_from(self, node: Node) -> list[Path]:
        """What a node must not see: the repository's code folders and every other node's folder."""
        others = [Path(n["root"]) for name, n in self.state.nodes.items() if name != node.name]
        return [REPO_ROOT / folder for folder in CODE_FOLDERS] + others

    def _isolated(self, node: Node, argv: list[str]) -> list[str]:
        """argv in a private mount namespace where hidden_from(node) are empty read-only folders,
        so that the node's processes can only use their own copies. Needs root (or the right to
        unshare); elsewhere the node still runs from its own copies, only without that proof."""
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        if os.geteuid() != 0 or not Path(unshare).exists():
            return argv
        hide = " ".join(f"'{path}'" for path in self.hidden_from(node) if path.is_dir())
        script = f'for d in {hide}; do mount -t tmpfs -o ro,size=4k,mode=555 none "$d" || exit 1; done; exec "$@"'
        return [unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "node", *argv]

    def _node_env(self, node: Node, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = self.airflow_env(node, extra)
        env["PYTHONPATH"] = str(Path(node.root) / "identity")
        env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = "dicom_node_identity.hostname"
        return env

    def airflow(self, node_name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run an `airflow` CLI command on a node."""
        node = self.node(node_name)
        result = subprocess.run(
            [str(VENV_BIN / "airflow"), *args],
            env=self._node_env(node),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} failed on {node_name}:\n{(result.stdout + result.stderr)[-4000:]}"
            )
        return result

    def start_airflow(
        self,
        *,
        workers: int = 2,
        storage_url: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        """Migrate the database, then start the control node's components and the workers.

        storage_url: where the Airflow processes reach Cloud Storage (default: the emulator; the
        test passes a fault proxy). settings: `visibility_timeout`, `heartbeat_timeout`,
        `task_retries`, and upper-case environment variables for every Airflow process."""
        s = self.state
        s.storage_url = storage_url or ""
        s.settings = dict(settings or {})
        s.secrets = {
            "fernet": _fernet_key(),
            "api": secrets.token_urlsafe(32),
            "jwt": secrets.token_urlsafe(32),
        }
        s.password = s.password or secrets.token_urlsafe(12)
        s.ports["api"] = emulators.free_port()
        control = self._make_node("control")
        (control.home / "simple_auth_passwords.json").write_text(json.dumps({ADMIN: s.password}))
        self.save()

        self.airflow("control", "db", "migrate", timeout=600)
        pools = {name: {"slots": slots, "description": text} for name, (slots, text) in POOLS.items()}
        pools_file = control.home / "pools.json"
        pools_file.write_text(json.dumps(pools))
        self.airflow("control", "pools", "import", str(pools_file))

        for n in range(1, workers + 1):  # the nodes first, so each hides all the others
            self._make_node(f"worker-{n}")
        env = self._node_env(control)
        for component in ("api-server", "scheduler", "dag-processor"):
            argv = self._isolated(control, [str(VENV_BIN / "airflow"), component])
            self._spawn(component, argv, env, cwd=control.home)
        for name in self.worker_names():
            self.start_worker(name)
        self.wait_healthy()
        for name in self.worker_names():
            self.wait_worker_ready(name)

    def start_worker(self, name: str, *, fresh: bool = False) -> int:
        """A Celery worker on its own node (fresh: new copies of the code and a new home)."""
        node = self._make_node(name) if fresh or name not in self.state.nodes else self.node(name)
        env = self._node_env(node)
        argv = [str(VENV_BIN / "airflow"), "celery", "worker", "--celery-hostname", f"{name}@dicom-distributed",
                "--skip-serve-logs"]  # fmt: skip
        # No log server (it would bind every interface): a worker's task logs stay on its own disk.
        log_path = self.log_path(name)
        if log_path.exists():
            log_path.rename(log_path.with_suffix(f".{int(time.time())}.log"))
        return self._spawn(name, self._isolated(node, argv), env, cwd=node.home)

    def wait_worker_ready(self, name: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not emulators.is_alive(self.state.pids[name]):
                raise RuntimeError(f"{name} exited; see {self.log_path(name)}")
            if " ready." in self.log_path(name).read_text(errors="replace"):
                return
            time.sleep(1)
        raise TimeoutError(f"{name} was not ready in {timeout:.0f}s; see {self.log_path(name)}")

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL a worker with everything it started, as when its machine dies."""
        return kill_tree(self.state.pids[name])

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for name in ("api-server", "scheduler", "dag-processor"):
                if not emulators.is_alive(self.state.pids[name]):
                    raise RuntimeError(f"{name} exited; see {self.log_path(name)}")
            try:
                last = self.request("GET", "/api/v2/monitor/health", auth=False)
                parts = ("metadatabase", "scheduler", "dag_processor")
                if all((last.get(part) or {}).get("status") == "healthy" for part in parts):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"the control node was not healthy in {timeout:.0f}s (last: {last})")

    # -- REST API --

    _token: str | None = None

    def request(self, method: str, path: str, body: dict | None = None, *, auth: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api_url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            if self._token is None:
                self._token = self.request(
                    "POST", "/auth/token", {"username": ADMIN, "password": self.state.password}, auth=False
                )["access_token"]
            req.add_header("Authorization", f"Bearer {self._token}")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read() or b"{}")

    def wait_for_dag(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", f"/api/v2/dags/{DAG_ID}")
                return
            except urllib.error.HTTPError as err:
                if err.code != 404:
                    raise
            time.sleep(2)
        raise TimeoutError(f"{DAG_ID} was not parsed in {timeout:.0f}s; see {self.log_path('dag-processor')}")

    def trigger(self, batch_ids: list[str], run_id: str | None = None) -> str:
        """Unpause the DAG and start a manual run for exactly these batches; returns the run id."""
        self.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        body: dict[str, Any] = {"logical_date": None, "conf": {"batch_ids": batch_ids}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", body)["dag_run_id"]

    def wait_for_runs(self, run_ids: list[str], timeout: float = 900) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {r: self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{r}")["state"] for r in run_ids}
            if all(state in ("success", "failed") for state in states.values()):
                return states
            time.sleep(3)
        raise TimeoutError(f"runs not finished in {timeout:.0f}s: {states}")

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]

    # -- landing zone --

    def upload_batches(self, local_root: Path) -> list[str]:
        """Copy batch folders written by tools.landing_zone to the gs:// landing zone, each
        batch's batch.json last (an anonymizer's upload: the manifest says it is complete)."""
        batch_ids = []
        with self.google_env():
            bucket = self.storage_client().bucket(self.state.landing_bucket)
            for folder in sorted(p for p in Path(local_root).iterdir() if p.is_dir()):
                files = sorted(p for p in folder.rglob("*") if p.is_file())
                files.sort(key=lambda p: p.name == "batch.json")
                for path in files:
                    name = f"{self.state.landing_prefix}/{folder.name}/{path.relative_to(folder).as_posix()}"
                    bucket.blob(name).upload_from_filename(str(path))
                batch_ids.append(folder.name)
        return batch_ids

    # -- stop --

    def stop(self, timeout: float = 30) -> list[int]:
        """Stop everything; returns the pids still alive afterwards (none, unless something is wrong)."""
        s = self.state
        # Workers first (they finish nothing more), then the control node, then the services.
        order = [*self.worker_names(), "dag-processor", "scheduler", "api-server", "redis", "gcs", "bigquery"]
        for name in order:
            pid = s.pids.get(name)
            if pid is not None and emulators.is_alive(pid):
                emulators.stop(pid, timeout=timeout)
                kill_tree(pid)
        bin_dir = postgres_bin_dir()
        if s.pg_data and bin_dir and (Path(s.pg_data) / "db" / "postmaster.pid").exists():
            subprocess.run(
                self._as_postgres_user([str(bin_dir / "pg_ctl"), "-D", f"{s.pg_data}/db", "-m", "fast", "-w", "stop"]),
                capture_output=True,
                check=False,
            )
        # What left its process group, or was orphaned by a killed worker.
        namespaces = set(s.namespaces)
        for pid in _marked_pids(s.stack_id) + _pids_in_namespaces(namespaces):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        alive = [p for p in s.pids.values() if emulators.is_alive(p)]
        left = _wait_gone(_marked_pids(s.stack_id) + _pids_in_namespaces(namespaces) + alive, 15)
        if s.pg_data and not left:
            shutil.rmtree(s.pg_data, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        return left


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


# --- command line (make distributed / distributed-stop) ------------------------------------------


def run_demo(stack: DistributedStack) -> int:
    """The demo's batches (tools.landing_zone.demo_batches) in two collections, on the stack."""
    from tools.landing_zone import demo_batches, write_batch

    local = stack.run_dir / "landing-source"
    shutil.rmtree(local, ignore_errors=True)
    # Two days of batches in each of two collections (their dates differ, so do their batch ids).
    batches = demo_batches(days=2) + demo_batches(days=2, start=date(2024, 2, 5), collection="IRB50001")
    for batch in batches:
        write_batch(local, batch)
    batch_ids = stack.upload_batches(local)
    print(f"[distributed] {len(batch_ids)} batches in {stack.landing_root}: {', '.join(batch_ids)}")
    stack.wait_for_dag()
    runs = [stack.trigger(batch_ids[0::2]), stack.trigger(batch_ids[1::2])]
    print(f"[distributed] triggered {', '.join(runs)}; waiting for them")
    states = stack.wait_for_runs(runs)
    for run_id, state in states.items():
        hosts: dict[str, set[str]] = {}
        for ti in stack.task_instances(run_id):
            hosts.setdefault(ti.get("hostname") or "?", set()).add(ti["task_id"])
        where = "; ".join(f"{host}: {', '.join(sorted(tasks))}" for host, tasks in sorted(hosts.items()))
        print(f"[distributed] {run_id}: {state} ({where})")
    return 0 if all(state == "success" for state in states.values()) else 1


def cli_start(run_dir: Path, demo: bool) -> int:
    existing = DistributedStack.load(run_dir)
    if existing is not None and emulators.is_alive(existing.state.pids.get("scheduler", 0) or 0):
        print(f"[distributed] already running: UI {existing.api_url} (make distributed-stop first)")
        return 0
    if existing is not None:
        existing.stop()
    stack = DistributedStack(run_dir)
    try:
        print("[distributed] starting PostgreSQL, Redis and the emulators")
        stack.start_services()
        print("[distributed] migrating the database; starting scheduler, dag-processor, api-server, 2 workers")
        stack.start_airflow(workers=2)
        code = run_demo(stack) if demo else 0
    except BaseException:
        print(f"[distributed] failed; logs in {stack.run_dir / 'logs'}; stopping", file=sys.stderr)
        stack.stop()
        raise
    cli_status(run_dir)
    print(f"[distributed] Airflow UI: {stack.api_url}  (login {ADMIN} / {stack.state.password})")
    print("[distributed] stop everything with: make distributed-stop")
    return code


def cli_stop(run_dir: Path) -> int:
    stack = DistributedStack.load(run_dir)
    if stack is None:
        print("[distributed] not running")
        return 0
    left = stack.stop()
    if left:
        print(f"[distributed] still alive: {left}", file=sys.stderr)
        return 1
    print("[distributed] stopped; no process left")
    return 0


def cli_status(run_dir: Path) -> int:
    stack = DistributedStack.load(run_dir)
    if stack is None:
        print("[distributed] not running")
        return 1
    down = 0
    for name, pid in sorted(stack.state.pids.items()):
        alive = emulators.is_alive(pid)
        down += not alive
        port = stack.state.ports.get({"api-server": "api"}.get(name, name))
        where = f" on 127.0.0.1:{port}" if port else ""
        print(f"{name}: {'running' if alive else 'DOWN'} (pid {pid}){where}")
    print(f"landing zone: {stack.landing_root}; archive bucket: gs://{stack.state.bucket}")
    return 1 if down else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--no-demo", action="store_true", help="start the stack without running the demo batches")
    args = parser.parse_args(argv)
    if args.action == "start":
        return cli_start(args.run_dir, demo=not args.no_demo)
    return {"stop": cli_stop, "status": cli_status}[args.action](args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
