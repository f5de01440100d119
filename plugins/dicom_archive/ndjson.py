"""The one NDJSON (JSON lines) writer, for staged rows, local output and BigQuery loads alike,
a temporary file of such lines (`NdjsonSpool`) that keeps rows out of memory, and the MERGE's
rule applied to a local rows file (`merge_rows`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

# What identifies a metadata row: one row per image of a collection, however often it is loaded.
ROW_KEY = ("collection", "instance_sha256")
# Tie-breakers after uploaded_at so the row kept among duplicates does not depend on scan order.
DEDUPE_ORDER = ("uploaded_at", "storage_uri", "archive_member")


def ndjson_line(row: Any) -> bytes:
    """One compact JSON value and its newline, keys sorted: the same rows always give the same
    bytes (a BigQuery load's job ids hash them). ASCII only (json's default escapes), so any
    string encodes."""
    return json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def to_ndjson(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """One line a row (see ndjson_line)."""
    return b"".join(ndjson_line(row) for row in rows)


def merge_rows(old: bytes | None, new: bytes) -> tuple[bytes, dict[str, int]]:
    """A batch's rows `new` merged into the rows file `old` as bigquery_load's MERGE merges them
    into the table (one row per ROW_KEY, the first in DEDUPE_ORDER): a row of an image already
    there from the same object and generation stays as it was (so a rerun changes nothing), one
    from a replaced archive (another generation) takes the new values, a new image is added, and
    an old row whose image is not in `new` goes. Returns the merged file and the counts
    `rows_inserted`, `rows_updated`, `rows_deleted`."""

    def keyed(data: bytes) -> dict[tuple[Any, ...], tuple[list[str], dict[str, Any], bytes]]:
        found: dict[tuple[Any, ...], tuple[list[str], dict[str, Any], bytes]] = {}
        for row in (json.loads(line) for line in data.splitlines() if line.strip()):
            key, order = tuple(row.get(c) for c in ROW_KEY), [str(row.get(c) or "") for c in DEDUPE_ORDER]
            if key not in found or order < found[key][0]:
                found[key] = order, row, ndjson_line(row)
        return found

    before, merged = keyed(old or b""), []
    counts = {"rows_inserted": 0, "rows_updated": 0, "rows_deleted": 0}
    for key, (_, row, line) in keyed(new).items():
        kept = before.pop(key, None)
        if kept is None:
            counts["rows_inserted"] += 1
        elif all(kept[1].get(c) == row.get(c) for c in ("storage_uri", "storage_generation")):
            line = kept[2]
        else:
            counts["rows_updated"] += 1
        merged.append(line)
    counts["rows_deleted"] = len(before)
    return b"".join(merged), counts


class NdjsonSpool:
    """JSON values written as NDJSON lines to an unnamed temporary file (gone when closed, or
    when the process ends), and read back in the order written: what an archive task must keep
    per image goes here instead of into memory, so its memory does not grow with the images.

    Reading rewinds the file; write again only after a read has finished. A value read back is
    the value written, as JSON has it (a tuple comes back as a list), and writes the same line."""

    def __init__(self) -> None:
        # Closed by close() (or the context); unnamed, so nothing is left behind either way.
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="dicom-archive-spool-")  # noqa: SIM115
        self.count = 0

    def __enter__(self) -> NdjsonSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def write(self, value: Any) -> None:
        self._file.write(ndjson_line(value))
        self.count += 1

    def clear(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        """The values, in the order written."""
        for line in self.lines():
            yield json.loads(line)

    def lines(self) -> Iterator[bytes]:
        self._file.flush()
        self._file.seek(0)
        try:
            for _ in range(self.count):
                yield self._file.readline()
        finally:
            self._file.seek(0, os.SEEK_END)

    def size(self) -> int:
        """The bytes written so far."""
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    @contextlib.contextmanager
    def stream(self) -> Iterator[IO[bytes]]:
        """The file, rewound, for the block: the NDJSON bytes to upload."""
        self._file.flush()
        self._file.seek(0)
        try:
            yield self._file
        finally:
            self._file.seek(0, os.SEEK_END)
