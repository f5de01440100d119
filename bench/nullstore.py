"""An ObjectStore that keeps nothing but each object's size and checksums.

It lets an archive task run end to end (publish, verify, build rows) with no network and no
disk writes, so a measurement sees only the task's own CPU, reads and memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import BinaryIO

from dicom_archive.archive import HashingSink
from dicom_archive.stores import StoredObject


class NullObjectStore:
    def __init__(self, bucket: str = "null") -> None:
        self.bucket = bucket
        self.objects: dict[str, StoredObject] = {}

    def uri(self, name: str) -> str:
        return f"null://{self.bucket}/{name}"

    def get(self, name: str) -> StoredObject | None:
        return self.objects.get(name)

    @contextlib.contextmanager
    def writer(
        self, name: str, *, metadata: dict[str, str], content_type: str, if_generation_match: int | None
    ) -> Iterator[BinaryIO]:
        sink = HashingSink(None)
        yield sink  # type: ignore[misc]
        digest = sink.digest()
        self.objects[name] = StoredObject(
            uri=self.uri(name),
            bucket=self.bucket,
            name=name,
            size=digest.size,
            md5=digest.md5,
            crc32c=digest.crc32c,
            generation=1,
            created="2024-01-05T09:30:00+00:00",
            metadata=dict(metadata),
        )

    def delete(self, name: str, generation: int | None) -> None:
        self.objects.pop(name, None)

    def update_metadata(
        self, name: str, metadata: dict[str, str], *, if_metageneration_match: int | None
    ) -> StoredObject:
        self.objects[name] = dataclasses.replace(self.objects[name], metadata=dict(metadata))
        return self.objects[name]

    def write_bytes(self, name: str, data: bytes, content_type: str) -> StoredObject:
        with self.writer(name, metadata={}, content_type=content_type, if_generation_match=None) as sink:
            sink.write(data)
        return self.objects[name]

    def write_file(self, name: str, stream: BinaryIO, content_type: str) -> StoredObject:
        with self.writer(name, metadata={}, content_type=content_type, if_generation_match=None) as sink:
            while chunk := stream.read(1024 * 1024):
                sink.write(chunk)
        return self.objects[name]

    def read_bytes(self, name: str) -> bytes | None:
        return None

    def list_names(self, prefix: str) -> list[str]:
        return sorted(name for name in self.objects if name.startswith(prefix))
