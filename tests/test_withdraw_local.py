"""Withdrawal requests and the local output folder (SEND_TO_GOOGLE=false): parsing, names, and
processing against a LocalObjectStore, where the rows are NDJSON files."""

from __future__ import annotations

import json

import pytest

from dicom_archive.bigquery_tables import DEFAULT_TABLE
from dicom_archive.naming import archive_object_name
from dicom_archive.plan import BatchPlan, ImageRecord, StudyGroup, apply_withdrawals
from dicom_archive.stores import LocalObjectStore
from dicom_archive.withdraw import (
    WithdrawalRequestError,
    WithdrawnIndex,
    delete_local_rows,
    make_request,
    marker_name,
    parse_request_file,
    process_withdrawal,
)

C = "IRB1"


def request(**doc):
    return make_request({"collection": C, "entity_id": "E1", "request_id": "r1", **doc}, where="test", source="manual")


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"entity_id": "../x"}, "entity_id"),
        ({"entity_id": None}, "entity_id"),
        ({"collection": "IRB-1"}, "collection"),
        ({"item_id": "a/b"}, "item_id"),
        ({"request_id": ".."}, "request_id"),
        ({"reason": "the patient called on Monday"}, "never free text"),
        ({"requested_at": "yesterday"}, "RFC 3339"),
    ],
)
def test_a_bad_request_is_refused_with_the_rule(doc, words):
    with pytest.raises(WithdrawalRequestError, match=words):
        request(**doc)


@pytest.mark.parametrize(
    "doc",
    [
        {"entity_id": "MRN7731904 Doe^John"},
        {"entity_id": ["Doe^John"]},
        {"item_id": "Smith, Jane 1954-03-11"},
        {"request_id": "withdraw Jane Marple"},
        {"collection": "Poirot Hercule"},
    ],
)
def test_a_refused_request_never_quotes_the_value(doc):
    """A request that names a patient instead of the coded id is refused by field and rule."""
    with pytest.raises(WithdrawalRequestError) as err:
        request(**doc)
    for word in ("Doe", "John", "7731904", "Smith", "Jane", "Marple", "Poirot"):
        assert word not in str(err.value)
    assert next(iter(doc)) in str(err.value)


def test_a_request_file_whose_id_differs_never_quotes_it():
    with pytest.raises(WithdrawalRequestError, match="request_id differs from the file name") as err:
        parse_request_file(
            b'{"collection": "IRB1", "entity_id": "E1", "request_id": "MRN 7731904"}', file_name="r1.json", where="f"
        )
    assert "7731904" not in str(err.value)


def test_request_file_takes_its_id_from_its_name():
    got = parse_request_file(b'{"collection": "IRB1", "entity_id": "E1"}', file_name="wd-7.json", where="f")
    assert (got.request_id, got.scope, got.source, got.reason) == ("wd-7", "entity", "landing_zone", "other")
    with pytest.raises(WithdrawalRequestError, match="differs from the file name"):
        parse_request_file(
            b'{"collection": "IRB1", "entity_id": "E1", "request_id": "x"}', file_name="y.json", where="f"
        )
    with pytest.raises(WithdrawalRequestError, match="not valid JSON"):
        parse_request_file(b"{", file_name="y.json", where="f")


def test_entity_and_study_markers_never_collide():
    assert marker_name(C, "E1", None) == "Collection/IRB1/Withdrawn/E1.json"
    assert marker_name(C, "E1", "I1") == "Collection/IRB1/Withdrawn/E1/I1.json"
    assert marker_name(C, "E1.json", None) != marker_name(C, "E1", None)


