"""The hook that owns every Google client this project uses.

It builds the landing zone, the archive store and the BigQuery client from the settings, with
clients from the Google provider hooks (GCSHook, BigQueryHook) and the `google_cloud_default`
connection. Locally the emulators are chosen by STORAGE_EMULATOR_HOST / BIGQUERY_EMULATOR_HOST
alone, which the Google clients honour; nothing here knows about them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from dicom_archive.landing import GCSLandingZone, LandingZone, LocalLandingZone, split_gs_uri
from dicom_archive.settings import Settings
from dicom_archive.stores import GCSObjectStore, LocalObjectStore, ObjectStore

if TYPE_CHECKING:
    from google.cloud import bigquery, storage


class GooglePermissionError(RuntimeError):
    """Google refused an operation; the message says which identity and which resource."""


def load_settings() -> Settings:
    """Settings from the environment first, then from Airflow Variables of the same name."""
    from airflow.sdk import Variable

    def lookup(name: str) -> str | None:
        value = os.environ.get(name)
        if value is not None:
            return value
        try:
            return Variable.get(name, default=None)
        except Exception:  # no Variable backend reachable (e.g. parsing outside a task)
            return None

    return Settings.load(lookup)


class DicomStorageHook(BaseHook):
    conn_name_attr = "gcp_conn_id"
    default_conn_name = "google_cloud_default"
    hook_name = "DICOM storage"

    def __init__(
        self,
        *,
        gcp_conn_id: str = default_conn_name,
        impersonation_chain: str | None = None,
    ) -> None:
        super().__init__()
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain

    @cached_property
    def _gcs_hook(self) -> Any:
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        return GCSHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)

    def storage_client(self) -> storage.Client:
        return self._gcs_hook.get_conn()

    def bigquery_client(self, project: str, location: str | None = None) -> bigquery.Client:
        from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

        hook = BigQueryHook(
            gcp_conn_id=self.gcp_conn_id,
            impersonation_chain=self.impersonation_chain,
            location=location,
            use_legacy_sql=False,
        )
        # get_client() does not fall back to the connection's project: pass it.
        return hook.get_client(project_id=project, location=location)

    def landing_zone(self, settings: Settings, root: str | None = None) -> LandingZone:
        """The landing zone at `root` (default: the DICOM_LANDING_ROOT setting)."""
        root = root or settings.landing_root
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
        try:
            extras = self.get_connection(self.gcp_conn_id).extra_dejson
        except Exception:
            extras = {}
        if extras.get("is_anonymous"):
            identity = "anonymous credentials"
        elif extras.get("key_path") or extras.get("extra__google_cloud_platform__key_path"):
            identity = f"the key file {extras.get('key_path') or extras.get('extra__google_cloud_platform__key_path')}"
        elif extras.get("keyfile_dict") or extras.get("extra__google_cloud_platform__keyfile_dict"):
            identity = "the key stored in the connection"
        elif os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            identity = f"GOOGLE_APPLICATION_CREDENTIALS={os.environ['GOOGLE_APPLICATION_CREDENTIALS']}"
        else:
            identity = "Application Default Credentials (the environment's service account)"
        if self.impersonation_chain:
            identity += f", impersonating {self.impersonation_chain}"
        return f"connection {self.gcp_conn_id!r} with {identity}"

    @contextlib.contextmanager
    def explain_google_errors(self, resource: str) -> Iterator[None]:
        """Turn Google's refusals and silences into messages that say who and what.

        401/403 name the credentials and the resource, as the original pipeline's documentation
        advises checking both; exhausted retries name the endpoint that did not answer."""
        from google.api_core.exceptions import RetryError

        try:
            yield
        except Exception as err:
            status = _refusal_status(err)
            if status is not None:
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


def _storage_retry(settings: Settings) -> Any:
    """The storage client's own retry policy (backoff on 429, 5xx, resets), for as long as the
    DICOM_GOOGLE_RETRY_SECONDS setting says."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(settings.google_retry_seconds)


class GoogleUnavailableError(RuntimeError):
    """Google could not be reached, even after the clients' retries."""


def _refusal_status(err: BaseException) -> int | None:
    """401 or 403, whether the client raised an API error or a raw upload response error."""
    code = getattr(err, "code", None)
    if code not in (401, 403):
        code = getattr(getattr(err, "response", None), "status_code", None)
    return code if code in (401, 403) else None
