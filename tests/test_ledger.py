"""Which run processes a batch (the ledger), through real Airflow runs against both emulators.

`dag.test()` always creates a *manual* run. For the scheduled and backfill cases, `run_as()`
creates the run the way the scheduler would (run type and the timetable's data interval), then
lets `dag.test()` run it: the sensor, the mapping, the trigger rules and the tasks are real.
The Cloud Storage emulator ignores `ifGenerationMatch`; the fault proxy in front of it enforces
it (tests/faultproxy.py, `gcs_preconditions`), as real Cloud Storage does, so that the claims'
create-only writes answer 412 to a second writer here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest

from tests.conftest import PROJECT, REPO_ROOT, pipeline_settings
from tests.faultproxy import Rule, gcs_preconditions
from tools.landing_zone import BatchSpec, ImageSpec, write_batch

DAG_ID = "dicom_storage"
HOUR = timedelta(hours=1)
T0 = datetime(2024, 3, 1, 10, tzinfo=UTC)  # the start of an hourly interval


@pytest.fixture
def env(tmp_path, gcs_emulator, bigquery_emulator, airflow_db) -> Iterator[dict]:
    with pipeline_settings(tmp_path / "landing", proxies=True, DICOM_RETRY_DELAY_SECONDS="1") as env:
        gcs = env["gcs"]
        gcs.add(gcs_preconditions(gcs, atomic=True))  # claims race: check and write as one step
        yield {**env, "tmp": tmp_path}


_serial = iter(range(1, 1_000_000))


def add_batch(env: dict, batch_id: str, completed_at: datetime, **kwargs) -> BatchSpec:
    n = next(_serial)
    image = ImageSpec(f"GL{n:06d}", f"GA{n:06d}", "20230105", "CT", source="ct")
    spec = BatchSpec(batch_id, images=[image], collection=env["collection"], completed_at=completed_at, **kwargs)
    write_batch(env["root"], spec)
    return spec


def get_dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO_ROOT / "dags")).get_dag(DAG_ID)


def run_as(run_type: str, start: datetime, end: datetime, conf: dict | None = None):
    """One run of `run_type` ("scheduled", "backfill") for the data interval [start, end)."""
    import airflow.models.dagrun as dagrun_module
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType
    from sqlalchemy import select

    def create(*, dag, logical_date, run_after, conf, triggered_by, triggering_user_name, session, **_):
        DagRun = dagrun_module.DagRun
        existing = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.logical_date == start))
        if existing:
            session.delete(existing)
            session.commit()
        kind = DagRunType(run_type)
        return dag.create_dagrun(
            run_id=DagRun.generate_run_id(run_type=kind, logical_date=start, run_after=end),
            logical_date=start,
            data_interval=(start, end),
            run_after=end,
            conf=conf,
            run_type=kind,
            state=DagRunState.RUNNING,
            triggered_by=triggered_by,
            triggering_user_name=triggering_user_name,
            start_date=datetime.now(UTC),
            session=session,
        )

    with mock.patch.object(dagrun_module, "get_or_create_dagrun", create):
        return get_dag().test(logical_date=start, run_conf=conf)


def run_manual(batch_ids: list[str] | None = None, **kwargs):
    return get_dag().test(run_conf=None if batch_ids is None else {"batch_ids": batch_ids}, **kwargs)


def states(dag_run) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for ti in dag_run.get_task_instances():
        found.setdefault(ti.task_id, []).append(str(ti.state))
    return found


def sensor_output(dag_run) -> list[str] | None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = (
            session.query(XComModel.value)
            .filter(
                XComModel.dag_id == DAG_ID,
                XComModel.run_id == dag_run.run_id,
                XComModel.task_id == "wait_for_batches",
                XComModel.key == "return_value",
            )
            .scalar()
        )
    return None if value is None else json.loads(value) if isinstance(value, str) else value


def report(env: dict, batch_id: str) -> dict | None:
    path = env["root"] / batch_id / "batch.report.json"
    return json.loads(path.read_text()) if path.exists() else None


def objects(env: dict) -> dict[str, int]:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    return {b.name: b.generation for b in GCSHook().get_conn().list_blobs(env["bucket"])}


def rows(env: dict) -> tuple[int, int]:
    from hooks.dicom_storage import DicomStorageHook

    client = DicomStorageHook().bigquery_client(PROJECT)
    table = f"`{PROJECT}.{env['collection']}.dicom`"
    row = next(iter(client.query(f"SELECT COUNT(*) AS n, COUNT(DISTINCT instance_sha256) AS d FROM {table}").result()))
    return row["n"], row["d"]


def expire_claim(env: dict, batch_id: str) -> None:
    """Time passing for a dead run's claim: its expiry moves into the past."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    blob = GCSHook().get_conn().bucket(env["bucket"]).blob(f"_claims/{batch_id}.json")
    doc = json.loads(blob.download_as_bytes())
    doc["expires_at"] = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    blob.upload_from_string(json.dumps(doc))


