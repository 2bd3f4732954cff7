"""One interface over a local folder and an S3 bucket/prefix.

Keys are ``/``-separated relative paths. Writes are atomic (a reader never sees half a file): locally
through a temporary file and ``os.replace``, on S3 because a PUT is atomic.

A local folder is read as hostile input (the inbox is filled by analysers, SMB mounts and people): listing
never follows a symbolic link, never raises for one bad entry (an unreadable folder, a name too long for
the OS, a socket or FIFO), and reports such entries with a ``problem`` instead of skipping them silently;
reading opens without following links and refuses anything but a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class ObjectNotFound(KeyError):
    pass


class NotARegularObject(OSError):
    """The key names a symbolic link, folder, FIFO, socket or device, not a file with content."""


# Why a listed entry cannot be read as a file. Entries with a problem are listed so that the caller can
# account for them (quarantine or a counted skip); their size and time are 0.
SYMLINK = "symlink"
SPECIAL_FILE = "special_file"
UNREADABLE_FOLDER = "unreadable_folder"
UNREADABLE_ENTRY = "unreadable_entry"
EMPTY_FOLDER = "empty_folder"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch
    problem: str | None = None  # None for a readable regular file, else one of the constants above


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def uri(self, key: str) -> str: ...


def put_if_absent(store: ObjectStore, key: str, data: bytes) -> None:
    """Write bytes under a content-addressed key (one that names a hash of ``data``) unless it is there:
    the same key always holds the same bytes, so a re-run writes nothing twice."""
    if not store.exists(key):
        store.put_bytes(key, data)


def _clean_key(key: str) -> str:
    parts = [part for part in key.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts):
        raise ValueError(f"invalid object key {key!r}")
    return "/".join(parts)


class LocalObjectStore:
    """A folder. ``private`` stores (the identifiable quarantine) create files 0600 and folders 0700
    whatever the umask: what they hold is as sensitive as the inbox it came from."""

    def __init__(self, root: str | os.PathLike[str], private: bool = False) -> None:
        self.root = Path(root).resolve()
        self.private = private

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def _make_parents(self, path: Path) -> None:
        if not self.private:
            path.parent.mkdir(parents=True, exist_ok=True)
            return
        missing = []
        folder = path.parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        temporary = path.parent / f".tmp-{uuid.uuid4().hex}"
        mode = 0o600 if self.private else 0o666
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            descriptor = os.open(temporary, flags, mode)
        except FileNotFoundError:
            self._make_parents(path)
            descriptor = os.open(temporary, flags, mode)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        # O_NOFOLLOW: a link swapped in after listing is refused, not followed (to a key file, /etc/shadow).
        # O_NONBLOCK: opening a FIFO would otherwise wait forever for a writer.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            descriptor = os.open(self._path(key), flags)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EMLINK):
                raise NotARegularObject(errno.ELOOP, "a symbolic link, not followed") from None
            raise
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise NotARegularObject(errno.EINVAL, "not a regular file")
            return handle.read()

    def exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._path(key)).st_mode)
        except OSError:
            return False

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / _clean_key(prefix) if prefix.strip("/") else self.root
        try:
            if not stat.S_ISDIR(os.lstat(base).st_mode):
                return
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing stored under this prefix
        except OSError as error:
            # A folder this process cannot reach (a parent without search permission, an I/O error) is not
            # an empty one: an inbox that looks empty would silently import nothing. No path in the message.
            if error.errno in (errno.EACCES, errno.EPERM):
                raise PermissionError(error.errno, "the folder cannot be reached") from None
            raise OSError(error.errno, f"the folder cannot be reached: {error.strerror}") from None
        start = base.relative_to(self.root).as_posix()
        start = "" if start == "." else start
        entries = sorted(_walk(base, start), key=lambda info: info.key)
        if any(info.key == start and info.problem == UNREADABLE_FOLDER for info in entries):
            # The listed folder itself, not an entry in it: no partial answer would be true.
            raise PermissionError(errno.EACCES, "the folder cannot be listed")
        yield from entries

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def prune_empty_folders(self, key: str) -> None:
        """Removes the empty folders at and below ``key``, then its parents while they are empty; never the
        store's root, never a folder with anything left in it."""
        folder = self._path(key)
        for below, _, _ in os.walk(folder, topdown=False, followlinks=False):
            with contextlib.suppress(OSError):
                os.rmdir(below)
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def local_path(self, key: str) -> Path:
        return self._path(key)


