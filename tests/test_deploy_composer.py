"""scripts/deploy_composer.sh: the gcloud commands it would run, and what it refuses.

gcloud is never called for real: --dry-run must not need it (a recording fake stands in for it and
must see no call), and the real mode runs the recording fake through GCLOUD.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "deploy_composer.sh"
STAGE_RE = re.compile(r"/deploy-composer\.[A-Za-z0-9]{6}")

REQUIRED = {
    "--environment": "dicom-env",
    "--location": "us-central1",
    "--project": "my-project",
    "--bucket": "radiology-archive",
    "--landing-root": "gs://radiology-landing/incoming",
}

FAKE_GCLOUD = """#!{python}
import json, os, sys
from pathlib import Path

# A Composer environment in a JSON file: its custom PyPI packages, changed by the update flags
# the way Composer changes them (--update-pypi-packages-from-file replaces the whole list).
state_path = Path(os.environ["FAKE_GCLOUD_STATE"])
state = json.loads(state_path.read_text()) if state_path.exists() else {{"pypi": {{}}}}
args = sys.argv[1:]
call = {{"argv": args, "files": {{}}, "pypi": None}}
for arg in args:
    if arg.startswith("--source="):
        source = Path(arg.split("=", 1)[1])
        call["files"][source.name] = sorted(
            str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()
        ) if source.is_dir() else [source.name]
    if arg.startswith("--update-pypi-packages-from-file="):
        call["pypi"] = Path(arg.split("=", 1)[1]).read_text()
        state["pypi"] = {{}}
        for line in call["pypi"].split():
            name = line.split("=")[0].split("<")[0].split(">")[0]
            state["pypi"][name] = line[len(name):]
    if arg.startswith("--update-pypi-package="):
        spec = arg.split("=", 1)[1]
        name = spec.split("=")[0].split("<")[0].split(">")[0].split("[")[0]
        state["pypi"][name] = spec[len(name):]
    if arg == "--clear-pypi-packages":
        state["pypi"] = {{}}
    if arg.startswith("--remove-pypi-packages="):
        for name in arg.split("=", 1)[1].split(","):
            state["pypi"].pop(name, None)
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(call) + "\\n")
state_path.write_text(json.dumps(state))
if args[:3] == ["composer", "environments", "describe"]:
    # As gcloud's flattened format prints them (checked with SDK 528.0.0's printer): a document
    # separator, keys padded so that the values line up, an empty value as blanks.
    lines = [("dag_gcs_prefix", "gs://us-central1-dicom-env-bucket/dags")] + [
        ("config.softwareConfig.pypiPackages." + name, value) for name, value in sorted(state["pypi"].items())
    ]
    width = max(len(key) for key, _ in lines) + 2
    print("---")
    for key, value in lines:
        print((key + ":").ljust(width) + value)
"""
OTHER_TEAMS = {
    "zope.interface": "==6.4",
    "pandas": ">=2.0",
    "scikit-learn": "==1.5.2",
    "apache-airflow-providers-slack": "",
    "great_expectations": "[sql]==1.2",
}
DESCRIBE_FORMAT = "--format=flattened(config.dagGcsPrefix,config.softwareConfig.pypiPackages)"


def _requirements(requirements_in: Path) -> dict[str, Requirement]:
    """requirements.in as read independently of the script: canonical name -> requirement."""
    found = {}
    for line in requirements_in.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            found[canonicalize_name(req.name)] = req
    return found


def _plan(stderr: str) -> dict[str, list[str]]:
    """The script's plan of PyPI packages (`#   set   pydicom==3.0.2 ...`), by verb."""
    plan: dict[str, list[str]] = {"set": [], "keep": [], "skip": [], "leave": []}
    for line in stderr.splitlines():
        if line.startswith("#   "):
            verb, requirement = line.split()[1:3]
            plan[verb].append(requirement)
    return plan


