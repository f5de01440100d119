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
