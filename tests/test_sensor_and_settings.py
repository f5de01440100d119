"""CompletedBatchSensor's choice of batches, and the settings check that runs when a run starts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from dicom_archive.deid_gate import DEFAULT_PERSON_ATTRIBUTES
from dicom_archive.settings import Settings, SettingsError
from tools.landing_zone import BatchSpec, ImageSpec, write_batch

IMAGE = ImageSpec("GLaa0001", "GLbb0001", "20230105", "CT", source="ct")


def batch(batch_id: str, completed: datetime, **kwargs) -> BatchSpec:
    return BatchSpec(batch_id, images=[IMAGE], collection="IRB1", completed_at=completed, **kwargs)


@pytest.fixture
def landing(tmp_path, monkeypatch):
    root = tmp_path / "landing"
    root.mkdir()
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(root))
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    day = datetime(2024, 1, 5, tzinfo=UTC)
    write_batch(root, batch("before", day - timedelta(seconds=1)))
    write_batch(root, batch("first", day))  # the interval's start belongs to it
    write_batch(root, batch("last", day + timedelta(hours=23, minutes=59)))
    write_batch(root, batch("after", day + timedelta(days=1)))  # the end does not
    write_batch(root, batch("busy", day + timedelta(hours=1), status="RUNNING"))
    write_batch(root, batch("gave-up", day + timedelta(hours=2), status="ERROR"))
    write_batch(root, batch("unfinished", day + timedelta(hours=3), write_manifest=False))
    return root


def poke(sensor, run_type: str = "scheduled", start: datetime | None = None, days: int = 1):
    from airflow.sdk.api.datamodels._generated import DagRunType
    from airflow.sdk.exceptions import AirflowSkipException

    start = start or datetime(2024, 1, 5, tzinfo=UTC)
    context = {
        "dag_run": SimpleNamespace(run_type=DagRunType(run_type)),  # the enum a real run carries
        "data_interval_start": start,
        "data_interval_end": start + timedelta(days=days),
    }
    try:
        return sensor.poke(context)
    except AirflowSkipException as skip:
        return skip


def make_sensor(**kwargs):
    from sensors.batches import CompletedBatchSensor

    return CompletedBatchSensor(task_id="wait", **kwargs)


def test_scheduled_run_takes_every_unreported_batch_completed_before_its_interval_end(landing):
    (landing / "first" / "batch.report.json").write_text("{}")  # in the ledger: done
    result = poke(make_sensor())
    assert result.is_done
    # Oldest first; "after" belongs to a later run, "busy" and "unfinished" are not ready.
    assert result.xcom_value == ["before", "gave-up", "last"]


def test_backfill_run_reprocesses_exactly_its_interval_reported_or_not(landing):
    (landing / "first" / "batch.report.json").write_text("{}")
    result = poke(make_sensor(), run_type="backfill")
    assert result.xcom_value == ["first", "gave-up", "last"]


def test_past_interval_with_nothing_pending_is_skipped_at_once(landing):
    from airflow.sdk.exceptions import AirflowSkipException

    result = poke(make_sensor(), start=datetime(2023, 6, 1, tzinfo=UTC))
    assert isinstance(result, AirflowSkipException)
    assert "nothing pending" in str(result)


def test_recent_interval_with_nothing_pending_is_skipped_at_once_not_after_hours(landing):
    from airflow.sdk.exceptions import AirflowSkipException

    for folder in landing.iterdir():
        (folder / "batch.report.json").write_text("{}")
    result = poke(make_sensor(), start=datetime.now(UTC) - timedelta(hours=1), days=1)
    assert isinstance(result, AirflowSkipException)


def test_per_run_cap_takes_the_oldest_and_leaves_the_rest(landing, monkeypatch):
    monkeypatch.setenv("DICOM_MAX_BATCHES_PER_RUN", "2")
    result = poke(make_sensor(), run_type="manual")
    assert result.xcom_value == ["before", "first"]


def test_manual_run_with_ids_gets_exactly_those(landing):
    result = poke(make_sensor(batch_ids=["last", "first", "first"]), run_type="manual")
    assert result.xcom_value == ["first", "last"]


@pytest.mark.parametrize("bad", ["", "../victim", "/abs/path", "a/../b", "a/.", ".", "..", "x" * 129, "b\u00e4tch"])
def test_manual_run_passes_a_refused_id_on_next_to_the_good_one(landing, bad):
    result = poke(make_sensor(batch_ids=["first", bad]), run_type="manual")
    assert result.xcom_value == ["first", bad], "the plan step refuses it visibly; the good id goes on"


def test_manual_run_without_ids_gets_every_complete_batch_without_a_report(landing):
    (landing / "first" / "batch.report.json").write_text("{}")
    result = poke(make_sensor(), run_type="manual")
    # Oldest first; "busy" is not ready yet, "unfinished" has no manifest.
    assert result.xcom_value == ["before", "gave-up", "last", "after"]


def test_a_missing_landing_root_fails_the_run_and_never_skips(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("DICOM_LANDING_ROOT", str(tmp_path / "not-mounted"))
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    with pytest.raises(AirflowFailException, match="does not exist"):
        poke(make_sensor())


def test_a_manual_run_with_ids_under_a_missing_landing_root_fails_as_a_scheduled_run_would(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("DICOM_LANDING_ROOT", str(tmp_path / "not-mounted"))
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    with pytest.raises(AirflowFailException) as scheduled:
        poke(make_sensor())
    with pytest.raises(AirflowFailException) as manual:
        poke(make_sensor(batch_ids=["20240105-0001"]), run_type="manual")
    assert str(manual.value) == str(scheduled.value)
    assert f"the landing root {tmp_path / 'not-mounted'} does not exist" in str(manual.value)


def test_a_gs_landing_root_whose_bucket_does_not_exist_fails_a_manual_run_with_ids(gcs_emulator, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("DICOM_LANDING_ROOT", "gs://no-such-landing-bucket/zone")
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    with pytest.raises(AirflowFailException, match="bucket 'no-such-landing-bucket' does not exist"):
        poke(make_sensor(batch_ids=["20240105-0001"]), run_type="manual")


ACCESS_DENIED = {
    "error": {"code": 403, "message": "caller does not have storage.objects.list access (injected)",
              "errors": [{"reason": "forbidden", "message": "caller does not have storage.objects.list access"}]}
}  # fmt: skip


@pytest.fixture
def refusing_landing_zone(gcs_emulator, tmp_path, monkeypatch):
    """A gs:// landing zone whose bucket refuses this identity (403) on every request."""
    from tests.faultproxy import Rule, proxied

    monkeypatch.setenv("DICOM_LANDING_ROOT", "gs://refused-landing/zone")
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    with proxied(gcs_emulator.url, "STORAGE_EMULATOR_HOST") as proxy:
        yield proxy.add(Rule(path=r"/b/refused-landing(/|$)", status=403, body=ACCESS_DENIED, times=None))


