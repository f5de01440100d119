"""End to end on a distributed Airflow: CeleryExecutor, PostgreSQL, Redis, two workers with no shared disk.

tools/distributed.py starts the stack (the one `make distributed` starts) on free loopback ports:
PostgreSQL, Redis, the Cloud Storage and BigQuery emulators, the scheduler, dag-processor and
api-server, and two Celery workers, each in a mount namespace where only its own copy of dags/,
plugins/ and include/ exists. The landing zone is gs:// in the Cloud Storage emulator. The Airflow
processes reach Cloud Storage through a fault proxy run by this test.

In order, on one stack (the module's tests depend on each other's runs, as a user's session would):
  1. four batches in two collections, in two concurrent runs: exact objects, rows and reports,
     both workers busy at once, each task's log only on the worker that ran it;
  2. a worker SIGKILLed while an archive task streams its upload: the task is failed for its
     missing heartbeat, retried on the other worker, and the message Celery redelivers later is
     refused; the batch ends complete with no duplicate and no staging left;
  3. a second run of all the batches changes nothing in the bucket or the tables;
  4. stopping the stack leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy, ProxyRequest, Rule
from tests.test_dag import expected_image_count, expected_objects
from tools import distributed, emulators
from tools.landing_zone import BatchSpec, demo_batches, synthetic_batches, write_batch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1800)]

OTHER_COLLECTION = "IRB50001"
VISIBILITY_TIMEOUT = 90  # seconds before Redis hands an unacknowledged task to another worker
HEARTBEAT_TIMEOUT = 30  # seconds without a heartbeat before the scheduler fails a running task
KILL_BATCH = "kill-0001"
KILL_IMAGES = 40  # one study of 40 images of 1 MiB: an archive of several 16 MiB upload chunks


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[distributed.DistributedStack]:
    run_dir = tmp_path_factory.mktemp("distributed")
    stack = distributed.DistributedStack(run_dir)
    proxy = None
    try:
        stack.start_services()
        proxy = FaultProxy(stack.gcs_url).start()
        stack.proxy = proxy  # type: ignore[attr-defined]
        stack.start_airflow(
            workers=2,
            storage_url=proxy.url,
            settings={
                "visibility_timeout": str(VISIBILITY_TIMEOUT),
                "heartbeat_timeout": str(HEARTBEAT_TIMEOUT),
                "task_retries": "2",
                "DICOM_STUDIES_PER_TASK": "1",  # one archive task per study: many tasks to share
            },
        )
        stack.wait_for_dag()
        yield stack
    finally:
        left = stack.stop()
        if proxy is not None:
            proxy.stop()
        stack.left_after_stop = left  # type: ignore[attr-defined]
        assert left == [], f"processes left behind: {left}"


@pytest.fixture(scope="module")
def batches(stack, tmp_path_factory) -> dict[str, BatchSpec]:
    """Four demo batches in two collections and one big single-study batch, in the gs:// landing zone."""
    local = tmp_path_factory.mktemp("landing-source")
    specs = demo_batches(days=2) + demo_batches(days=2, start=date(2024, 2, 5), collection=OTHER_COLLECTION)
    (big,) = synthetic_batches(1, studies=1, images_per_study=KILL_IMAGES, image_kb=1024, kind="ct")
    big.batch_id = KILL_BATCH
    specs.append(big)
    for spec in specs:
        write_batch(local, spec)
    uploaded = stack.upload_batches(local)
    assert sorted(uploaded) == sorted(s.batch_id for s in specs)
    return {s.batch_id: s for s in specs}


def demo_ids(batches: dict[str, BatchSpec]) -> list[str]:
    return sorted(b for b in batches if b != KILL_BATCH)


# --- what the stack holds -------------------------------------------------------------------------


def bucket_objects(stack) -> dict[str, int]:
    with stack.google_env():
        return {b.name: b.generation for b in stack.storage_client().list_blobs(stack.state.bucket)}


