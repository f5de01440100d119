"""`impersonation_chain` of every operator and the sensor: templated, a string or a list, and
the identity the Google clients use (through the provider's GCSHook and BigQueryHook).

The connection holds a service-account key made up for the test (nothing is sent anywhere:
building a client does not call Google); the clients must hold impersonated credentials for
the chain's last account, with the accounts before it as delegates.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import PROJECT

SOURCE = f"source@{PROJECT}.iam.gserviceaccount.com"
TARGET = f"archiver@{PROJECT}.iam.gserviceaccount.com"
DELEGATE = f"delegate@{PROJECT}.iam.gserviceaccount.com"
CONN_ID = "google_with_key"


@pytest.fixture(scope="module")
def key_connection() -> str:
    """A connection with a service-account key of its own (a fresh RSA key, never sent)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    keyfile = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "test",
        "private_key": pem,
        "client_email": SOURCE,
        "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",  # never reached: no request is made
    }
    conn = {"conn_type": "google_cloud_platform", "extra": {"keyfile_dict": json.dumps(keyfile), "project": PROJECT}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
        yield CONN_ID


@pytest.fixture
def local_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("SEND_TO_GOOGLE", "false")
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(tmp_path / "landing"))
    monkeypatch.setenv("DICOM_LOCAL_OUTPUT", str(tmp_path / "out"))


def make(kind: str, **kwargs):
    from operators.archive import DicomStudyArchiveOperator
    from operators.bigquery import DicomMetadataToBigQueryOperator
    from operators.withdraw import DicomWithdrawOperator
    from sensors.batches import CompletedBatchSensor

    if kind == "archive":
        return DicomStudyArchiveOperator(task_id="t", study_groups=[], **kwargs)
    if kind == "bigquery":
        return DicomMetadataToBigQueryOperator(task_id="t", plan_ref={}, **kwargs)
    if kind == "withdraw":
        return DicomWithdrawOperator(task_id="t", request={}, **kwargs)
    return CompletedBatchSensor(task_id="t", **kwargs)


def impersonated(credentials) -> tuple[str, list[str]]:
    from google.auth import impersonated_credentials

    assert isinstance(credentials, impersonated_credentials.Credentials), type(credentials)
    assert credentials._source_credentials.service_account_email == SOURCE
    return credentials._target_principal, list(credentials._delegates or [])


@pytest.mark.parametrize("kind", ["archive", "bigquery", "withdraw", "sensor"])
@pytest.mark.parametrize(
    ("chain", "params", "expected"),
    [
        ("{{ params.account }}", {"account": TARGET}, (TARGET, [])),
        (["{{ params.delegate }}", TARGET], {"delegate": DELEGATE}, (TARGET, [DELEGATE])),
    ],
    ids=["string", "list"],
)
def test_templated_chain_is_the_identity_of_the_google_clients(
    key_connection, local_settings, kind, chain, params, expected
):
    task = make(kind, gcp_conn_id=key_connection, impersonation_chain=chain)
    assert "impersonation_chain" in task.template_fields

    task.render_template_fields({"params": params})

    assert task.impersonation_chain == (expected[0] if isinstance(chain, str) else [DELEGATE, TARGET])
    hook = task.storage_hook()
    assert impersonated(hook.storage_client()._credentials) == expected
    assert impersonated(hook.bigquery_client(PROJECT)._credentials) == expected
    assert impersonated(hook.bigquery_client(PROJECT, on_job=lambda job_id: None)._credentials) == expected
    assert f"impersonating {TARGET}" in hook.describe_credentials()


def test_without_a_chain_the_clients_use_the_connections_own_key(key_connection, local_settings):
    from google.oauth2 import service_account

    hook = make("bigquery", gcp_conn_id=key_connection).storage_hook()
    credentials = hook.storage_client()._credentials
    assert isinstance(credentials, service_account.Credentials)
    assert credentials.service_account_email == SOURCE


@pytest.mark.parametrize("kind", ["archive", "bigquery", "withdraw", "sensor"])
def test_the_identity_setting_is_the_default_and_an_argument_wins(key_connection, local_settings, monkeypatch, kind):
    monkeypatch.setenv("DICOM_IMPERSONATION_CHAIN", f"{DELEGATE}, {TARGET}")
    task = make(kind, gcp_conn_id=key_connection)
    task.render_template_fields({"params": {}})
    assert task.impersonation_chain == [DELEGATE, TARGET]
    assert impersonated(task.storage_hook().storage_client()._credentials) == (TARGET, [DELEGATE])

    own = make(kind, gcp_conn_id=key_connection, impersonation_chain=DELEGATE)
    own.render_template_fields({"params": {}})
    assert own.impersonation_chain == DELEGATE
    assert impersonated(own.storage_hook().bigquery_client(PROJECT)._credentials) == (DELEGATE, [])


