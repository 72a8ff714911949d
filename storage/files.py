"""Content-addressed file store: ``<root>/<sha[:2]>/<sha>``, so identical bytes are kept once.

Writes go to a temp file in the target directory, are fsynced, then renamed into place, so a file at its
final path is always complete. These functions block; the storage layer calls them through a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileStore"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileStore:
    root: Path

    def path_for(self, sha256: str) -> Path:
        # The digest comes from the database; refuse anything that could point outside the store.
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> tuple[str, bool]:
        """Store ``data``; return its sha256 and whether this call created the file (False: already there)."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        with contextlib.suppress(FileNotFoundError):
            if final.stat().st_size == len(data):
                return digest, False
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
        return digest, True

    def read(self, sha256: str) -> bytes:
        """The file's bytes; ``ValueError`` if they no longer hash to ``sha256``."""
        data = self.path_for(sha256).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"content of {sha256} does not match its digest")
        return data

    def remove(self, digests: Iterable[str]) -> None:
        for digest in digests:
            self.path_for(digest).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
