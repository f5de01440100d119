"""The settings the DAG files read when they are parsed: from the environment only.

A DAG file must not query Airflow Variables while it is parsed (every parse, on every scheduler
loop, would hit the metadata database), so these come from the environment alone; the plan task
warns when one of them is also set as an Airflow Variable (hooks.dicom_storage). A bad value
fails the parse with an import error that names the setting and its rule. Standard library only:
parsing the DAG files stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol, TypeVar


class _Timetable(Protocol):
    def validate(self) -> None: ...


T = TypeVar("T", bound=_Timetable)

# Every parse-time setting and its default (as the environment would spell it).
PARSE_TIME_DEFAULTS: dict[str, str] = {
    "DICOM_SCHEDULE": "0 * * * *",
    "DICOM_WITHDRAW_SCHEDULE": "*/15 * * * *",
    "DICOM_TASK_RETRIES": "3",
    "DICOM_RETRY_DELAY_SECONDS": "30",
    "DICOM_MAX_ACTIVE_RUNS": "2",
    "DICOM_GCS_POOL": "default_pool",
    "DICOM_BIGQUERY_POOL": "default_pool",
}

# A schedule of `none`: manual runs only.
NO_SCHEDULE = "none"


class ParseTimeSettingError(ValueError):
    """A parse-time setting's value breaks its rule; the message names both."""


def in_use(name: str) -> str:
    """The value the DAG files use: the environment's, or the default when unset or empty."""
    return (os.environ.get(name) or "").strip() or PARSE_TIME_DEFAULTS[name]


def whole_number(name: str, minimum: int = 0) -> int:
    value = in_use(name)
    rule = f"{name} must be a whole number of {minimum} or more"
    try:
        number = int(value)
    except ValueError:
        raise ParseTimeSettingError(f"{rule}, not {value!r}") from None
    if number < minimum:
        raise ParseTimeSettingError(f"{rule}, not {number}")
    return number


def pool(name: str) -> str:
    return in_use(name)


def schedule(name: str, timetable: Callable[..., T]) -> T | None:
    """None for `none` (manual runs only), else the `timetable` class (an Airflow cron timetable,
    passed in so that this module imports no Airflow) made of the expression, in UTC and validated
    here, so that a bad expression names the setting (Airflow's own message names none)."""
    value = in_use(name)
    if value.lower() == NO_SCHEDULE:
        return None
    try:
        made = timetable(value, timezone="UTC")
        made.validate()
    except Exception as err:
        raise ParseTimeSettingError(
            f"{name} must be a cron expression (5 to 7 fields, e.g. '0 * * * *', or a preset such as "
            f"'@daily') or {NO_SCHEDULE!r}, not {value!r}: {err}"
        ) from err
    return made


def task_defaults() -> dict[str, object]:
    """Both DAGs' default_args: one retry policy (the README's DICOM_TASK_RETRIES and
    DICOM_RETRY_DELAY_SECONDS rows), growing to at most 10 minutes between tries."""
    return {
        "owner": "radiology-research",
        "retries": whole_number("DICOM_TASK_RETRIES"),
        "retry_delay": timedelta(seconds=whole_number("DICOM_RETRY_DELAY_SECONDS")),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    }


def same_value(name: str, value: str) -> bool:
    """Whether `value` (an Airflow Variable's) means what the DAG files use for `name`."""
    used, given = in_use(name), value.strip() or PARSE_TIME_DEFAULTS[name]
    if given.lower() == used.lower():
        return True
    try:
        return int(given) == int(used)
    except ValueError:
        return False
