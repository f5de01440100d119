"""The hook that owns every Google client this project uses.

It builds the landing zone, the archive store and the BigQuery client from the settings, with
clients from the Google provider hooks (GCSHook, BigQueryHook) and the `google_cloud_default`
connection. Locally the emulators are chosen by STORAGE_EMULATOR_HOST / BIGQUERY_EMULATOR_HOST
alone, which the Google clients honour; nothing here knows about them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from dicom_archive.google_errors import http_status, rate_limited
from dicom_archive.landing import GCSLandingZone, LandingZone, LocalLandingZone, split_gs_uri
from dicom_archive.settings import Settings, SettingsError
from dicom_archive.stores import GCSObjectStore, LocalObjectStore, ObjectStore

if TYPE_CHECKING:
    from google.cloud import bigquery, storage


_log = logging.getLogger(__name__)


class GooglePermissionError(RuntimeError, AirflowFailException):
    """Google refused an operation; the message says which identity and which resource. A retry
    is refused too, so the task fails at once wherever it is raised (an AirflowFailException:
    no call site can forget it)."""


class GoogleCredentialsError(GooglePermissionError):
    """No credentials were found for the connection (google.auth's DefaultCredentialsError: no
    Application Default Credentials, or a GOOGLE_APPLICATION_CREDENTIALS file that does not exist or
    is not a key). A retry finds none either, so the task fails at once wherever it is raised, even
    where a client is made outside fail_at_once_on_permanent_errors (like BadSettingError)."""


class GoogleNotFoundError(RuntimeError, AirflowFailException):
    """A bucket, project or dataset the settings name does not exist (a retry cannot create it),
    so the task fails at once wherever it is raised."""


# The settings a task's destination arguments stand for: Settings field -> setting name.
DESTINATION_SETTINGS = {
    "bucket": "GOOGLE_CLOUD_STORAGE",
    "project": "GOOGLE_PROJECT_NAME",
    "landing_root": "DICOM_LANDING_ROOT",
    "bigquery_location": "DICOM_BIGQUERY_LOCATION",
    "default_collection": "GOOGLE_STORAGE_COLLECTION",
}

ImpersonationChain = str | Sequence[str] | None


def _config_described(config: Any) -> str:
    """credential_config_file is a path, or the configuration itself (never shown)."""
    if isinstance(config, str) and not config.lstrip().startswith("{"):
        return f"the credential configuration file {config}"
    return "the credential configuration stored in the connection"


# The fields of a Google connection that name its credentials; any of them wins over the
# GOOGLE_APPLICATION_CREDENTIALS setting. Each with how error messages name that identity
# (never a secret).
_CONNECTION_CREDENTIALS: dict[str, Callable[[Any], str]] = {
    "is_anonymous": lambda _: "anonymous credentials",
    "key_path": lambda path: f"the key file {path}",
    "keyfile_dict": lambda _: "the key stored in the connection",
    "key_secret_name": lambda name: f"the key in the Secret Manager secret {name}",
    "credential_config_file": _config_described,
}


class BadSettingError(SettingsError, AirflowFailException):
    """A bad setting gives the same error on every try, so the task that reads it fails at once,
    without retries. Raised by load_settings, the one way every task, sensor and operator reads
    the settings, so that no task can forget it; still a SettingsError for callers that report it."""


def setting_value(name: str) -> str | None:
    """One setting, read like every other: the environment first, then the Airflow Variable.

    Nothing is caught: a missing Variable is None already (default=None), also outside a task
    (Airflow 3.3 then asks the environment and the configured secrets backend only). An error that
    does reach here (a secrets backend denying access) is no "not set": read as one, it would fail
    the task as a bad setting, or run a sending deployment with SEND_TO_GOOGLE=false."""
    from airflow.sdk import Variable

    value = os.environ.get(name)
    return value if value is not None else Variable.get(name, default=None)


def load_settings(overrides: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment first, then from Airflow Variables of the same name.

    `overrides` (Settings field -> value, see DESTINATION_SETTINGS) are a task's own arguments:
    they take the place of the setting and are checked like it, so a bad bucket given to one
    task fails it as a bad GOOGLE_CLOUD_STORAGE would."""
    given = {DESTINATION_SETTINGS[field]: str(value) for field, value in (overrides or {}).items()}

    def lookup(name: str) -> str | None:
        return given[name] if name in given else setting_value(name)

    try:
        return Settings.load(lookup)
    except SettingsError as err:
        shown = ", ".join(f"{field}={value!r}" for field, value in (overrides or {}).items())
        raise BadSettingError(f"{err} (task arguments: {shown})" if shown else str(err)) from err


