"""Where archives, staged rows and reports go: a Cloud Storage bucket or a local folder.

Both stores offer create-only writes: Cloud Storage through the `if_generation_match`
precondition, the local folder through a hard link that fails when the name exists.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import google_crc32c

from dicom_archive.local_files import PARTIAL_SUFFIX, atomic_file, write_atomically

UPLOAD_CHUNK = 16 * 1024 * 1024  # resumable upload chunk, a multiple of 256 KiB
ARCHIVE_CONTENT_TYPE = "application/gzip"
COPY_BUFFER = 1024 * 1024


class Checksums:
    """The md5 and crc32c of a byte stream, fed as it passes, in Cloud Storage's spelling (base64;
    crc32c of the big-endian value), so that what we hashed compares with what the store reports."""

    def __init__(self) -> None:
        self.size = 0
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._crc32c = google_crc32c.Checksum()

    def update(self, data: bytes) -> None:
        self._md5.update(data)
        self._crc32c.update(data)
        self.size += len(data)

    @property
    def md5(self) -> str:
        return base64.b64encode(self._md5.digest()).decode()

    @property
    def crc32c(self) -> str:
        return base64.b64encode(self._crc32c.digest()).decode()

    @classmethod
    def of_file(cls, path: Path, chunk_size: int = 1024 * 1024) -> Checksums:
        checksums = cls()
        with open(path, "rb") as stream:
            while chunk := stream.read(chunk_size):
                checksums.update(chunk)
        return checksums


class ObjectExistsError(RuntimeError):
    """A create-only write found the name taken (HTTP 412 on Cloud Storage)."""


class ObjectChangedError(RuntimeError):
    """A guarded update or delete found the object changed since it was read, or gone (HTTP 412 or
    404 on Cloud Storage)."""


@dataclass
class StoredObject:
    uri: str  # gs://bucket/name, or file:///... in a local store
    bucket: str | None  # the Cloud Storage bucket; None in a local store (its folder is in `uri`)
    name: str
    size: int
    md5: str
    crc32c: str
    generation: int | None = None
    created: str = ""  # RFC 3339
    media_link: str | None = None
    self_link: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    metageneration: int | None = None  # guards metadata-only updates (None: the store has none)

    def as_xcom(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "generation": self.generation,
            "md5": self.md5,
            "crc32c": self.crc32c,
            "size": self.size,
        }


class ObjectStore(Protocol):
    def get(self, name: str) -> StoredObject | None: ...

    def writer(
        self, name: str, *, metadata: dict[str, str], content_type: str, if_generation_match: int | None
    ) -> contextlib.AbstractContextManager[BinaryIO]: ...

    def delete(self, name: str, generation: int | None) -> None: ...

    def write_bytes(self, name: str, data: bytes, content_type: str) -> StoredObject: ...

    def write_file(self, name: str, stream: BinaryIO, content_type: str) -> StoredObject: ...

    def read_bytes(self, name: str) -> bytes | None: ...

    def list_names(self, prefix: str) -> list[str]: ...

    def uri(self, name: str) -> str: ...

    # Small compare-and-swap objects (claims): see dicom_archive.claims.
    def write_bytes_if_generation(
        self, name: str, data: bytes, content_type: str, if_generation_match: int
    ) -> StoredObject: ...

    def read_versioned(self, name: str) -> tuple[bytes, int] | None: ...

    # Content identity and withdrawals (see publish.py and withdraw.py).

    def update_metadata(
        self, name: str, metadata: dict[str, str], *, if_metageneration_match: int | None
    ) -> StoredObject: ...

    def open_reader(self, name: str, generation: int | None) -> contextlib.AbstractContextManager[BinaryIO]: ...

    def list_versions(self, prefix: str) -> list[StoredObject]: ...

    def delete_version(self, name: str, generation: int | None) -> bool: ...


class GCSObjectStore:
    """A bucket, through a google.cloud.storage.Bucket (production gets it from GCSHook)."""

    def __init__(self, bucket: Any, upload_chunk: int = UPLOAD_CHUNK, retry: Any = None) -> None:
        self.bucket = bucket
        self.upload_chunk = upload_chunk
        # The client's own retry (backoff on 429, 5xx and resets); `retry` only changes how long.
        self._retry: dict[str, Any] = {} if retry is None else {"retry": retry}

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket.name}/{name}"

    def _stored(self, blob: Any) -> StoredObject:
        return StoredObject(
            uri=self.uri(blob.name),
            bucket=self.bucket.name,
            name=blob.name,
            size=int(blob.size or 0),
            md5=blob.md5_hash or "",
            crc32c=blob.crc32c or "",
            generation=int(blob.generation) if blob.generation is not None else None,
            created=blob.time_created.astimezone(UTC).isoformat() if blob.time_created else "",
            media_link=blob.media_link,
            self_link=blob.self_link,
            metadata=dict(blob.metadata or {}),
            metageneration=int(blob.metageneration) if blob.metageneration is not None else None,
        )

    def get(self, name: str) -> StoredObject | None:
        blob = self.bucket.get_blob(name, **self._retry)
        return None if blob is None else self._stored(blob)

    @contextlib.contextmanager
    def writer(
        self, name: str, *, metadata: dict[str, str], content_type: str, if_generation_match: int | None
    ) -> Iterator[BinaryIO]:
        from google.api_core.exceptions import PreconditionFailed, from_http_response
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        blob = self.bucket.blob(name, chunk_size=self.upload_chunk)
        blob.metadata = metadata
        writer = blob.open(
            "wb",
            content_type=content_type,
            if_generation_match=if_generation_match,
            ignore_flush=True,
            **self._retry,
        )
        try:
            # The writer cancels the resumable session when the block raises, so a failed
            # or interrupted archive never becomes an object.
            with writer as stream:
                yield stream
        except PreconditionFailed as err:
            raise ObjectExistsError(f"{self.uri(name)} already exists (precondition failed)") from err
        except DataCorruption:
            # The blob writer (unlike upload_from_file) neither deletes the finished object nor
            # converts the error: leave the object for the caller, which compares its own
            # digest with what the store reports, deletes the object and fails.
            pass
        except InvalidResponse as err:
            # The blob writer reports HTTP errors raw (upload_from_file converts them): a failed
            # precondition is a 412, not PreconditionFailed, and a refusal a 403, not Forbidden.
            if getattr(err.response, "status_code", None) == 412:
                raise ObjectExistsError(f"{self.uri(name)} already exists (precondition failed)") from err
            if err.response is None:
                raise
            raise from_http_response(err.response) from err
        finally:
            if not writer.closed:
                # close() failed (the last chunk was refused or never answered). A writer left
                # open uploads its buffer again when it is garbage-collected: cancel it now.
                with contextlib.suppress(Exception):
                    writer.terminate()
                if not writer.closed:  # terminate() could not reach the service
                    writer._buffer.close()

    def delete(self, name: str, generation: int | None) -> None:
        """Delete the live object, only if it is still `generation` (None: whichever it is);
        ObjectChangedError when it is another one or gone."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.bucket.blob(name).delete(if_generation_match=generation, **self._retry)
        except (PreconditionFailed, NotFound) as err:
            wanted = "" if generation is None else f" (generation {generation})"
            raise ObjectChangedError(f"{self.uri(name)}{wanted} was replaced or is gone: {err}") from err

    def write_bytes(self, name: str, data: bytes, content_type: str) -> StoredObject:
        blob = self.bucket.blob(name)
        blob.upload_from_string(data, content_type=content_type, **self._retry)
        return self._stored(blob)

    def write_file(self, name: str, stream: BinaryIO, content_type: str) -> StoredObject:
        """The rest of a seekable stream as the whole object, read as it is sent: one request up
        to 8 MiB (as write_bytes sends), a resumable upload in `upload_chunk` pieces beyond."""
        start = stream.tell()
        size = stream.seek(0, os.SEEK_END) - start
        stream.seek(start)
        blob = self.bucket.blob(name, chunk_size=self.upload_chunk)
        blob.upload_from_file(stream, size=size, content_type=content_type, **self._retry)
        return self._stored(blob)

    def read_bytes(self, name: str) -> bytes | None:
        blob = self.bucket.get_blob(name, **self._retry)
        return None if blob is None else blob.download_as_bytes(**self._retry)

    def list_names(self, prefix: str) -> list[str]:
        return sorted(blob.name for blob in self.bucket.list_blobs(prefix=prefix, **self._retry))

    # -- compare-and-swap objects (claims)

    def write_bytes_if_generation(
        self, name: str, data: bytes, content_type: str, if_generation_match: int
    ) -> StoredObject:
        """Write only if the live object has this generation (0: only if there is none);
        ObjectExistsError otherwise (HTTP 412)."""
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(name)
        try:
            blob.upload_from_string(
                data, content_type=content_type, if_generation_match=if_generation_match, **self._retry
            )
        except PreconditionFailed as err:
            raise ObjectExistsError(f"{self.uri(name)} changed or exists (precondition failed)") from err
        return self._stored(blob)

    def read_versioned(self, name: str) -> tuple[bytes, int] | None:
        """The object's bytes and the generation they belong to (None: no such object)."""
        from google.api_core.exceptions import NotFound

        blob = self.bucket.get_blob(name, **self._retry)
        if blob is None:
            return None
        generation = int(blob.generation)
        try:
            data = blob.download_as_bytes(if_generation_match=generation, **self._retry)
        except NotFound:
            return None
        return data, generation

    def update_metadata(
        self, name: str, metadata: dict[str, str], *, if_metageneration_match: int | None
    ) -> StoredObject:
        """Replace the object's custom metadata (all of it: the emulator replaces rather than
        merges, so the full set is always sent), only if its metageneration is still the one read."""
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(name)
        blob.metadata = metadata
        try:
            blob.patch(if_metageneration_match=if_metageneration_match, **self._retry)
        except PreconditionFailed as err:
            raise ObjectChangedError(f"{self.uri(name)} changed while its metadata was updated") from err
        return self._stored(blob)

    @contextlib.contextmanager
    def open_reader(self, name: str, generation: int | None) -> Iterator[BinaryIO]:
        blob = self.bucket.blob(name, generation=generation)
        with blob.open("rb", chunk_size=self.upload_chunk, **self._retry) as stream:
            yield stream

    def list_versions(self, prefix: str) -> list[StoredObject]:
        """Every version under `prefix`, noncurrent ones included where the bucket keeps them."""
        blobs = self.bucket.list_blobs(prefix=prefix, versions=True, **self._retry)
        return sorted((self._stored(blob) for blob in blobs), key=lambda o: (o.name, o.generation or 0))

    def delete_version(self, name: str, generation: int | None) -> bool:
        """Delete one version for good (False: it was gone already, e.g. an earlier try's)."""
        from google.api_core.exceptions import NotFound

        try:
            self.bucket.blob(name, generation=generation).delete(**self._retry)
        except NotFound:
            return False
        return True


