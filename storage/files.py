"""Content-addressed files on local disk: ``<root>/<sha[:2]>/<sha>``, the default ``BlobStore``.

Writes go to a temp file in the target directory, are fsynced, then renamed into place, so a file at its
final path is always complete. The blocking work runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from .blobs import StoredBlob, is_digest
from .database import disk_almost_full
from .errors import StorageError

__all__ = ["FileStore"]

log = logging.getLogger(__name__)

_LISTING_BATCH = 500


@dataclass(frozen=True)
class FileStore:
    root: Path

    def describe(self) -> str:
        return f"files in {self.root}"

    def path(self, digest: str) -> Path:
        # The digest comes from the database; refuse anything that could point outside the store.
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest

    async def put(self, digest: str, data: bytes, *, name: str) -> None:
        try:
            await asyncio.to_thread(self._put, digest, data)
        except OSError as err:
            log.error("could not store file %s: %s", name, err)
            # Some filesystems report a full disk as an I/O error (as SQLite in WAL mode does).
            if err.errno in (errno.ENOSPC, errno.EDQUOT) or (
                err.errno == errno.EIO and await asyncio.to_thread(disk_almost_full, self.root)
            ):
                raise StorageError(
                    f"the disk is full, so {name} could not be stored; free some space and try again"
                ) from err
            raise StorageError(f"could not store {name}: {err.strerror or err}") from err

    async def get(self, digest: str, size: int, *, name: str) -> bytes:
        try:
            data = await asyncio.to_thread(self.path(digest).read_bytes)
        except FileNotFoundError as err:
            raise StorageError(f"the file {name} is missing from storage") from err
        except OSError as err:
            raise StorageError(f"could not read the file {name}: {err.strerror or err}") from err
        if len(data) != size or not await asyncio.to_thread(_matches, data, digest):
            raise StorageError(f"the file {name} is damaged in storage")
        return data

    async def delete(self, digest: str) -> None:
        await asyncio.to_thread(self.path(digest).unlink, missing_ok=True)

    async def listing(self) -> AsyncIterator[list[StoredBlob]]:
        files = _walk(self.root)
        while batch := await asyncio.to_thread(_take, files, _LISTING_BATCH):
            yield batch

    async def remove_leftovers(self, older_than: float, now: float) -> int:
        return await asyncio.to_thread(self._remove_temps, older_than, now)

    async def close(self) -> None:
        return None

    def _put(self, digest: str, data: bytes) -> None:
        final = self.path(digest)
        with contextlib.suppress(FileNotFoundError):
            if final.stat().st_size == len(data):
                return
        new_dir = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{digest[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        if new_dir:
            _fsync_dir(self.root)

    def _remove_temps(self, older_than: float, now: float) -> int:
        """Temp files of writes a crash interrupted, untouched for ``older_than`` seconds."""
        removed = 0
        if not self.root.is_dir():
            return removed
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime >= older_than:
                        path.unlink()
                        removed += 1
        return removed


def _walk(root: Path) -> Iterator[StoredBlob]:
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if not is_digest(path.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                yield path.name, stat.st_size, stat.st_mtime


def _take(files: Iterator[StoredBlob], count: int) -> list[StoredBlob]:
    return [item for _, item in zip(range(count), files, strict=False)]


def _matches(data: bytes, digest: str) -> bool:
    return hashlib.sha256(data).hexdigest() == digest


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