# --- the ledger ------------------------------------------------------------------------------


def test_a_late_batch_is_archived_by_the_next_scheduled_run(env):
    add_batch(env, "on-time", T0 + timedelta(minutes=5))
    first = run_as("scheduled", T0, T0 + HOUR)
    assert str(first.state) == "success"
    assert sensor_output(first) == ["on-time"]

    # Completed in the first interval, but its batch.json landed after that run's poke.
    add_batch(env, "late", T0 + timedelta(minutes=50))
    second = run_as("scheduled", T0 + HOUR, T0 + 2 * HOUR)
    assert str(second.state) == "success"
    assert sensor_output(second) == ["late"], "the ledger: unreported and completed before the interval's end"
    assert report(env, "late")["status"] == "DONE"
    assert rows(env) == (2, 2)


def test_after_scheduler_downtime_the_first_run_archives_every_batch_of_the_gap(env):
    gap = [add_batch(env, f"gap-{i}", T0 + i * HOUR + timedelta(minutes=10)) for i in range(4)]
    future = add_batch(env, "future", T0 + 9 * HOUR)
    # catchup=False: after the downtime the scheduler runs only the latest interval.
    run = run_as("scheduled", T0 + 5 * HOUR, T0 + 6 * HOUR)
    assert str(run.state) == "success"
    assert sensor_output(run) == [b.batch_id for b in gap], "oldest first"
    assert all(report(env, b.batch_id)["status"] == "DONE" for b in gap)
    assert report(env, future.batch_id) is None, "completed after the interval: a later run's"
    assert rows(env) == (4, 4)


def test_a_backfill_reprocesses_exactly_the_batches_of_its_interval(env):
    inside = add_batch(env, "inside", T0 + timedelta(minutes=30))
    before = add_batch(env, "before", T0 - timedelta(minutes=1))
    after = add_batch(env, "after", T0 + HOUR)  # the interval's end is not in it
    assert str(run_manual().state) == "success"  # everything is archived and reported once
    reports = {b.batch_id: report(env, b.batch_id) for b in (inside, before, after)}
    generations = objects(env)

    backfill = run_as("backfill", T0, T0 + HOUR)
    assert str(backfill.state) == "success"
    assert sensor_output(backfill) == ["inside"]
    again = report(env, "inside")
    assert again["run_key"] != reports["inside"]["run_key"], "reprocessed by the backfill"
    assert (again["archives"]["written"], again["bigquery"]["rows_inserted"]) == (0, 0), "a no-op"
    assert report(env, "before") == reports["before"]
    assert report(env, "after") == reports["after"]
    assert objects(env) == generations, "nothing rewritten in the bucket"
    assert rows(env) == (3, 3)


def test_more_batches_than_the_cap_go_over_consecutive_runs_oldest_first(env, monkeypatch):
    monkeypatch.setenv("DICOM_MAX_BATCHES_PER_RUN", "2")
    batches = [add_batch(env, f"capped-{i}", T0 + timedelta(minutes=i)) for i in range(5)]
    taken = []
    for i in range(3):
        run = run_as("scheduled", T0 + (i + 1) * HOUR, T0 + (i + 2) * HOUR)
        assert str(run.state) == "success", states(run)
        taken.append(sensor_output(run))
    assert taken == [["capped-0", "capped-1"], ["capped-2", "capped-3"], ["capped-4"]]
    assert all(report(env, b.batch_id)["status"] == "DONE" for b in batches)
    assert rows(env) == (5, 5)
    last = run_as("scheduled", T0 + 4 * HOUR, T0 + 5 * HOUR)
    assert states(last)["wait_for_batches"] == ["skipped"]


def test_the_cap_never_exceeds_max_map_length(env, monkeypatch):
    monkeypatch.setenv("DICOM_MAX_BATCHES_PER_RUN", "100000")
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "3")
    for i in range(4):
        add_batch(env, f"mapped-{i}", T0 + timedelta(minutes=i))
    run = run_as("scheduled", T0 + HOUR, T0 + 2 * HOUR)
    assert str(run.state) == "success", states(run)
    assert sensor_output(run) == ["mapped-0", "mapped-1", "mapped-2"]
    assert max(len(v) for v in states(run).values()) <= 3


# --- a fair cap: held and failing batches never starve the others -------------------------------


