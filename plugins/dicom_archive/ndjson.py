"""The one NDJSON (JSON lines) writer, for staged rows, local output and BigQuery loads alike,
and a temporary file of such lines (`NdjsonSpool`) that keeps rows out of memory."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any


def ndjson_line(row: Any) -> bytes:
    """One compact JSON value and its newline, keys sorted: the same rows always give the same
    bytes (a BigQuery load's job ids hash them). ASCII only (json's default escapes), so any
    string encodes."""
    return json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def to_ndjson(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """One line a row (see ndjson_line)."""
    return b"".join(ndjson_line(row) for row in rows)


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