def test_the_dags_own_tasks_build_their_hook_from_the_identity_setting(monkeypatch, tmp_path):
    """The plan, summary and report tasks (and the withdrawal, batches-view and demo code) take no
    operator arguments: their hook is DicomStorageHook.of_settings, never a bare DicomStorageHook()."""
    import ast

    from dicom_archive.settings import Settings
    from hooks.dicom_storage import DicomStorageHook
    from tests.conftest import REPO_ROOT

    settings = Settings.load(
        {
            "SEND_TO_GOOGLE": "false",
            "DICOM_LANDING_ROOT": "x",
            "DICOM_LOCAL_OUTPUT": "y",
            "DICOM_IMPERSONATION_CHAIN": TARGET,
        }.get
    )
    assert DicomStorageHook.of_settings(settings).impersonation_chain == [TARGET]
    assert (
        DicomStorageHook.of_settings(
            Settings.load({"DICOM_LANDING_ROOT": "x", "DICOM_LOCAL_OUTPUT": "y"}.get)
        ).impersonation_chain
        is None
    )

    sources = [
        *(REPO_ROOT / "dags").glob("*.py"),
        REPO_ROOT / "plugins" / "batches_view" / "app.py",
        REPO_ROOT / "tools" / "demo.py",
    ]
    built = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.startswith("DicomStorageHook"):
                    built.append((path.name, name))
    assert built, "the DAGs build hooks"
    assert {name for _, name in built} == {"DicomStorageHook.of_settings"}, built


@pytest.mark.parametrize("value", ["archiver", "a@b@c", "@example.com", "x@", "two words@x.com"])
def test_a_malformed_identity_setting_fails_the_settings_check(value):
    from dicom_archive.settings import Settings, SettingsError

    given = {"DICOM_LANDING_ROOT": "x", "DICOM_LOCAL_OUTPUT": "y", "DICOM_IMPERSONATION_CHAIN": f"{TARGET},{value}"}
    with pytest.raises(SettingsError, match="DICOM_IMPERSONATION_CHAIN: not service account e-mail addresses"):
        Settings.load(given.get)


# GOOGLE_APPLICATION_CREDENTIALS is read like every other setting: the environment, then the
# Airflow Variable. Set as a Variable, it is the key of a connection that names none of its own.
KEY_FILE_ACCOUNT = f"keyfile@{PROJECT}.iam.gserviceaccount.com"
NO_KEY_CONN_ID = "google_without_key"


def service_account_key(email: str) -> dict:
    """A service-account key made up for the test (a fresh RSA key, never sent)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "test",
        "private_key": pem,
        "client_email": email,
        "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",  # never reached: no request is made
    }


PROBE_DAG = """
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from airflow.sdk import DAG, task

with DAG(dag_id="test_credentials_setting", schedule=None, start_date=datetime(2024, 1, 1, tzinfo=UTC)):

    @task
    def identities():
        from hooks.dicom_storage import DicomStorageHook, load_settings

        settings = load_settings()
        found = {"setting": settings.credentials_file}
        hooks = {
            "tasks": DicomStorageHook.of_settings(settings),  # the DAG's own tasks
            "operators": DicomStorageHook(gcp_conn_id="google_without_key"),  # storage_hook() of an operator
            "own_key": DicomStorageHook(gcp_conn_id="google_with_key"),
        }
        for name, hook in hooks.items():
            clients = [hook.storage_client(), hook.bigquery_client("p"), hook.bigquery_client("p", on_job=print)]
            found[name] = sorted({c._credentials.service_account_email for c in clients})
            found[name + " described"] = hook.describe_credentials()
        Path(os.environ["IDENTITIES_OUT"]).write_text(json.dumps(found))

    identities()