def add_conflicting_batches(env: dict, first: str, again: str, first_at: datetime, again_at: datetime) -> None:
    """`again` re-sends `first`'s study with one more image: other content under the same archive
    name, so it fails (ArchiveConflictError) in every run once `first` is archived."""
    study = ("GLfail01", "GAfail01", "20230105", "CT")
    images = [ImageSpec(*study, source="ct"), ImageSpec(*study, instance_number=2, source="ct")]
    write_batch(env["root"], BatchSpec(first, images=images[:1], collection=env["collection"], completed_at=first_at))
    write_batch(env["root"], BatchSpec(again, images=images, collection=env["collection"], completed_at=again_at))


def archive_store(env: dict):
    from dicom_archive.stores import GCSObjectStore
    from hooks.dicom_storage import DicomStorageHook

    return GCSObjectStore(DicomStorageHook().storage_client().bucket(env["bucket"]))


def test_a_batch_that_always_fails_never_starves_a_newer_one_and_is_still_retried(env, monkeypatch, caplog):
    from dicom_archive import claims

    monkeypatch.setenv("DICOM_MAX_BATCHES_PER_RUN", "1")
    add_conflicting_batches(env, "sent-first", "failing", T0 - HOUR, T0 + timedelta(minutes=5))
    assert str(run_manual(["sent-first"]).state) == "success"
    add_batch(env, "newer", T0 + timedelta(minutes=10))

    taken = []
    for i in range(3):
        run = run_as("scheduled", T0 + (i + 1) * HOUR, T0 + (i + 2) * HOUR)
        taken.append(sensor_output(run))
        assert str(run.state) == ("success" if taken[-1] == ["newer"] else "failed"), states(run)
    # The failing batch is the oldest: the first run takes it; the next takes the newer batch,
    # which has waited since before that attempt; the third retries the failing one.
    assert taken == [["failing"], ["newer"], ["failing"]]
    assert report(env, "newer")["status"] == "DONE"
    assert report(env, "failing") is None, "never reported: it stays pending, never dropped"
    last = claims.holder_of(archive_store(env), "failing")
    assert last.released_at is not None, "given up by the run that failed it"
    assert not last.is_held(datetime.now(UTC)), "so it holds the batch no more"
    assert last.attempts == 2
    assert "claimed for attempt 2; the last one, by run 'scheduled__" in caplog.text

    # A manual run naming it takes it at once (no cap logic for named batches), as attempt 3.
    manual = run_manual(["failing"])
    assert sensor_output(manual) == ["failing"]
    assert str(manual.state) == "failed"
    assert claims.holder_of(archive_store(env), "failing").attempts == 3


@pytest.mark.parametrize("claimed", [1, 2])
def test_batches_held_by_a_live_run_take_no_slot_and_are_taken_once_their_claim_expires(env, monkeypatch, claimed):
    """cap = the number of claimed batches: the run takes as many free batches, never a claimed one."""
    from dicom_archive import claims

    monkeypatch.setenv("DICOM_MAX_BATCHES_PER_RUN", str(claimed))
    held = [add_batch(env, f"held-{i}", T0 + timedelta(minutes=i)).batch_id for i in range(claimed)]
    free = [add_batch(env, f"free-{i}", T0 + timedelta(minutes=10 + i)).batch_id for i in range(claimed)]
    store = archive_store(env)
    for batch_id in held:
        assert claims.acquire(store, batch_id, "scheduled__still_working", timedelta(hours=12)).owned

    run = run_as("scheduled", T0 + HOUR, T0 + 2 * HOUR)
    assert str(run.state) == "success", states(run)
    assert sensor_output(run) == free
    assert all(report(env, b)["status"] == "DONE" for b in free)
    assert all(report(env, b) is None and claims.holder_of(store, b).run_id == "scheduled__still_working" for b in held)

    expire_claim(env, held[0])  # that run died: its claim runs out (DICOM_CLAIM_HOURS)
    run = run_as("scheduled", T0 + 2 * HOUR, T0 + 3 * HOUR)
    assert str(run.state) == "success", states(run)
    assert sensor_output(run) == [held[0]]
    assert report(env, held[0])["status"] == "DONE"
    assert claims.holder_of(store, held[0]) is None, "released after the report"
    if claimed > 1:
        assert claims.holder_of(store, held[1]).run_id == "scheduled__still_working", "still held"


def _zone_and_store(tmp_path, batches: dict[str, datetime]):
    from dicom_archive.landing import LocalLandingZone
    from dicom_archive.stores import LocalObjectStore

    for batch_id, completed_at in batches.items():
        image = ImageSpec(f"GL{batch_id}", f"GA{batch_id}", "20230105")
        write_batch(
            tmp_path / "landing", BatchSpec(batch_id, images=[image], collection="IRB1", completed_at=completed_at)
        )
    return LocalLandingZone(tmp_path / "landing"), LocalObjectStore(tmp_path / "out")


