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
                # Fresh again, so that no sweep (``stale``) takes it while a row for it is being written.
                os.utime(final)
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

    def stale(self, older_than: float, now: float) -> tuple[list[str], list[Path]]:
        """Stored files and leftover temp files (a crash mid-write) untouched for ``older_than`` seconds."""
        digests: list[str] = []
        temps: list[Path] = []
        if not self.root.is_dir():
            return digests, temps
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                try:
                    old = now - path.stat().st_mtime >= older_than
                except FileNotFoundError:
                    continue
                if old and _SHA256.fullmatch(path.name):
                    digests.append(path.name)
                elif old and path.name.startswith(".") and path.name.endswith(".tmp"):
                    temps.append(path)
        return digests, temps

    def remove_stale(self, digests: Iterable[str], temps: Iterable[Path], older_than: float, now: float) -> int:
        """Remove what is still stale (checked again: another process may have just reused a file)."""
        removed = 0
        for path in [*(self.path_for(d) for d in digests), *temps]:
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= older_than:
                    path.unlink()
                    removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