@pytest.mark.parametrize("run_type", ["scheduled", "manual-with-ids"])
def test_a_landing_zone_refusing_the_identity_fails_the_sensor_at_once(refusing_landing_zone, run_type):
    """A 403 (not a rate limit) is the same on every try: no retry, and the message names the
    identity and the landing zone."""
    from airflow.sdk.exceptions import AirflowFailException

    sensor = make_sensor(batch_ids=["20240105-0001"]) if run_type == "manual-with-ids" else make_sensor()
    with pytest.raises(AirflowFailException) as raised:
        poke(sensor, run_type="manual" if run_type == "manual-with-ids" else run_type)
    assert "Google refused access (403) to the landing zone gs://refused-landing/zone" in str(raised.value)
    assert "connection 'google_cloud_default'" in str(raised.value)
    assert refusing_landing_zone.fired >= 1


def test_a_landing_zone_refusing_the_identity_fails_find_requests_at_once_explained(refusing_landing_zone):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException

    from tests.conftest import REPO_ROOT

    dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags["dicom_withdraw"]
    find_requests = dag.get_task("find_requests").python_callable
    with pytest.raises(AirflowFailException) as raised:
        find_requests(params={}, run_id="scheduled__x")
    assert "Google refused access (403) to the withdrawal requests in gs://refused-landing/zone" in str(raised.value)
    assert "connection 'google_cloud_default'" in str(raised.value)
    assert refusing_landing_zone.fired >= 1


