"""The one NDJSON (JSON lines) writer, for staged rows, local output and BigQuery loads alike."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def to_ndjson(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """One compact JSON object a line, keys sorted: the same rows always give the same bytes (a
    BigQuery load's job ids hash them). ASCII only (json's default escapes), so any string encodes."""
    return b"".join(json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n" for row in rows)
