"""Where the project's `include/` folder (SQL templates, table schema) lives at run time.

Locally and in docker compose it sits next to plugins/. Cloud Composer maps only dags/,
plugins/ and data/ of its bucket, so scripts/deploy_composer.sh puts it under data/include,
mounted at /home/airflow/gcs/data/include. DICOM_INCLUDE_DIR overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

BESIDE_PLUGINS = Path(__file__).resolve().parents[2] / "include"
COMPOSER_DATA = Path("/home/airflow/gcs/data/include")


def include_dir() -> Path:
    override = os.environ.get("DICOM_INCLUDE_DIR")
    if override:
        return Path(override)
    if not BESIDE_PLUGINS.is_dir() and COMPOSER_DATA.is_dir():
        return COMPOSER_DATA
    return BESIDE_PLUGINS