def test_sensor_fails_at_once_with_every_missing_setting_named(monkeypatch):
    monkeypatch.delenv("DICOM_LANDING_ROOT", raising=False)
    monkeypatch.setenv("SEND_TO_GOOGLE", "true")
    monkeypatch.delenv("GOOGLE_CLOUD_STORAGE", raising=False)
    monkeypatch.delenv("GOOGLE_PROJECT_NAME", raising=False)
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as err:  # a setting is not fixed by a retry
        poke(make_sensor())
    message = str(err.value)
    for name in ("DICOM_LANDING_ROOT", "GOOGLE_CLOUD_STORAGE", "GOOGLE_PROJECT_NAME"):
        assert name in message


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"SEND_TO_GOOGLE": "maybe"}, "SEND_TO_GOOGLE must be true or false"),
        ({"DICOM_GZIP_LEVEL": "9"}, "DICOM_GZIP_LEVEL must be between 0 and 3"),
        ({"DICOM_STUDIES_PER_TASK": "many"}, "DICOM_STUDIES_PER_TASK must be a whole number"),
        ({"GOOGLE_STORAGE_COLLECTION": "IRB-1"}, "GOOGLE_STORAGE_COLLECTION: collection 'IRB-1' must match"),
        ({"GOOGLE_STORAGE_COLLECTION": "I" * 1024}, "limit of 1024 bytes per object name"),
        ({"DICOM_MAX_BATCHES_PER_RUN": "0"}, "DICOM_MAX_BATCHES_PER_RUN must be between 1"),
        ({"DICOM_LANDING_ROOT": "gs://Staging/x"}, "DICOM_LANDING_ROOT: bucket name 'Staging' has uppercase"),
        # A typo must never switch a check off without a word (issue 11).
        ({"DICOM_PERSON_ATTRIBUTES": "PatientsName"}, "DICOM_PERSON_ATTRIBUTES: not DICOM keywords.*PatientsName"),
        ({"DICOM_PERSON_ATTRIBUTES": "OperatorsName, referringphysicianname"}, "referringphysicianname"),
        ({"DICOM_HEADER_ALLOW_LIST": "Modality, SeriesDescripton"}, "DICOM_HEADER_ALLOW_LIST: .*SeriesDescripton"),
        ({"DICOM_PERSON_ATTRIBUTES_REMOVED": "PatientNam"}, "DICOM_PERSON_ATTRIBUTES_REMOVED: .*PatientNam"),
        ({"DICOM_PRIVATE_TAGS": "keep"}, "DICOM_PRIVATE_TAGS must be one of strip, quarantine"),
        ({"DICOM_PRIVATE_TAGS": "off"}, "DICOM_PRIVATE_TAGS must be one of"),
        ({"DICOM_DEID_PROFILE": "none"}, "DICOM_DEID_PROFILE must be one of contract, basic"),
        ({"DICOM_PRIVATE_ALLOW": "SIEMENS CSA HEADER:0029,1010"}, "not a creator:gggg,xxee pattern"),
        ({"DICOM_PRIVATE_ALLOW": "GEMS_ACQU_01:0018,xx39"}, "not a private"),
        # lookup.json fields a site declares: plain names, never a person field spelled otherwise.
        (
            {"DICOM_LOOKUP_FIELDS": "ScanNotes, Scan Notes"},
            "DICOM_LOOKUP_FIELDS: 'Scan Notes' is not a plain field name",
        ),
        ({"DICOM_LOOKUP_FIELDS": "Seq.Notes"}, "DICOM_LOOKUP_FIELDS: 'Seq.Notes' is not a plain field name"),
        ({"DICOM_LOOKUP_FIELDS": "N\u043etes"}, "is not a plain field name"),  # a Cyrillic o
        ({"DICOM_LOOKUP_FIELDS": "flagged"}, "DICOM_LOOKUP_FIELDS: 'flagged' is the flag"),
        ({"DICOM_LOOKUP_FIELDS": "PatientsName"}, "'PatientsName' is another spelling of PatientName"),
        ({"DICOM_LOOKUP_FIELDS": "patient_name"}, "'patient_name' is another spelling of PatientName"),
        ({"DICOM_LOOKUP_FIELDS": "OtherPatientID"}, "another spelling of OtherPatientIDs"),
        ({"DICOM_LOOKUP_FIELDS": "Radiologist"}, "'Radiologist' is named for a person's name"),
        ({"DICOM_LOOKUP_FIELDS": "ReviewedBy"}, "'ReviewedBy' is named for a person's name"),
        ({"DICOM_LOOKUP_FIELDS": "OperatorsName2"}, "'OperatorsName2' is named for a person's name"),
        ({"DICOM_LOOKUP_FIELDS": "MRN"}, "'MRN' is named for a person's name"),
        ({"DICOM_LOOKUP_FIELDS": "ScanNotes,Surname"}, "'Surname' is named for a person's name"),
    ],
)
def test_bad_settings_are_named(env, problem):
    base = {"DICOM_LANDING_ROOT": "/data/landing", "DICOM_LOCAL_OUTPUT": "/data/out"}
    with pytest.raises(SettingsError, match=problem):
        Settings.load({**base, **env}.get)


