"""Every summary template runs on the BigQuery emulator over a known set of rows.

The fixture is six archives (A1..A6) of ten images; the expected numbers below are worked out
by hand from the table in `ARCHIVES`, not copied from a query's output.
"""

from __future__ import annotations

import datetime as dt

import pytest

from dicom_archive import bigquery_load as bl
from dicom_archive import sql_templates as st
from dicom_archive.bigquery_withdrawals import log_withdrawal
from dicom_archive.ndjson import to_ndjson

PROJECT = "test-project"
UTC = dt.UTC

# archive: entity, item, StudyDate, sex, age, batch, agent, uploaded_at,
#          images as (Modality, BodyPartExamined, SeriesInstanceUID)
ARCHIVES = {
    "A1": ("E1", "I1", "2020-01-10", "M", "045Y", "B1", "airflow-a", "2024-05-01T10:00:00Z",
           [("CT", "CHEST", "S1"), ("CT", "CHEST", "S1"), ("CT", "CHEST", "S2")]),
    "A2": ("E1", "I2", "2021-06-01", "M", "018Y", "B1", "airflow-a", "2024-05-01T10:05:00Z",
           [("MR", "HEAD", "S3"), ("MR", "HEAD", "S3")]),
    "A3": ("E2", "I3", "2019-03-15", "F", "070Y", "B2", "airflow-b", "2024-06-02T08:00:00Z",
           [("CT", "CHEST", "S4"), ("PT", "WHOLEBODY", "S5")]),
    "A4": ("E3", "I4", "2022-02-02", "F", "006M", "B2", "airflow-b", "2024-06-02T08:30:00Z",
           [("CR", "HAND", "S6")]),
    "A5": ("E4", "I5", "2018-12-31", None, "abc", "B3", "airflow-a", "2024-07-01T00:00:00Z",
           [(None, None, None)]),
    "A6": ("E5", "I6", "2023-03-03", "m", "104W", "B3", None, "2024-07-01T00:10:00Z",
           [("MR", "head", "S7")]),
}  # fmt: skip


def uri(archive: str) -> str:
    entity, item, date = ARCHIVES[archive][:3]
    return f"gs://radiology/Collection/IRB1/Entity/{entity}/{entity}_{date.replace('-', '')}_{item}.tar.gz"


def fixture_rows() -> list[dict]:
    rows = []
    for archive, (entity, item, date, sex, age, batch, agent, uploaded, images) in ARCHIVES.items():
        for n, (modality, body_part, series) in enumerate(images, start=1):
            rows.append(
                {
                    "collection": "IRB1",
                    "batch_id": batch,
                    "upload_agent": agent,
                    "entity_id": entity,
                    "item_id": item,
                    "StudyDate": date,
                    "Modality": modality,
                    "BodyPartExamined": body_part,
                    "PatientSex": sex,
                    "PatientAge": age,
                    "SeriesInstanceUID": series,
                    # A5's one image has a blank UID but a SeriesNumber, like the demo's awkward study.
                    "SeriesNumber": int(series[1:]) if series else 7,
                    "instance_sha256": f"{archive}-{n}",
                    "archive_member": f"{archive}/{n}.dcm",
                    "storage_uri": uri(archive),
                    "uploaded_at": uploaded,
                }
            )
    return rows


@pytest.fixture
def loaded(bigquery_client, dataset_id) -> str:
    """The dataset with the fixture rows in `dicom` and two rows in a second table."""
    rows = fixture_rows()
    assert len(rows) == 10
    result = bl.load_rows_exactly_once(
        bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="fixture"
    )
    assert result.rows_inserted == 10
    extra = f"{bigquery_client.project}.{dataset_id}.dicom_extra"
    bigquery_client.query(f"CREATE TABLE `{extra}` AS SELECT * FROM `{result.table_id}` LIMIT 2").result()
    return dataset_id


def run(client, name: str, dataset: str, **params) -> list[dict]:
    return st.run_summary(client, name, project=PROJECT, dataset=dataset, params=params or None)


