"""What importing the project's modules does: the settings stay light, and no plugin module hides
a module of the same name.

Each check runs a fresh interpreter, so that what the test process imported before does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

PLUGINS = REPO_ROOT / "plugins"

# Top-level packages that importing the settings must not pull in: the DICOM parser, the gzip
# library, the Google clients (beyond the namespace stubs a .pth file creates at start), Airflow.
HEAVY = ("pydicom", "isal", "google", "google_crc32c", "numpy", "airflow")


def _new_modules(statement: str) -> list[str]:
    """The modules a fresh interpreter (plugins/ on its path) imports for `statement`."""
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"{statement}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(PLUGINS)!r})\n{code}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "statement",
    ["import dicom_archive.settings", "from dicom_archive.settings import ArchiveSettings, Settings"],
)
def test_importing_the_settings_imports_no_heavy_library(statement):
    new = _new_modules(statement)
    assert "dicom_archive.settings" in new  # the check itself works: the module was imported here
    heavy = [name for name in new if name.split(".")[0] in HEAVY]
    assert heavy == []


def test_the_heavy_check_sees_a_heavy_import():
    """The same check on a module that does need pydicom finds it (the check can fail)."""
    new = _new_modules("import dicom_archive.rows")
    assert "pydicom" in new


def test_loading_the_settings_still_checks_keywords_against_the_dicom_dictionary():
    """The keyword check moved behind the import, not away: a typo still fails the settings."""
    from dicom_archive.settings import Settings, SettingsError

    env = {"DICOM_LANDING_ROOT": "/in", "DICOM_LOCAL_OUTPUT": "/out", "DICOM_HEADER_ALLOW_LIST": "Modality,Modalty"}
    with pytest.raises(SettingsError, match="Modalty"):
        Settings.load(env.get)


def _plugin_module_names() -> list[str]:
    return sorted({path.stem for path in PLUGINS.rglob("*.py") if path.name != "__init__.py"})


def test_no_plugin_module_shares_its_name_with_another_module():
    """Airflow's plugin manager imports every .py file under plugins/ as a top-level module of its
    bare name (sys.modules["<stem>"]), so a file named like a standard-library or installed module
    (`deid`, `profile`...) replaces that module for the rest of the process."""
    names = _plugin_module_names()
    assert "settings" in names  # the listing works
    code = (
        "import importlib.util, json\n"
        f"names = {names!r}\n"
        "print(json.dumps({n: importlib.util.find_spec(n).origin for n in names if importlib.util.find_spec(n)}))"
    )
    # -I: neither the working folder nor PYTHONPATH on the path, so plugins/ is not searched.
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(result.stdout) == {}


PLUGIN_LOAD_PROBE = """
import json, sys
from airflow import plugins_manager
plugins_manager.ensure_plugins_loaded()
loaded = sorted(name for name, module in sys.modules.items()
                if str(getattr(module, "__file__", "") or "").startswith(sys.argv[1]) and "." not in name)
import deid.dicom, cProfile, profile
print(json.dumps({"loaded": loaded, "deid": deid.__file__, "profile": profile.__file__,
                  "cProfile_runs": hasattr(profile, "Profile")}))
"""


def test_after_airflow_loads_the_plugins_the_libraries_are_still_theirs():
    """What the plugin manager does in every Airflow component: the PyPI `deid` package (the real
    anonymizer tests run it) and the standard library's `profile` (cProfile) are unharmed."""
    import os

    result = subprocess.run(
        [sys.executable, "-c", PLUGIN_LOAD_PROBE, str(PLUGINS)],
        env={**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS)},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    found = json.loads(result.stdout.splitlines()[-1])
    assert "settings" in found["loaded"]  # the plugins were loaded under their bare names
    assert "/site-packages/deid/" in found["deid"]
    assert not found["profile"].startswith(str(PLUGINS))
    assert found["cProfile_runs"]
