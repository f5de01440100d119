"""Where a task reads and writes, and as whom: keyword arguments that default to the settings.

Like the Google provider's operators, every operator and the sensor of this project take their
destination (bucket, project, landing root, BigQuery location) and `impersonation_chain` as
templated keyword arguments. One left at None is filled from the settings (the identity from
DICOM_IMPERSONATION_CHAIN, as for the DAGs' own tasks) when the task renders its templates on the
worker (never when the DAG is parsed), so the UI's "Rendered Templates" shows where a task wrote.
The settings are checked there, with the task's own values in place of the settings they stand
for: a bad setting or argument fails the task at once, without retries, even a sensor's with
soft_fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from operators.failures import fail_at_once_on_permanent_errors

if TYPE_CHECKING:
    import jinja2
    from google.cloud import bigquery

    from dicom_archive.settings import Settings
    from hooks.dicom_storage import DicomStorageHook, ImpersonationChain


class GoogleDestinationMixin:
    """Destination arguments filled from the settings at render time; the hook built from them.

    `destination_fields` maps each destination attribute to the Settings field it defaults to
    (see hooks.dicom_storage.DESTINATION_SETTINGS for the setting names).
    """

    destination_fields: ClassVar[Mapping[str, str]] = {}
    gcp_conn_id: str
    impersonation_chain: ImpersonationChain
    # The settings the templates were rendered with: execute uses them rather than reading every
    # setting (environment, then one Variable each) a second time in the same try.
    _rendered_settings: Settings | None = None

    def _do_render_template_fields(
        self,
        parent: Any,
        template_fields: Iterable[str],
        context: Any,
        jinja_env: jinja2.Environment,
        seen_oids: set[int],
    ) -> None:
        # The one step both a task and a mapped task's expansion go through (render_template_fields
        # is not called for the latter); the rendered fields are recorded right after it.
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)  # type: ignore[misc]
        if parent is self:
            self.fill_destination()

    def fill_destination(self) -> Settings:
        """Fill the destination arguments left at None from the settings; return the settings
        with the task's arguments in place (a bad one fails the task at once)."""
        with fail_at_once_on_permanent_errors():
            settings = self._load_destination_settings()
        for attribute, field in self.destination_fields.items():
            if getattr(self, attribute) is None:
                setattr(self, attribute, getattr(settings, field))
        if self.impersonation_chain is None and settings.impersonation_chain:
            self.impersonation_chain = list(settings.impersonation_chain)
        self._rendered_settings = settings
        return settings

    def destination_settings(self) -> Settings:
        """The settings, with this task's destination arguments in place of their settings (those
        of the rendering, once the templates were rendered)."""
        if self._rendered_settings is not None:
            return self._rendered_settings
        return self._load_destination_settings()

    def _load_destination_settings(self) -> Settings:
        from hooks.dicom_storage import load_settings

        given = {field: getattr(self, attribute) for attribute, field in self.destination_fields.items()}
        return load_settings({field: value for field, value in given.items() if value is not None})

    def storage_hook(self) -> DicomStorageHook:
        from hooks.dicom_storage import DicomStorageHook

        return DicomStorageHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)


class DicomStorageBaseOperator(GoogleDestinationMixin, BaseOperator):
    """What the operators of this project share: the archive bucket, the project, the
    connection and the identity, and the BigQuery job a killed task cancels.

    :param bucket: the archive bucket; default: the GOOGLE_CLOUD_STORAGE setting. With
        SEND_TO_GOOGLE=false nothing leaves the machine, whatever the bucket.
    :param project: the Google Cloud project (BigQuery, console links); default: the
        GOOGLE_PROJECT_NAME setting.
    :param gcp_conn_id: the Google Cloud connection.
    :param impersonation_chain: a service account to impersonate, or a chain of them (each
        granting the next the Service Account Token Creator role); the last one is used.
    """

    template_fields: Sequence[str] = ("bucket", "project", "impersonation_chain")
    destination_fields: ClassVar[Mapping[str, str]] = {"bucket": "bucket", "project": "project"}

    def __init__(
        self,
        *,
        bucket: str | None = None,
        project: str | None = None,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: ImpersonationChain = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket = bucket
        self.project = project
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain
        self.job_id: str | None = None  # the BigQuery job the task last started, and where
        self._job_place: tuple[str | None, str] | None = None

    def bigquery_client(self, hook: DicomStorageHook, settings: Settings) -> bigquery.Client:
        """The BigQuery client of this task; the job it runs is kept in `job_id` for on_kill."""

        def started(job_id: str) -> None:
            self.job_id, self._job_place = job_id, (settings.project, settings.bigquery_location)

        return hook.bigquery_client(settings.project, settings.bigquery_location, on_job=started)

    def on_kill(self) -> None:
        """Cancel the BigQuery job the task was running (a job that already ended is left alone;
        a retry re-attaches to the finished jobs of the try it replaces)."""
        if self.job_id is None or self._job_place is None:
            return
        project, location = self._job_place
        self.log.info("task killed: cancelling BigQuery job %s", self.job_id)
        try:
            self.storage_hook().cancel_bigquery_job(self.job_id, project=project, location=location)
        except Exception:  # the task is going down anyway: say so, do not hide the kill
            self.log.exception("could not cancel BigQuery job %s", self.job_id)