def d(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


# -------------------------------------------------------------------------------------- rendering


def test_templates_are_the_expected_set():
    assert st.available_templates() == [
        "batch_summary", "collection_rows", "collection_summary", "demographics", "entity_summary",
        "find_studies", "modality_summary", "study_summary", "withdrawals_summary",
    ]  # fmt: skip


def test_render_fills_identifiers_only():
    sql = st.render_sql("entity_summary", project="my-proj", dataset="IRB41449", table="dicom")
    assert "FROM `my-proj.IRB41449.dicom`" in sql
    assert "{{" not in sql
    assert "{%" not in sql
    find = st.render_sql("find_studies", project="p", dataset="d")
    assert [p.name for p in st.query_parameters(find, None)] == [
        "modality", "body_part", "sex", "date_from", "date_to", "age_min", "age_max",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../secret"}, "unknown SQL template"),
        ({"name": "_macros"}, "unknown SQL template"),
        ({"name": "entity_summary", "dataset": "IRB1`; DROP TABLE x; --"}, "dataset"),
        ({"name": "entity_summary", "project": "p.q"}, "project"),
        ({"name": "entity_summary", "table": "dicom x"}, "table"),
    ],
)
def test_render_rejects_bad_names(kwargs, message):
    args = {"project": "p", "dataset": "d", "table": "dicom", **kwargs}
    with pytest.raises(ValueError, match=message):
        st.render_sql(args.pop("name"), **args)


def test_parameter_types_are_inferred():
    sql = "SELECT @s, @i, @f, @b, @d, @t, @n"
    params = st.query_parameters(
        sql,
        {"s": "x", "i": 3, "f": 1.5, "b": True, "d": dt.date(2020, 1, 1), "t": ts("2024-01-01T00:00:00"), "n": None},
    )
    assert [(p.name, p.type_, p.value) for p in params] == [
        ("s", "STRING", "x"),
        ("i", "INT64", 3),
        ("f", "FLOAT64", 1.5),
        ("b", "BOOL", True),
        ("d", "DATE", dt.date(2020, 1, 1)),
        ("t", "TIMESTAMP", ts("2024-01-01T00:00:00")),
        ("n", "STRING", None),
    ]
    with pytest.raises(ValueError, match="not used by the query: typo"):
        st.query_parameters(sql, {"typo": 1})


def test_format_table():
    text = st.format_table(
        [{"name": "CT", "images": 4, "first": d("2020-01-10")}, {"name": None, "images": 12, "first": None}]
    )
    assert text.splitlines() == [
        "name | images | first",
        "-----+--------+-----------",
        "CT   |      4 | 2020-01-10",
        "     |     12 |",
    ]
    assert st.format_table([]) == "(no rows)"


# ------------------------------------------------------------------------------ against the emulator


def test_collection_summary(bigquery_client, loaded):
    before = dt.datetime.now(UTC) - dt.timedelta(minutes=10)
    rows = run(bigquery_client, "collection_summary", loaded)
    # The scratch tables are gone: only the two real tables are listed.
    assert [(r["table_name"], r["row_count"]) for r in rows] == [("dicom", 10), ("dicom_extra", 2)]
    assert all(r["size_bytes"] > 0 for r in rows)
    assert all(before <= r["last_modified"] <= dt.datetime.now(UTC) + dt.timedelta(minutes=1) for r in rows)


def test_entity_summary(bigquery_client, loaded):
    got = [tuple(r.values()) for r in run(bigquery_client, "entity_summary", loaded)]
    assert got == [
        ("E1", 2, 5, d("2020-01-10"), d("2021-06-01"), "CT,MR"),
        ("E2", 1, 2, d("2019-03-15"), d("2019-03-15"), "CT,PT"),
        ("E3", 1, 1, d("2022-02-02"), d("2022-02-02"), "CR"),
        ("E4", 1, 1, d("2018-12-31"), d("2018-12-31"), None),
        ("E5", 1, 1, d("2023-03-03"), d("2023-03-03"), "MR"),
    ]


