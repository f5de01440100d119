"""Errors a retry cannot fix fail the task at once, without retries.

A conflict (another archive under the same name, replacing not allowed), an image that no
longer passes the de-identification re-check or changed since it was planned (a retry would meet
the same file; nothing of the archive being written is kept: its upload is cancelled), a schema
conflict, a bad row, a bad setting, a manifest value that breaks a rule (batch.json's deid given to
the archive step), a bad withdrawal request, no Google credentials found for the connection,
Google refusing the identity (401/403, rate limits aside) or a bucket, project or dataset that
does not exist (404) gives the same result on every try: retrying them only delays the failure
(3 retries with backoff took about 5 minutes).
Transient errors (Google unavailable, a checksum mismatch after an upload) still retry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def permanent_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that fail a task at once (imported lazily: DAG parsing stays fast)."""
    from dicom_archive.archive import ArchiveIntegrityError
    from dicom_archive.bigquery_rows import RowError
    from dicom_archive.bigquery_tables import SchemaConflictError
    from dicom_archive.manifest import ManifestError
    from dicom_archive.naming import InvalidIdentifierError
    from dicom_archive.publish import ArchiveConflictError
    from dicom_archive.settings import SettingsError
    from dicom_archive.withdraw import WithdrawalRequestError
    from hooks.dicom_storage import GoogleCredentialsError, GoogleNotFoundError, GooglePermissionError

    return (
        ArchiveConflictError,
        ArchiveIntegrityError,
        SchemaConflictError,
        RowError,
        SettingsError,
        InvalidIdentifierError,
        WithdrawalRequestError,
        ManifestError,
        GoogleCredentialsError,
        GooglePermissionError,
        GoogleNotFoundError,
    )


@contextlib.contextmanager
def fail_at_once_on_permanent_errors() -> Iterator[None]:
    """Re-raise a permanent error as AirflowFailException (no retries), keeping its message."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except permanent_errors() as err:
        raise AirflowFailException(f"{type(err).__name__}: {err} (not retried: a retry cannot fix this)") from err
