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


class InvalidIdentifierError(ValueError):
    """An identifier that may not become part of an object name."""


def is_valid_coded_id(value: object) -> bool:
    # A run of dots matches the character class but would be a path component of its own.
    return isinstance(value, str) and bool(CODED_ID_RE.fullmatch(value)) and value.strip(".") != ""


def require(value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value) or value.strip(".") == "":
        raise InvalidIdentifierError(f"{what} {value!r} does not match {pattern.pattern}")
    return value


def archive_stem(entity_id: str, study_date: str, item_id: str) -> str:
    """`<entity>_<YYYYMMDD>_<item>`: the archive's name without suffix and its top folder."""
    require(entity_id, CODED_ID_RE, "entity id")
    require(study_date, STUDY_DATE_RE, "study date")
    require(item_id, CODED_ID_RE, "item id")
    return f"{entity_id}_{study_date}_{item_id}"


def collection_prefix(collection: str) -> str:
    return f"Collection/{require(collection, COLLECTION_RE, 'collection')}/"


def archive_object_name(collection: str, entity_id: str, study_date: str, item_id: str) -> str:
    stem = archive_stem(entity_id, study_date, item_id)
    return f"{collection_prefix(collection)}Entity/{entity_id}/{stem}{ARCHIVE_SUFFIX}"


def batch_report_object_name(collection: str, batch_id: str) -> str:
    return f"{collection_prefix(collection)}Batches/{require(batch_id, BATCH_ID_RE, 'batch id')}.json"