def landing_report(stack, batch_id: str) -> dict:
    with stack.google_env():
        blob = (
            stack.storage_client()
            .bucket(stack.state.landing_bucket)
            .blob(f"{stack.state.landing_prefix}/{batch_id}/batch.report.json")
        )
        return json.loads(blob.download_as_bytes())


def table_counts(stack, collection: str) -> tuple[int, int]:
    query = (
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT instance_sha256) AS d FROM `{stack.state.project}.{collection}.dicom`"
    )
    row = next(iter(stack.bigquery_client().query(query).result()))
    return row["n"], row["d"]


def log_file(stack, worker: str, ti: dict) -> Path:
    """Where a task instance's log is on the disk of the worker that ran it."""
    run = Path(stack.node(worker).home) / "logs" / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}"
    folder = run / f"task_id={ti['task_id']}"
    if ti["map_index"] >= 0:
        folder = folder / f"map_index={ti['map_index']}"
    return folder / f"attempt={ti['try_number']}.log"


def interval(ti: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])


# --- 1. concurrency ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_runs(stack, batches) -> list[str]:
    ids = demo_ids(batches)
    # Each run takes one batch of each collection; both runs go at once (max_active_runs=2).
    runs = [stack.trigger(ids[0::2]), stack.trigger(ids[1::2])]
    states = stack.wait_for_runs(runs)
    assert set(states.values()) == {"success"}, states
    return runs


def test_each_node_sees_only_its_own_copy_of_the_code(stack, first_runs):
    nodes = {name: stack.node(name) for name in stack.state.nodes}
    assert set(nodes) == {"control", "worker-1", "worker-2"}
    code = {name: sorted(p.name for p in Path(node.root, "dags").iterdir()) for name, node in nodes.items()}
    assert all("dicom_storage.py" in listing for listing in code.values())
    for process, node_name in [("scheduler", "control"), ("dag-processor", "control"), ("api-server", "control"),
                               ("worker-1", "worker-1"), ("worker-2", "worker-2")]:  # fmt: skip
        pid = stack.state.pids[process]
        own = nodes[node_name]
        assert Path(f"/proc/{pid}/cwd").resolve() == own.home, process
        # The file system as the process sees it (its mount namespace): its own copy of the code,
        # and nothing in the repository's code folders or in any other node's folder.
        seen = Path(f"/proc/{pid}/root")
        for folder in distributed.CODE_FOLDERS:
            assert sorted(os.listdir(f"{seen}{own.root}/{folder}")), (process, folder)
            assert os.listdir(f"{seen}{distributed.REPO_ROOT / folder}") == [], (process, folder)
        for other_name, other in nodes.items():
            if other_name != node_name:
                assert os.listdir(f"{seen}{other.root}") == [], (process, other_name)
        assert distributed.mount_namespace(pid) in stack.state.namespaces


def test_four_batches_in_two_collections_are_exact(stack, batches, first_runs):
    demo = [batches[b] for b in demo_ids(batches)]
    objects = bucket_objects(stack)
    assert {n for n in objects if n.endswith(".tar.gz")} == set().union(*(expected_objects(b) for b in demo))
    assert {n for n in objects if "/Batches/" in n} == {
        f"Collection/{b.collection}/Batches/{b.batch_id}.json" for b in demo
    }
    assert not [n for n in objects if n.startswith("_staging/")], "staging is cleared after each report"
    for collection in ("IRB41449", OTHER_COLLECTION):
        total = sum(expected_image_count(b) for b in demo if b.collection == collection)
        assert total > 0
        assert table_counts(stack, collection) == (total, total), collection
    for batch in demo:
        report = landing_report(stack, batch.batch_id)
        assert report["status"] == "DONE"
        assert report["collection"] == batch.collection
        assert report["images"]["seen"] == len(batch.images)
        assert report["images"]["archived"] == expected_image_count(batch)
        assert report["images"]["quarantined"] == len(batch.images) - expected_image_count(batch)
        assert report["archives"]["total"] == report["archives"]["written"] == len(expected_objects(batch))
        assert report["bigquery"]["rows_in_batch"] == report["bigquery"]["rows_inserted"] == expected_image_count(batch)


