"""What the pipeline knows of Google's errors, without Airflow: their HTTP status, whether a 403 is
a rate limit, and whether a retry may fix them (transient) or not.

The developers' rule: an error that a retry cannot fix fails the task at once; a transient one
retries. The hook (hooks/dicom_storage.py) explains and classifies the permanent ones; the domain
steps use `is_transient` to tell an outage (the task fails and Airflow retries it) from a batch's
own trouble (that batch ends ERROR, the others go on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

# Wraps the calls on one resource (named) so that a refusal or an outage says who and what: the
# hook's explain_google_errors in the tasks, `no_explanation` where there is no hook.
Explain = Callable[[str], contextlib.AbstractContextManager[None]]


def no_explanation(resource: str) -> contextlib.AbstractContextManager[None]:
    """The errors as raised."""
    return contextlib.nullcontext()


def http_status(err: BaseException) -> int | None:
    """The HTTP status of a Google error, whether the client raised an API error or a raw upload
    response error (None: not an HTTP answer)."""
    code = getattr(err, "code", None)
    if not isinstance(code, int):
        code = getattr(getattr(err, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


# A 403 that says "slow down", not "not allowed": it passes, and a later try may succeed.
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"})


def rate_limited(err: BaseException) -> bool:
    """The reasons are parsed by the BigQuery client; the storage client keeps only the body's text."""
    errors = getattr(err, "errors", None) or []
    if any(isinstance(e, dict) and e.get("reason") in RATE_LIMIT_REASONS for e in errors):
        return True
    return any(f'"{reason}"' in str(err) for reason in RATE_LIMIT_REASONS)


def is_transient(err: BaseException) -> bool:
    """An error a retry may fix: Google unavailable (5xx, also after the client's own retries ran
    out), a rate limit (429, or a 403 whose reason is one), a connection that failed or timed out."""
    import requests
    from google.api_core.exceptions import RetryError
    from google.auth.exceptions import TransportError

    if isinstance(err, RetryError | TransportError | ConnectionError | TimeoutError):
        return True
    if isinstance(err, requests.ConnectionError | requests.Timeout):  # an IOError, not a ConnectionError
        return True
    status = http_status(err)
    return status is not None and (status >= 500 or status == 429 or (status == 403 and rate_limited(err)))