def warn_of_ignored_variables() -> list[str]:
    """Log a warning for each parse-time setting (dicom_archive.parse_time_settings) that is set as an
    Airflow Variable to something other than what the DAG files use, and return their names.

    A DAG file must not query Variables while it is parsed, so such a Variable is never read; the
    plan task (one lookup per name, once per run) says so rather than leave it looking applied.
    Never raises: a warning must not fail a run."""
    from airflow.sdk import Variable

    from dicom_archive import parse_time_settings

    ignored = []
    for name in parse_time_settings.PARSE_TIME_DEFAULTS:
        try:
            value = Variable.get(name, default=None)
        except Exception:  # no Variable backend reachable: nothing to tell
            return ignored
        if value is None or parse_time_settings.same_value(name, str(value)):
            continue
        ignored.append(name)
        _log.warning(
            "%s is set as an Airflow Variable (%r), which is not read: parse-time settings come from the "
            "environment only (see README, Settings); the DAGs use %r",
            name,
            value,
            parse_time_settings.in_use(name),
        )
    return ignored


class DicomStorageHook(BaseHook):
    conn_name_attr = "gcp_conn_id"
    default_conn_name = "google_cloud_default"
    hook_name = "DICOM storage"

    def __init__(
        self,
        *,
        gcp_conn_id: str = default_conn_name,
        impersonation_chain: ImpersonationChain = None,
        credentials_file: str | None = None,
    ) -> None:
        """`credentials_file`: the GOOGLE_APPLICATION_CREDENTIALS setting (None: read it here)."""
        super().__init__()
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain
        self.credentials_file = credentials_file

    @classmethod
    def of_settings(cls, settings: Settings) -> DicomStorageHook:
        """The hook of a task without identity arguments of its own: the default connection, and
        the DICOM_IMPERSONATION_CHAIN setting's service accounts, if any."""
        return cls(
            impersonation_chain=list(settings.impersonation_chain) or None,
            credentials_file=settings.credentials_file,
        )

    @cached_property
    def _key_file(self) -> str | None:
        """The GOOGLE_APPLICATION_CREDENTIALS setting (the environment, then the Airflow Variable)."""
        return self.credentials_file or (setting_value("GOOGLE_APPLICATION_CREDENTIALS") or "").strip() or None

    def _with_key_file(self, hook: Any) -> Any:
        """The provider hook, given the GOOGLE_APPLICATION_CREDENTIALS key file as the connection's
        key_path when the connection names no credentials of its own (they win). Set in the
        environment, the Google clients' Application Default Credentials read it already; set as
        an Airflow Variable only this makes it count."""
        from airflow.providers.google.common.hooks.base_google import get_field

        key_file = self._key_file
        extras = dict(getattr(hook, "extras", None) or {})
        from_variable = key_file and key_file != os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if from_variable and not any(get_field(extras, name) for name in _CONNECTION_CREDENTIALS):
            hook.extras = {**extras, "key_path": key_file}
        return hook

    def _ensure_default_connection(self) -> None:
        """Airflow 3 creates no connection on a fresh install (Composer does): a missing
        `google_cloud_default` stands for an empty Google connection, i.e. Application Default
        Credentials or the GOOGLE_APPLICATION_CREDENTIALS key file, rather than failing every task.
        A connection id given by name must exist."""
        if self.gcp_conn_id != self.default_conn_name:
            return
        try:
            self.get_connection(self.gcp_conn_id)
        except AirflowNotFoundException:
            # The environment is the first place Airflow looks; only this task's process sees it.
            os.environ.setdefault(f"AIRFLOW_CONN_{self.gcp_conn_id.upper()}", '{"conn_type": "google_cloud_platform"}')

    @cached_property
    def _gcs_hook(self) -> Any:
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        self._ensure_default_connection()
        return self._with_key_file(GCSHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain))

    def storage_client(self) -> storage.Client:
        with self._credentials_explained():
            return self._gcs_hook.get_conn()

    def _bigquery_hook(self, location: str | None) -> Any:
        from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

        self._ensure_default_connection()
        return self._with_key_file(
            BigQueryHook(
                gcp_conn_id=self.gcp_conn_id,
                impersonation_chain=self.impersonation_chain,
                location=location,
                use_legacy_sql=False,
            )
        )

    def bigquery_client(
        self, project: str, location: str | None = None, *, on_job: Callable[[str], None] | None = None
    ) -> bigquery.Client:
        """The BigQuery client of the connection. `on_job(job_id)` hears of each job the client
        starts (before it is submitted, when its id is chosen by the caller, and once it is
        created), so that a task that is killed can cancel the job it was waiting for."""
        hook = self._bigquery_hook(location)
        if on_job is None:
            with self._credentials_explained():
                # get_client() does not fall back to the connection's project: pass it.
                return hook.get_client(project_id=project, location=location)
        from airflow.providers.google.common.consts import CLIENT_INFO

        with self._credentials_explained():
            credentials = hook.get_credentials()
        # What get_client() builds, as a client that reports its jobs.
        return _job_reporting_client_class()(
            on_job,
            client_info=CLIENT_INFO,
            project=project,
            location=location,
            credentials=credentials,
            client_options=hook.get_client_options(),
        )

    def cancel_bigquery_job(self, job_id: str, *, project: str, location: str | None = None) -> None:
        """Cancel a job and wait for it to end (the provider hook's cancel: a job that already
        ended is left alone)."""
        with self._credentials_explained():
            self._bigquery_hook(location).cancel_job(job_id=job_id, project_id=project, location=location)

    def landing_zone(self, settings: Settings) -> LandingZone:
        """The landing zone at the settings' landing root."""
        root = settings.landing_root
        if root.startswith("gs://"):
            bucket, prefix = split_gs_uri(root)
            return GCSLandingZone(self.storage_client().bucket(bucket), prefix, retry=_storage_retry(settings))
        return LocalLandingZone(root)

    def archive_store(self, settings: Settings) -> ObjectStore:
        if settings.send_to_google:
            return GCSObjectStore(self.storage_client().bucket(settings.bucket), retry=_storage_retry(settings))
        return LocalObjectStore(settings.local_output)

    def describe_credentials(self) -> str:
        """Which identity the connection uses, for error messages (never a secret)."""
        from airflow.providers.google.common.hooks.base_google import get_field

        try:
            extras = self.get_connection(self.gcp_conn_id).extra_dejson
        except Exception:  # a message about another error must not fail on its own
            extras = {}
        named = ((name, get_field(extras, name)) for name in _CONNECTION_CREDENTIALS)
        field, value = next(((name, value) for name, value in named if value), (None, None))
        if field is not None:
            identity = _CONNECTION_CREDENTIALS[field](value)
        elif self._key_file:
            identity = f"GOOGLE_APPLICATION_CREDENTIALS={self._key_file}"
        else:
            identity = "Application Default Credentials (the environment's service account)"
        if self.impersonation_chain:
            identity += f", impersonating {describe_chain(self.impersonation_chain)}"
        return f"connection {self.gcp_conn_id!r} with {identity}"

    @contextlib.contextmanager
    def _credentials_explained(self) -> Iterator[None]:
        """Where a client is made, credentials that cannot be found become GoogleCredentialsError:
        also a key file that cannot be read, which the provider opens itself when the setting comes
        from an Airflow Variable or the connection names one (no network is used in making a client)."""
        from google.auth.exceptions import DefaultCredentialsError

        try:
            yield
        except (DefaultCredentialsError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise GoogleCredentialsError(
                f"No Google credentials for {self.describe_credentials()}: {err} Set GOOGLE_APPLICATION_CREDENTIALS "
                "to a service account key file that exists, or set up Application Default Credentials (the "
                "environment's service account, or `gcloud auth application-default login`), or give the "
                f"connection {self.gcp_conn_id!r} a key; for the local emulators, make it anonymous "
                '({"is_anonymous": true} in its extra).'
            ) from err

    @contextlib.contextmanager
    def explain_google_errors(self, resource: str) -> Iterator[None]:
        """Turn Google's refusals and silences into messages that say who and what.

        401/403 name the credentials and the resource, as the original pipeline's documentation
        advises checking both; exhausted retries name the endpoint that did not answer."""
        from google.api_core.exceptions import RetryError

        try:
            yield
        except Exception as err:  # missing credentials are explained where a client is made
            status = http_status(err)
            if status == 404:
                raise GoogleNotFoundError(
                    f"{resource} (or the bucket, project or dataset holding it) does not exist for "
                    f"{self.describe_credentials()}: {getattr(err, 'message', err)}. Check GOOGLE_CLOUD_STORAGE, "
                    "GOOGLE_PROJECT_NAME and DICOM_LANDING_ROOT."
                ) from err
            if status in (401, 403) and not rate_limited(err):
                raise GooglePermissionError(
                    f"Google refused access ({status}) to {resource} for {self.describe_credentials()}: "
                    f"{getattr(err, 'message', err)}. Check the credentials file (GOOGLE_APPLICATION_CREDENTIALS "
                    "or the connection's key) and that this identity has the IAM roles listed in "
                    "docs/composer.md on that resource."
                ) from err
            if isinstance(err, RetryError):
                raise GoogleUnavailableError(
                    f"Google did not answer for {resource} before the retries ran out ({err.cause!r}). "
                    "Nothing was lost: rerun the batch once the service answers."
                ) from err
            raise


def describe_chain(chain: str | Sequence[str]) -> str:
    """The account a chain impersonates, and the accounts it goes through."""
    if isinstance(chain, str):
        return chain
    *delegates, target = chain
    return target + (f" (through {', '.join(delegates)})" if delegates else "")


class _JobReportingClientFactory(Protocol):
    """The job-reporting client class: a bigquery.Client whose first argument is `on_job`."""

    def __call__(self, on_job: Callable[[str], None], /, **kwargs: Any) -> bigquery.Client: ...


@functools.cache
def _job_reporting_client_class() -> _JobReportingClientFactory:
    from google.cloud import bigquery

    class JobReportingClient(bigquery.Client):
        """A BigQuery client that tells `on_job` the id of every job it starts."""

        def __init__(self, on_job: Callable[[str], None], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.on_job = on_job

        def _started(self, start: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
            if kwargs.get("job_id"):
                self.on_job(kwargs["job_id"])  # known before the call: a kill during it still cancels
            job = start(*args, **kwargs)
            self.on_job(job.job_id)
            return job

        def query(self, *args: Any, **kwargs: Any) -> Any:
            return self._started(super().query, args, kwargs)

        def load_table_from_file(self, *args: Any, **kwargs: Any) -> Any:
            return self._started(super().load_table_from_file, args, kwargs)

        def load_table_from_uri(self, *args: Any, **kwargs: Any) -> Any:
            return self._started(super().load_table_from_uri, args, kwargs)

        def copy_table(self, *args: Any, **kwargs: Any) -> Any:
            return self._started(super().copy_table, args, kwargs)

        def extract_table(self, *args: Any, **kwargs: Any) -> Any:
            return self._started(super().extract_table, args, kwargs)

    return JobReportingClient


def _storage_retry(settings: Settings) -> Any:
    """The storage client's own retry policy (backoff on 429, 5xx, resets), for as long as the
    DICOM_GOOGLE_RETRY_SECONDS setting says."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(settings.google_retry_seconds)


class GoogleUnavailableError(RuntimeError):
    """Google could not be reached, even after the clients' retries."""