"""


def run_identities(tmp_path) -> dict:
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "credentials_dag.py").write_text(PROBE_DAG)
    bag = DagBag(dag_folder=str(folder), bundle_path=folder)
    assert bag.import_errors == {}
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    run = bag.dags["test_credentials_setting"].test()
    assert str(run.state) == "success"
    return json.loads((tmp_path / "identities.json").read_text())


def test_the_credentials_setting_as_a_variable_is_the_key_of_the_connection(
    airflow_db, key_connection, local_settings, monkeypatch, tmp_path
):
    """Set as an Airflow Variable (read through the Task SDK, in a task), GOOGLE_APPLICATION_CREDENTIALS
    is the key of every client of a connection that names no credentials of its own."""
    from airflow.models import Variable

    key_file = tmp_path / "sa-key.json"
    key_file.write_text(json.dumps(service_account_key(KEY_FILE_ACCOUNT)))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("IDENTITIES_OUT", str(tmp_path / "identities.json"))
    no_key = json.dumps({"conn_type": "google_cloud_platform", "extra": {"project": PROJECT}})
    monkeypatch.setenv(f"AIRFLOW_CONN_{NO_KEY_CONN_ID.upper()}", no_key)
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", no_key)

    Variable.set("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    try:
        found = run_identities(tmp_path)
    finally:
        Variable.delete("GOOGLE_APPLICATION_CREDENTIALS")
    assert found["setting"] == str(key_file)
    for name in ("tasks", "operators"):
        assert found[name] == [KEY_FILE_ACCOUNT]
        assert f"GOOGLE_APPLICATION_CREDENTIALS={key_file}" in found[f"{name} described"]
    assert found["own_key"] == [SOURCE]  # a connection's own credentials win


def test_the_credentials_setting_comes_from_the_environment_first():
    from dicom_archive.settings import Settings

    base = {"DICOM_LANDING_ROOT": "/data/landing", "DICOM_LOCAL_OUTPUT": "/data/out"}
    assert Settings.load(base.get).credentials_file is None
    given = {**base, "GOOGLE_APPLICATION_CREDENTIALS": " /keys/sa.json "}
    assert Settings.load(given.get).credentials_file == "/keys/sa.json"


def test_without_the_credentials_setting_the_clients_use_application_default_credentials(local_settings, monkeypatch):
    from hooks.dicom_storage import DicomStorageHook, load_settings

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    assert load_settings().credentials_file is None
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT",
        json.dumps({"conn_type": "google_cloud_platform", "extra": {"project": PROJECT}}),
    )
    assert "Application Default Credentials" in DicomStorageHook().describe_credentials()


@pytest.mark.parametrize("client", ["storage", "bigquery"])
def test_a_fresh_airflow_without_the_default_connection_uses_the_key_file(
    airflow_db, local_settings, monkeypatch, tmp_path, client
):
    """Airflow 3 creates no connection: a missing google_cloud_default is Application Default
    Credentials (here GOOGLE_APPLICATION_CREDENTIALS' key file), not a failure of every task."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    from hooks.dicom_storage import DicomStorageHook

    key_file = tmp_path / "sa-key.json"
    key_file.write_text(json.dumps(service_account_key(KEY_FILE_ACCOUNT)))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.delenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", raising=False)
    with pytest.raises(AirflowNotFoundException):
        DicomStorageHook.get_connection("google_cloud_default")  # a fresh Airflow indeed

    hook = DicomStorageHook()
    made = hook.storage_client() if client == "storage" else hook.bigquery_client(PROJECT)
    assert made._credentials.service_account_email == KEY_FILE_ACCOUNT
    assert f"GOOGLE_APPLICATION_CREDENTIALS={key_file}" in hook.describe_credentials()


def test_a_connection_named_by_the_user_must_exist(airflow_db, local_settings, monkeypatch):
    from airflow.sdk.exceptions import AirflowNotFoundException

    from hooks.dicom_storage import DicomStorageHook

    with pytest.raises(AirflowNotFoundException):
        DicomStorageHook(gcp_conn_id="google_typo").storage_client()


@pytest.fixture
def metadata_server_watch(monkeypatch):
    """A stand-in for the GCE metadata server that only records whether anyone knocked."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("GCE_METADATA_HOST", address)
    monkeypatch.setenv("GCE_METADATA_IP", address)

    def knocked() -> bool:
        server.setblocking(False)
        try:
            server.accept()[0].close()
        except BlockingIOError:
            return False
        return True

    yield knocked
    server.close()


@pytest.mark.parametrize("client", ["storage", "bigquery", "bigquery reporting its jobs"])
def test_a_credentials_file_that_does_not_exist_fails_at_once_naming_the_connection(
    airflow_db, local_settings, monkeypatch, tmp_path, metadata_server_watch, client
):
    import time

    from airflow.sdk.exceptions import AirflowFailException

    from hooks.dicom_storage import DicomStorageHook
    from operators.failures import permanent_errors

    missing = tmp_path / "no-such-key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT",
        json.dumps({"conn_type": "google_cloud_platform", "extra": {"project": PROJECT}}),
    )
    hook = DicomStorageHook()
    make = {
        "storage": hook.storage_client,
        "bigquery": lambda: hook.bigquery_client(PROJECT),
        "bigquery reporting its jobs": lambda: hook.bigquery_client(PROJECT, on_job=print),
    }[client]
    started = time.monotonic()
    # An AirflowFailException: fails at once even where a client is made outside a guard.
    with pytest.raises(AirflowFailException, match="No Google credentials") as raised:
        make()
    assert time.monotonic() - started < 5
    assert not metadata_server_watch(), "no credentials is known without asking the metadata server"
    err = raised.value
    assert isinstance(err, permanent_errors())
    message = str(err)
    assert "connection 'google_cloud_default'" in message
    assert str(missing) in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message
    assert "Application Default Credentials" in message
    assert "is_anonymous" in message


@pytest.mark.parametrize("named_by", ["the setting as an Airflow Variable", "the connection's key_path"])
def test_a_key_file_the_provider_opens_that_does_not_exist_fails_at_once(
    airflow_db, local_settings, monkeypatch, tmp_path, metadata_server_watch, named_by
):
    """The provider opens a key file itself when the setting comes from a Variable (handed over as
    the connection's key_path) or the connection names one: a missing file is a bad setting too,
    not a FileNotFoundError retried for minutes."""
    from airflow.sdk.exceptions import AirflowFailException

    from hooks.dicom_storage import DicomStorageHook
    from operators.failures import permanent_errors

    missing = tmp_path / "no-such-key.json"
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    extra = (
        {"project": PROJECT} if named_by.startswith("the setting") else {"project": PROJECT, "key_path": str(missing)}
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps({"conn_type": "google_cloud_platform", "extra": extra})
    )
    hook = DicomStorageHook(credentials_file=str(missing) if named_by.startswith("the setting") else None)
    for make in (hook.storage_client, lambda: hook.bigquery_client(PROJECT)):
        with pytest.raises(AirflowFailException, match="No Google credentials") as raised:
            make()
        assert isinstance(raised.value, permanent_errors())
        assert "connection 'google_cloud_default'" in str(raised.value)
        assert str(missing) in str(raised.value)
    assert not metadata_server_watch()


def test_no_credentials_fail_the_run_at_once_without_retries(airflow_db, monkeypatch, tmp_path, capfd):
    """A real run of the DAG with retries on: the first task that makes a client fails, once."""
    from tests.conftest import run_dag
    from tools.landing_zone import BatchSpec, ImageSpec, write_batch

    root = tmp_path / "landing"
    image = ImageSpec("GLaa0001", "GLbb0001", "20230105", "CT", source="ct")
    write_batch(root, BatchSpec("ok1", images=[image], collection="IRB1"))
    monkeypatch.setenv("DICOM_LANDING_ROOT", str(root))
    monkeypatch.setenv("SEND_TO_GOOGLE", "true")
    monkeypatch.setenv("GOOGLE_CLOUD_STORAGE", "some-bucket")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps({"conn_type": "google_cloud_platform"}))
    monkeypatch.setenv("DICOM_TASK_RETRIES", "2")  # read when the DAG file is parsed
    monkeypatch.setenv("DICOM_RETRY_DELAY_SECONDS", "1")
    run = run_dag(["ok1"])
    tries = {ti.task_id: (str(ti.state), ti.try_number) for ti in run.get_task_instances()}
    assert str(run.state) == "failed"
    assert tries["plan_batches"] == ("failed", 1), tries  # the first task that makes a client
    assert all(try_number <= 1 for _, try_number in tries.values()), tries
    log = capfd.readouterr()
    assert "No Google credentials for connection 'google_cloud_default'" in log.out + log.err


@pytest.mark.parametrize(
    ("extra", "named", "never_shown"),
    [
        ({"key_secret_name": "dicom-sa-key"}, "the key in the Secret Manager secret dicom-sa-key", None),
        ({"credential_config_file": "/etc/wif.json"}, "the credential configuration file /etc/wif.json", None),
        (
            {"credential_config_file": json.dumps({"type": "external_account", "audience": "wif-pool-7731"})},
            "the credential configuration stored in the connection",
            "wif-pool-7731",
        ),
        ({"extra__google_cloud_platform__key_path": "/k.json"}, "the key file /k.json", None),
        ({"keyfile_dict": json.dumps({"private_key": "KEY-7731"})}, "the key stored in the connection", "KEY-7731"),
        ({"is_anonymous": True}, "anonymous credentials", None),
    ],
)
def test_a_refusal_names_the_identity_the_connection_uses(monkeypatch, extra, named, never_shown):
    """A 403 message names the connection's own credentials, whichever field holds them, never
    Application Default Credentials when they are not in use, and never a secret."""
    from google.api_core.exceptions import Forbidden

    from hooks.dicom_storage import DicomStorageHook, GooglePermissionError

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_PROBE_CONN", json.dumps({"conn_type": "google_cloud_platform", "extra": extra}))
    hook = DicomStorageHook(gcp_conn_id="probe_conn")
    with pytest.raises(GooglePermissionError) as raised, hook.explain_google_errors("the bucket b"):
        raise Forbidden("caller does not have storage.objects.list access")
    assert f"connection 'probe_conn' with {named}:" in str(raised.value)
    assert "Application Default Credentials" not in str(raised.value)
    if never_shown:
        assert never_shown not in str(raised.value)
