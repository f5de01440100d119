"""The rows the pipeline builds fit the table: the schema's columns, no more, no fewer, whatever the images."""

from __future__ import annotations

import json

import pytest

from dicom_archive.batch import archive_groups
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import plan_batch
from dicom_archive.rows import RunContext
from dicom_archive.settings import ArchiveSettings
from dicom_archive.stores import LocalObjectStore
from tests.conftest import REPO_ROOT
from tools import landing_zone as lz

SCHEMA = json.loads((REPO_ROOT / "include" / "schemas" / "dicom.json").read_text())


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every row of the demo landing zone (CT, MR, US, multi-frame, lookup.json fields...), archived locally."""
    tmp = tmp_path_factory.mktemp("rows")
    zone, store = LocalLandingZone(tmp / "landing"), LocalObjectStore(tmp / "out")
    found = []
    for spec in lz.demo_landing_zone(tmp / "landing"):
        plan = plan_batch(zone, spec.batch_id)
        _, batch_rows = archive_groups(
            plan.groups, zone, store, deid=plan.deid, context=RunContext("rows-test"), settings=ArchiveSettings()
        )
        found.extend(batch_rows)
    return found


def test_every_row_has_exactly_the_schema_columns(rows):
    assert len(rows) > 10
    columns = {field["name"] for field in SCHEMA}
    for row in rows:
        assert set(row) == columns, (set(row) - columns, columns - set(row))


def test_required_columns_are_never_null(rows):
    required = [field["name"] for field in SCHEMA if field["mode"] == "REQUIRED"]
    assert required
    for row in rows:
        assert [name for name in required if row[name] is None] == []


def test_a_local_row_names_no_bucket(rows):
    """SEND_TO_GOOGLE=false: the archive is a local file, its place is storage_uri (file://)."""
    for row in rows:
        assert row["storage_bucket"] is None
        assert row["storage_uri"].startswith("file://")
