"""An image in the Deflated Explicit VR Little Endian transfer syntax, read as the equivalent
Explicit VR Little Endian file.

The header walker reads a file element by element; a deflated dataset cannot be read that way.
Its inflated form can: the file meta as it is but for TransferSyntaxUID (Explicit VR Little
Endian, the group length patched), then the inflated dataset. Every step that walks an image (the
plan's check, the archiver's check and copy) does so through `walked_image`, so all of them see
the same bytes, and the archived copy of a deflated image is that explicit little endian file, its
pixel data unchanged. The same file always inflates to the same bytes: reruns make the same archive.

The inflated file is spooled to a temporary file as it is inflated (memory stays bounded) and
capped in size (`DeidPolicy.max_image_bytes`, as a landing file is): a small file that inflates
to an enormous one (a zip bomb) is unreadable.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

from dicom_archive.deid_gate import DeidPolicy, Reason
from dicom_archive.header_walk import (
    COPY_CHUNK,
    DeflatedDatasetError,
    HeaderWalk,
    SizeChangedError,
    WalkError,
    walk_header,
)

EXPLICIT_LITTLE = b"1.2.840.10008.1.2.1\0"  # a UI value is padded to an even length with a null
SPOOL_IN_MEMORY = 8 * 1024 * 1024  # an inflated file larger than this is spooled to disk
# What may follow the deflated data: nothing, the null byte that pads a stream of odd length
# (pydicom writes it), or a gzip trailer (CRC-32 and size of the inflated data, as some writers put
# it: pydicom's own image_dfl.dcm has one) that matches. Anything else is not understood: the file
# is not archived, though such bytes would never reach the archived copy.
DEFLATE_PADDING = (b"", b"\0")
GZIP_TRAILER = 8


@dataclass
class ImageBytes:
    """An image as the gate walked it and as the archiver copies it."""

    stream: BinaryIO
    size: int
    walk: HeaderWalk
    # sha256 of the file in the landing zone when `stream` is not that file (a deflated image,
    # inflated); None: `stream` is the landing file itself.
    landing_sha256: str | None = None


@contextmanager
def walked_image(
    stream: BinaryIO,
    size: int,
    policy: DeidPolicy,
    *,
    check_end: bool = True,
    record: frozenset[str] = frozenset(),
) -> Iterator[ImageBytes]:
    """`walk_header` of the image in `stream` (`size` bytes, as listed), or, for a deflated image,
    of its inflated equivalent (spooled, then `stream` of the result), which lives as long as
    the context. Raises WalkError (quarantine the image): for a deflated image, SizeChangedError
    when it is not `size` bytes long, not_dicom when its deflated data is truncated, corrupt or
    followed by anything but its padding or a matching gzip trailer, unreadable when it inflates
    to more than `policy.max_image_bytes`."""
    try:
        walk = walk_header(stream, size, policy, check_end=check_end, record=record)
    except DeflatedDatasetError as err:
        deflated = err
    else:
        yield ImageBytes(stream, size, walk)
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        inflated = cast(BinaryIO, spool)
        stream.seek(0)
        landing_sha256, inflated_size = _inflate(stream, size, deflated, inflated, policy.max_image_bytes)
        inflated.seek(0)
        walk = walk_header(inflated, inflated_size, policy, record=record)
        yield ImageBytes(inflated, inflated_size, walk, landing_sha256)


def _explicit_file_meta(head: bytes, deflated: DeflatedDatasetError) -> bytes:
    """The preamble and file meta `head` (as the walker read them) with TransferSyntaxUID Explicit
    VR Little Endian and the group length, if any, patched to match."""
    start, end = deflated.syntax_element
    syntax = head[start : start + 6] + struct.pack("<H", len(EXPLICIT_LITTLE)) + EXPLICIT_LITTLE
    explicit = bytearray(head[:start] + syntax + head[end:])
    if deflated.group_length_at is not None:
        # Both come before the dataset; the group length's value counts the bytes after it.
        at = deflated.group_length_at + (len(syntax) - (end - start) if deflated.group_length_at > start else 0)
        struct.pack_into("<L", explicit, at, len(explicit) - at - 4)
    return bytes(explicit)


def _inflate(
    stream: BinaryIO, size: int, deflated: DeflatedDatasetError, out: IO[bytes], max_bytes: int
) -> tuple[str, int]:
    """Writes the inflated file of the deflated file in `stream` (as the walker found it) to `out`;
    returns the sha256 of the deflated file and the size of the inflated one."""
    landing, data_at = hashlib.sha256(), deflated.data_at
    head = stream.read(data_at)
    if len(head) != data_at:
        raise SizeChangedError(Reason.NOT_DICOM, "does not parse as DICOM (the file ended early)")
    landing.update(head)
    written = out.write(_explicit_file_meta(head, deflated))
    inflater = zlib.decompressobj(-15)  # raw deflate (PS3.5 A.5): no zlib header
    read, trailing, crc, inflated = data_at, b"", 0, 0
    while read < size:
        data = stream.read(min(COPY_CHUNK, size - read))
        if not data:
            raise SizeChangedError(Reason.NOT_DICOM, "does not parse as DICOM (the file ended early)")
        read += len(data)
        landing.update(data)
        if inflater.eof:
            trailing += data[: GZIP_TRAILER + 1]
        else:
            try:
                while True:
                    # At most a chunk of output a call: a small input may inflate to a great deal.
                    chunk = inflater.decompress(data, COPY_CHUNK)
                    written += len(chunk)
                    if written > max_bytes:
                        raise WalkError(
                            Reason.UNREADABLE, f"the deflated data inflates to more than the limit of {max_bytes} bytes"
                        )
                    out.write(chunk)
                    crc, inflated = zlib.crc32(chunk, crc), inflated + len(chunk)
                    # At the end of the stream what follows it is both unused_data and unconsumed_tail.
                    data = inflater.unconsumed_tail
                    if inflater.eof or (not data and len(chunk) < COPY_CHUNK):
                        break
            except zlib.error as err:
                raise WalkError(Reason.NOT_DICOM, "does not parse as DICOM (corrupt deflated data)") from err
            trailing = inflater.unused_data
        if len(trailing) > GZIP_TRAILER:
            raise WalkError(Reason.NOT_DICOM, "does not parse as DICOM (data after the end of the deflated data)")
    if stream.read(1):
        raise SizeChangedError(Reason.UNREADABLE, "the file grew: it is longer than its listed size")
    if not inflater.eof:
        raise WalkError(Reason.NOT_DICOM, "does not parse as DICOM (truncated deflated data)")
    if trailing not in DEFLATE_PADDING and trailing != struct.pack("<LL", crc, inflated & 0xFFFFFFFF):
        raise WalkError(Reason.NOT_DICOM, "does not parse as DICOM (data after the end of the deflated data)")
    return landing.hexdigest(), written