@pytest.fixture
def source_root(tmp_path: Path) -> Path:
    """A small tree shaped like the repository, with bytecode that must not be deployed."""
    root = tmp_path / "src"
    files = {
        "dags/dicom_storage.py": "# the DAG\n",
        "dags/.airflowignore": "helpers/\n",
        "dags/__pycache__/dicom_storage.cpython-311.pyc": "bytecode",
        "plugins/dicom_archive/__init__.py": "",
        "plugins/dicom_archive/naming.py": "",
        "plugins/dicom_archive/__pycache__/naming.cpython-311.pyc": "bytecode",
        "plugins/operators/__init__.py": "",
        "plugins/operators/archive.py": "",
        "include/sql/batch_summary.sql": "SELECT 1\n",
        "include/schemas/dicom.json": "[]\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "requirements.in").write_text((REPO_ROOT / "requirements.in").read_text())
    return root


@pytest.fixture
def fake_gcloud(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "gcloud"
    path.parent.mkdir()
    path.write_text(FAKE_GCLOUD.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture
def gcloud_log(tmp_path: Path) -> Path:
    return tmp_path / "gcloud-calls.jsonl"


@pytest.fixture
def environment_state(tmp_path: Path) -> Path:
    """The fake environment's state; absent: no custom PyPI package."""
    return tmp_path / "environment.json"


def _set_packages(state: Path, packages: dict[str, str]) -> None:
    state.write_text(json.dumps({"pypi": packages}))


def _packages(state: Path) -> dict[str, str]:
    return json.loads(state.read_text())["pypi"]


@pytest.fixture
def run(tmp_path: Path, fake_gcloud: Path, gcloud_log: Path, environment_state: Path):
    """Run the script in a clean environment (no COMPOSER_* or settings from the caller's shell)."""
    (tmp_path / "tmp").mkdir()

    def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "TMPDIR": str(tmp_path / "tmp"),
            "GCLOUD": str(fake_gcloud),
            "FAKE_GCLOUD_LOG": str(gcloud_log),
            "FAKE_GCLOUD_STATE": str(environment_state),
        }
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return _run


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _normalized(argv: list[str]) -> list[str]:
    return [STAGE_RE.sub("/<stage>", arg) for arg in argv]


def _dry_run_commands(stdout: str) -> list[list[str]]:
    return [_normalized(shlex.split(line)) for line in stdout.splitlines()]


def _required_args() -> list[str]:
    return [part for option, value in REQUIRED.items() for part in (option, value)]


def _expected_commands(gcloud: str, env_variables: str, packages: list[str]) -> list[list[str]]:
    """What a deploy to an environment without any custom package runs."""
    target = ["--location=us-central1", "--project=my-project"]
    environment = ["--environment=dicom-env", *target]
    storage = [gcloud, "composer", "environments", "storage"]
    ours = [f"--update-pypi-package={r}" for r in packages]
    return [
        [gcloud, "composer", "environments", "describe", "dicom-env", *target, DESCRIBE_FORMAT],
        [gcloud, "composer", "environments", "update", "dicom-env", *target, *ours],
        [gcloud, "composer", "environments", "update", "dicom-env", *target,
         f"--update-env-variables={env_variables}"],
        [*storage, "data", "import", *environment, "--source=/tmp/<stage>/include"],
        [*storage, "plugins", "import", *environment, "--source=/tmp/<stage>/plugins/dicom_archive"],
        [*storage, "plugins", "import", *environment, "--source=/tmp/<stage>/plugins/operators"],
        [*storage, "dags", "import", *environment, "--source=/tmp/<stage>/dags/.airflowignore"],
        [*storage, "dags", "import", *environment, "--source=/tmp/<stage>/dags/dicom_storage.py"],
    ]  # fmt: skip


def _with_stage_dir(commands: list[list[str]], tmpdir: Path) -> list[list[str]]:
    return [[arg.replace("/tmp/<stage>", f"{tmpdir}/<stage>") for arg in argv] for argv in commands]


def test_dry_run_prints_the_gcloud_commands_and_only_reads(run, source_root, fake_gcloud, gcloud_log, tmp_path):
    result = run("--dry-run", *_required_args(), "--collection", "IRB41449", "--source-root", str(source_root))

    assert result.returncode == 0, result.stderr
    env_variables = (
        "SEND_TO_GOOGLE=true,GOOGLE_CLOUD_STORAGE=radiology-archive,GOOGLE_PROJECT_NAME=my-project,"
        "GOOGLE_STORAGE_COLLECTION=IRB41449,DICOM_LANDING_ROOT=gs://radiology-landing/incoming"
    )
    packages = _plan(result.stderr)["set"]
    assert packages  # what the imports need: test_every_package_the_deployed_code_imports_...
    expected = _with_stage_dir(_expected_commands(str(fake_gcloud), env_variables, packages), tmp_path / "tmp")
    assert _dry_run_commands(result.stdout) == expected
    # Printed, not run: the only call is the read-only describe, to list the packages.
    assert [_normalized(["gcloud", *c["argv"]])[1:] for c in _calls(gcloud_log)] == [expected[0][1:]]
    assert not list((tmp_path / "tmp").iterdir()), "the staging copy must be removed on exit"


def test_dry_run_does_not_need_gcloud(run, source_root, tmp_path):
    """PATH holds only the basic tools the script uses: no gcloud anywhere."""
    shim = tmp_path / "path-without-gcloud"
    shim.mkdir()
    for tool in ("bash", "cat", "cp", "dirname", "find", "grep", "mktemp", "rm", "sed"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True, check=True)
        (shim / tool).symlink_to(found.stdout.strip())

    result = run(
        "--dry-run", *_required_args(), "--source-root", str(source_root),
        env={"GCLOUD": "gcloud", "PATH": str(shim)},
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("gcloud composer environments describe dicom-env ")
    assert len(result.stdout.splitlines()) == 8
    assert "not read (no gcloud or no access)" in result.stderr
    assert "whatever else is installed stays as it is" in result.stderr


def test_real_run_executes_exactly_the_dry_run_commands(run, source_root, gcloud_log):
    args = [*_required_args(), "--source-root", str(source_root), "--set-env", "DICOM_BIGQUERY_LOCATION=US"]
    dry = run("--dry-run", *args)
    real = run(*args)

    assert dry.returncode == 0, dry.stderr
    assert real.returncode == 0, real.stderr
    calls = _calls(gcloud_log)[1:]  # the first is the dry run's read-only describe
    assert [_normalized(["gcloud", *call["argv"]])[1:] for call in calls] == [
        argv[1:] for argv in _dry_run_commands(dry.stdout)
    ]
    assert "GOOGLE_STORAGE_COLLECTION" not in " ".join(calls[2]["argv"])  # not given: not set
    assert calls[2]["argv"][-1].endswith(",DICOM_BIGQUERY_LOCATION=US")

    uploaded = {name: files for call in calls for name, files in call["files"].items()}
    assert uploaded == {
        "include": ["schemas/dicom.json", "sql/batch_summary.sql"],
        "dicom_archive": ["__init__.py", "naming.py"],  # no __pycache__
        "operators": ["__init__.py", "archive.py"],
        ".airflowignore": [".airflowignore"],
        "dicom_storage.py": ["dicom_storage.py"],
    }
    packages = _plan(dry.stderr)["set"]
    assert calls[1]["argv"][-len(packages) :] == [f"--update-pypi-package={r}" for r in packages]


def test_only_what_the_composer_image_lacks_is_set(run, source_root, gcloud_log, environment_state):
    (source_root / "requirements.in").write_text(
        "# top-level pins\n"
        "apache-airflow==3.3.2\n"
        "apache-airflow-providers-google==22.8.0\n"
        "pydicom == 3.0.2   # DICOM\n"
        "google-cloud-storage>=3.0\n"
        "Some_New.Package>=1.2\n"
        "isal==1.9.1\n"
    )
    result = run(*_required_args(), "--source-root", str(source_root))

    assert result.returncode == 0, result.stderr
    (update,) = [call for call in _calls(gcloud_log) if "--update-pypi-package" in " ".join(call["argv"])]
    assert [a for a in update["argv"] if a.startswith("--update-pypi")] == [
        "--update-pypi-package=pydicom==3.0.2",
        "--update-pypi-package=some-new-package>=1.2",
        "--update-pypi-package=isal==1.9.1",
    ]
    assert _packages(environment_state) == {"pydicom": "==3.0.2", "some-new-package": ">=1.2", "isal": "==1.9.1"}
    assert _plan(result.stderr)["skip"] == [
        "apache-airflow==3.3.2",
        "apache-airflow-providers-google==22.8.0",
        "google-cloud-storage>=3.0",
    ]


@pytest.mark.parametrize(
    ("requirements", "message"),
    [
        ("pydicom==3.0.2\nPyDicom>=3\n", "names pydicom more than once"),
        ("-r other.txt\n", "cannot deploy '-rother.txt'"),
        ("apache-airflow==3.3.2\n", "names no package that Composer's image lacks"),
    ],
)
def test_refuses_requirements_it_cannot_deploy(requirements, message, run, source_root, gcloud_log):
    (source_root / "requirements.in").write_text(requirements)
    result = run("--dry-run", *_required_args(), "--source-root", str(source_root))
    assert result.returncode == 1
    assert message in result.stderr
    assert _calls(gcloud_log) == []


def _imported_distributions(folders: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> the installed distributions that provide it, for every module that
    the files import (inside functions too) and that is neither the standard library nor ours."""
    ours = {p.name for p in (REPO_ROOT / "plugins").iterdir()} | {p.stem for p in (REPO_ROOT / "plugins").rglob("*.py")}
    modules: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    return {
        module: {canonicalize_name(d) for d in providers.get(module, [])}
        for module in modules - set(sys.stdlib_module_names) - ours - {"__future__"}
    }


def _with_dependencies(names: set[str]) -> set[str]:
    """The distributions and everything they need (installed metadata; extras not taken)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_every_package_the_deployed_code_imports_is_set_or_in_the_composer_image(run, source_root):
    """What the DAGs and plugins import (DICOM_DEID_PROFILE=basic's dicom-anonymizer included)
    is installed by the deploy or comes with a package of the Composer image; nothing the image
    has is installed again, and every package of requirements.in is one or the other, with the
    specifier requirements.in gives it."""
    result = run("--dry-run", *_required_args(), "--source-root", str(source_root))
    assert result.returncode == 0, result.stderr
    plan = _plan(result.stderr)
    installed = {canonicalize_name(Requirement(r).name): r for r in plan["set"]}
    image = {canonicalize_name(Requirement(r).name) for r in plan["skip"]}
    in_image = _with_dependencies(image)

    imports = _imported_distributions([REPO_ROOT / "plugins", REPO_ROOT / "dags"])
    assert "dicomanonymizer" in imports  # the scan sees imports inside functions
    assert "pydicom" in imports
    missing = {m: d for m, d in imports.items() if not d & (set(installed) | in_image)}
    assert missing == {}
    assert not set(installed) & in_image, "a package the Composer image has must not be installed again"

    requirements = _requirements(REPO_ROOT / "requirements.in")
    assert set(installed) | image == set(requirements)
    for name, requirement in installed.items():
        assert Requirement(requirement) == Requirement(str(requirements[name])), name


def _no_removal(calls: list[dict]) -> None:
    for call in calls:
        for arg in call["argv"]:
            assert not arg.startswith(("--update-pypi-packages-from-file", "--remove-pypi-packages")), arg
            assert arg != "--clear-pypi-packages"


def test_packages_of_other_teams_survive_a_deploy(run, source_root, gcloud_log, environment_state):
    """A shared environment: other teams' packages, one of ours outdated, one already right."""
    first = run("--dry-run", *_required_args(), "--source-root", str(source_root))
    assert first.returncode == 0, first.stderr
    requirements = _plan(first.stderr)["set"]
    assert len(requirements) >= 2
    names = [canonicalize_name(Requirement(r).name) for r in requirements]
    ours = {name: r[len(name) :] for name, r in zip(names, requirements, strict=True)}
    outdated, current = names[0], names[1]
    _set_packages(environment_state, {**OTHER_TEAMS, outdated: "==0.0.1", current: ours[current]})

    dry = run("--dry-run", *_required_args(), "--source-root", str(source_root))
    assert dry.returncode == 0, dry.stderr
    assert _packages(environment_state) == {**OTHER_TEAMS, outdated: "==0.0.1", current: ours[current]}
    # Before anything changes: what it sets, what it keeps, and the packages it leaves alone.
    plan = [line for line in dry.stderr.splitlines() if line.startswith("#   ") and " skip " not in line]
    assert plan == [
        f"#   set   {outdated}{ours[outdated]} (now {outdated}==0.0.1)",
        f"#   keep  {current}{ours[current]} (already set)",
        *(f"#   set   {name}{ours[name]} (new)" for name in names[2:]),
        "#   leave apache-airflow-providers-slack (not ours)",
        "#   leave great_expectations[sql]==1.2 (not ours)",
        "#   leave pandas>=2.0 (not ours)",
        "#   leave scikit-learn==1.5.2 (not ours)",
        "#   leave zope.interface==6.4 (not ours)",
    ]

    gcloud_log.unlink()
    real = run(*_required_args(), "--source-root", str(source_root))
    assert real.returncode == 0, real.stderr
    calls = _calls(gcloud_log)
    _no_removal(calls)
    updates = [a for call in calls for a in call["argv"] if a.startswith("--update-pypi-package=")]
    assert updates == [f"--update-pypi-package={name}{ours[name]}" for name in names if name != current]
    # Every other team's package is still there, unchanged; ours are set.
    assert _packages(environment_state) == {**OTHER_TEAMS, **ours}

    # Deploying again changes no package: no environment update for PyPI at all.
    gcloud_log.unlink()
    again = run(*_required_args(), "--source-root", str(source_root))
    assert again.returncode == 0, again.stderr
    assert not [c for c in _calls(gcloud_log) if any(a.startswith("--update-pypi") for a in c["argv"])]
    assert "every package of ours is already set: no PyPI update" in again.stderr
    assert _packages(environment_state) == {**OTHER_TEAMS, **ours}


def test_the_old_file_update_would_have_removed_them(fake_gcloud, environment_state, gcloud_log, tmp_path):
    """Why the script no longer uses --update-pypi-packages-from-file: the fake environment
    replaces the whole list with the file, as Composer does."""
    _set_packages(environment_state, dict(OTHER_TEAMS))
    requirements = tmp_path / "ours.txt"
    requirements.write_text("pydicom==3.0.2\n")
    env = {**os.environ, "FAKE_GCLOUD_STATE": str(environment_state), "FAKE_GCLOUD_LOG": str(gcloud_log)}
    subprocess.run(
        [str(fake_gcloud), "composer", "environments", "update", "dicom-env",
         f"--update-pypi-packages-from-file={requirements}"],
        env=env, check=True,
    )  # fmt: skip
    assert _packages(environment_state) == {"pydicom": "==3.0.2"}


def test_layout_of_this_repository_is_deployed_entry_by_entry(run, tmp_path):
    """plugins/ and include/ as they are in the repository; dags/ stubbed (it may still be empty)."""
    root = tmp_path / "repo"
    (root / "dags").mkdir(parents=True)
    for folder in ("plugins", "include"):
        subprocess.run(["cp", "-R", str(REPO_ROOT / folder), str(root / folder)], check=True)
    (root / "dags" / "dicom_storage.py").write_text("")
    (root / "requirements.in").write_text((REPO_ROOT / "requirements.in").read_text())

    result = run("--dry-run", *_required_args(), "--source-root", str(root))

    assert result.returncode == 0, result.stderr
    commands = _dry_run_commands(result.stdout)
    sources = {argv[4]: [] for argv in commands if argv[3] == "storage"}
    for argv in commands:
        if argv[3] == "storage":
            sources[argv[4]].append(argv[-1].rsplit("/", 1)[1])
    plugin_entries = sorted(p.name for p in (REPO_ROOT / "plugins").iterdir() if p.name != "__pycache__")
    assert sources == {"data": ["include"], "plugins": plugin_entries, "dags": ["dicom_storage.py"]}


def test_skip_flags_leave_out_the_environment_updates(run, source_root):
    result = run(
        "--dry-run", *_required_args(), "--source-root", str(source_root), "--skip-pypi-update", "--skip-env-update"
    )
    assert result.returncode == 0, result.stderr
    assert not any(argv[3] == "update" for argv in _dry_run_commands(result.stdout))


def test_settings_from_environment_variables(run, source_root):
    env = {"COMPOSER_ENVIRONMENT": "dicom-env", "COMPOSER_LOCATION": "us-central1", "COMPOSER_PROJECT": "my-project"}
    result = run(
        "--dry-run", "--bucket=radiology-archive", "--landing-root=gs://radiology-landing/incoming",
        "--bigquery-project=bq-project", "--source-root", str(source_root), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = _dry_run_commands(result.stdout)
    assert commands[0][4:7] == ["dicom-env", "--location=us-central1", "--project=my-project"]
    assert "GOOGLE_PROJECT_NAME=bq-project" in commands[2][-1]


def test_refuses_to_run_without_arguments(run, gcloud_log):
    result = run()
    assert result.returncode == 2
    assert "Usage: scripts/deploy_composer.sh" in result.stderr
    for option in REQUIRED:
        assert f"{option} " in result.stderr, option
    assert result.stdout == ""
    assert _calls(gcloud_log) == []


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_refuses_to_run_without_each_required_argument(missing, run, source_root, gcloud_log):
    args = [part for option, value in REQUIRED.items() if option != missing for part in (option, value)]
    for mode in ([], ["--dry-run"]):
        result = run(*mode, *args, "--source-root", str(source_root))
        assert result.returncode == 2, (mode, result.stderr)
        assert f"{missing} " in result.stderr.splitlines()[0], result.stderr
        assert result.stdout == ""
    assert _calls(gcloud_log) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--landing-root", "/work/main/.demo/landing"], "--landing-root must be gs://"),
        (["--bucket", "gs://radiology-archive"], "--bucket must be a bucket name"),
        (["--collection", "IRB1,IRB2"], "cannot contain a comma"),
        (["--set-env", "SEND_TO_GOOGLE=false"], "use the dedicated option"),
        (["--set-env", "NOT A PAIR"], "--set-env takes NAME=VALUE"),
        (["--unknown"], "unknown argument: --unknown"),
        (["--collection"], "--collection needs a value"),
    ],
)
def test_refuses_bad_values(args, message, run, source_root, gcloud_log):
    result = run("--dry-run", "--source-root", str(source_root), *_required_args(), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == ""
    assert _calls(gcloud_log) == []


def test_refuses_a_source_without_a_dag(run, source_root, gcloud_log):
    for path in sorted((source_root / "dags").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    result = run(*_required_args(), "--source-root", str(source_root))
    assert result.returncode == 1
    assert "dags has no files to deploy" in result.stderr
    assert _calls(gcloud_log) == []


def test_real_run_without_gcloud_fails_clearly(run, source_root):
    result = run(*_required_args(), "--source-root", str(source_root), env={"GCLOUD": "/nonexistent/gcloud"})
    assert result.returncode == 1
    assert "gcloud not found" in result.stderr
    assert result.stdout == ""


def test_help(run):
    result = run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: scripts/deploy_composer.sh")
    assert "--dry-run" in result.stdout
