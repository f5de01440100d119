"""Hostile or broken input stays in its own batch, and late errors come early with the limit named.

Real runs (dag.test()) against both emulators; the Cloud Storage emulator sits behind the fault
proxy that enforces `ifGenerationMatch` (see tests/test_ledger.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import test_ledger
from tests.test_ledger import T0, add_batch, objects, report, rows, run_manual, states
from tools.landing_zone import BatchSpec, ImageSpec, write_batch

env = test_ledger.env  # the same fixture: a bucket, a dataset, a landing zone, the proxy

HOSTILE_IDS = [
    "../victim",
    "a/../b",
    "a/.",
    ".",
    "..",
    "",
    "a..b",
    "-leading-dash",
    "x" * 200,
    "b\u00e4tch-unicode",
    "tab\tid",
    "victim/",
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with a digest of its bytes (links as their target)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[rel] = f"link:{path.readlink()}"
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


def test_every_hostile_id_in_the_conf_is_refused_and_the_good_batch_is_done(env, capfd, caplog):
    root: Path = env["root"]
    outside = root.parent
    # Whatever a path-like id could reach: a DONE batch's report beside the landing root, an
    # unprocessed batch inside it, an absolute path.
    victim = outside / "victim"
    victim.mkdir()
    (victim / "batch.report.json").write_text(json.dumps({"status": "DONE"}))
    add_batch(env, "b", T0)  # "a/../b" normalises to it: it must not be processed under that id
    absolute = outside / "abs"
    absolute.mkdir()
    good = add_batch(env, "good-batch", T0)
    (root / "linked").symlink_to(victim)  # a valid id, but not a folder of the landing root
    (victim / "batch.json").write_text(json.dumps({"batch_id": "linked", "status": "DONEPROCESSING"}))
    before = snapshot(outside)

    run = run_manual([*HOSTILE_IDS, str(absolute), "linked", good.batch_id])

    assert str(run.state) == "failed", "a refused id fails visibly"
    refused = [s for s in states(run)["batch_report"] if s == "failed"]
    assert len(refused) == len(HOSTILE_IDS) + 2
    assert report(env, good.batch_id)["status"] == "DONE"
    after = snapshot(outside)
    assert after.pop(f"landing/{good.batch_id}/batch.report.json")
    assert after == before, "nothing written outside the good batch's report, nothing changed"
    names = set(objects(env))
    collection = f"Collection/{env['collection']}/"
    assert all(n.startswith(collection) for n in names), names
    assert f"{collection}Batches/{good.batch_id}.json" in names
    assert len([n for n in names if "/Batches/" in n]) == 1, "no report for a refused id, anywhere"
    assert rows(env) == (1, 1)
    log = capfd.readouterr()
    text = log.out + log.err + caplog.text  # printed by Airflow, or logged by the tasks
    assert "an empty batch id is not allowed" in text
    assert "refused batch id: batch id '../victim' does not match" in text
    assert "(200 characters)" in text


def test_folders_that_are_not_batch_ids_are_left_alone_by_the_ledger(env, capfd):
    root: Path = env["root"]
    for name in ("bad id", "a..b", "-x", "\u00fc"):
        folder = root / name
        folder.mkdir()
        (folder / "batch.json").write_text("{}")
    good = add_batch(env, "listed-good", T0)
    before = snapshot(root)

    run = run_manual()

    assert str(run.state) == "success", states(run)
    assert report(env, good.batch_id)["status"] == "DONE"
    after = snapshot(root)
    after.pop(f"{good.batch_id}/batch.report.json")
    assert after == before
    text = capfd.readouterr()
    assert "landing zone folder 'bad id' is not a batch" in text.out + text.err


def test_a_symlink_loop_fails_its_batch_alone(env):
    good = add_batch(env, "loop-neighbour", T0)
    looped = add_batch(env, "looped", T0)
    (env["root"] / looped.batch_id / "self.dcm").symlink_to("self.dcm")
    (env["root"] / looped.batch_id / "ping").symlink_to("pong")
    (env["root"] / looped.batch_id / "pong").symlink_to("ping")

    run = run_manual([good.batch_id, looped.batch_id])

    assert str(run.state) == "success", states(run)
    assert report(env, good.batch_id)["status"] == "DONE"
    broken = report(env, looped.batch_id)
    assert broken["status"] == "ERROR"
    assert "could not be planned" in broken["error"]
    assert "loop" in broken["error"].lower()
    assert rows(env) == (1, 1)


def test_a_file_named_like_ours_is_counted_and_archived(tmp_path):
    from dicom_archive.landing import LocalLandingZone
    from dicom_archive.plan import plan_batch

    images = [
        ImageSpec("GLaa0001", "GLbb0001", "20230105", "CT", instance_number=i, source="ct", relpath=f"im{i}.dcm")
        for i in range(2)
    ]
    folder = write_batch(tmp_path, BatchSpec("own-names", images=images, collection="IRB1"))
    shutil.copy(folder / "im1.dcm", folder / ".batch.json.x.dcm")  # named like a temp file, but an image
    (folder / "nested").mkdir()
    shutil.copy(folder / "im0.dcm", folder / "nested" / "batch.report.json")  # only top-level names are ours

    plan = plan_batch(LocalLandingZone(tmp_path), "own-names")

    paths = sorted(image.relpath for group in plan.groups for image in group.images)
    quarantined = sorted(q.relpath for q in plan.quarantined)
    assert plan.images_seen == 4
    assert sorted(paths + quarantined) == [".batch.json.x.dcm", "im0.dcm", "im1.dcm", "nested/batch.report.json"]


# --- early, clear errors -----------------------------------------------------------------------


def test_a_collection_too_long_for_object_names_fails_its_batch_before_any_upload(env):
    long_collection = "I" * 1024  # a valid BigQuery dataset id, but no room left in an object name
    spec = add_batch(env, "long-collection", T0)
    manifest = env["root"] / spec.batch_id / "batch.json"
    doc = json.loads(manifest.read_text())
    doc["collection"] = long_collection
    manifest.write_text(json.dumps(doc))
    uploads = env["gcs"].requests(method="POST", path="/upload/")

    run = run_manual([spec.batch_id])

    assert states(run)["batch_report"] == ["failed"], "the manifest is broken: the batch fails, visibly"
    error = report(env, spec.batch_id)["error"]
    assert "limit of 1024 bytes per object name" in error
    archive_uploads = [r for r in env["gcs"].requests(method="POST", path="/upload/") if r not in uploads]
    assert not [r for r in archive_uploads if "Collection" in r.query], "no upload attempted"
    assert not [n for n in objects(env) if n.endswith(".tar.gz")]


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("GOOGLE_CLOUD_STORAGE", "Radiology-Archive", "has uppercase letters"),
        ("GOOGLE_CLOUD_STORAGE", "my_google_bucket", "not starting with 'goog' nor containing 'google'"),
        ("DICOM_LANDING_ROOT", "gs://Landing/zone", "DICOM_LANDING_ROOT: bucket name 'Landing' has uppercase"),
        ("GOOGLE_STORAGE_COLLECTION", "I" * 1000, "limit of 1024 bytes per object name"),
    ],
)
def test_a_setting_that_breaks_a_google_rule_fails_the_first_task_with_the_rule(
    env, monkeypatch, capfd, setting, value, message
):
    add_batch(env, "any-batch", T0)
    monkeypatch.setenv(setting, value)
    run = run_manual()
    assert str(run.state) == "failed"
    sensor = next(ti for ti in run.get_task_instances() if ti.task_id == "wait_for_batches")
    assert str(sensor.state) == "failed"
    assert sensor.try_number == 1, "a bad setting is not retried"
    log = capfd.readouterr()
    assert message in log.out + log.err


@pytest.mark.parametrize("where", ["missing-folder", "missing-bucket"])
def test_a_landing_root_that_cannot_be_read_fails_the_run_and_never_skips(env, monkeypatch, capfd, where):
    root = str(env["tmp"] / "not-mounted") if where == "missing-folder" else "gs://no-such-landing-bucket/zone"
    monkeypatch.setenv("DICOM_LANDING_ROOT", root)
    for run_type in ("manual", "scheduled"):
        if run_type == "manual":
            run = run_manual()
        else:
            from tests.test_ledger import HOUR, run_as

            run = run_as("scheduled", datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 1, tzinfo=UTC) + HOUR)
        assert str(run.state) == "failed", run_type
        assert states(run)["wait_for_batches"] == ["failed"], run_type
    log = capfd.readouterr()
    assert "fails rather than skip" in log.out + log.err
