"""Publishing study archives to the real Cloud Storage emulator, with faults injected by a proxy.

The store is built the production way, `GCSObjectStore(GCSHook().get_conn().bucket(name))`, and
reaches the emulator through tests/faultproxy.py (STORAGE_EMULATOR_HOST points at the proxy). The
proxy also enforces upload preconditions (`ifGenerationMatch`), which the emulator ignores, so
the 412 paths run as they would against Cloud Storage. A second, direct client looks at what the
emulator really holds.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import hashlib
import io
import json
import re
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.api_core.exceptions import Forbidden, GoogleAPICallError
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from dicom_archive import PIPELINE_VERSION
from dicom_archive.archive import ArchiveIntegrityError, write_study_archive
from dicom_archive.landing import LocalLandingZone
from dicom_archive.naming import batch_report_object_name
from dicom_archive.plan import StudyGroup, plan_batch
from dicom_archive.publish import (
    ALREADY_PRESENT,
    COMPLETED_AT_KEY,
    REPLACED,
    SUPERSEDED,
    WRITTEN,
    ArchiveConflictError,
    ChecksumMismatchError,
    NewerBatch,
    publish_study_archive,
)
from dicom_archive.stores import GCSObjectStore, LocalObjectStore
from tests.conftest import PROJECT
from tests.faultproxy import FaultProxy, ProxyRequest, Rule, flip_byte, gcs_preconditions, json_patch, proxied
from tools.landing_zone import BatchSpec, ImageSpec, write_batch

ENTITY, ITEM, DATE = "GL664ba0", "GL71cfb7", "20070904"
SMALL_CHUNK = 256 * 1024  # several resumable chunks for a ~2 MB archive
UPLOAD_START = ("POST", r"^/upload/storage/v1/b/[^/]+/o$", "uploadType=resumable")
UPLOAD_PUT = ("PUT", r"^/upload/storage/v1/b/[^/]+/o$", "upload_id=")


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> tuple[LocalLandingZone, StudyGroup, StudyGroup]:
    """One study of six 512x512 CT images (a ~2 MB archive), and the same study as an earlier
    batch delivered it with only five images (same object name, different bytes)."""
    root = tmp_path_factory.mktemp("landing")
    images = [ImageSpec(ENTITY, ITEM, DATE, "CT", 1, i, rows=512, cols=512) for i in range(1, 7)]
    write_batch(root, BatchSpec("b-full", images=images, collection="IRB41449"))
    write_batch(root, BatchSpec("b-early", images=images[:5], collection="IRB41449"))
    zone = LocalLandingZone(root)
    (full,) = plan_batch(zone, "b-full").groups
    (early,) = plan_batch(zone, "b-early").groups
    assert full.object_name == early.object_name
    return zone, full, early


@pytest.fixture
def proxy(gcs_emulator) -> FaultProxy:
    with proxied(gcs_emulator.url, "STORAGE_EMULATOR_HOST") as running:
        running.add(gcs_preconditions(running))
        yield running
        assert running.errors == [], "a rule's hook failed"


@pytest.fixture
def direct(gcs_emulator) -> storage.Client:
    """A client that talks to the emulator itself, bypassing the proxy."""
    return storage.Client(
        project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_emulator.url}
    )


def make_store(bucket_name: str, upload_chunk: int | None = None) -> GCSObjectStore:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    bucket = GCSHook(gcp_conn_id="google_cloud_default").get_conn().bucket(bucket_name)
    return GCSObjectStore(bucket) if upload_chunk is None else GCSObjectStore(bucket, upload_chunk=upload_chunk)


def expected_archive(group: StudyGroup, zone: LocalLandingZone) -> bytes:
    sink = io.BytesIO()
    write_study_archive(group, zone, sink)
    return sink.getvalue()


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def listing(direct: storage.Client, bucket_name: str) -> list[str]:
    return sorted(blob.name for blob in direct.bucket(bucket_name).list_blobs())


def upload_starts(proxy: FaultProxy) -> list:
    return proxy.requests(*UPLOAD_START)


def assert_nothing_sent_when_collected(proxy: FaultProxy) -> None:
    """A failed upload must not leave an open blob writer behind: one that is still open when
    garbage-collected closes itself, i.e. starts the upload again, long after the task failed."""
    seen = len(proxy.log)
    gc.collect()
    time.sleep(0.2)
    assert [(r.method, r.path, r.status) for r in proxy.log[seen:]] == []


def assert_no_acl_calls(proxy: FaultProxy) -> None:
    assert proxy.log, "the proxy saw no request: the client does not go through it"
    acl_calls = [r for r in proxy.log if "/acl" in r.path or "/defaultObjectAcl" in r.path]
    acl_params = [r for r in proxy.log if re.search(r"predefined(default)?acl=", r.query, re.IGNORECASE)]
    assert acl_calls == []
    assert acl_params == []


# --- idempotence ----------------------------------------------------------------------------


def test_write_then_rerun_is_already_present_with_the_same_generation(proxy, bucket_name, direct, landing):
    zone, group, _ = landing
    store = make_store(bucket_name)
    expected = expected_archive(group, zone)

    first = publish_study_archive(group, zone, store)
    assert first.outcome == WRITTEN
    assert first.stored.uri == f"gs://{bucket_name}/{group.object_name}"
    assert (first.stored.md5, first.stored.size) == (b64md5(expected), len(expected))
    assert first.stored.crc32c == first.digest.crc32c
    assert first.stored.generation
    assert first.stored.generation > 0
    assert direct.bucket(bucket_name).blob(group.object_name).download_as_bytes() == expected
    assert len(upload_starts(proxy)) == 1
    # The resumable session's follow-up went through the proxy (its Location was rewritten).
    assert proxy.requests(*UPLOAD_PUT)

    again = publish_study_archive(group, zone, store)
    assert again.outcome == ALREADY_PRESENT
    assert again.stored.generation == first.stored.generation
    assert again.stored.md5 == first.stored.md5
    assert [m.sha256 for m in again.members] == [m.sha256 for m in first.members]
    assert len(upload_starts(proxy)) == 1, "the rerun must not upload anything"
    assert listing(direct, bucket_name) == [group.object_name]


def test_object_metadata_content_type_and_no_acl(proxy, bucket_name, direct, landing):
    zone, group, _ = landing
    bodies: list[dict] = []
    proxy.add(Rule(*UPLOAD_START, times=None, before=lambda r: bodies.append(json.loads(r.body or b"{}"))))

    published = publish_study_archive(group, zone, make_store(bucket_name))

    blob = direct.bucket(bucket_name).get_blob(group.object_name)
    assert blob.content_type == "application/gzip"
    # The content digest, worked out here from the object's own members (not from the pipeline).
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes()), mode="r:gz") as tar:
        pairs = sorted((m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest()) for m in tar if m.isfile())
    expected_digest = hashlib.sha256(
        b"dicom-archive-content/1\n" + b"".join(f"{n}\0{h}\n".encode() for n, h in pairs)
    ).hexdigest()
    assert blob.metadata == {
        "batch_id": "b-full",
        "batch_completed_at": "2024-01-05T09:30:00+00:00",  # BatchSpec's default completed_at
        "collection": "IRB41449",
        "image_count": "6",
        "pipeline_version": PIPELINE_VERSION,
        "content_digest": expected_digest,
        "content_digest_format": "1",
    }
    assert published.stored.metadata == blob.metadata
    assert len(bodies) == 1
    assert "acl" not in bodies[0]
    assert "predefinedAcl" not in json.dumps(bodies[0])
    assert_no_acl_calls(proxy)
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes()), mode="r:gz") as tar:
        assert len([m for m in tar.getmembers() if m.isfile()]) == 6


def content_digest_of(archive: bytes) -> str:
    """The content digest of the outputs spec, worked out from an archive's bytes."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        pairs = sorted((m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest()) for m in tar if m.isfile())
    return hashlib.sha256(b"dicom-archive-content/1\n" + b"".join(f"{n}\0{h}\n".encode() for n, h in pairs)).hexdigest()