@pytest.mark.parametrize(
    "keywords",
    [
        "PatientBirthDate",
        "Modality, PatientComments",
        "InstitutionAddress,IssuerOfPatientID",
        "AdditionalPatientHistory",
        "MedicalRecordLocator",
        "PatientWeight",
        "StudyID",
        "OtherPatientIDs",
        "ReferringPhysicianName",
        "InstitutionName",
        "ContentDate",
        "DeviceSerialNumber",
    ],
)
def test_the_header_allow_list_refuses_attributes_annex_e_counts_as_identifying(keywords):
    """Rows must not carry what the gate does not judge: a birth date, comments, an address..."""
    base = {"DICOM_LANDING_ROOT": "/data/landing", "DICOM_LOCAL_OUTPUT": "/data/out"}
    with pytest.raises(SettingsError, match=r"DICOM_HEADER_ALLOW_LIST: attributes PS3\.15 Annex E counts") as err:
        Settings.load({**base, "DICOM_HEADER_ALLOW_LIST": keywords}.get)
    for keyword in keywords.split(","):
        if keyword.strip() != "Modality":
            assert keyword.strip() in str(err.value)
    assert "Modality" not in str(err.value).split("identifying")[-1]


def test_the_header_allow_list_takes_the_default_fields_and_uids():
    base = {"DICOM_LANDING_ROOT": "/data/landing", "DICOM_LOCAL_OUTPUT": "/data/out"}
    keywords = "PatientSex, PatientAge, StudyDescription, StudyInstanceUID, FrameOfReferenceUID, Modality, KVP"
    settings = Settings.load({**base, "DICOM_HEADER_ALLOW_LIST": keywords}.get)
    assert "FrameOfReferenceUID" in settings.header_allow_list
    assert len(settings.header_allow_list) == 7


def test_settings_defaults_and_lists():
    settings = Settings.load(
        {
            "DICOM_LANDING_ROOT": "gs://staging/landing",
            "SEND_TO_GOOGLE": "TRUE",
            "GOOGLE_CLOUD_STORAGE": "radiology",
            "GOOGLE_PROJECT_NAME": "p",
            "DICOM_PERSON_ATTRIBUTES": "PatientName, OperatorsName",
        }.get
    )
    assert settings.send_to_google is True
    assert settings.compresslevel == 1
    assert settings.replace_changed is False
    # DICOM_PERSON_ATTRIBUTES adds to the contract's list: naming two defaults changes nothing.
    assert settings.policy.person_attributes == DEFAULT_PERSON_ATTRIBUTES
    assert settings.policy.private_tags == "strip"
    assert settings.policy.profile == "contract"


def test_local_mode_needs_only_the_landing_root(monkeypatch, tmp_path):
    """SEND_TO_GOOGLE=false is the default: with no DICOM_LOCAL_OUTPUT, the output goes to
    `dicom_output` in the Airflow home, so the spec's settings alone start a run."""
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow-home"))
    settings = Settings.load({"DICOM_LANDING_ROOT": "/data/landing"}.get)
    assert (settings.send_to_google, settings.local_output) == (False, str(tmp_path / "airflow-home" / "dicom_output"))
    given = Settings.load({"DICOM_LANDING_ROOT": "/data/landing", "DICOM_LOCAL_OUTPUT": " /data/out "}.get)
    assert given.local_output == "/data/out"
    # A bad SEND_TO_GOOGLE is named alone, not with a folder it would not need.
    with pytest.raises(SettingsError) as err:
        Settings.load({"DICOM_LANDING_ROOT": "/data/landing", "SEND_TO_GOOGLE": "maybe"}.get)
    assert "SEND_TO_GOOGLE must be true or false" in str(err.value)
    assert "DICOM_LOCAL_OUTPUT" not in str(err.value)


