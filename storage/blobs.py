"""Where file contents live: one interface, a local directory (the default) or an S3-compatible bucket.

Contents are addressed by their SHA-256, so identical bytes are stored once and a put never overwrites: it
creates the object if absent and otherwise leaves the one that is there (same name, same bytes). Which
contents may be deleted is decided in the database (the ``blobs`` table), never by a store on its own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from .config import StorageConfig

__all__ = ["BlobStore", "StoredBlob", "digest_of", "is_digest", "open_blob_store"]

_SHA256 = re.compile(r"[0-9a-f]{64}")

StoredBlob = tuple[str, int, float]
"""A listed content: its digest, size in bytes and last-modified time (epoch seconds)."""


class BlobStore(Protocol):
    def describe(self) -> str:
        """Where the contents are, without credentials."""
        ...

    def path(self, digest: str) -> Path | None:
        """The local file holding ``digest``, if the store is on this machine's disk (else None)."""
        ...

    async def put(self, digest: str, data: bytes, *, name: str) -> None:
        """Store ``data`` (whose SHA-256 is ``digest``) unless it is there already. ``StorageError`` names
        ``name`` when it fails."""
        ...

    async def get(self, digest: str, size: int, *, name: str) -> bytes:
        """The content, checked against its digest; ``StorageError`` if missing, damaged or unreadable."""
        ...

    async def delete(self, digest: str) -> None:
        """Remove the content if present."""
        ...

    def listing(self) -> AsyncIterator[list[StoredBlob]]:
        """Every stored content, in batches: the sweep gives the ones without a ``blobs`` row one."""
        ...

    async def remove_leftovers(self, older_than: float, now: float) -> int:
        """Remove what interrupted writes left behind and return how many."""
        ...

    async def close(self) -> None: ...


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_digest(text: str) -> bool:
    return _SHA256.fullmatch(text) is not None


def open_blob_store(config: StorageConfig) -> BlobStore:
    """The store ``config`` names: S3 when ``blob_url`` is set (boto3 must be installed), else local files."""
    if config.blob_url:
        from .s3 import S3BlobStore

        return S3BlobStore.from_url(config.blob_url, config.s3)
    from .files import FileStore

    return FileStore(config.data_dir / "files")