def direct_bytes(direct, bucket_name: str, group) -> bytes:
    return direct.bucket(bucket_name).blob(group.object_name).download_as_bytes()


# --- conflicts and replacement --------------------------------------------------------------


def test_different_bytes_under_the_same_name_is_a_conflict_and_nothing_changes(proxy, bucket_name, direct, landing):
    zone, full, early = landing
    store = make_store(bucket_name)
    before = publish_study_archive(early, zone, store)
    assert before.outcome == WRITTEN
    starts = len(upload_starts(proxy))

    with pytest.raises(ArchiveConflictError) as caught:
        publish_study_archive(full, zone, store)

    message = str(caught.value)
    expected = content_digest_of(expected_archive(full, zone))
    assert f"gs://{bucket_name}/{full.object_name} already exists with different content" in message
    assert f"stored content digest {content_digest_of(direct_bytes(direct, bucket_name, full))}" in message
    assert f"generation {before.stored.generation}" in message
    assert "written by batch b-early with 5 images" in message
    assert f"this batch gives content digest {expected}, 6 images" in message
    assert "Nothing was overwritten" in message
    assert "DICOM_REPLACE_CHANGED_ARCHIVES=true" in message

    after = direct.bucket(bucket_name).get_blob(full.object_name)
    assert (after.generation, after.md5_hash, after.metadata["batch_id"]) == (
        before.stored.generation,
        before.stored.md5,
        "b-early",
    )
    assert len(upload_starts(proxy)) == starts, "a conflict must not even start an upload"


