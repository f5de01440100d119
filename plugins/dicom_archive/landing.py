"""Landing zones: a local folder or a `gs://bucket/prefix`, one folder per batch.

The project only reads what the anonymizer wrote; the one thing it writes into a batch folder
is its own report (`batch.report.json`).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import socket
import stat
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from dicom_archive.deid_gate import value_looks_like_person_name
from dicom_archive.local_files import write_atomically

# A DICOM header is a few KiB: what a header read takes beyond it is read twice (once to plan,
# once to archive). Locally a read is a system call, so a header is read a page at a time; from
# gs:// a read is an HTTP request, so one fetches 16 KiB, most headers in one request.
LOCAL_HEADER_READ = 4 * 1024
GCS_HEADER_READ = 16 * 1024


# What a file of the batch was when the plan opened it (LandingZone.source_identity): locally
# st_dev, st_ino, size, mtime_ns and ctime_ns of the opened file; in a bucket, the object's generation.
SourceIdentity = Mapping[str, int]


@dataclass(frozen=True)
class LandingFile:
    relpath: str  # POSIX path relative to the batch folder
    size: int
    outside_batch: bool = False  # a symlink whose target lies outside the batch folder
    special: bool = False  # not a regular file (a named pipe, socket or device): never opened
    # What the file is, whatever name it was reached under: "device:inode" in a local zone (hard
    # links and symbolic links share their target's), the object name in a bucket. None: unknown.
    identity: str | None = None
    link_target: str | None = None  # a symbolic link's resolved path, relative to the batch folder
    generation: int | None = None  # an object's generation, as listed (a bucket only)

    def planned_source(self) -> SourceIdentity | None:
        """What to open it as (LandingZone.open's `source`): the listed generation of an object."""
        return None if self.generation is None else {"generation": self.generation}


# The files of a batch folder the pipeline reads and writes beside the images (the ledger lists
# them, see list_batch_folders): the manifest, the report of a run that sent the batch to Google,
# and the report of a local (SEND_TO_GOOGLE=false) run, beside the real one, never in its place.
MANIFEST_NAME = "batch.json"
REPORT_NAME = "batch.report.json"
LOCAL_REPORT_NAME = "batch.report.local.json"


class LandingRootError(RuntimeError):
    """The landing root does not exist or cannot be read: the run fails, it never skips."""


NAME_SHAPED_PART = "(shaped like a person's name, not shown)"


def shown_path(relpath: str) -> str:
    """An image path as reports, errors and logs show it: a part of it shaped like a person's name
    (a letter next to `^`) is not shown, as for lookup.json's keys. File names are the anonymizer's;
    one that holds an identifier in any other shape is its mistake to fix."""
    return "/".join(NAME_SHAPED_PART if value_looks_like_person_name(part) else part for part in relpath.split("/"))


class HeldImagesError(RuntimeError):
    """The images held back under `PHI/` cannot all be found (a dangling or looping link, a link
    to the batch folder or above it, a folder that cannot be listed): the batch fails and nothing
    of it is uploaded, rather than risk uploading one of them under another name."""

    def __init__(self, relpath: str, problem: str) -> None:
        super().__init__(f"{shown_path(relpath)}: {problem}")
        self.relpath = relpath  # the name in or of a PHI folder that is the trouble
        self.problem = problem


@dataclass(frozen=True)
class BatchFolder:
    """One direct child of the landing root, as a single listing shows it."""

    name: str
    has_manifest: bool
    has_report: bool
    manifest_modified: datetime | None = None
    has_local_report: bool = False  # batch.report.local.json: a SEND_TO_GOOGLE=false run reported it


class LandingZone(Protocol):
    uri: str

    def batch_ids(self) -> list[str]: ...

    def list_batch_folders(self) -> list[BatchFolder]: ...

    def check_root(self) -> None:
        """Raise LandingRootError when the landing root does not exist or cannot be read (what
        list_batch_folders raises), at the cost of one look, however many batches it holds."""
        ...

    def read_bytes(self, batch_id: str, relpath: str) -> bytes | None: ...

    def list_files(self, batch_id: str) -> list[LandingFile]: ...

    def open(
        self, batch_id: str, relpath: str, chunk_size: int | None = None, *, source: SourceIdentity | None = None
    ) -> BinaryIO:
        """Read in `chunk_size` pieces; None: a header read, in the zone's header read size.
        `source`: what the plan found (source_identity); a zone that can, reads only that file.
        Raises FileNotFoundError when there is no such file (any more)."""
        ...

    def source_identity(self, stream: BinaryIO) -> SourceIdentity:
        """What an opened file is, from the opened file itself (never its name again): the same
        value for the same unchanged file; {} when the zone cannot tell."""
        ...

    def held_identities(self, batch_id: str) -> set[str]:
        """The identities (LandingFile.identity) of the images held back under `PHI/`, now.
        Raises HeldImagesError when they cannot all be found."""
        ...

    def write_bytes(self, batch_id: str, relpath: str, data: bytes) -> str: ...

    def modified(self, batch_id: str, relpath: str) -> datetime | None: ...

    def describe(self, batch_id: str, relpath: str = "") -> str:
        """Where a file is, for messages: a part shaped like a person's name is not shown (shown_path)."""
        ...


class LocalLandingZone:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def batch_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink())

    def list_batch_folders(self) -> list[BatchFolder]:
        """Every folder directly under the root (linked folders excluded: they are not direct
        children), with whether it holds batch.json and our reports. Three stats per folder, no read."""
        self.check_root()
        folders = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                manifest = _stat_or_none(Path(entry.path, MANIFEST_NAME))
                if isinstance(manifest, OSError):
                    # A batch.json that cannot be reached (a looping link, a folder the worker may not
                    # read) is the batch's own trouble: taken, dated by its folder, its plan says why.
                    manifest = entry.stat(follow_symlinks=False)
                folders.append(
                    BatchFolder(
                        entry.name,
                        has_manifest=manifest is not None,
                        # A report that cannot be reached does not count: the batch is taken, and says why.
                        has_report=isinstance(_stat_or_none(Path(entry.path, REPORT_NAME)), os.stat_result),
                        manifest_modified=None if manifest is None else datetime.fromtimestamp(manifest.st_mtime, UTC),
                        has_local_report=isinstance(_stat_or_none(Path(entry.path, LOCAL_REPORT_NAME)), os.stat_result),
                    )
                )
        return sorted(folders, key=lambda f: f.name)

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise LandingRootError(
                f"the landing root {self.root} does not exist or is not a folder (DICOM_LANDING_ROOT); "
                "a run cannot tell whether batches are pending, so it fails rather than skip"
            )

    def _path(self, batch_id: str, relpath: str) -> Path:
        return self.root / batch_id / relpath

    def read_bytes(self, batch_id: str, relpath: str) -> bytes | None:
        try:
            return self._path(batch_id, relpath).read_bytes()
        except FileNotFoundError:
            return None

    def list_files(self, batch_id: str) -> list[LandingFile]:
        """Every file of the batch, links to folders not followed, except in a `PHI` tree (see
        _walk_held). Raises HeldImagesError when the images held under `PHI/` cannot all be
        found, and OSError for a folder that cannot be listed."""
        batch_dir = (self.root / batch_id).resolve()
        if not batch_dir.is_dir():
            return []
        return sorted(self._walk(batch_dir), key=lambda f: f.relpath)

    def held_identities(self, batch_id: str) -> set[str]:
        """Walks the batch's folders as list_files does, but stats only the held images (and any
        file named `PHI`): a listing per folder, which each archive task can afford once per batch."""
        batch_dir = (self.root / batch_id).resolve()
        if not batch_dir.is_dir():
            return set()
        return {file.identity for file in self._walk(batch_dir, held_only=True) if file.identity is not None}

    def _walk(self, batch_dir: Path, *, held_only: bool = False) -> Iterator[LandingFile]:
        held_folders: set[tuple[int, int]] = set()  # the folders of PHI trees walked so far
        # A folder that cannot be listed fails the batch: it could hold a PHI folder whose images
        # are hard-linked elsewhere in the batch.
        for dirpath, dirnames, filenames in os.walk(batch_dir, onerror=_raise):
            folder = Path(dirpath)
            relpaths = {name: (folder / name).relative_to(batch_dir).as_posix() for name in dirnames}
            phi_dirs = [d for d in dirnames if is_under_phi_folder(relpaths[d])]
            # Never follow another linked folder: it could lead anywhere, or loop.
            linked_dirs = [d for d in dirnames if d not in phi_dirs and os.path.islink(folder / d)]
            dirnames[:] = sorted(d for d in dirnames if d not in phi_dirs and d not in linked_dirs)
            for name in sorted(filenames) + linked_dirs:
                path = folder / name
                relpath = path.relative_to(batch_dir).as_posix()
                if held_only and not is_under_phi_folder(relpath):
                    continue
                yield self._file(path, relpath, batch_dir, held=is_under_phi_folder(relpath))
            for name in sorted(phi_dirs):
                yield from self._walk_held(folder / name, relpaths[name], batch_dir, held_folders)

    def _walk_held(
        self, folder: Path, relpath: str, batch_dir: Path, visited: set[tuple[int, int]]
    ) -> Iterator[LandingFile]:
        """Every file of a `PHI` folder, listed under its name in that folder, whatever links lead
        to it: the folder itself may be a link, and so may any folder or file in it, to a folder
        inside the batch or outside it. Each folder is walked once (a link back up is a loop).
        Fails closed (HeldImagesError): a link that cannot be followed, a link to the batch
        folder or a folder above it, a folder that cannot be listed."""
        real = _resolve_held(folder, relpath)
        if batch_dir.is_relative_to(real):
            where = "the batch folder" if real == batch_dir else "a folder that holds the batch folder"
            raise HeldImagesError(relpath, f"a link to {where}: it would hold back the whole batch")
        info = real.stat()
        if (info.st_dev, info.st_ino) in visited:
            return
        visited.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(real) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            raise HeldImagesError(relpath, f"cannot be listed ({err.strerror or type(err).__name__})") from err
        for entry in entries:
            child = f"{relpath}/{entry.name}"
            if _is_folder(entry):  # a folder, or a link to one
                yield from self._walk_held(Path(entry.path), child, batch_dir, visited)
            else:
                yield self._file(Path(entry.path), child, batch_dir, held=True)

    def _file(self, path: Path, relpath: str, batch_dir: Path, *, held: bool) -> LandingFile:
        """One name of the batch. A held one (in or named `PHI`) is never opened, but its identity
        is always known, wherever a link leads, so that its other names are held too."""
        link_target = None
        if path.is_symlink():
            target = _resolve_held(path, relpath) if held else path.resolve()
            inside = target.is_relative_to(batch_dir)
            if not held and (not inside or not target.is_file()):
                # Not opened; its identity still tells whether it is one of the held images.
                return LandingFile(relpath, 0, outside_batch=True, identity=_regular_file_identity(target))
            link_target = target.relative_to(batch_dir).as_posix() if inside else None
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            # Opening a named pipe blocks until someone writes to it: never try.
            return LandingFile(relpath, 0, special=True)
        return LandingFile(relpath, info.st_size, identity=file_identity(info), link_target=link_target)

    def open(
        self, batch_id: str, relpath: str, chunk_size: int | None = None, *, source: SourceIdentity | None = None
    ) -> BinaryIO:
        # `source` is not used to open: a path cannot name an inode. The caller compares the
        # opened file's source_identity with it, before reading.
        path = self._path(batch_id, relpath)
        stream = open(path, "rb", buffering=chunk_size or LOCAL_HEADER_READ)  # noqa: SIM115  (returned)
        if chunk_size is None and hasattr(os, "posix_fadvise"):
            # A header read: without this the kernel's read-ahead fetches far more than the header.
            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        return stream

    def source_identity(self, stream: BinaryIO) -> SourceIdentity:
        # fstat of the open descriptor: what is read is what was compared, whatever the name
        # leads to by now (a link, a rename over it). The change time too: a rewrite in place
        # that keeps the size and puts the mtime back still sets it, and no one can set it back.
        info = os.fstat(stream.fileno())
        return {
            "host": _this_host(),  # device and inode numbers are this machine's
            "st_dev": info.st_dev,
            "st_ino": info.st_ino,
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns,
        }

    def write_bytes(self, batch_id: str, relpath: str, data: bytes) -> str:
        path = self._path(batch_id, relpath)
        # A fixed temporary name, which the plan knows as ours (manifest.REPORT_TEMP_NAME).
        write_atomically(path, data, temp_suffix=".tmp")
        return str(path)

    def modified(self, batch_id: str, relpath: str) -> datetime | None:
        try:
            return datetime.fromtimestamp(self._path(batch_id, relpath).stat().st_mtime, UTC)
        except FileNotFoundError:
            return None

    def describe(self, batch_id: str, relpath: str = "") -> str:
        return str(self._path(batch_id, shown_path(relpath)))