def test_study_summary(bigquery_client, loaded):
    rows = run(bigquery_client, "study_summary", loaded)
    assert list(rows[0]) == ["storage_uri", "entity_id", "item_id", "StudyDate", "images", "series", "modalities"]
    assert [tuple(r.values()) for r in rows] == [
        (uri("A1"), "E1", "I1", d("2020-01-10"), 3, 2, "CT"),
        (uri("A2"), "E1", "I2", d("2021-06-01"), 2, 1, "MR"),
        (uri("A3"), "E2", "I3", d("2019-03-15"), 2, 2, "CT,PT"),
        (uri("A4"), "E3", "I4", d("2022-02-02"), 1, 1, "CR"),
        (uri("A5"), "E4", "I5", d("2018-12-31"), 1, 1, None),  # a blank UID: the series counts by its number
        (uri("A6"), "E5", "I6", d("2023-03-03"), 1, 1, "MR"),
    ]


def test_study_summary_counts_images_without_series_uid_or_number_as_one_series(bigquery_client, dataset_id):
    """The contract lets UIDs be blank, and the rows then hold NULL for both series fields."""
    rows = [r for r in fixture_rows() if r["storage_uri"] in (uri("A1"), uri("A5"))]
    for row in rows:
        row["SeriesInstanceUID"] = row["SeriesNumber"] = None
    bl.load_rows_exactly_once(bigquery_client, dataset_id=dataset_id, ndjson=to_ndjson(rows), run_key="no-series")
    got = {r["storage_uri"]: (r["images"], r["series"]) for r in run(bigquery_client, "study_summary", dataset_id)}
    assert got == {uri("A1"): (3, 1), uri("A5"): (1, 1)}


def test_modality_summary(bigquery_client, loaded):
    got = [tuple(r.values()) for r in run(bigquery_client, "modality_summary", loaded)]
    # (Modality, images, studies, patients), most images first, NULL last among equals.
    assert got == [("CT", 4, 2, 2), ("MR", 3, 2, 2), ("CR", 1, 1, 1), ("PT", 1, 1, 1), (None, 1, 1, 1)]


def test_demographics(bigquery_client, loaded):
    got = [tuple(r.values()) for r in run(bigquery_client, "demographics", loaded)]
    # A4 006M -> 0 y; A6 104W -> 1 y and sex 'm' -> M; A5 has neither a valid age nor a sex.
    # (age_band, PatientSex, patients, studies, images)
    assert got == [
        ("00-17", "F", 1, 1, 1),
        ("00-17", "M", 1, 1, 1),
        ("18-39", "M", 1, 1, 2),
        ("40-64", "M", 1, 1, 3),
        ("65+", "F", 1, 1, 2),
        ("unknown", "unknown", 1, 1, 1),
    ]


def test_batch_summary(bigquery_client, loaded):
    got = [tuple(r.values()) for r in run(bigquery_client, "batch_summary", loaded)]
    assert got == [
        ("B1", "airflow-a", 5, 2, ts("2024-05-01T10:00:00"), ts("2024-05-01T10:05:00")),
        ("B2", "airflow-b", 3, 2, ts("2024-06-02T08:00:00"), ts("2024-06-02T08:30:00")),
        ("B3", "airflow-a", 1, 1, ts("2024-07-01T00:00:00"), ts("2024-07-01T00:00:00")),
        ("B3", None, 1, 1, ts("2024-07-01T00:10:00"), ts("2024-07-01T00:10:00")),
    ]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # No filter: every archive, by StudyDate.
        ({}, [("A5", 1, None), ("A3", 2, "CT,PT"), ("A1", 3, "CT"), ("A2", 2, "MR"), ("A4", 1, "CR"),
              ("A6", 1, "MR")]),
        ({"modality": "ct"}, [("A3", 1, "CT"), ("A1", 3, "CT")]),
        ({"body_part": "HEAD", "sex": "M"}, [("A2", 2, "MR"), ("A6", 1, "MR")]),
        ({"date_from": dt.date(2020, 1, 10), "date_to": "2022-02-02"}, [("A1", 3, "CT"), ("A2", 2, "MR"),
                                                                         ("A4", 1, "CR")]),
        ({"age_min": 18, "age_max": 45}, [("A1", 3, "CT"), ("A2", 2, "MR")]),
        ({"age_max": 1}, [("A4", 1, "CR"), ("A6", 1, "MR")]),
        ({"age_min": 46.5}, [("A3", 2, "CT,PT")]),
        ({"sex": "F", "modality": "PT"}, [("A3", 1, "PT")]),
        ({"modality": "US"}, []),
        ({"modality": None, "date_to": "2018-12-31"}, [("A5", 1, None)]),
    ],
)  # fmt: skip
def test_find_studies(bigquery_client, loaded, params, expected):
    rows = run(bigquery_client, "find_studies", loaded, **params)
    by_uri = {uri(a): a for a in ARCHIVES}
    assert [(by_uri[r["storage_uri"]], r["matching_images"], r["modalities"]) for r in rows] == expected
    for r in rows:
        archive = ARCHIVES[by_uri[r["storage_uri"]]]
        assert (r["entity_id"], r["item_id"], r["StudyDate"]) == (archive[0], archive[1], d(archive[2]))