def test_replace_setting_replaces_under_a_generation_precondition(proxy, bucket_name, direct, landing):
    zone, full, early = landing
    store = make_store(bucket_name)
    old = publish_study_archive(early, zone, store).stored

    replaced = publish_study_archive(full, zone, store, replace_changed=True)

    assert replaced.outcome == REPLACED
    expected = expected_archive(full, zone)
    assert replaced.stored.md5 == b64md5(expected) != old.md5
    assert replaced.stored.generation != old.generation
    blob = direct.bucket(bucket_name).get_blob(full.object_name)
    assert (blob.md5_hash, blob.metadata["batch_id"], blob.metadata["image_count"]) == (
        replaced.stored.md5,
        "b-full",
        "6",
    )
    assert upload_starts(proxy)[-1].query.endswith(f"ifGenerationMatch={old.generation}")
    # Replacing again with the same bytes is a no-op.
    assert publish_study_archive(full, zone, store, replace_changed=True).outcome == ALREADY_PRESENT


def test_replace_that_loses_a_race_is_a_conflict_not_an_overwrite(proxy, bucket_name, direct, landing):
    zone, full, early = landing
    store = make_store(bucket_name)
    publish_study_archive(early, zone, store)

    def someone_else_rewrites(_: ProxyRequest) -> None:
        direct.bucket(bucket_name).blob(full.object_name).upload_from_string(b"a third version")

    proxy.rules.insert(0, Rule(*UPLOAD_START, before=someone_else_rewrites))
    with pytest.raises(ArchiveConflictError, match="already exists with different content"):
        publish_study_archive(full, zone, store, replace_changed=True)
    assert direct.bucket(bucket_name).blob(full.object_name).download_as_bytes() == b"a third version"
    assert [r.status for r in upload_starts(proxy)] == [200, 412]
    assert_nothing_sent_when_collected(proxy)