class GCSLandingZone:
    """A landing zone in a (private, staging) bucket, read through google-cloud-storage."""

    def __init__(self, bucket: object, prefix: str = "", retry: object = None) -> None:
        self.bucket = bucket  # google.cloud.storage.Bucket
        self._retry: dict[str, object] = {} if retry is None else {"retry": retry}
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"gs://{bucket.name}/{self.prefix}"  # type: ignore[attr-defined]

    def _name(self, batch_id: str, relpath: str) -> str:
        return f"{self.prefix}{batch_id}/{relpath}"

    def batch_ids(self) -> list[str]:
        iterator = self.bucket.list_blobs(prefix=self.prefix, delimiter="/", **self._retry)  # type: ignore[attr-defined]
        for _ in iterator:  # the prefixes are filled while the pages are read
            pass
        return sorted(p[len(self.prefix) :].rstrip("/") for p in iterator.prefixes)

    def list_batch_folders(self) -> list[BatchFolder]:
        """One paged listing of the root, narrowed by the service to the names the ledger needs
        (`<prefix>*/batch.json`, `<prefix>*/batch.report.json`, `<prefix>*/batch.report.local.json`):
        the requests are the list pages, however many images the landing zone holds. A bucket that does not exist or
        cannot be read fails the run (never a skip)."""
        from google.api_core.exceptions import NotFound

        glob = f"{_glob_escape(self.prefix)}*/{{{MANIFEST_NAME},{REPORT_NAME},{LOCAL_REPORT_NAME}}}"
        seen: dict[str, dict[str, object]] = {}
        try:
            for blob in self.bucket.list_blobs(prefix=self.prefix, match_glob=glob, **self._retry):  # type: ignore[attr-defined]
                folder, _, leaf = blob.name[len(self.prefix) :].partition("/")
                # Filtered again: the glob is a pattern, the ledger wants these exact names only.
                if folder and leaf in (MANIFEST_NAME, REPORT_NAME, LOCAL_REPORT_NAME):
                    seen.setdefault(folder, {})[leaf] = blob.updated
        except NotFound as err:
            raise self._missing_bucket() from err
        return [
            BatchFolder(
                name,
                has_manifest=MANIFEST_NAME in leaves,
                has_report=REPORT_NAME in leaves,
                manifest_modified=leaves.get(MANIFEST_NAME),  # type: ignore[arg-type]
                has_local_report=LOCAL_REPORT_NAME in leaves,
            )
            for name, leaves in sorted(seen.items())
        ]

    def check_root(self) -> None:
        from google.api_core.exceptions import NotFound

        try:
            next(iter(self.bucket.list_blobs(prefix=self.prefix, max_results=1, **self._retry)), None)  # type: ignore[attr-defined]
        except NotFound as err:
            raise self._missing_bucket() from err

    def _missing_bucket(self) -> LandingRootError:
        return LandingRootError(
            f"the landing zone {self.uri} cannot be listed: bucket {self.bucket.name!r} does not exist "  # type: ignore[attr-defined]
            "(DICOM_LANDING_ROOT); a run cannot tell whether batches are pending, so it fails rather than skip"
        )

    def read_bytes(self, batch_id: str, relpath: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        # One request per read (no metadata GET first): the ledger reads each new manifest once.
        try:
            return self.bucket.blob(self._name(batch_id, relpath)).download_as_bytes(**self._retry)  # type: ignore[attr-defined]
        except NotFound:
            return None

    def list_files(self, batch_id: str) -> list[LandingFile]:
        base = self._name(batch_id, "")
        files = [
            LandingFile(blob.name[len(base) :], blob.size or 0, identity=blob.name, generation=blob.generation)
            for blob in self.bucket.list_blobs(prefix=base, **self._retry)  # type: ignore[attr-defined]
            if not blob.name.endswith("/")
        ]
        return sorted(files, key=lambda f: f.relpath)

    def open(
        self, batch_id: str, relpath: str, chunk_size: int | None = None, *, source: SourceIdentity | None = None
    ) -> BinaryIO:
        # Given the plan's generation, every read asks for that generation: an object written
        # again since (a new generation) is never read in its place; the old one gone, a read
        # raises FileNotFoundError.
        generation = (source or {}).get("generation")
        blob = self.bucket.blob(self._name(batch_id, relpath), generation=generation)  # type: ignore[attr-defined]
        pinned = {} if generation is None else {"if_generation_match": generation}  # kept by every read
        return _pinned_reader_class()(blob, chunk_size=chunk_size or GCS_HEADER_READ, **self._retry, **pinned)

    def source_identity(self, stream: BinaryIO) -> SourceIdentity:
        # The generation the reads ask for (the plan opens the listed one), or the one the first
        # read's response named (X-Goog-Generation); {} before any read of an object opened without.
        generation = stream.generation_asked or stream._blob.generation  # type: ignore[attr-defined]
        return {} if generation is None else {"generation": int(generation)}

    def held_identities(self, batch_id: str) -> set[str]:
        # An object has one name: no other name can lead to an image held under PHI/.
        return set()

    def write_bytes(self, batch_id: str, relpath: str, data: bytes) -> str:
        blob = self.bucket.blob(self._name(batch_id, relpath))  # type: ignore[attr-defined]
        blob.upload_from_string(data, content_type="application/json", **self._retry)
        return f"gs://{self.bucket.name}/{blob.name}"  # type: ignore[attr-defined]

    def modified(self, batch_id: str, relpath: str) -> datetime | None:
        blob = self.bucket.get_blob(self._name(batch_id, relpath), **self._retry)  # type: ignore[attr-defined]
        return None if blob is None else blob.updated

    def describe(self, batch_id: str, relpath: str = "") -> str:
        return f"gs://{self.bucket.name}/{self._name(batch_id, shown_path(relpath))}"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Names and identities of the images of a batch (batch contract: "Links and names of files")

PHI_FOLDER = "PHI"


def normalise_relpath(relpath: str) -> str:
    """The one spelling of a path inside a batch, the same for a local and a gs:// landing zone.

    Backslashes are separators, blanks around a component are dropped, and so are empty and `.`
    components: `PHI//x.dcm`, `./PHI/x.dcm`, `PHI \\x.dcm` and `PHI/x.dcm ` all give `PHI/x.dcm`.
    Accented letters are composed (NFC): macOS writes file names decomposed (NFD), most editors
    write JSON composed, and the two spellings are one name to whoever typed it. Compatibility
    forms (fullwidth letters) are another name and stay apart (NFKC would merge them).
    Case is kept (lookup keys are matched case-insensitively, see manifest.match_lookup)."""
    parts = (part.strip() for part in unicodedata.normalize("NFC", relpath).replace("\\", "/").split("/"))
    return "/".join(part for part in parts if part not in ("", "."))


def is_under_phi_folder(relpath: str) -> bool:
    """True for an image in a `PHI` folder at ANY depth and in ANY case (`PHI/`, `a/phi/`, `Phi/`),
    and for a file named `PHI` itself (in any case, at any depth).

    The contract names a top-level `PHI/` folder; a folder of that name anywhere else is taken to
    mean the same, and so is a file of that name (not a folder, but nothing says what else it
    would be), because guessing otherwise would upload images the anonymizer meant to hold back.
    A case-insensitive file system would also take `phi/` for `PHI/`. Compatibility forms count
    too (NFKC: fullwidth letters, a styled letter): holding an image back is the safe
    side of a doubt."""
    names = normalise_relpath(relpath).split("/")
    return any(unicodedata.normalize("NFKC", name).casefold() == PHI_FOLDER.casefold() for name in names)


@functools.cache
def _this_host() -> int:
    """This machine, as a number: its name and, where the kernel says it, its boot."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return int.from_bytes(hashlib.sha256(f"{socket.gethostname()}\0{boot}".encode()).digest()[:6], "big")


def file_identity(info: os.stat_result) -> str:
    return f"{info.st_dev}:{info.st_ino}"


def file_identity_of(source: SourceIdentity) -> str | None:
    """The LandingFile.identity of a local file's source identity (None: not a local file's)."""
    if "st_dev" not in source or "st_ino" not in source:
        return None
    return f"{source['st_dev']}:{source['st_ino']}"


def aliases(files: list[LandingFile]) -> dict[str, list[LandingFile]]:
    """Files reached under more than one name (hard links, symbolic links to a file of the batch),
    by identity; each list starts with the name the file is counted under: the first in path
    order that is not a symbolic link."""
    by_identity: dict[str, list[LandingFile]] = {}
    for file in files:
        if file.identity is not None and not file.outside_batch:  # a link out is never read
            by_identity.setdefault(file.identity, []).append(file)
    return {
        identity: sorted(names, key=lambda f: (f.link_target is not None, f.relpath))
        for identity, names in by_identity.items()
        if len(names) > 1
    }


def batch_folder_problem(zone: LandingZone, batch_id: str) -> str | None:
    """Why a (valid) batch id does not name a direct child folder of the landing root: a linked
    folder could lead anywhere, and our report would be written there (None: it is one, or it
    does not exist yet, which the plan reports as not ready)."""
    if isinstance(zone, LocalLandingZone) and (zone.root / batch_id).is_symlink():
        return f"{zone.root / batch_id} is a link, not a folder of the landing root"
    return None


def _raise(err: OSError) -> None:
    raise err


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; False for a link that cannot be followed (a loop raises
    otherwise), which _resolve_held then reports."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _resolve_held(path: Path, relpath: str) -> Path:
    """Where a name in or of a `PHI` folder leads, or HeldImagesError when it cannot be followed."""
    try:
        return path.resolve(strict=True)
    except FileNotFoundError as err:
        raise HeldImagesError(relpath, "a dangling link: what it holds back cannot be known") from err
    except (OSError, RuntimeError) as err:  # RuntimeError: a symbolic link loop
        problem = getattr(err, "strerror", None) or str(err)
        raise HeldImagesError(
            relpath, f"a link that cannot be followed ({problem}): what it holds back cannot be known"
        ) from err


def _regular_file_identity(path: Path) -> str | None:
    """The identity of the regular file a link leads to, without opening it (None: none)."""
    try:
        info = path.stat()
    except (OSError, RuntimeError):
        return None
    return file_identity(info) if stat.S_ISREG(info.st_mode) else None


@functools.cache
def _pinned_reader_class() -> type:
    """google-cloud-storage's BlobReader, raising FileNotFoundError (as a local file does) for an
    object, or the generation asked for, that does not exist (any more)."""
    from google.api_core.exceptions import NotFound, PreconditionFailed
    from google.cloud.storage.fileio import BlobReader

    class PinnedBlobReader(BlobReader):
        def __init__(self, blob: Any, **kwargs: Any) -> None:
            super().__init__(blob, **kwargs)
            # A download's response headers overwrite the blob's generation: keep the one asked.
            self.generation_asked: int | None = blob.generation

        def read(self, size: int = -1) -> bytes:
            try:
                return super().read(size)
            except (NotFound, PreconditionFailed) as err:  # 412: ifGenerationMatch no longer holds
                raise FileNotFoundError(f"gs://{self._blob.bucket.name}/{self._blob.name}: no such object") from err

    return PinnedBlobReader


# Errors of one batch's folder or files that no retry mends: the batch fails alone, with its report.
BATCH_PROBLEMS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENAMETOOLONG})


def is_batch_problem(err: OSError) -> bool:
    return err.errno in BATCH_PROBLEMS


def _stat_or_none(path: Path) -> os.stat_result | OSError | None:
    """The file's stat; None when there is none; the error when it cannot be reached (a batch problem)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as err:
        if is_batch_problem(err):
            return err
        raise


def _glob_escape(text: str) -> str:
    """A literal prefix inside a Cloud Storage matchGlob pattern."""
    return "".join(f"[{c}]" if c in "*?[]{}\\," else c for c in text)


def split_gs_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not uri.startswith("gs://"):
        raise ValueError(f"{uri!r} is not a gs:// URI")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, prefix
