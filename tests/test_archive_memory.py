"""Bounded memory: archiving a study streams it, whatever its size.

A large synthetic study (about 670 MB of CT images from tools.landing_zone) is planned and
published in a fresh Python process, which reports the kernel's peak resident set of its own
memory (VmHWM in /proc/self/status) before and after archiving. (ru_maxrss is no good here: a
child started with vfork inherits its parent's high-water mark at exec, so it would measure the
pytest process.) A study ten times smaller, archived the same way, shows the peak is flat.
This is a property test, not a benchmark: the limits are generous, the sizes are not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.providers.google.cloud.hooks.gcs import GCSHook

from tools.landing_zone import synthetic_batches, write_batch

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_KB = 8 * 1024  # 16 frames of 512x512 CT per image
MB = 1024 * 1024
SMALL_IMAGES, LARGE_IMAGES = 8, 80  # about 67 MB and 670 MB

CHILD = r"""
import json, sys, time

def vm_hwm_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

from dicom_archive.landing import LocalLandingZone
from dicom_archive.plan import plan_batch
from dicom_archive.publish import publish_study_archive

root, batch_id, target = sys.argv[1:4]
if target.startswith("gs://"):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from dicom_archive.stores import GCSObjectStore
    client = storage.Client(project="test-project", credentials=AnonymousCredentials())
    store = GCSObjectStore(client.bucket(target[len("gs://"):]))
else:
    from dicom_archive.stores import LocalObjectStore
    store = LocalObjectStore(target)

zone = LocalLandingZone(root)
(group,) = plan_batch(zone, batch_id).groups
baseline = vm_hwm_kb()  # everything imported, the plan made, nothing archived yet
started = time.monotonic()
published = publish_study_archive(group, zone, store)
print(json.dumps({
    "outcome": published.outcome,
    "images": len(published.members),
    "input_bytes": group.size,
    "archive_bytes": published.stored.size,
    "md5": published.stored.md5,
    "baseline_kb": baseline,
    "peak_kb": vm_hwm_kb(),
    "seconds": round(time.monotonic() - started, 2),
}))
"""


def run_child(root: Path, batch_id: str, target: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), batch_id, target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def write_study(root: Path, images: int, image_kb: int = IMAGE_KB) -> int:
    (spec,) = synthetic_batches(1, 1, images, image_kb, "ct")
    write_batch(root, spec)
    return sum(p.stat().st_size for p in (root / spec.batch_id).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    base = tmp_path_factory.mktemp("memory")
    sizes = {"small": write_study(base / "small", SMALL_IMAGES), "large": write_study(base / "large", LARGE_IMAGES)}
    yield base, sizes
    shutil.rmtree(base, ignore_errors=True)  # over 1 GB: do not leave it to tmp retention


def test_peak_memory_is_flat_and_far_below_the_study_size(studies):
    base, sizes = studies
    assert sizes["large"] > 600 * MB
    assert sizes["small"] < sizes["large"] / 9

    small = run_child(base / "small", "synth-0001", str(base / "out-small"))
    large = run_child(base / "large", "synth-0001", str(base / "out-large"))

    for result, images, size in ((small, SMALL_IMAGES, sizes["small"]), (large, LARGE_IMAGES, sizes["large"])):
        assert (result["outcome"], result["images"]) == ("written", images)
        assert result["input_bytes"] < size <= result["input_bytes"] + 2048  # images + manifest
        assert result["peak_kb"] * 1024 < 300 * MB, result
    archive = next((base / "out-large").rglob("*.tar.gz"))
    assert archive.stat().st_size == large["archive_bytes"] > 400 * MB  # the data really went through
    assert large["peak_kb"] * 1024 < large["input_bytes"] / 2

    growth_small = (small["peak_kb"] - small["baseline_kb"]) * 1024
    growth_large = (large["peak_kb"] - large["baseline_kb"]) * 1024
    # Archiving 670 MB adds no more than a few copy buffers over the imports...
    assert growth_large < 64 * MB, large
    # ...and no more than archiving 67 MB did: the peak is flat in the study size.
    assert abs(large["peak_kb"] - small["peak_kb"]) * 1024 < 32 * MB, (small, large)
    assert growth_large - growth_small < 32 * MB, (small, large)


def test_peak_memory_streaming_into_the_gcs_emulator(studies, bucket_name):
    """The production path: a resumable upload in 16 MiB chunks holds a chunk or two, not the study."""
    base, _sizes = studies
    bucket = GCSHook(gcp_conn_id="google_cloud_default").get_conn().bucket(bucket_name)
    large = run_child(base / "large", "synth-0001", f"gs://{bucket_name}")
    try:
        assert (large["outcome"], large["images"]) == ("written", LARGE_IMAGES)
        assert large["archive_bytes"] > 400 * MB
        assert large["peak_kb"] * 1024 < 300 * MB, large
        assert (large["peak_kb"] - large["baseline_kb"]) * 1024 < 128 * MB, large
        (blob,) = bucket.list_blobs()
        assert (blob.size, blob.md5_hash) == (large["archive_bytes"], large["md5"])
    finally:
        for blob in bucket.list_blobs():
            blob.delete()  # free the emulator's memory


def test_peak_memory_is_flat_for_a_study_of_many_small_images(tmp_path):
    """Each image fits in one copy window: what the archiver keeps per image until the study's end
    (the members, their hashes) must not include the image."""
    size = write_study(tmp_path / "many", 640, image_kb=512)  # about 330 MB
    assert size > 300 * MB
    result = run_child(tmp_path / "many", "synth-0001", str(tmp_path / "out"))
    assert (result["outcome"], result["images"]) == ("written", 640)
    assert (result["peak_kb"] - result["baseline_kb"]) * 1024 < 64 * MB, result
