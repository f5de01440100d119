"""The one write-then-rename helper and the one md5 + crc32c helper, and the local store built on them."""

from __future__ import annotations

import base64
import hashlib
import io
import os

import google_crc32c
import pytest

from dicom_archive.archive import HashingSink
from dicom_archive.landing import LocalLandingZone
from dicom_archive.local_files import atomic_file, write_atomically
from dicom_archive.stores import Checksums, LocalObjectStore, ObjectExistsError

DATA = b"0123456789" * 100_003  # not a multiple of any read chunk


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomically_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_bytes(b"old")

    def interrupted_write():
        with atomic_file(target) as stream:
            stream.write(b"half of the n")
            assert target.read_bytes() == b"old"  # nothing seen before the block ends
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted_write()
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_create_only_refuses_an_existing_name_and_keeps_it(tmp_path):
    target = tmp_path / "archive.tar.gz"
    with atomic_file(target, create_only=True) as stream:
        stream.write(b"first")
    with pytest.raises(FileExistsError), atomic_file(target, create_only=True) as stream:
        stream.write(b"second")
    assert target.read_bytes() == b"first"
    assert leftovers(tmp_path) == []


def test_the_temporary_name_is_per_process_unless_fixed(tmp_path):
    target = tmp_path / "x.json"
    with atomic_file(target) as stream:
        assert leftovers(tmp_path) == [f".x.json.{os.getpid()}.partial"]
        stream.write(b"{}")
    with atomic_file(target, temp_suffix=".tmp") as stream:
        assert leftovers(tmp_path) == [".x.json.tmp"]
        stream.write(b"{}")


def test_checksums_are_cloud_storage_spelling_of_md5_and_crc32c(tmp_path):
    expected_md5 = base64.b64encode(hashlib.md5(DATA).digest()).decode()
    expected_crc = base64.b64encode(google_crc32c.Checksum(DATA).digest()).decode()
    fed = Checksums()
    for start in range(0, len(DATA), 65_537):
        fed.update(DATA[start : start + 65_537])
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    from_file = Checksums.of_file(path, chunk_size=4096)
    for checksums in (fed, from_file):
        assert (checksums.size, checksums.md5, checksums.crc32c) == (len(DATA), expected_md5, expected_crc)

    sink = HashingSink(io.BytesIO())
    sink.write(DATA)
    digest = sink.digest()
    assert (digest.size, digest.md5, digest.crc32c) == (len(DATA), expected_md5, expected_crc)


def test_local_store_objects_have_checksums_and_no_bucket(tmp_path):
    store = LocalObjectStore(tmp_path / "out")
    stored = store.write_bytes("Collection/IRB1/x.json", DATA, "application/json")
    assert stored.bucket is None  # a local folder is not a bucket: its place is in the uri
    assert stored.uri == (tmp_path / "out" / "Collection/IRB1/x.json").resolve().as_uri()
    assert stored.md5 == base64.b64encode(hashlib.md5(DATA).digest()).decode()
    assert stored.crc32c == base64.b64encode(google_crc32c.Checksum(DATA).digest()).decode()
    assert store.list_names("") == ["Collection/IRB1/x.json"]


def test_local_store_create_only_writer_keeps_the_first_object(tmp_path):
    store = LocalObjectStore(tmp_path / "out")
    with store.writer("a.tar.gz", metadata={"k": "1"}, content_type="application/gzip", if_generation_match=0) as out:
        out.write(b"first")
    with (
        pytest.raises(ObjectExistsError, match="already exists"),
        store.writer("a.tar.gz", metadata={"k": "2"}, content_type="application/gzip", if_generation_match=0) as out,
    ):
        out.write(b"second")
    kept = store.get("a.tar.gz")
    assert kept is not None
    assert (store.read_bytes("a.tar.gz"), kept.metadata) == (b"first", {"k": "1"})
    assert store.list_names("") == ["a.tar.gz"]
    assert not [p for p in (tmp_path / "out").rglob("*.partial")]


def test_local_landing_zone_report_write_uses_the_name_the_plan_knows(tmp_path, monkeypatch):
    """The report's temporary file is one the plan counts as ours, never as an image of the batch."""
    from dicom_archive import local_files
    from dicom_archive.landing import REPORT_NAME
    from dicom_archive.manifest import is_control_file

    renamed = []

    def replace(source, target):
        renamed.append(os.path.basename(source))
        os.rename(source, target)

    monkeypatch.setattr(local_files.os, "replace", replace)
    (tmp_path / "b1").mkdir()
    zone = LocalLandingZone(tmp_path)
    written = zone.write_bytes("b1", REPORT_NAME, b"{}")
    assert written == str(tmp_path / "b1" / REPORT_NAME)
    assert sorted(p.name for p in (tmp_path / "b1").iterdir()) == [REPORT_NAME]
    assert len(renamed) == 1
    assert is_control_file(renamed[0])