def asset_race_failures(stack) -> set[str]:
    """Task instances the api-server set to failed because two tasks created the same new asset at once.

    An Airflow 3.3.2 race, seen here on PostgreSQL and never on SQLite (one writer at a time): the
    first events of a new asset, given through an asset alias by two tasks finishing together, both
    insert the asset row; the loser's state update fails on the unique index, and the api-server
    sets that task instance to failed, after its work was done (see docs/reliability.md)."""
    lines = stack.log_path("api-server").read_text(errors="replace").splitlines()
    raced = set()
    for n, line in enumerate(lines):
        if "Error updating Task Instance state. Setting the task to failed." not in line:
            continue
        if not any("idx_asset_name_uri_unique" in later for later in lines[n : n + 60]):
            continue
        correlation = re.search(r"correlation_id=(\S+)", line).group(1)
        for other in lines[n:]:
            if f"correlation_id={correlation}" in other and "new_state=failed" in other:
                raced.add(re.search(r"ti_id=(\S+)", other).group(1))
    return raced


def test_both_workers_were_busy_and_each_log_is_on_the_worker_that_ran_the_task(stack, first_runs):
    tis = [ti for run in first_runs for ti in stack.task_instances(run)]
    # Every task succeeded, except those that lost the asset race above: their work was done (the
    # objects, rows and reports are exact, see the test before) and only their state says failed.
    raced = asset_race_failures(stack)
    failed = [
        (t["task_id"], t["map_index"], t["hostname"]) for t in tis if t["state"] != "success" and t["id"] not in raced
    ]
    assert failed == [], f"{failed}; logs under {stack.run_dir}"
    for ti in tis:
        if ti["id"] in raced:
            assert (ti["state"], ti["task_id"]) in {("failed", "archive_studies"), ("failed", "load_metadata")}, ti
    workers = {"worker-1", "worker-2"}
    assert {ti["hostname"] for ti in tis} == workers
    archive = [ti for ti in tis if ti["task_id"] == "archive_studies"]
    assert len(archive) >= 12
    assert {ti["hostname"] for ti in archive} == workers
    # Busy at the same time: some tasks of one worker ran while tasks of the other were running.
    overlapping = [
        (a, b)
        for a in tis
        for b in tis
        if a["hostname"] == "worker-1" and b["hostname"] == "worker-2"
        and interval(a)[0] < interval(b)[1] and interval(b)[0] < interval(a)[1]
    ]  # fmt: skip
    assert overlapping, "the two workers never ran tasks at the same time"
    # Consecutive tasks of one run on different machines, handing over through the bucket only.
    for run in first_runs:
        hosts = {ti["task_id"]: set() for ti in tis}
        for ti in tis:
            if ti["dag_run_id"] == run:
                hosts[ti["task_id"]].add(ti["hostname"])
        assert hosts["plan_batches"] | hosts["archive_studies"] | hosts["batch_report"] == workers, run
    for ti in tis:
        ran, other = ti["hostname"], (workers - {ti["hostname"]}).pop()
        assert log_file(stack, ran, ti).is_file(), ti
        assert not log_file(stack, other, ti).exists(), ti
        text = log_file(stack, ran, ti).read_text()
        assert ti["id"] in text
        # The worker parsed the DAG from its own copy (the dag-processor's path means nothing there).
        assert f"Filling up the DagBag from {stack.node(ran).root}/dags/dicom_storage.py" in text, ti


# --- 2. a worker killed mid-upload -----------------------------------------------------------------


def _archive_ti(stack, run_id: str) -> dict:
    (ti,) = [ti for ti in stack.task_instances(run_id) if ti["task_id"] == "archive_studies"]
    return ti