def test_declared_lookup_fields_reach_the_policy_and_the_report():
    base = {"DICOM_LANDING_ROOT": "/data/landing", "DICOM_LOCAL_OUTPUT": "/data/out"}
    assert Settings.load(base.get).policy.lookup_fields == ()
    settings = Settings.load({**base, "DICOM_LOOKUP_FIELDS": " ScanNotes, Scanner_2 ,CTDIvol"}.get)
    assert settings.policy.lookup_fields == ("ScanNotes", "Scanner_2", "CTDIvol")
    assert settings.archive.policy.describe()["lookup_fields"] == ["ScanNotes", "Scanner_2", "CTDIvol"]


def test_private_allow_patterns_are_parsed():
    settings = Settings.load(
        {
            "DICOM_LANDING_ROOT": "/data/landing",
            "DICOM_LOCAL_OUTPUT": "/data/out",
            "DICOM_PRIVATE_TAGS": "Quarantine",
            "DICOM_PRIVATE_ALLOW": "SIEMENS CSA HEADER:0029,xx10; GEMS_PARM_01:0043,xx39\nGEMS_ACQU_01:0019,XXBB",
        }.get
    )
    policy = settings.policy
    assert policy.private_tags == "quarantine"
    assert [str(rule) for rule in policy.private_allow] == [
        "SIEMENS CSA HEADER:0029,xx10",
        "GEMS_PARM_01:0043,xx39",
        "GEMS_ACQU_01:0019,xxBB",
    ]
    assert policy.private_allowed("SIEMENS CSA HEADER", 0x0029, 0x1010)
    assert policy.private_allowed("SIEMENS CSA HEADER", 0x0029, 0x1110)  # any block the creator reserved
    assert not policy.private_allowed("SIEMENS CSA HEADER", 0x0029, 0x1020)
    assert not policy.private_allowed("SIEMENS MEDCOM HEADER", 0x0029, 0x1010)
    assert not policy.private_allowed(None, 0x0029, 0x1010)


@pytest.mark.parametrize(
    ("counts", "preferred", "limit"),
    [([3, 4], 25, 512), ([50_000], 25, 512), ([20_000, 20_000, 1, 1], 25, 512), ([10_000] * 30, 25, 100), ([0], 5, 1)],
)
def test_chunking_keeps_the_mapped_tasks_of_a_run_under_the_limit(counts, preferred, limit):
    from math import ceil

    from dicom_archive.batch import studies_per_chunk

    size = studies_per_chunk(counts, preferred, limit)
    assert size >= preferred
    assert sum(ceil(n / size) for n in counts) <= max(limit, len(counts))
    if sum(ceil(n / preferred) for n in counts) <= limit - len(counts):
        assert size == preferred, "small runs keep the preferred size"


def test_manual_run_without_ids_and_nothing_pending_is_skipped_at_once(landing):
    from airflow.sdk.exceptions import AirflowSkipException

    for batch_dir in landing.iterdir():
        (batch_dir / "batch.report.json").write_text("{}")
    result = poke(make_sensor(), run_type="manual")
    assert isinstance(result, AirflowSkipException)
    assert "nothing pending" in str(result)


# soft_fail, passed the usual ways, in real runs (a DAG parsed from a folder, run with dag.test()).
SOFT_FAIL_DAG_ID = "test_completed_batch_sensor_soft_fail"
SOFT_FAIL_DAG = """
from datetime import UTC, datetime

from airflow.sdk import DAG

from sensors.batches import CompletedBatchSensor

with DAG(
    dag_id="{dag_id}",
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    default_args={{"soft_fail": True, "retries": 2, "poke_interval": 7}},
):
    CompletedBatchSensor(task_id="soft_by_default_args")
    CompletedBatchSensor(task_id="soft", soft_fail=True, mode="poke", poke_interval=5, timeout=30)
    CompletedBatchSensor(task_id="hard", soft_fail=False)
"""