def test_local_withdrawal_deletes_archives_and_ndjson_rows_and_is_idempotent(tmp_path):
    store = LocalObjectStore(tmp_path)
    names = [archive_object_name(C, "E1", "20230101", item) for item in ("I1", "I2")]
    keep = archive_object_name(C, "E10", "20230101", "I1")  # a prefix of E1's name, another entity
    for name in [*names, keep]:
        store.write_bytes(name, b"tar.gz", "application/gzip")
    rows = [{"entity_id": e, "item_id": i, "instance_sha256": f"{e}{i}{n}"} for e, i, n in
            [("E1", "I1", 1), ("E1", "I1", 2), ("E1", "I2", 1), ("E10", "I1", 1)]]  # fmt: skip
    store.write_bytes(f"BigQuery/{C}/dicom/b1.ndjson", b"".join(json.dumps(r).encode() + b"\n" for r in rows), "x")

    record = process_withdrawal(request(item_id="I1"), store, delete_rows=delete_local_rows(store, DEFAULT_TABLE))
    assert (record.status, record.objects_deleted, record.rows_deleted) == ("complete", 1, 2)
    assert store.get(names[0]) is None
    assert store.get(names[1]) is not None
    record = process_withdrawal(request(request_id="r2"), store, delete_rows=delete_local_rows(store, DEFAULT_TABLE))
    assert (record.objects_deleted, record.rows_deleted, record.scope) == (1, 1, "entity")
    assert store.get(keep) is not None
    left = [json.loads(line) for line in store.read_bytes(f"BigQuery/{C}/dicom/b1.ndjson").splitlines()]
    assert [r["entity_id"] for r in left] == ["E10"]

    again = process_withdrawal(request(request_id="r2"), store, delete_rows=lambda r: pytest.fail("ran twice"))
    assert again == record, "a completed request is a no-op"
    on_disk = json.loads(store.read_bytes(f"Collection/{C}/Withdrawals/r2.json"))
    assert on_disk["status"] == "complete"
    assert set(on_disk) >= {"request_id", "entity_id", "scope", "reason", "started_at", "completed_at"}


def test_withdrawn_studies_become_quarantine_reason_withdrawn(tmp_path):
    store = LocalObjectStore(tmp_path)
    process_withdrawal(request(item_id="I1"), store, delete_rows=lambda r: 0)
    image = ImageRecord("a.dcm", 10, 5, 1, 1, "", "")
    groups = [
        StudyGroup(C, "b", "E1", "20230101", "I1", images=[image]),
        StudyGroup(C, "b", "E1", "20230101", "I2", images=[image]),
    ]
    plan = apply_withdrawals(BatchPlan("b", C, "DONE", groups=groups), WithdrawnIndex.load(store, C).withdrawn_by)
    assert [g.item_id for g in plan.groups] == ["I2"]
    assert [(q.reason, q.detail, q.study) for q in plan.quarantined] == [
        ("withdrawn", "withdrawn by request r1", "E1_20230101_I1")
    ]
    all_gone = apply_withdrawals(
        BatchPlan("b", C, "DONE", groups=groups[:1]), WithdrawnIndex.load(store, C).withdrawn_by
    )
    assert all_gone.status == "EMPTY"


class RacedStore(LocalObjectStore):
    """A local store where another actor deletes `gone` just after the withdrawal listed it, and
    where deleting `refused` fails once (an outage: the task fails and is retried)."""

    def __init__(self, root, *, gone=None, refused=None):
        super().__init__(root)
        self.gone, self.refused = gone, refused

    def list_versions(self, prefix):
        listed = super().list_versions(prefix)
        if self.gone is not None:
            self.delete(self.gone, None)
            self.gone = None
        return listed

    def delete_version(self, name, generation):
        if name == self.refused:
            self.refused = None
            raise OSError(f"{name}: the store is unavailable")
        return super().delete_version(name, generation)


def test_the_record_counts_the_archives_this_request_deleted_across_retries(tmp_path):
    names = [archive_object_name(C, "E1", "20230101", item) for item in ("I1", "I2", "I3")]
    store = RacedStore(tmp_path, gone=names[0], refused=names[2])
    for name in names:
        store.write_bytes(name, b"tar.gz", "application/gzip")

    with pytest.raises(OSError, match="unavailable"):
        process_withdrawal(request(), store, delete_rows=delete_local_rows(store, DEFAULT_TABLE))
    record = process_withdrawal(request(), store, delete_rows=delete_local_rows(store, DEFAULT_TABLE))

    assert [store.get(name) for name in names] == [None, None, None]
    assert (record.status, record.objects_found, record.objects_deleted) == ("complete", 3, 2), (
        "found 3; one was gone before this request deleted it, the other two were deleted by two tries"
    )
    saved = json.loads(store.read_bytes(f"Collection/{C}/Withdrawals/r1.json"))
    assert (saved["objects_found"], saved["objects_deleted"], saved["versions_deleted"]) == (3, 2, 0)