def test_the_cap_counts_only_batches_the_run_can_take(tmp_path):
    from dicom_archive import claims
    from dicom_archive.ledger import select_batches

    zone, store = _zone_and_store(tmp_path, {f"b{i}": T0 + timedelta(minutes=i) for i in range(5)})
    now = T0 + 10 * HOUR
    for batch_id, run_id in (("b0", "other"), ("b1", "other"), ("b3", "this-run")):
        claims.acquire(store, batch_id, run_id, timedelta(hours=12), now=now - HOUR)

    picked = select_batches(zone, end=None, limit=2, store=store, run_id="this-run", now=now)
    assert picked.batch_ids == ["b2", "b4"], "b3's claim is this run's own (a cleared run): takeable, tried"
    assert sorted(picked.held) == ["b0", "b1"]
    assert picked.deferred == ["b3"]
    assert "2 held by another run's claim (left alone, outside the cap)" in picked.describe()
    # Without the store (the version before): the claimed batches fill the cap.
    assert select_batches(zone, end=None, limit=2).batch_ids == ["b0", "b1"]
    # Once the claims expire they are taken again, queued as of their last attempt.
    later = select_batches(zone, end=None, limit=5, store=store, run_id="next-run", now=now + 12 * HOUR)
    assert later.batch_ids == ["b2", "b4", "b0", "b1", "b3"]
    assert not later.held


def test_a_failed_batch_queues_as_of_its_last_attempt_deterministically(tmp_path):
    """Never-tried batches that came before a failed batch's last attempt go first; those that
    came after it go after it: a batch that keeps failing never starves, and is never starved."""
    from dicom_archive import claims
    from dicom_archive.ledger import select_batches

    zone, store = _zone_and_store(
        tmp_path, {"failing": T0, "waiting": T0 + HOUR, "came-later": T0 + 3 * HOUR, "also-failing": T0}
    )
    for batch_id, tried_at in (("failing", T0 + 2 * HOUR), ("also-failing", T0 + 2 * HOUR)):
        assert claims.acquire(store, batch_id, "run-1", timedelta(hours=12), now=tried_at).owned
        assert claims.give_up(store, batch_id, "run-1", now=tried_at + timedelta(minutes=1))
    now = T0 + 4 * HOUR

    picked = select_batches(zone, end=None, limit=9, store=store, run_id="r", now=now)
    assert picked.batch_ids == ["waiting", "also-failing", "failing", "came-later"], "ties: completed_at, then id"
    capped = select_batches(zone, end=None, limit=1, store=store, run_id="r", now=now)
    assert capped.batch_ids == ["waiting"]
    assert capped.deferred == ["also-failing", "failing", "came-later"]
    assert sorted(capped.tried) == ["also-failing", "failing"]
    assert "(attempt 1, claimed 2024-03-01 12:00:00 UTC, left without a report" in capped.tried["failing"]
    # A backfill of the interval orders the same way.
    backfill = select_batches(zone, start=T0, end=T0 + 4 * HOUR, limit=9, store=store, run_id="r", now=now)
    assert backfill.batch_ids == ["waiting", "also-failing", "failing", "came-later"]


def test_a_given_up_claim_keeps_the_attempt_and_no_longer_holds_the_batch(tmp_path):
    import json as json_module

    from dicom_archive import claims
    from dicom_archive.stores import LocalObjectStore

    store = LocalObjectStore(tmp_path)
    ttl = timedelta(hours=12)
    assert claims.acquire(store, "b", "run-1", ttl, now=T0).owned
    assert not claims.give_up(store, "b", "run-2", now=T0), "only the owner gives its claim up"
    assert not claims.acquire(store, "b", "run-2", ttl, now=T0 + HOUR).owned, "still held by run-1"
    assert claims.give_up(store, "b", "run-1", now=T0 + HOUR)
    assert not claims.give_up(store, "b", "run-1", now=T0 + HOUR), "once (a retried report step)"
    given_up = claims.holder_of(store, "b")
    assert (given_up.attempts, given_up.released_at, given_up.is_held(T0 + HOUR)) == (1, T0 + HOUR, False)

    taken = claims.acquire(store, "b", "run-2", ttl, now=T0 + 2 * HOUR)  # at once, not after 12 h
    assert taken.owned
    assert taken.attempts == 2
    assert taken.message.startswith("claimed for attempt 2; the last one, by run 'run-1' (attempt 1,")
    assert claims.acquire(store, "b", "run-2", ttl, now=T0 + 3 * HOUR).attempts == 2, "a retried task renews"
    assert not claims.acquire(store, "b", "run-3", ttl, now=T0 + 3 * HOUR).owned, "one run at a time"
    assert claims.release(store, "b", "run-2")
    assert claims.holder_of(store, "b") is None, "a report ends the history"

    # A claim written by the version before (no attempt count) is one attempt, held until it expires.
    old = {"batch_id": "c", "run_id": "old-run", "claimed_at": T0.isoformat(), "expires_at": (T0 + ttl).isoformat()}
    store.write_bytes(claims.claim_name("c"), json_module.dumps(old).encode(), "application/json")
    assert not claims.acquire(store, "c", "run-2", ttl, now=T0 + HOUR).owned
    assert claims.acquire(store, "c", "run-2", ttl, now=T0 + 13 * HOUR).attempts == 2