@pytest.fixture(scope="module")
def soft_fail_dag(airflow_db, tmp_path_factory):
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    folder = tmp_path_factory.mktemp("soft_fail_dags")
    (folder / "soft_fail_dag.py").write_text(SOFT_FAIL_DAG.format(dag_id=SOFT_FAIL_DAG_ID))
    bag = DagBag(dag_folder=str(folder), bundle_path=folder)
    assert bag.import_errors == {}, "passing soft_fail and the other sensor arguments is accepted"
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    return bag.dags[SOFT_FAIL_DAG_ID]


def sensor_states(dag) -> dict[str, tuple[str, int]]:
    run = dag.test()
    return {ti.task_id: (str(ti.state), ti.try_number) for ti in run.get_task_instances()}


def test_sensor_arguments_are_forwarded(soft_fail_dag):
    soft, hard = soft_fail_dag.get_task("soft"), soft_fail_dag.get_task("hard")
    assert (soft.soft_fail, soft.mode, soft.poke_interval, soft.timeout) == (True, "poke", 5, 30)
    assert (hard.soft_fail, hard.mode) == (False, "reschedule")
    by_default_args = soft_fail_dag.get_task("soft_by_default_args")
    assert (by_default_args.soft_fail, by_default_args.poke_interval) == (True, 7)


def test_soft_fail_skips_when_the_landing_zone_cannot_be_read(soft_fail_dag, tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(tmp_path / "not-mounted"))
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))

    assert sensor_states(soft_fail_dag) == {
        "soft_by_default_args": ("skipped", 1),
        "soft": ("skipped", 1),
        "hard": ("failed", 1),  # without soft_fail a landing zone that cannot be read fails the run
    }


def test_soft_fail_never_skips_a_bad_setting(soft_fail_dag, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(tmp_path))
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("DICOM_GZIP_LEVEL", "9")

    # Failed at once, with no retry, whatever soft_fail says: a run that skips on a bad setting
    # would hide it for good.
    assert sensor_states(soft_fail_dag) == {name: ("failed", 1) for name in ("soft_by_default_args", "soft", "hard")}
    log = capfd.readouterr()
    assert "DICOM_GZIP_LEVEL must be between 0 and 3" in log.out + log.err