@pytest.mark.parametrize("competitor", ["same", "different"])
@pytest.mark.parametrize("moment", ["start", "finish"])
def test_object_created_between_look_and_write_is_judged(proxy, bucket_name, direct, landing, competitor, moment):
    """Another writer creates the object after our look: Cloud Storage answers 412 to our
    create-only upload, when the session starts or when its last chunk arrives. Same bytes:
    already present; different bytes: a conflict, and the other writer's object stays."""
    zone, full, early = landing
    ours = expected_archive(full, zone)
    theirs = ours if competitor == "same" else expected_archive(early, zone)

    def create_theirs(_: ProxyRequest) -> None:
        direct.bucket(bucket_name).blob(full.object_name).upload_from_string(theirs, content_type="application/gzip")

    if moment == "start":
        proxy.rules.insert(0, Rule(*UPLOAD_START, before=create_theirs))
    else:  # right before the final chunk; the earlier chunks have gone up already
        proxy.rules.insert(0, Rule(*UPLOAD_PUT, before=create_theirs, skip=len(ours) // SMALL_CHUNK))
    store = make_store(bucket_name, upload_chunk=SMALL_CHUNK)

    if competitor == "same":
        published = publish_study_archive(full, zone, store)
        assert published.outcome == ALREADY_PRESENT
    else:
        with pytest.raises(ArchiveConflictError, match="already exists with different content"):
            publish_study_archive(full, zone, store)

    refused = [r for r in proxy.log if r.status == 412]
    assert len(refused) == 1
    assert refused[0].method == ("POST" if moment == "start" else "PUT")
    if moment == "finish":
        assert [r.status for r in proxy.requests(*UPLOAD_PUT)] == [308] * (len(ours) // SMALL_CHUNK) + [412]
    blob = direct.bucket(bucket_name).get_blob(full.object_name)
    assert blob.md5_hash == b64md5(theirs)
    if competitor == "same":
        assert published.stored.generation == blob.generation
    assert listing(direct, bucket_name) == [full.object_name]
    assert_nothing_sent_when_collected(proxy)


# --- newer wins: an older batch never replaces a newer batch's archive ------------------------

OLDER_AT, NEWER_AT = datetime(2024, 1, 5, 9, tzinfo=UTC), datetime(2024, 1, 6, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> tuple[LocalLandingZone, StudyGroup, StudyGroup]:
    """A study sent by batch b-older (2 images) and, corrected, by b-newer, completed a day later
    (3 images: the same two and one more)."""
    root = tmp_path_factory.mktemp("versions")
    images = [ImageSpec(ENTITY, ITEM, DATE, "CT", 1, i, rows=64, cols=64) for i in range(1, 4)]
    write_batch(root, BatchSpec("b-older", images=images[:2], collection="IRB41449", completed_at=OLDER_AT))
    write_batch(root, BatchSpec("b-newer", images=images, collection="IRB41449", completed_at=NEWER_AT))
    zone = LocalLandingZone(root)
    (older,) = plan_batch(zone, "b-older").groups
    (newer,) = plan_batch(zone, "b-newer").groups
    return zone, older, newer


@pytest.fixture(params=["local", "gcs"])
def any_store(request, tmp_path):
    """The archive store of local mode (SEND_TO_GOOGLE=false) and of Cloud Storage (the emulator,
    behind the precondition-enforcing proxy): both must give the same answers."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "out")
    request.getfixturevalue("proxy")
    return make_store(request.getfixturevalue("bucket_name"))


def state_of(store, name: str) -> tuple:
    stored = store.get(name)
    return stored.generation, stored.md5, stored.metadata["batch_id"], stored.metadata["image_count"]


def test_the_archive_records_the_completed_at_of_the_batch_that_wrote_it(any_store, two_versions):
    zone, older, _ = two_versions
    published = publish_study_archive(older, zone, any_store)
    assert published.stored.metadata[COMPLETED_AT_KEY] == "2024-01-05T09:00:00+00:00"
    assert any_store.get(older.object_name).metadata[COMPLETED_AT_KEY] == "2024-01-05T09:00:00+00:00"


@pytest.mark.parametrize("replace", [True, False])
def test_an_older_batch_reprocessed_after_a_correction_leaves_it_alone(any_store, two_versions, replace):
    zone, older, newer = two_versions
    assert publish_study_archive(older, zone, any_store).outcome == WRITTEN
    assert publish_study_archive(newer, zone, any_store, replace_changed=True).outcome == REPLACED
    before = state_of(any_store, newer.object_name)

    again = publish_study_archive(older, zone, any_store, replace_changed=replace)

    assert again.outcome == SUPERSEDED
    assert again.newer == NewerBatch("b-newer", "2024-01-06T09:00:00+00:00")
    assert (again.images_before, len(again.members)) == (3, 2)
    assert state_of(any_store, newer.object_name) == before == (before[0], before[1], "b-newer", "3")
    # The newer batch's own rerun is still a no-op.
    assert publish_study_archive(newer, zone, any_store, replace_changed=True).outcome == ALREADY_PRESENT


@pytest.mark.parametrize("replace", [True, False])
def test_an_older_batch_processed_late_does_not_replace_the_newer_version(any_store, two_versions, replace):
    zone, older, newer = two_versions
    publish_study_archive(newer, zone, any_store)
    before = state_of(any_store, newer.object_name)
    assert publish_study_archive(older, zone, any_store, replace_changed=replace).outcome == SUPERSEDED
    assert state_of(any_store, newer.object_name) == before


def test_the_newer_batch_still_replaces_the_older_version(any_store, two_versions):
    zone, older, newer = two_versions
    publish_study_archive(older, zone, any_store)
    with pytest.raises(ArchiveConflictError, match="already exists with different content"):
        publish_study_archive(newer, zone, any_store)  # without the setting: a conflict, as before
    replaced = publish_study_archive(newer, zone, any_store, replace_changed=True)
    assert (replaced.outcome, replaced.images_before) == (REPLACED, 2)
    assert replaced.stored.metadata[COMPLETED_AT_KEY] == "2024-01-06T09:00:00+00:00"


def test_same_completed_at_keeps_the_conflict_or_replace_rule(any_store, two_versions):
    zone, older, newer = two_versions
    publish_study_archive(newer, zone, any_store)
    tie = dataclasses.replace(older, completed_at=newer.completed_at)  # another batch, the same instant
    with pytest.raises(ArchiveConflictError):
        publish_study_archive(tie, zone, any_store)
    assert publish_study_archive(tie, zone, any_store, replace_changed=True).outcome == REPLACED


def test_an_archive_of_older_code_is_ordered_by_its_batch_report_or_never_replaced(any_store, two_versions):
    zone, older, newer = two_versions
    publish_study_archive(newer, zone, any_store)
    # As older code wrote it: no completed_at in the metadata.
    stored = any_store.get(newer.object_name)
    legacy = {k: v for k, v in stored.metadata.items() if k != COMPLETED_AT_KEY}
    any_store.update_metadata(newer.object_name, legacy, if_metageneration_match=stored.metageneration)
    before = state_of(any_store, newer.object_name)

    # The order cannot be established (b-newer has no published report): nothing is replaced.
    with pytest.raises(ArchiveConflictError, match=r"cannot be established.*Nothing was overwritten"):
        publish_study_archive(older, zone, any_store, replace_changed=True)
    assert state_of(any_store, newer.object_name) == before

    # Its batch's published report (the ledger) tells: newer, so left alone.
    report = {"batch_id": "b-newer", "collection": "IRB41449", "completed_at": "2024-01-06T09:00:00Z"}
    any_store.write_bytes(batch_report_object_name("IRB41449", "b-newer"), json.dumps(report).encode(), "x")
    assert publish_study_archive(older, zone, any_store, replace_changed=True).outcome == SUPERSEDED
    assert state_of(any_store, newer.object_name) == before


def test_a_plan_without_completed_at_never_replaces_another_batchs_archive(any_store, two_versions):
    zone, older, newer = two_versions
    publish_study_archive(older, zone, any_store)
    staged_by_older_code = dataclasses.replace(newer, completed_at=None)
    with pytest.raises(ArchiveConflictError, match="cannot be established"):
        publish_study_archive(staged_by_older_code, zone, any_store, replace_changed=True)


# --- checksum verification ------------------------------------------------------------------


def test_bytes_corrupted_in_transit_are_deleted_and_fail(proxy, bucket_name, direct, landing):
    zone, group, _ = landing
    corrupt = proxy.add(Rule(*UPLOAD_PUT, before=flip_byte(4096)))

    with pytest.raises(ChecksumMismatchError) as caught:
        publish_study_archive(group, zone, make_store(bucket_name))

    assert corrupt.fired == 1
    expected = expected_archive(group, zone)
    message = str(caught.value)
    assert f"streamed md5 {b64md5(expected)}" in message
    assert "the object was removed" in message
    assert listing(direct, bucket_name) == []
    assert proxy.requests("DELETE", r"/o/")  # deleted by generation
    del caught
    assert_nothing_sent_when_collected(proxy)
    # Without the fault, the next attempt writes it.
    proxy.clear()
    assert publish_study_archive(group, zone, make_store(bucket_name)).outcome == WRITTEN


def test_store_reporting_another_md5_after_upload_deletes_and_fails(proxy, bucket_name, direct, landing):
    zone, group, _ = landing
    bogus = base64.b64encode(b"0123456789abcdef").decode()
    lie = proxy.add(Rule("GET", r"^/storage/v1/b/[^/]+/o/.+", times=None, after=json_patch(md5Hash=bogus)))

    with pytest.raises(ChecksumMismatchError, match=f"store reports md5 {bogus}"):
        publish_study_archive(group, zone, make_store(bucket_name))

    assert lie.fired == 1  # the 404 of the first look is left alone
    assert listing(direct, bucket_name) == []


# --- transient faults -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "status", "times"),
    [(UPLOAD_START, 503, 1), (UPLOAD_PUT, 503, 2), (UPLOAD_PUT, 429, 1), (UPLOAD_PUT, 500, 1),
     (("GET", r"^/storage/v1/b/[^/]+/o/.+", ""), 503, 1)],
    ids=["503-on-start", "503-twice-on-chunk", "429-on-chunk", "500-on-chunk", "503-on-look"],
)  # fmt: skip
def test_transient_errors_are_retried_and_the_run_completes(proxy, bucket_name, direct, landing, where, status, times):
    zone, group, _ = landing
    fault = proxy.add(Rule(*where, status=status, times=times))

    published = publish_study_archive(group, zone, make_store(bucket_name, upload_chunk=SMALL_CHUNK))

    assert published.outcome == WRITTEN
    assert fault.fired == times
    statuses = [r.status for r in proxy.requests(*where)]
    assert statuses[:times] == [status] * times
    assert statuses[times] in (200, 308, 404), "the same request, retried, got through"
    assert [r.status for r in proxy.log].count(status) == times
    expected = expected_archive(group, zone)
    assert direct.bucket(bucket_name).blob(group.object_name).download_as_bytes() == expected
    assert listing(direct, bucket_name) == [group.object_name]


def test_slow_answers_do_not_break_the_upload(proxy, bucket_name, landing):
    zone, group, _ = landing
    slow = proxy.add(Rule(*UPLOAD_PUT, delay=0.1, times=None))
    started = time.monotonic()
    published = publish_study_archive(group, zone, make_store(bucket_name, upload_chunk=SMALL_CHUNK))
    assert published.outcome == WRITTEN
    assert slow.fired == slow.seen >= 2
    assert time.monotonic() - started >= 0.1 * slow.fired


def test_connection_reset_mid_chunk_is_retried_and_resumes(proxy, bucket_name, direct, landing):
    zone, group, _ = landing
    reset = proxy.add(Rule(*UPLOAD_PUT, reset_after=64 * 1024, skip=1))  # the second chunk

    published = publish_study_archive(group, zone, make_store(bucket_name, upload_chunk=SMALL_CHUNK))

    assert reset.fired == 1
    assert [r.status for r in proxy.requests(*UPLOAD_PUT)][:3] == [308, "reset", 308]
    assert published.outcome == WRITTEN
    expected = expected_archive(group, zone)
    assert published.stored.md5 == b64md5(expected)
    assert direct.bucket(bucket_name).blob(group.object_name).download_as_bytes() == expected


def test_upload_broken_for_good_leaves_no_partial_object(proxy, bucket_name, direct, landing):
    """A reset in the middle of the second chunk, and the session is gone when the client
    retries (410): the task fails with that error, and nothing (not even the first chunk) is
    visible in the bucket. The next attempt writes the whole archive."""
    zone, group, _ = landing
    proxy.add(Rule(*UPLOAD_PUT, reset_after=64 * 1024, skip=1))
    gone = proxy.add(Rule(*UPLOAD_PUT, status=410, times=None, skip=2))

    with pytest.raises(GoogleAPICallError, match="410") as caught:
        publish_study_archive(group, zone, make_store(bucket_name, upload_chunk=SMALL_CHUNK))

    assert caught.value.code == 410
    assert "invalid state" not in str(caught.value), "the first error must be reported, not a follow-up"
    assert gone.fired == 1
    assert [r.status for r in proxy.requests(*UPLOAD_PUT)] == [308, "reset", 410]
    assert listing(direct, bucket_name) == []
    del caught
    assert_nothing_sent_when_collected(proxy)

    proxy.clear()
    again = publish_study_archive(group, zone, make_store(bucket_name, upload_chunk=SMALL_CHUNK))
    assert again.outcome == WRITTEN
    assert again.stored.md5 == b64md5(expected_archive(group, zone))


@pytest.mark.parametrize("chunk", [None, SMALL_CHUNK], ids=["one-chunk", "many-chunks"])
def test_refused_upload_raises_the_clients_forbidden_and_writes_nothing(proxy, bucket_name, direct, landing, chunk):
    """A 403 reaches the caller as google.api_core's Forbidden, as from every other client call
    (the hook turns that into a message naming the credentials), not as a raw media error."""
    zone, group, _ = landing
    denied = proxy.add(Rule(*UPLOAD_START, status=403, times=None, body={"error": {"code": 403, "message": "denied"}}))

    with pytest.raises(Forbidden, match="403"):
        publish_study_archive(group, zone, make_store(bucket_name, upload_chunk=chunk))

    assert denied.fired == 1, "a refusal is not retried"
    assert listing(direct, bucket_name) == []
    assert_nothing_sent_when_collected(proxy)


def test_lost_answer_to_the_final_chunk_then_a_rerun_finds_the_object(proxy, bucket_name, direct, landing):
    """The object was finalized but the client never heard of it. Whatever this attempt
    concludes, a retry of the task compares and keeps the object: one object, never two."""
    zone, group, _ = landing
    lost = proxy.add(Rule(*UPLOAD_PUT, reset_after_forward=True))
    store = make_store(bucket_name)
    try:
        first_outcome = publish_study_archive(group, zone, store).outcome
    except Exception as err:  # the emulator answers the retried chunk of a finished session with 404
        first_outcome = type(err).__name__
    assert lost.fired == 1
    held = direct.bucket(bucket_name).get_blob(group.object_name)
    assert held is not None
    assert held.md5_hash == b64md5(expected_archive(group, zone))

    retry = publish_study_archive(group, zone, store)
    assert retry.outcome == ALREADY_PRESENT, first_outcome
    assert retry.stored.generation == held.generation
    assert listing(direct, bucket_name) == [group.object_name]


def test_image_changed_during_upload_leaves_no_object(proxy, bucket_name, direct, tmp_path):
    root = tmp_path / "landing"
    images = [ImageSpec(ENTITY, ITEM, DATE, "CT", 1, i, rows=512, cols=512) for i in range(1, 7)]
    write_batch(root, BatchSpec("b1", images=images, collection="IRB41449"))
    zone = LocalLandingZone(root)
    (group,) = plan_batch(zone, "b1").groups
    last = Path(root / "b1" / group.sorted_images()[-1].relpath)
    last.write_bytes(last.read_bytes()[:-1000])  # after planning, before archiving

    with pytest.raises(ArchiveIntegrityError, match=r"changed after planning: ctime_ns, mtime_ns, size"):
        publish_study_archive(group, zone, make_store(bucket_name, upload_chunk=SMALL_CHUNK))

    assert [r.status for r in proxy.requests(*UPLOAD_PUT)].count(308) >= 2  # chunks had gone up
    assert listing(direct, bucket_name) == []


# --- the proxy itself -----------------------------------------------------------------------


def test_fault_proxy_counts_skips_answers_and_restores_the_environment(gcs_emulator):
    import os
    import urllib.error
    import urllib.request

    before = os.environ.get("STORAGE_EMULATOR_HOST")
    with proxied(gcs_emulator.url, "STORAGE_EMULATOR_HOST") as proxy:
        assert os.environ["STORAGE_EMULATOR_HOST"] == proxy.url != gcs_emulator.url
        teapot = proxy.add(Rule("GET", r"^/storage/v1/b$", "project=", status=418, body={"tea": 1}, skip=1, times=2))

        def get(url: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=10) as answer:
                    return answer.status, answer.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()

        answers = [get(f"{proxy.url}/storage/v1/b?project={PROJECT}") for _ in range(4)]
        assert [status for status, _ in answers] == [200, 418, 418, 200]
        assert json.loads(answers[1][1]) == {"tea": 1}
        assert (teapot.seen, teapot.fired) == (4, 2)
        assert get(f"{proxy.url}/storage/v1/b/no-such-bucket?x=1")[0] == 404  # passed through, not matched
        assert teapot.seen == 4
        assert [r.status for r in proxy.log] == [200, 418, 418, 200, 404]
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before

    with FaultProxy("http://127.0.0.1:9") as dead:  # nothing listens on the discard port
        assert get(f"{dead.url}/storage/v1/b?project={PROJECT}")[0] == 502