def test_an_empty_scheduled_run_ends_skipped_within_one_poke(env):
    add_batch(env, "done-already", T0)
    assert str(run_manual().state) == "success"
    run = run_as("scheduled", T0 + HOUR, T0 + 2 * HOUR)
    assert str(run.state) == "success"
    sensor = next(ti for ti in run.get_task_instances() if ti.task_id == "wait_for_batches")
    assert str(sensor.state) == "skipped"
    assert sensor.try_number == 1, "one poke, no reschedule"
    assert (sensor.end_date - sensor.start_date).total_seconds() < 60


# --- one owner per batch ---------------------------------------------------------------------


def test_a_live_claim_leaves_the_batch_alone_and_an_expired_one_is_taken_over(env, caplog):
    from dicom_archive import claims
    from dicom_archive.stores import GCSObjectStore
    from hooks.dicom_storage import DicomStorageHook

    add_batch(env, "contested", T0)
    store = GCSObjectStore(DicomStorageHook().storage_client().bucket(env["bucket"]))
    assert claims.acquire(store, "contested", "other-run", timedelta(hours=1)).owned

    run = run_manual(["contested"])
    assert str(run.state) == "success"
    assert "left alone: it is claimed by run 'other-run'" in caplog.text  # the plan task's log
    caplog.clear()
    assert report(env, "contested") is None
    assert claims.holder_of(store, "contested").run_id == "other-run"

    expire_claim(env, "contested")
    run = run_manual(["contested"])
    assert str(run.state) == "success"
    assert "took over the expired claim of run 'other-run'" in caplog.text
    assert report(env, "contested")["status"] == "DONE"
    assert claims.holder_of(store, "contested") is None, "released after the report"