# A bad setting with retries on, in real runs of the project's DAGs: every task that reads the
# settings (the sensor, plan_batches, collection_summary and batch_report run ALL_DONE, the
# withdrawal DAG's find_requests) fails at once; no task is ever up for retry.
@pytest.mark.parametrize(
    ("dag_id", "env", "variables", "problem"),
    [
        ("dicom_storage", {"DICOM_PRIVATE_TAGS": "keep"}, {}, "DICOM_PRIVATE_TAGS must be one of"),
        ("dicom_storage", {}, {"DICOM_DEID_PROFILE": "strict"}, "DICOM_DEID_PROFILE must be one of"),
        ("dicom_storage", {}, {"SEND_TO_GOOGLE": "true"}, "GOOGLE_CLOUD_STORAGE \\(the bucket\\) is required"),
        ("dicom_withdraw", {"DICOM_GZIP_LEVEL": "9"}, {}, "DICOM_GZIP_LEVEL must be between 0 and 3"),
        ("dicom_withdraw", {}, {"DICOM_MAX_BATCHES_PER_RUN": "0"}, "DICOM_MAX_BATCHES_PER_RUN must be between 1"),
    ],
)
def test_a_bad_setting_fails_every_task_at_once_without_retries(
    airflow_db, tmp_path, monkeypatch, capfd, dag_id, env, variables, problem
):
    import re

    from airflow.models import Variable

    from tests.conftest import run_dag

    root = tmp_path / "landing"
    write_batch(root, batch("ok1", datetime(2024, 1, 5, tzinfo=UTC)))
    for name in ("SEND_TO_GOOGLE", "GOOGLE_CLOUD_STORAGE", "GOOGLE_PROJECT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(root))
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("DICOM_TASK_RETRIES", "2")  # read when the DAG file is parsed
    monkeypatch.setenv("DICOM_RETRY_DELAY_SECONDS", "1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name, value in variables.items():
        Variable.set(name, value)
    try:
        run = run_dag(["ok1"]) if dag_id == "dicom_storage" else run_dag(dag_id=dag_id, conf={})
    finally:
        for name in variables:
            Variable.delete(name)
    tries = {(ti.task_id, ti.map_index): (str(ti.state), ti.try_number) for ti in run.get_task_instances()}
    assert str(run.state) == "failed"
    assert tries
    assert all(try_number <= 1 for _, try_number in tries.values()), tries
    assert not [key for key, (state, _) in tries.items() if state == "up_for_retry"], tries
    failed = {task_id for (task_id, _), (state, _) in tries.items() if state == "failed"}
    if dag_id == "dicom_storage":
        assert {"wait_for_batches", "collection_summary"} <= failed, tries
    else:
        assert failed == {"find_requests"}, tries
    log = capfd.readouterr()
    assert re.search(problem, log.out + log.err)


# Parse-time settings (read from the environment when a DAG file is parsed): a bad value is an
# import error that names the setting and its rule, not a bare int() or croniter message.
WHOLE = "must be a whole number of {} or more, not {}"
CRON = "must be a cron expression .* not {!r}"


@pytest.mark.parametrize(
    ("dag_file", "name", "value", "message"),
    [
        ("dicom_storage.py", "DICOM_TASK_RETRIES", "abc", WHOLE.format(0, "'abc'")),
        ("dicom_withdraw.py", "DICOM_TASK_RETRIES", "-1", WHOLE.format(0, "-1")),
        ("dicom_storage.py", "DICOM_RETRY_DELAY_SECONDS", "1.5", WHOLE.format(0, "'1.5'")),
        ("dicom_storage.py", "DICOM_MAX_ACTIVE_RUNS", "0", WHOLE.format(1, "0")),
        ("dicom_storage.py", "DICOM_SCHEDULE", "bogus", CRON.format("bogus")),
        ("dicom_withdraw.py", "DICOM_WITHDRAW_SCHEDULE", "every 15 min", CRON.format("every 15 min")),
    ],
)
def test_a_bad_parse_time_setting_is_an_import_error_that_names_it(
    airflow_db, monkeypatch, dag_file, name, value, message
):
    import re

    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import REPO_ROOT

    monkeypatch.setenv(name, value)
    bag = DagBag(dag_folder=str(REPO_ROOT / "dags" / dag_file))
    errors = {path.rsplit("/", 1)[-1]: error for path, error in bag.import_errors.items()}
    assert list(errors) == [dag_file], bag.import_errors
    assert re.search(f"{name} {message}", errors[dag_file]), errors[dag_file]


def test_good_parse_time_settings_reach_the_dags(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import REPO_ROOT

    def parsed(**env: str) -> tuple:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
        assert bag.import_errors == {}
        return bag.get_dag("dicom_storage"), bag.get_dag("dicom_withdraw")

    storage, withdraw = parsed(DICOM_SCHEDULE="none", DICOM_WITHDRAW_SCHEDULE="None")
    assert (type(storage.timetable).__name__, type(withdraw.timetable).__name__) == ("NullTimetable",) * 2
    storage, withdraw = parsed(DICOM_SCHEDULE="@daily", DICOM_WITHDRAW_SCHEDULE="*/5 * * * *")
    assert (storage.timetable.expression, withdraw.timetable.expression) == ("0 0 * * *", "*/5 * * * *")
    # The storage DAG's runs cover data intervals; a withdrawal run is a trigger at a time.
    kinds = (type(storage.timetable).__name__, type(withdraw.timetable).__name__)
    assert kinds == ("CronDataIntervalTimetable", "CronTriggerTimetable")
    assert str(storage.timetable.timezone) == str(withdraw.timetable.timezone) == "UTC"
    storage, _ = parsed(DICOM_TASK_RETRIES="", DICOM_MAX_ACTIVE_RUNS=" 4 ")  # empty: the default
    assert (storage.max_active_runs, storage.get_task("plan_batches").retries) == (4, 3)
    storage, withdraw = parsed(DICOM_RETRY_DELAY_SECONDS="7")  # both DAGs' tasks
    for task in (storage.get_task("plan_batches"), *withdraw.tasks):
        assert task.retry_delay.total_seconds() == 7, task.task_id
        policy = (task.retries, bool(task.retry_exponential_backoff), task.max_retry_delay.total_seconds(), task.owner)
        assert policy == (3, True, 600, "radiology-research"), task.task_id


def test_a_parse_time_setting_set_as_an_airflow_variable_is_named_in_a_warning(
    airflow_db, tmp_path, monkeypatch, caplog
):
    """Parse-time settings come from the environment only; one set as an Airflow Variable is not
    read, and a real run says so (once, in its plan task) rather than leave it looking applied."""
    from airflow.models import Variable

    from tests.conftest import run_dag

    root = tmp_path / "landing"
    write_batch(root, batch("ok1", datetime(2024, 1, 5, tzinfo=UTC)))
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(root))
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))
    monkeypatch.delenv("DICOM_SCHEDULE", raising=False)
    monkeypatch.setenv("DICOM_TASK_RETRIES", "0")
    monkeypatch.delenv("DICOM_MAX_ACTIVE_RUNS", raising=False)
    variables = {
        "DICOM_SCHEDULE": "none",  # ignored: the DAG stays hourly
        "DICOM_TASK_RETRIES": "4",  # ignored: the environment's 0 applies
        "DICOM_MAX_ACTIVE_RUNS": "2",  # what the DAG uses anyway: nothing to tell
    }
    for name, value in variables.items():
        Variable.set(name, value)
    try:
        run = run_dag(["ok1"])
    finally:
        for name in variables:
            Variable.delete(name)
    assert str(run.state) == "success", "a warning never fails the run"
    warned = [r for r in caplog.records if "which is not read" in r.getMessage()]
    assert {r.levelname for r in warned} == {"WARNING"}
    assert sorted(r.getMessage().split()[0] for r in warned) == ["DICOM_SCHEDULE", "DICOM_TASK_RETRIES"]
    for record in warned:
        assert "is set as an Airflow Variable" in record.getMessage()
        assert "parse-time settings come from the environment only (see README, Settings)" in record.getMessage()