def _walk(root: Path, root_key: str) -> Iterator[ObjectInfo]:
    """Every entry below ``root``, without following links; one bad entry is reported, never raised.
    Iterative, so a hostile folder nested thousands deep cannot exhaust the stack."""
    pending = [(root, root_key)]
    while pending:
        folder, folder_key = pending.pop()
        try:
            with os.scandir(folder) as scan:
                children = list(scan)
        except OSError:
            yield ObjectInfo(folder_key, 0, 0.0, UNREADABLE_FOLDER)
            continue
        if not children and folder_key != root_key:
            yield ObjectInfo(folder_key, 0, 0.0, EMPTY_FOLDER)
        for entry in children:
            if entry.name.startswith(".tmp-"):
                continue
            key = f"{folder_key}/{entry.name}" if folder_key else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                yield ObjectInfo(key, 0, 0.0, UNREADABLE_ENTRY)
                continue
            if stat.S_ISLNK(info.st_mode):
                yield ObjectInfo(key, 0, 0.0, SYMLINK)
            elif stat.S_ISDIR(info.st_mode):
                pending.append((Path(entry.path), key))
            elif stat.S_ISREG(info.st_mode):
                yield ObjectInfo(key, info.st_size, info.st_mtime)
            else:
                yield ObjectInfo(key, 0, 0.0, SPECIAL_FILE)


class S3ObjectStore:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        client: Any | None = None,
    ) -> None:
        import boto3  # imported here: local-only users never pay for it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client: Any = client or boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region_name or None)

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self._client.exceptions.NoSuchKey:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = self._key(prefix) if prefix.strip("/") else self.prefix
        if full_prefix:
            full_prefix += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue  # a "folder" marker written by a console or sync tool: no content
                yield ObjectInfo(item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp())

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


class PrefixedStore:
    """The objects of ``store`` under ``prefix``, addressed as if they were at its root (one archived
    export read by the code that reads the inbox)."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = _clean_key(prefix)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{_clean_key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        self.store.put_bytes(self._key(key), data)

    def get_bytes(self, key: str) -> bytes:
        return self.store.get_bytes(self._key(key))

    def exists(self, key: str) -> bool:
        return self.store.exists(self._key(key))

    def delete(self, key: str) -> None:
        self.store.delete(self._key(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        strip = len(self.prefix) + 1
        full = self._key(prefix) if prefix.strip("/") else self.prefix
        for info in self.store.list(full):
            if info.key == self.prefix:
                continue
            yield ObjectInfo(info.key[strip:], info.size, info.modified, info.problem)

    def uri(self, key: str) -> str:
        return self.store.uri(self._key(key))


def move_folder(source: ObjectStore, folder: str, target: ObjectStore, target_folder: str, delete_first: str = "") -> int:
    """Moves the readable files under ``folder`` to ``target_folder`` of ``target``; returns how many
    entries could not be moved (links, FIFOs, unreadable folders: they stay where they are).

    On one local filesystem the folder is renamed, which is atomic. Anywhere else (S3, two filesystems)
    every file is copied and checked before any original is deleted, and ``delete_first`` (a key under
    ``folder``) is deleted before the others, so that a move cut short leaves the folder without it."""
    if isinstance(source, LocalObjectStore) and isinstance(target, LocalObjectStore):
        destination = target.local_path(target_folder)
        target._make_parents(destination)
        try:
            os.rename(source.local_path(folder), destination)
            return 0
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
    strip = len(_clean_key(folder)) + 1
    entries = list(source.list(folder))
    movable = [info for info in entries if info.problem is None]
    for info in movable:
        target.put_bytes(f"{target_folder}/{info.key[strip:]}", source.get_bytes(info.key))
    for info in movable:
        if not target.exists(f"{target_folder}/{info.key[strip:]}"):
            raise OSError(errno.EIO, "a copied file is missing from the target; nothing was deleted")
    ordered = sorted(movable, key=lambda info: info.key != delete_first)
    for info in ordered:
        source.delete(info.key)
    if isinstance(source, LocalObjectStore):
        source.prune_empty_folders(folder)
    return len(entries) - len(movable)


def open_object_store(
    url: str,
    endpoint_url: str | None = None,
    region_name: str | None = None,
    private: bool = False,
) -> ObjectStore:
    """``s3://bucket/prefix`` gives an ``S3ObjectStore``; anything else is a local folder (``private``:
    files 0600 and folders 0700; on S3 access is the bucket policy's business)."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        return S3ObjectStore(bucket, prefix, endpoint_url=endpoint_url, region_name=region_name)
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalObjectStore(url, private=private)
