"""Identifier rules and object names.

Every id that becomes part of an object name is validated here, so no input can escape the
`Collection/<collection>/` prefix (no `/`, no `..`, no spaces, bounded length).
"""

from __future__ import annotations

import re

COLLECTION_RE = re.compile(r"[A-Za-z0-9_]{1,1024}")
BATCH_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CODED_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
STUDY_DATE_RE = re.compile(r"\d{8}")

ARCHIVE_SUFFIX = ".tar.gz"


# Limits Google enforces, checked before anything is read or written so that a bad value fails
# early with the limit named (not as a raw 400 at upload time, after retries).
MAX_OBJECT_NAME_BYTES = 1024  # Cloud Storage object names, UTF-8
MAX_DATASET_ID_LENGTH = 1024  # BigQuery dataset ids: letters, digits, underscores
BUCKET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
IPV4_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
# The longest names this project writes under Collection/<collection>/: an archive with ids of
# the longest coded form, and a batch report with the longest batch id.
_LONGEST_ARCHIVE_TAIL = len("Entity/") + 64 + 1 + (64 + 1 + 8 + 1 + 64) + len(".tar.gz")
_LONGEST_REPORT_TAIL = len("Batches/") + 128 + len(".json")
_LONGEST_TAIL = max(_LONGEST_ARCHIVE_TAIL, _LONGEST_REPORT_TAIL)
MAX_COLLECTION_LENGTH = MAX_OBJECT_NAME_BYTES - len("Collection/") - 1 - _LONGEST_TAIL


class InvalidIdentifierError(ValueError):
    """An identifier that may not become part of an object name."""


def _shown(value: str, limit: int = 60) -> str:
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def batch_id_problem(value: object) -> str | None:
    """Why `value` may not be a batch id (None: it may). The contract's pattern, no `..`, not `.`:
    a batch id names a direct child of the landing root and nothing else, so it never reaches a
    path or an object name unless it passes this."""
    if not isinstance(value, str):
        return f"batch id {value!r} is not a string"
    if value == "":
        return "an empty batch id is not allowed (it would not name a batch folder)"
    if not BATCH_ID_RE.fullmatch(value):
        return f"batch id {_shown(value)} does not match {BATCH_ID_RE.pattern} (at most 128 characters, ASCII)"
    if ".." in value or value.strip(".") == "":
        return (
            f"batch id {_shown(value)} contains '..' or is only dots: "
            "it would not name a direct child of the landing root"
        )
    return None


def require_batch_id(value: object) -> str:
    problem = batch_id_problem(value)
    if problem is not None:
        raise InvalidIdentifierError(problem)
    return value  # type: ignore[return-value]


def collection_problem(value: object, *, show_value: bool = True) -> str | None:
    """Why `value` may not be a collection (None: it may): a BigQuery dataset id whose object
    names all stay within Cloud Storage's limit. `show_value=False` for a value from a manifest,
    which errors must not quote."""
    if not isinstance(value, str) or not COLLECTION_RE.fullmatch(value):
        shown = (" " + _shown(value) if isinstance(value, str) else f" {value!r}") if show_value else ""
        return (
            f"collection{shown} must match "
            f"{COLLECTION_RE.pattern} (BigQuery dataset id rules: letters, digits and underscores, "
            f"at most {MAX_DATASET_ID_LENGTH} characters)"
        )
    if len(value) > MAX_COLLECTION_LENGTH:
        return (
            f"collection of {len(value)} characters is too long: object names under Collection/<collection>/ would "
            f"exceed Cloud Storage's limit of {MAX_OBJECT_NAME_BYTES} bytes per object name (at most "
            f"{MAX_COLLECTION_LENGTH} characters leave room for the longest archive and report names)"
        )
    return None


def bucket_name_problem(name: str) -> str | None:
    """Cloud Storage's bucket naming rules (None: the name follows them)."""
    rules = (
        "Cloud Storage bucket naming rules: 3-63 characters (up to 222 with dots, 63 per dot-separated part), "
        "lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit, not an IP "
        "address, not starting with 'goog' nor containing 'google'"
    )
    if name != name.lower():
        return f"bucket name {name!r} has uppercase letters; {rules}"
    if not BUCKET_NAME_RE.fullmatch(name):
        return f"bucket name {name!r} breaks the {rules}"
    parts = name.split(".")
    if (len(parts) == 1 and len(name) > 63) or any(not 1 <= len(part) <= 63 for part in parts):
        return f"bucket name {name!r} breaks the {rules}"
    if IPV4_RE.fullmatch(name) or name.startswith("goog") or "google" in name or "g00gle" in name:
        return f"bucket name {name!r} breaks the {rules}"
    return None


def is_valid_coded_id(value: object) -> bool:
    # A run of dots matches the character class but would be a path component of its own.
    return isinstance(value, str) and bool(CODED_ID_RE.fullmatch(value)) and value.strip(".") != ""


def kind_of(value: object) -> str:
    """What a refused value is, never the value: where an id is expected, a person's name or record
    number may stand, and errors reach reports, task logs and the bucket."""
    if value is None:
        return "(missing)"
    if isinstance(value, str):
        return f"(a string of {len(value)} characters)"
    return f"(a {type(value).__name__})"


def require(value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value) or value.strip(".") == "":
        raise InvalidIdentifierError(f"{what} {kind_of(value)} does not match {pattern.pattern}")
    return value


def archive_stem(entity_id: str, study_date: str, item_id: str) -> str:
    """`<entity>_<YYYYMMDD>_<item>`: the archive's name without suffix and its top folder."""
    require(entity_id, CODED_ID_RE, "entity id")
    require(study_date, STUDY_DATE_RE, "study date")
    require(item_id, CODED_ID_RE, "item id")
    return f"{entity_id}_{study_date}_{item_id}"


def collection_prefix(collection: str) -> str:
    require(collection, COLLECTION_RE, "collection")
    problem = collection_problem(collection)
    if problem is not None:
        raise InvalidIdentifierError(problem)
    return f"Collection/{collection}/"


def archive_object_name(collection: str, entity_id: str, study_date: str, item_id: str) -> str:
    stem = archive_stem(entity_id, study_date, item_id)
    return f"{collection_prefix(collection)}Entity/{entity_id}/{stem}{ARCHIVE_SUFFIX}"


def batch_report_object_name(collection: str, batch_id: str) -> str:
    return f"{collection_prefix(collection)}Batches/{require_batch_id(batch_id)}.json"
