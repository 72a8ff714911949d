"""IDENTIFY spacing across the bot's processes: one gateway login per ``max_concurrency`` bucket every 5 s.

Discord lets a bot start ``max_concurrency`` sessions every 5 seconds, one per bucket (``shard_id %
max_concurrency``), and counts every process of the bot together; a process that identifies too soon is
disconnected, and too many logins in a day (1,000) reset the token. discord.py spaces the shards of one process
only. So before each IDENTIFY a shard takes its bucket's lock, shared by all processes, and keeps it for 5 s
after: the next IDENTIFY of that bucket, from any process, comes at least 5 s later. A process that dies drops
its locks with it (the database session ends, the file is closed), so a crash never blocks the others.

- With PostgreSQL: a session-level advisory lock per bucket (``pg_try_advisory_lock(key, bucket)``), polled, so
  waiting can be cancelled. For processes on several machines.
- Otherwise: an ``flock`` on ``<data dir>/identify/bucket-N.lock``, for processes sharing one machine (as they
  share its SQLite database).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["IDENTIFY_SPACING", "FileIdentifyGate", "IdentifyGate", "PostgresIdentifyGate"]

log = logging.getLogger(__name__)

IDENTIFY_SPACING = 5.0
"""Seconds between two IDENTIFYs of one bucket (Discord's window)."""
_POLL = 0.1
# The first key of the advisory locks: "HG" for HuggingGPT, so they do not collide with another program's.
_LOCK_SPACE = 0x4847


class IdentifyGate(ABC):
    """Waits for a bucket's turn to IDENTIFY; holds it ``spacing`` seconds after; released on ``aclose``."""

    def __init__(self, *, spacing: float = IDENTIFY_SPACING) -> None:
        self.spacing = spacing
        self._holding: set[asyncio.Task[None]] = set()

    async def wait_turn(self, bucket: int) -> None:
        """Return when this process may IDENTIFY in ``bucket``; the bucket stays taken ``spacing`` seconds."""
        release = await self._acquire(bucket)
        holder = asyncio.create_task(self._hold(bucket, release))
        self._holding.add(holder)
        holder.add_done_callback(self._holding.discard)

    async def _hold(self, bucket: int, release: Callable[[], Any]) -> None:
        try:
            await asyncio.sleep(self.spacing)
        finally:
            result = release()
            if asyncio.iscoroutine(result):
                await result
            log.debug("identify bucket %d released", bucket)

    @abstractmethod
    async def _acquire(self, bucket: int) -> Callable[[], Any]:
        """Take ``bucket``'s lock, waiting as long as another process holds it; return what releases it."""

    async def aclose(self) -> None:
        """Release every bucket now (the process is stopping)."""
        for holder in list(self._holding):
            holder.cancel()
        await asyncio.gather(*self._holding, return_exceptions=True)


class FileIdentifyGate(IdentifyGate):
    """Buckets as ``flock``-ed files in ``directory``: processes on one machine."""

    def __init__(self, directory: Path, *, spacing: float = IDENTIFY_SPACING) -> None:
        super().__init__(spacing=spacing)
        self.directory = directory

    async def _acquire(self, bucket: int) -> Callable[[], Any]:
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        fd = os.open(self.directory / f"bucket-{bucket}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_POLL)
        except BaseException:
            os.close(fd)
            raise

        def release() -> None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

        return release


class PostgresIdentifyGate(IdentifyGate):
    """Buckets as PostgreSQL advisory locks, one session per held bucket: processes on any machine."""

    def __init__(self, dsn: str, *, spacing: float = IDENTIFY_SPACING, connect_timeout: float = 10.0) -> None:
        super().__init__(spacing=spacing)
        self._dsn = dsn
        self._connect_timeout = connect_timeout

    async def _acquire(self, bucket: int) -> Callable[[], Any]:
        import psycopg

        async with asyncio.timeout(self._connect_timeout):
            conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        try:
            while True:
                cursor = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_SPACE, bucket))
                row = await cursor.fetchone()
                if row is not None and row[0]:
                    break
                await asyncio.sleep(_POLL)
        except BaseException:
            await conn.close()
            raise

        async def release() -> None:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_SPACE, bucket))
            await conn.close()

        return release
