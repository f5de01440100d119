"""Per-task plans: each archive task reads its own chunk plan, never the batch's whole plan.

Domain level, on a local landing zone and the local object store (the DAG-level check through
Cloud Storage requests is tests/test_ledger.py::test_each_archive_task_downloads_its_own_chunk_plan_only).
"""

from __future__ import annotations

import pytest

from dicom_archive.batch import Staging, chunk_id, run_key
from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import BatchPlan, plan_batch
from dicom_archive.stores import LocalObjectStore
from tools.landing_zone import BatchSpec, ImageSpec, write_batch

BATCH_ID = "20240105-0001"
DEID = {"software": "deid 0.4.13", "recipe": "deid.dicom"}


class CountingStore(LocalObjectStore):
    """The local store, remembering which names were read."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read_bytes(self, name: str) -> bytes | None:
        self.reads.append(name)
        return super().read_bytes(name)


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> BatchPlan:
    """Seven studies of one or two images."""
    root = tmp_path_factory.mktemp("landing")
    images = [
        ImageSpec(f"GLp{n:05d}", f"GAp{n:05d}", "20230105", "CT", 1, i) for n in range(7) for i in (1, 2)[: 1 + n % 2]
    ]
    write_batch(root, BatchSpec(BATCH_ID, images=images, collection="IRB41449", deid=DEID))
    planned = plan_batch(LocalLandingZone(root), BATCH_ID)
    assert len(planned.groups) == 7
    return planned


@pytest.mark.parametrize("size", [1, 3, 7, 50])
def test_each_chunk_reference_reads_its_own_studies_only(plan, tmp_path, size):
    store = CountingStore(tmp_path / "store")
    staging = Staging(store, BATCH_ID, run_key("manual__test"))

    refs = staging.stage_plan(plan, size)

    assert [(r["start"], r["stop"]) for r in refs] == [(s, min(s + size, 7)) for s in range(0, 7, size)]
    seen = []
    for ref in refs:
        store.reads.clear()
        chunk = staging.read_chunk_plan(ref)
        assert store.reads == [f"{staging.prefix}plans/{chunk_id(ref['start'])}.json"], "never plan.json"
        assert chunk.chunk_id == chunk_id(ref["start"])
        assert chunk.deid == plan.deid == DEID
        assert [g.to_dict() for g in chunk.groups] == [g.to_dict() for g in plan.groups[ref["start"] : ref["stop"]]]
        seen += [g.stem for g in chunk.groups]
    assert seen == [g.stem for g in plan.groups], "every study in exactly one chunk"
    # The whole plan is staged too, for the report step.
    assert staging.read_plan().to_json() == plan.to_json()


def test_a_reference_without_its_chunk_plan_is_read_from_the_whole_plan(plan, tmp_path):
    """A run planned before chunk plans were staged: its archive tasks still find their studies."""
    store = CountingStore(tmp_path / "store")
    staging = Staging(store, BATCH_ID, run_key("manual__old"))
    refs = staging.stage_plan(plan, 3)
    store.delete(f"{staging.prefix}plans/{chunk_id(3)}.json", None)

    chunk = staging.read_chunk_plan(refs[1])

    assert [g.stem for g in chunk.groups] == [g.stem for g in plan.groups[3:6]]
    assert chunk.deid == plan.deid
    assert store.reads[-1] == staging.plan_name


def test_a_retried_plan_step_restages_and_the_clear_removes_every_chunk_plan(plan, tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    staging = Staging(store, BATCH_ID, run_key("manual__retried"))
    staging.stage_plan(plan, 2)
    refs = staging.stage_plan(plan, 2)  # the retry writes the same names again

    assert sorted(store.list_names(f"{staging.prefix}plans/")) == [
        f"{staging.prefix}plans/{chunk_id(r['start'])}.json" for r in refs
    ]
    staging.clear()
    assert store.list_names(staging.batch_prefix) == []


def test_local_rows_log_passes_over_a_refused_plan_reference(tmp_path, caplog):
    """SEND_TO_GOOGLE=false: collection_summary's log of where the rows went names each batch;
    a refused id (a path) is never turned into a staging name."""
    import logging

    from batches_view.task_outcome import log_local_rows

    store = LocalObjectStore(tmp_path / "output")
    loaded = {"rows_in_batch": 3, "rows_inserted": 3, "table": "x"}
    Staging(store, BATCH_ID, run_key("manual__local")).write_result("bigquery", loaded)
    plan_refs = [
        {"batch_id": "../outside", "run_key": run_key("manual__local"), "status": "REFUSED"},
        {"batch_id": BATCH_ID, "run_key": run_key("manual__local"), "status": "DONE"},
    ]
    with caplog.at_level(logging.INFO):
        log_local_rows(plan_refs, store)
    assert "refused batch id '../outside': nothing read or written" in caplog.text
    assert f"batch {BATCH_ID}: 3 rows in x (3 new)" in caplog.text
    assert not (tmp_path / "output" / "_staging" / "..").resolve().joinpath("outside").exists()