def _celery_task_ids(log_text: str, run_id: str, task_id: str) -> set[str]:
    """Celery ids of the workloads of a task in a run, from a worker's log."""
    found = set()
    for line in log_text.splitlines():
        if "Executing workload in Celery" in line and f"task_id='{task_id}'" in line and f"run_id='{run_id}'" in line:
            match = re.search(r"\[([0-9a-f-]{36})\] Executing workload", line)
            if match:
                found.add(match.group(1))
    return found


def _worker_logs(stack) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((stack.run_dir / "logs").glob("worker-*.log")))


@pytest.fixture(scope="module")
def killed_run(stack, batches, first_runs) -> dict:
    proxy: FaultProxy = stack.proxy
    uploading, killed = threading.Event(), threading.Event()

    held: list[str] = []

    def hold_the_first_chunk(request: ProxyRequest) -> None:
        # The archive's first 16 MiB chunk: the task is streaming its upload. Hold it until the
        # worker is dead, then drop it, as the network of a dead machine would. Later chunks (the
        # retry's) pass.
        if held:
            return
        held.append(request.target)
        uploading.set()
        killed.wait(120)
        raise RuntimeError("the worker that sent this chunk was killed")

    rule = proxy.add(Rule(method="PUT", query="upload_id", before=hold_the_first_chunk, times=1, name="kill"))
    run_id = stack.trigger([KILL_BATCH])
    try:
        assert uploading.wait(300), "the archive upload never started"
        ti = _archive_ti(stack, run_id)
        assert ti["state"] == "running", ti
        victim = ti["hostname"]
        tree = stack.kill_worker(victim)
        killed_at = time.monotonic()
        assert distributed._wait_gone(tree, 10) == [], "every process of the killed worker is gone"
    finally:
        killed.set()
    deadline = time.monotonic() + 30
    while not proxy.errors and time.monotonic() < deadline:
        time.sleep(0.5)
    proxy.clear()
    assert len(held) == 1
    assert [type(err) for err in proxy.errors] == [RuntimeError], "the held chunk was dropped"
    assert rule.seen >= 1
    states = stack.wait_for_runs([run_id], timeout=600)
    return {"run_id": run_id, "victim": victim, "killed_at": killed_at, "state": states[run_id], "tree": tree}


def test_a_worker_killed_mid_upload_then_retry_and_redelivery_leave_the_batch_complete(stack, batches, killed_run):
    run_id, victim = killed_run["run_id"], killed_run["victim"]
    survivor = ({"worker-1", "worker-2"} - {victim}).pop()
    assert killed_run["state"] == "success"

    # The task was failed for its missing heartbeat and retried on the other worker.
    ti = _archive_ti(stack, run_id)
    assert ti["state"] == "success"
    assert ti["try_number"] == 2
    assert ti["hostname"] == survivor
    tries = stack.request(
        "GET", f"/api/v2/dags/{distributed.DAG_ID}/dagRuns/{run_id}/taskInstances/archive_studies/0/tries"
    )["task_instances"]
    first = next(t for t in tries if t["try_number"] == 1)
    assert first["hostname"] == victim
    assert first["state"] in ("failed", "up_for_retry")
    assert log_file(stack, victim, first).is_file(), "the first try's log stays on the dead worker's disk"

    # Celery redelivers the dead worker's unacknowledged message after the visibility timeout; the
    # execution API refuses it (that try is over), so it changes nothing.
    celery_ids = _celery_task_ids(stack.log_path(victim).read_text(errors="replace"), run_id, "archive_studies")
    assert len(celery_ids) == 1, celery_ids
    (celery_id,) = celery_ids
    deadline = killed_run["killed_at"] + VISIBILITY_TIMEOUT + 120
    while time.monotonic() < deadline:
        if _worker_logs(stack).count(f"execute_workload[{celery_id}] received") >= 2:
            break
        time.sleep(3)
    else:
        pytest.fail(f"Celery did not redeliver {celery_id} within the visibility timeout")
    time.sleep(15)  # let the redelivered message be refused and its failure reach the scheduler
    after = _archive_ti(stack, run_id)
    assert (after["state"], after["try_number"], after["hostname"]) == ("success", 2, survivor)
    assert stack.request("GET", f"/api/v2/dags/{distributed.DAG_ID}/dagRuns/{run_id}")["state"] == "success"

    # Same objects as an undisturbed run, no duplicate row, no staging left, a correct report.
    big = batches[KILL_BATCH]
    objects = bucket_objects(stack)
    assert {n for n in objects if "/Entity/" in n and f"_{big.images[0].item_id}." in n} == expected_objects(big)
    assert not [n for n in objects if n.startswith("_staging/")]
    demo_total = sum(expected_image_count(batches[b]) for b in demo_ids(batches) if batches[b].collection == "IRB41449")
    assert table_counts(stack, "IRB41449") == (demo_total + KILL_IMAGES,) * 2
    report = landing_report(stack, KILL_BATCH)
    assert report["status"] == "DONE"
    assert report["images"] == {"seen": KILL_IMAGES, "archived": KILL_IMAGES, "quarantined": 0,
                                "quarantined_by_reason": {}, "stripped": 0, "private_elements_removed": 0}  # fmt: skip
    assert report["archives"]["total"] == report["archives"]["written"] == 1
    assert report["archives"]["bytes"] > 16 * 2**20, "the upload had more than one chunk"
    assert report["bigquery"]["rows_inserted"] == KILL_IMAGES