class DenyingSecretsBackend:
    """A secrets backend that refuses every Variable: what Airflow 3.3 lets reach the caller of
    Variable.get (a backend's other failures it logs and reads as "not found")."""

    def _set_connection_class(self, cls: type) -> None:
        pass

    def get_variable(self, key: str, team_name: str | None = None) -> str | None:
        from airflow.sdk.exceptions import AirflowSecretsBackendAccessDenied

        raise AirflowSecretsBackendAccessDenied(f"the secrets backend refuses Variable {key} (injected)")

    def get_connection(self, conn_id: str, team_name: str | None = None) -> None:
        return None


@pytest.fixture
def denying_secrets_backend(monkeypatch):
    from airflow.sdk.configuration import clear_secrets_backends_cache

    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", f"{__name__}.DenyingSecretsBackend")
    monkeypatch.setenv("AIRFLOW__WORKERS__SECRETS_BACKEND", f"{__name__}.DenyingSecretsBackend")
    clear_secrets_backends_cache()
    yield
    monkeypatch.undo()
    clear_secrets_backends_cache()


@pytest.mark.parametrize("in_environment", [{}, {"DICOM_LANDING_ROOT": "/tmp/landing"}], ids=["root", "send"])
def test_a_variable_that_cannot_be_read_is_never_read_as_not_set(denying_secrets_backend, monkeypatch, in_environment):
    """Settings kept as Airflow Variables: a backend that fails to answer is no missing setting
    (a false "bad setting" that fails the task at once, or SEND_TO_GOOGLE=true read as false and
    the run kept local). The error reaches the task, which fails (and is retried)."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSecretsBackendAccessDenied

    from hooks.dicom_storage import load_settings
    from operators.links import links_to_view

    for name in ("DICOM_LANDING_ROOT", "SEND_TO_GOOGLE", "GOOGLE_CLOUD_STORAGE", "GOOGLE_PROJECT_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in in_environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DICOM_LINKS_TO", raising=False)

    with pytest.raises(AirflowSecretsBackendAccessDenied) as raised:
        load_settings()
    assert not isinstance(raised.value, AirflowFailException)
    with pytest.raises(AirflowSecretsBackendAccessDenied):
        links_to_view()