def test_two_create_only_claims_at_once_one_owner(env):
    """Through the proxy that enforces ifGenerationMatch like Cloud Storage (the emulator does not)."""
    import threading

    from dicom_archive import claims
    from dicom_archive.stores import GCSObjectStore
    from hooks.dicom_storage import DicomStorageHook

    store = GCSObjectStore(DicomStorageHook().storage_client().bucket(env["bucket"]))
    barrier = threading.Barrier(4)
    outcomes: dict[str, bool] = {}

    def claim(run_id: str) -> None:
        barrier.wait()
        outcomes[run_id] = claims.acquire(store, "raced", run_id, timedelta(hours=1)).owned

    threads = [threading.Thread(target=claim, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(outcomes.values()) == 1, outcomes
    owner = next(run for run, owned in outcomes.items() if owned)
    assert claims.holder_of(store, "raced").run_id == owner


def test_overlapping_runs_on_the_same_batches_one_owner_no_duplicates(env, tmp_path):
    """Two `airflow dags test` processes (two workers) on the same batches at the same time."""
    import os
    import sqlite3
    import subprocess
    import threading
    import time

    batches = [add_batch(env, f"overlap-{i}", T0 + timedelta(minutes=i)) for i in range(2)]
    ids = [b.batch_id for b in batches]
    # The second run's claim attempts (412 from the proxy) happen while the first holds the batches:
    # the first run's archive uploads wait until the second has tried to claim both.
    second_tried = threading.Event()
    claim_attempts: list[str] = []

    def count_or_hold(request) -> None:
        if b'"_claims/' in request.body or "_claims" in request.query:
            claim_attempts.append(request.query)
        elif b'"Collection/' in request.body:  # an archive or a report: wait for the second run
            second_tried.wait(timeout=120)

    # First in the chain: the precondition rule answers a refused claim itself, ending the chain.
    env["gcs"].rules.insert(0, Rule(method="POST", path=r"^/upload/", before=count_or_hold, times=None))
    from airflow import settings

    database = settings.SQL_ALCHEMY_CONN.removeprefix("sqlite:///")
    airflow = str(REPO_ROOT / ".venv" / "bin" / "airflow")
    procs = []
    for n in range(2):
        home = tmp_path / f"airflow-{n}"
        home.mkdir()
        with sqlite3.connect(database) as source, sqlite3.connect(home / "airflow.db") as copy:
            source.backup(copy)  # a consistent copy of the migrated database
        child_env = dict(os.environ, AIRFLOW_HOME=str(home),
                         AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}")  # fmt: skip
        log = open(tmp_path / f"run-{n}.log", "w")  # noqa: SIM115  (closed below)
        procs.append((subprocess.Popen([airflow, "dags", "test", DAG_ID, "--conf", json.dumps({"batch_ids": ids})],
                                       env=child_env, stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
        if n == 0:  # the second run starts once the first owns both batches
            deadline = time.monotonic() + 120
            while len(claim_attempts) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
    deadline = time.monotonic() + 120
    while len(claim_attempts) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    second_tried.set()
    for proc, log in procs:
        proc.wait(timeout=300)
        log.close()
    logs = [(tmp_path / f"run-{n}.log").read_text() for n in range(2)]
    assert all(proc.returncode == 0 for proc, _ in procs), logs[1][-3000:]
    assert len(claim_attempts) == 4, "each run tried to claim each batch once"
    assert logs[1].count("left alone: it is claimed by run") == 2, logs[1][-3000:]
    assert rows(env) == (2, 2), "0 duplicate rows"
    names = set(objects(env))
    assert {n for n in names if "/Batches/" in n} == {f"Collection/{env['collection']}/Batches/{i}.json" for i in ids}
    assert not [n for n in names if n.startswith(("_staging/", "_claims/"))]
    owners = {report(env, i)["run_key"] for i in ids}
    assert len(owners) == 1, "one run reported both batches"


# --- an idempotent report, and the truth after a recovery ------------------------------------


@pytest.mark.parametrize("step", range(6))
def test_batch_report_is_retried_after_each_step_of_a_partial_clear(env, step):
    """Staging of one study: archive summary, chunk plan, rows, load result, plan (last), then
    the claim.
    The delete of step `step` is refused once (rate limited); Airflow retries batch_report, which
    finds the report it published and finishes the clear."""
    from airflow.models import Variable  # noqa: F401  (Airflow configured)

    add_batch(env, "retried", T0)
    # A refusal a retry can mend (a rate limit): the client does not retry a 403, Airflow does.
    slow_down = {"error": {"code": 403, "message": "Rate limit exceeded (injected)",
                           "errors": [{"reason": "rateLimitExceeded", "message": "injected"}]}}  # fmt: skip
    refused = env["gcs"].add(
        Rule(method="DELETE", path=r"/o/(_staging|_claims)", skip=step, times=1, status=403, body=slow_down,
             name="refuse-delete")
    )  # fmt: skip
    with mock.patch.dict("os.environ", {"DICOM_TASK_RETRIES": "1"}):
        run = run_manual(["retried"])
    assert refused.fired == 1
    assert str(run.state) == "success", states(run)
    tries = [ti.try_number for ti in run.get_task_instances() if ti.task_id == "batch_report"]
    assert tries == [2], "failed once, then succeeded on its retry"
    assert report(env, "retried")["status"] == "DONE"
    assert not [n for n in objects(env) if n.startswith(("_staging/", "_claims/"))]


def test_a_report_after_a_crash_recovery_counts_what_the_interrupted_attempt_wrote(env):
    batch = add_batch(env, "recovered", T0)
    # The first attempt dies after the MERGE: its batch_report never runs.
    crashed = run_manual(["recovered"], mark_success_pattern="^batch_report$")
    assert report(env, "recovered") is None
    assert rows(env) == (1, 1)
    written = {n for n in objects(env) if n.endswith(".tar.gz")}
    assert len(written) == 1
    expire_claim(env, "recovered")  # the dead run's claim runs out

    rerun = run_manual(["recovered"], logical_date=datetime.now(UTC) + timedelta(seconds=1))
    assert str(rerun.state) == "success"
    assert rerun.run_id != crashed.run_id
    done = report(env, batch.batch_id)
    assert done["note"] == "completed after an interrupted attempt"
    assert done["archives"]["written"] == 1
    assert done["archives"]["already_present"] == 0
    assert done["bigquery"]["rows_inserted"] == 1
    assert done["recovery"]["archives_written_by_interrupted_attempt"] == 1
    assert done["recovery"]["rows_inserted_by_interrupted_attempt"] == 1
    assert not [n for n in objects(env) if n.startswith(("_staging/", "_claims/"))], "the crashed staging too"


# --- per-task plans ----------------------------------------------------------------------------


def test_each_archive_task_downloads_its_own_chunk_plan_only(env, monkeypatch):
    """Three studies, one per archive task: each task downloads its own chunk plan, once; the
    batch's whole plan is downloaded once, by the report step (and by no archive task)."""
    import urllib.parse

    images = [ImageSpec(f"GLc{n:05d}", f"GAc{n:05d}", "20230105", "CT", source="ct") for n in range(3)]
    spec = BatchSpec("chunked", images=images, collection=env["collection"], completed_at=T0)
    write_batch(env["root"], spec)
    monkeypatch.setenv("DICOM_STUDIES_PER_TASK", "1")

    run = run_manual(["chunked"])

    assert str(run.state) == "success", states(run)
    assert states(run)["archive_studies"] == ["success"] * 3
    assert report(env, "chunked")["archives"]["total"] == 3
    downloads = [
        urllib.parse.unquote(r.path)
        for r in env["gcs"].requests("GET", "/o/_staging", "alt=media")
        if "/o/_staging/chunked/" in urllib.parse.unquote(r.path)
    ]
    staged = [d.split("/o/", 1)[1].split("/", 3)[3] for d in downloads]  # the name under the run's folder
    assert sorted(n for n in staged if n.startswith("plans/")) == [f"plans/{i:07d}.json" for i in range(3)]
    assert staged.count("plan.json") == 1, staged
    assert not [n for n in objects(env) if n.startswith("_staging/")], "chunk plans are cleared with the rest"


# Local mode (SEND_TO_GOOGLE=false) writes batch.report.local.json, never batch.report.json: for
# local runs that report is the ledger too, so a local run takes the next batches instead of
# archiving the same ones again; a run that sends to Google still takes what was only done locally.
@pytest.mark.parametrize("kind", ["local", "gs"])
def test_a_local_report_counts_for_local_runs_only(env, kind):
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from dicom_archive.landing import GCSLandingZone, LocalLandingZone
    from dicom_archive.ledger import select_batches

    spec_root = env["tmp"] / "spec"
    for n, batch_id in enumerate(["sent", "local-only", "both", "new"]):
        image = ImageSpec(f"GL{n:06d}", f"GA{n:06d}", "20230105")
        write_batch(spec_root, BatchSpec(batch_id, images=[image], collection="IRB1"))
    if kind == "local":
        zone = LocalLandingZone(spec_root)
    else:
        zone = GCSLandingZone(GCSHook().get_conn().bucket(env["bucket"]), "landing/zone")
        for folder in spec_root.iterdir():
            zone.write_bytes(folder.name, "batch.json", (folder / "batch.json").read_bytes())
    zone.write_bytes("sent", "batch.report.json", b"{}")
    zone.write_bytes("local-only", "batch.report.local.json", b"{}")
    zone.write_bytes("both", "batch.report.json", b"{}")
    zone.write_bytes("both", "batch.report.local.json", b"{}")

    assert select_batches(zone, end=None, local=True).batch_ids == ["new"]
    assert select_batches(zone, end=None).batch_ids == ["local-only", "new"]  # sending to Google
    assert sorted(select_batches(zone, end=None, local=False).batch_ids) == ["local-only", "new"]
    # A backfill reprocesses its interval, reported or not, in either mode.
    since = datetime(2000, 1, 1, tzinfo=UTC)
    assert len(select_batches(zone, start=since, end=datetime.now(UTC), local=True).batch_ids) == 4


def test_local_runs_over_the_cap_take_the_next_batches_and_a_send_run_still_sends_them(env, monkeypatch):
    monkeypatch.setenv("DICOM_MAX_BATCHES_PER_RUN", "1")
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(env["tmp"] / "out"))
    older = add_batch(env, "local-older", T0)
    newer = add_batch(env, "local-newer", T0 + timedelta(minutes=5))
    taken = []
    for i in range(3):
        run = run_as("scheduled", T0 + (i + 1) * HOUR, T0 + (i + 2) * HOUR)
        assert str(run.state) == "success", states(run)
        taken.append(sensor_output(run))
    assert taken == [[older.batch_id], [newer.batch_id], None]  # the third run: nothing pending
    assert states(run)["wait_for_batches"] == ["skipped"]
    for spec in (older, newer):
        assert (env["root"] / spec.batch_id / "batch.report.local.json").exists()
        assert report(env, spec.batch_id) is None  # never the report of a run that sent it
    assert objects(env) == {}  # nothing left the machine

    monkeypatch.setenv("SEND_TO_GOOGLE", "true")  # a later send-mode run still sends both
    monkeypatch.setenv("DICOM_MAX_BATCHES_PER_RUN", "5")
    run = run_as("scheduled", T0 + 4 * HOUR, T0 + 5 * HOUR)
    assert str(run.state) == "success", states(run)
    assert sorted(sensor_output(run)) == sorted([older.batch_id, newer.batch_id])
    assert report(env, older.batch_id)["status"] == report(env, newer.batch_id)["status"] == "DONE"


@pytest.mark.parametrize(
    ("name", "target"),
    [
        pytest.param("batch.json", "batch.json", id="manifest-loops"),
        pytest.param("batch.json", "notes.txt/batch.json", id="manifest-through-a-file"),
        pytest.param("batch.json", "a/b", id="manifest-through-a-loop-of-folders"),
        pytest.param("batch.report.json", "batch.report.json", id="report-loops"),
    ],
)
@pytest.mark.parametrize("how", ["scheduled", "manual"])
def test_one_batch_folder_that_cannot_be_read_never_stops_the_others(env, name, target, how, capfd):
    """A looping link or a path through a file in one batch folder is that batch's ERROR; the
    sensor and the planning go on, and the good batch beside it is archived and loaded."""
    add_batch(env, "bad", T0 + timedelta(minutes=5))
    add_batch(env, "good", T0 + timedelta(minutes=10))
    folder = env["root"] / "bad"
    (folder / "notes.txt").write_text("a file, not a folder")
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(target)
    moment = (T0 + timedelta(minutes=5)).timestamp()  # an unreadable batch.json: dated by its folder
    os.utime(folder, (moment, moment))

    run = run_as("scheduled", T0, T0 + HOUR) if how == "scheduled" else run_manual(["bad", "good"])
    assert report(env, "good")["status"] == "DONE"
    assert rows(env) == (1, 1)
    assert "success" in states(run)["plan_batches"]
    if how == "scheduled":
        assert sensor_output(run) == ["bad", "good"], "the unreadable batch is taken, to be reported"
        if name == "batch.json":  # the sensor's warning (its task log) says what this run does with it
            captured = capfd.readouterr()  # the task log goes to the console in dag.test()
            logged = (captured.out + captured.err).splitlines()
            warning = next(line for line in logged if "batch bad: its manifest cannot be read" in line)
            assert "; this run takes it (dated by its batch.json's or folder's modification time, " in warning
            assert f"{T0 + timedelta(minutes=5):%Y-%m-%dT%H:%M:%S}" in warning
    bad = report(env, "bad")
    assert bad["status"] == "ERROR"
    assert name in bad["error"]


def test_a_release_that_loses_the_race_leaves_the_claim_and_the_store_says_so(env):
    """Between reading the claim and deleting it, another run replaced it (Cloud Storage answers
    412 to the generation-guarded delete) or deleted it (404): the store reports its own
    ObjectChangedError, and release leaves the claim as the other run left it."""
    from dicom_archive import claims
    from dicom_archive.stores import GCSObjectStore, ObjectChangedError
    from hooks.dicom_storage import DicomStorageHook

    class DeletedMeanwhile(GCSObjectStore):
        def delete(self, name, generation):
            GCSObjectStore.delete(self, name, None)  # the other run's delete comes first
            return super().delete(name, generation)

    bucket = DicomStorageHook().storage_client().bucket(env["bucket"])
    store = GCSObjectStore(bucket)
    assert claims.acquire(store, "lost-race", "run-1", timedelta(hours=1)).owned
    generation = claims.holder_of(store, "lost-race").generation
    replaced = {"error": {"code": 412, "message": "conditionNotMet", "errors": [{"reason": "conditionNotMet"}]}}
    rule = Rule(method="DELETE", path=r"/o/_claims(%2F|/)lost-race\.json$", status=412, body=replaced, times=None)
    env["gcs"].add(rule)
    with pytest.raises(ObjectChangedError, match="was replaced or is gone"):
        store.delete(claims.claim_name("lost-race"), generation)
    assert not claims.release(store, "lost-race", "run-1")
    assert claims.holder_of(store, "lost-race").run_id == "run-1", "the claim is left as it is"
    env["gcs"].rules.remove(rule)

    with pytest.raises(ObjectChangedError, match="was replaced or is gone"):
        DeletedMeanwhile(bucket).delete(claims.claim_name("lost-race"), generation)
    assert claims.acquire(store, "lost-race", "run-1", timedelta(hours=1)).owned
    assert not claims.release(DeletedMeanwhile(bucket), "lost-race", "run-1")
    assert claims.holder_of(store, "lost-race") is None