# --- 3. idempotency on PostgreSQL ----------------------------------------------------------------


def test_a_second_run_of_the_same_batches_changes_nothing(stack, batches, killed_run):
    victim = killed_run["victim"]
    stack.start_worker(victim)  # the dead machine comes back (same disk)
    stack.wait_worker_ready(victim)
    before = bucket_objects(stack)
    counts = {c: table_counts(stack, c) for c in ("IRB41449", OTHER_COLLECTION)}

    ids = sorted(batches)
    run_id = stack.trigger(ids)
    assert stack.wait_for_runs([run_id]) == {run_id: "success"}

    assert bucket_objects(stack) == before, "no new object, no new generation, reports included"
    assert {c: table_counts(stack, c) for c in counts} == counts
    for batch_id in ids:
        report = landing_report(stack, batch_id)
        assert report["archives"]["written"] == 0
        assert report["archives"]["already_present"] == report["archives"]["total"] > 0
        assert report["bigquery"]["rows_inserted"] == 0
    tis = stack.task_instances(run_id)
    assert {ti["state"] for ti in tis} == {"success"}, "the collections' assets exist by now: no race"
    assert {ti["hostname"] for ti in tis} <= {"worker-1", "worker-2"}


# --- 4. nothing left behind ----------------------------------------------------------------------


def test_stop_leaves_no_process_behind(tmp_path):
    """A stack of its own (services only, quick): every process it started is gone after stop()."""
    stack = distributed.DistributedStack(tmp_path / "run")
    try:
        stack.start_services()
        pids = dict(stack.state.pids)
        assert set(pids) >= {"postgres", "redis", "gcs", "bigquery"}
        assert all(emulators.is_alive(pid) for pid in pids.values())
        # The marker variable finds what does not rewrite its process title (PostgreSQL does: pg_ctl
        # stops it); the emulators' processes carry it.
        assert {pids["gcs"], pids["bigquery"]} <= set(distributed._marked_pids(stack.state.stack_id))
        pg_data = stack.state.pg_data
    finally:
        left = stack.stop()
    assert left == []
    assert not any(emulators.is_alive(pid) for pid in pids.values())
    assert distributed._marked_pids(stack.state.stack_id) == []
    assert not Path(pg_data).exists()
    assert not (tmp_path / "run" / "state.json").exists()
