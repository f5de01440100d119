"""Files on a local disk written whole or not at all: a temporary sibling, then one rename.

Every local write that a reader may see half-done (the local store's objects and metadata, the
report in a local landing zone, a test landing zone's batch.json) goes through `atomic_file`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"  # what listings of a local store leave out


def partial_suffix() -> str:
    """The default temporary suffix: per process, so that two writers of one name never share
    (and truncate) one temporary file."""
    return f".{os.getpid()}{PARTIAL_SUFFIX}"


@contextlib.contextmanager
def atomic_file(path: Path, *, temp_suffix: str | None = None, create_only: bool = False) -> Iterator[BinaryIO]:
    """A stream to `.<name><temp_suffix>` beside `path`; when the block ends without error, the
    file takes the name `path` in one step, so a reader sees the old file or the whole new one.

    `create_only`: a hard link instead of a rename, which fails with FileExistsError when `path`
    exists. The temporary file never stays behind, whatever happens."""
    temp = path.with_name(f".{path.name}{partial_suffix() if temp_suffix is None else temp_suffix}")
    try:
        with open(temp, "wb") as stream:
            yield stream
        if create_only:
            os.link(temp, path)
        else:
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes, *, temp_suffix: str | None = None) -> None:
    """`data` as the whole content of `path`, replacing it in one step (see atomic_file)."""
    with atomic_file(path, temp_suffix=temp_suffix) as stream:
        stream.write(data)
