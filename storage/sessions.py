"""Which processes are alive, so a restart marks only the runs of dead processes ``interrupted``.

Each open ``Storage`` holds an exclusive ``flock`` on ``<dir>/<id>.lock`` and tags the runs it starts with
``id``. The kernel drops the lock when the process dies, even by kill -9, so another process that can take
the lock knows the owner is gone; one that cannot knows the owner is still working (a bot and a CLI sharing
a data directory must not interrupt each other's runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SessionLock", "live_sessions"]


@dataclass
class SessionLock:
    id: str
    path: Path
    fd: int | None

    @classmethod
    def acquire(cls, directory: Path) -> SessionLock:
        """Lock a fresh file, then rename it into view, so no prober ever sees it unlocked."""
        directory.mkdir(parents=True, exist_ok=True)
        session_id = secrets.token_urlsafe(9)
        pending = directory / f"{session_id}.pending"
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = directory / f"{session_id}.lock"
            os.rename(pending, path)
        except BaseException:
            os.close(fd)
            pending.unlink(missing_ok=True)
            raise
        return cls(session_id, path, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def live_sessions(directory: Path) -> set[str]:
    """Ids of the sessions whose process still holds its lock; lock files of dead ones are removed."""
    live: set[str] = set()
    for path in directory.glob("*.lock"):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.add(path.stem)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        finally:
            os.close(fd)
    return live