def test_summary_of_a_fresh_rerun_is_unchanged(bigquery_client, loaded):
    # A rerun of the same rows under a new run key (a backfill) must not change any count.
    before = run(bigquery_client, "modality_summary", loaded)
    bl.load_rows_exactly_once(bigquery_client, dataset_id=loaded, ndjson=to_ndjson(fixture_rows()), run_key="backfill")
    assert run(bigquery_client, "modality_summary", loaded) == before
    text = st.format_table(before)
    assert text.splitlines()[2] == "CT       |      4 |       2 |        2"


# ---------------------------------------------------------------------------------------- withdrawals


def test_withdrawals_summary_and_row_counts_without_withdrawn_entities(bigquery_client, loaded):
    # E3 withdrawn whole (its 1 row), study I2 of E1 withdrawn (2 of E1's 5 rows), both logged
    # while their rows are still in the table (a withdrawal in progress): they are not counted.
    for record in (
        {"request_id": "r1", "entity_id": "E3", "item_id": None, "reason": "consent_withdrawn",
         "objects_deleted": 1, "rows_deleted": 1, "completed_at": "2024-08-01T00:00:00+00:00"},
        {"request_id": "r2", "entity_id": "E1", "item_id": "I2", "reason": "phi_found",
         "objects_deleted": 1, "rows_deleted": 2, "completed_at": "2024-08-02T00:00:00+00:00"},
        {"request_id": "r3", "entity_id": "E9", "item_id": None, "reason": "consent_withdrawn",
         "objects_deleted": 0, "rows_deleted": 0, "completed_at": "2024-08-03T00:00:00+00:00"},
    ):  # fmt: skip
        log_withdrawal(bigquery_client, dataset_id=loaded, record={"collection": "IRB1", **record})
    # Logged twice (a retry): still one row per request.
    log_withdrawal(
        bigquery_client,
        dataset_id=loaded,
        record={"collection": "IRB1", "request_id": "r1", "entity_id": "E3", "reason": "consent_withdrawn",
                "completed_at": "2024-08-01T00:00:00+00:00"},
    )  # fmt: skip

    summary = [tuple(r.values()) for r in run(bigquery_client, "withdrawals_summary", loaded)]
    assert summary == [
        ("entity", "consent_withdrawn", 2, 1, 1, ts("2024-08-01T00:00:00Z"), ts("2024-08-03T00:00:00Z")),
        ("study", "phi_found", 1, 1, 2, ts("2024-08-02T00:00:00Z"), ts("2024-08-02T00:00:00Z")),
    ]
    counts = [tuple(r.values()) for r in run(bigquery_client, "collection_rows", loaded)]
    assert counts == [("IRB1", 10 - 1 - 2, 4, 4)]  # E1 (I1 only), E2, E4, E5; archives A1, A3, A5, A6