METADATA_DIR = ".metadata"  # local store: custom metadata of `name` in `.metadata/<name>.json`


class LocalObjectStore:
    """A local folder laid out like the bucket (SEND_TO_GOOGLE=false: nothing leaves the machine)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def uri(self, name: str) -> str:
        return (self.root / name).resolve().as_uri()

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{name!r} escapes {self.root}")
        return path

    def _stored(self, path: Path, name: str) -> StoredObject:
        checksums = Checksums.of_file(path)
        stat = path.stat()
        return StoredObject(
            uri=self.uri(name),
            bucket=None,
            name=name,
            size=stat.st_size,
            md5=checksums.md5,
            crc32c=checksums.crc32c,
            generation=stat.st_mtime_ns,
            created=datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(),
            metadata=self._read_metadata(name),
        )

    def _metadata_path(self, name: str) -> Path:
        return self._path(f"{METADATA_DIR}/{name}.json")

    def _read_metadata(self, name: str) -> dict[str, str]:
        try:
            return json.loads(self._metadata_path(name).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _write_metadata(self, name: str, metadata: dict[str, str]) -> None:
        path = self._metadata_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(metadata, sort_keys=True).encode())

    def update_metadata(
        self, name: str, metadata: dict[str, str], *, if_metageneration_match: int | None
    ) -> StoredObject:
        if not self._path(name).is_file():
            raise ObjectChangedError(f"{self.uri(name)} is gone")
        self._write_metadata(name, metadata)
        return self._stored(self._path(name), name)

    @contextlib.contextmanager
    def open_reader(self, name: str, generation: int | None) -> Iterator[BinaryIO]:
        with open(self._path(name), "rb") as stream:
            yield stream

    def list_versions(self, prefix: str) -> list[StoredObject]:
        return [self._stored(self._path(name), name) for name in self.list_names(prefix)]

    def delete_version(self, name: str, generation: int | None) -> bool:
        existed = self._path(name).is_file()
        self.delete(name, generation)
        return existed

    def get(self, name: str) -> StoredObject | None:
        path = self._path(name)
        return self._stored(path, name) if path.is_file() else None

    @contextlib.contextmanager
    def writer(
        self, name: str, *, metadata: dict[str, str], content_type: str, if_generation_match: int | None
    ) -> Iterator[BinaryIO]:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_file(path, create_only=if_generation_match == 0) as stream:
                yield stream
                if if_generation_match != 0:
                    current = self.get(name)
                    if current is not None and current.generation != if_generation_match:
                        raise ObjectExistsError(f"{path} changed while it was being replaced")
        except FileExistsError as err:  # create-only, and the name exists
            raise ObjectExistsError(f"{path} already exists") from err
        self._write_metadata(name, metadata)

    def delete(self, name: str, generation: int | None) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        if not name.startswith(f"{METADATA_DIR}/"):
            self._metadata_path(name).unlink(missing_ok=True)
        # A bucket has no folders: leave none behind either.
        root = self.root.resolve()
        for parent in path.parents:
            if parent == root or not parent.is_relative_to(root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def write_bytes(self, name: str, data: bytes, content_type: str) -> StoredObject:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
        return self._stored(path, name)

    def write_file(self, name: str, stream: BinaryIO, content_type: str) -> StoredObject:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as out:
            shutil.copyfileobj(stream, out, COPY_BUFFER)
        return self._stored(path, name)

    def read_bytes(self, name: str) -> bytes | None:
        path = self._path(name)
        return path.read_bytes() if path.is_file() else None

    # -- compare-and-swap objects (claims)

    def write_bytes_if_generation(
        self, name: str, data: bytes, content_type: str, if_generation_match: int
    ) -> StoredObject:
        with self.writer(name, metadata={}, content_type=content_type, if_generation_match=if_generation_match) as out:
            out.write(data)
        return self._stored(self._path(name), name)

    def read_versioned(self, name: str) -> tuple[bytes, int] | None:
        path = self._path(name)
        try:
            with open(path, "rb") as stream:
                return stream.read(), os.fstat(stream.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None

    def list_names(self, prefix: str) -> list[str]:
        base = self.root.resolve()
        if not base.is_dir():
            return []
        names = (p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(
            n
            for n in names
            if n.startswith(prefix)
            and not Path(n).name.endswith(PARTIAL_SUFFIX)
            and not n.startswith(f"{METADATA_DIR}/")
        )
