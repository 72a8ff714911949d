"""One async engine, SQLite or PostgreSQL, and the transaction discipline every storage step goes through.

A step is a coroutine run inside one transaction; it commits whole or not at all. SQLite allows one writer:
its engine holds one connection, an asyncio lock gives each step that connection to itself, and a writing
step starts with ``BEGIN IMMEDIATE`` so it takes the write lock up front (no deadlock between two readers
that both want to write). PostgreSQL gets a small pool at READ COMMITTED; steps that must not interleave lock
the rows they change (``SELECT … FOR UPDATE``, which SQLite's compiler drops: there the write lock covers it).

Both retry what is worth retrying — another process holding the lock (SQLite busy, PostgreSQL lock timeout),
a serialization failure or deadlock, a connection lost between steps — with backoff, then raise
``StorageError`` with a message a user can act on; the driver's own wording goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.sql import expression
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.schema import Table
from sqlalchemy.types import Float

from .config import StorageConfig, shown_url
from .errors import StorageError

__all__ = ["Database", "Step", "db_now"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Step = Callable[[AsyncConnection], Awaitable[T]]

ATTEMPTS = 6
FIRST_BACKOFF = 0.05
# Less free space than this where the data lives, and a failed write is taken for a full disk: SQLite in WAL
# mode reports one as a generic I/O error, not SQLITE_FULL.
ALMOST_FULL_BYTES = 16 * 1024 * 1024
_POOL_SIZE = 4
_STATEMENT_TIMEOUT_MS = 120_000
# PostgreSQL SQLSTATEs: retried, and the few that say something a user can act on.
_PG_RETRY = {"40001", "40P01"}  # serialization failure, deadlock detected
_PG_BUSY = {"55P03"}  # lock_not_available: lock_timeout expired
_PG_FULL = {"53100"}  # disk_full


class db_now(expression.FunctionElement[float]):
    """The database server's clock in epoch seconds: heartbeats are compared on one clock across hosts."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _sqlite_now(element: db_now, compiler: Any, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _postgres_now(element: db_now, compiler: Any, **kw: Any) -> str:
    return "extract(epoch from clock_timestamp())::float8"


class Database:
    """The engine and the step runner. ``dialect`` is ``sqlite`` or ``postgresql``."""

    def __init__(self, engine: AsyncEngine, config: StorageConfig) -> None:
        self.engine = engine
        self.config = config
        self.dialect = engine.dialect.name
        self._lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._closed = False

    @classmethod
    def create(cls, config: StorageConfig, *, busy_timeout: float) -> Database:
        """The engine for ``config`` (no connection is made yet). ``busy_timeout`` is how long one attempt
        waits for a lock another process holds."""
        if config.database_url:
            url = make_url(config.database_url).set(drivername="postgresql+psycopg")
            engine = create_async_engine(
                url,
                pool_size=_POOL_SIZE,
                max_overflow=_POOL_SIZE,
                pool_pre_ping=True,
                pool_timeout=max(busy_timeout, 5.0) * ATTEMPTS,
                isolation_level="READ COMMITTED",
                connect_args={
                    "connect_timeout": 10,
                    "options": f"-c lock_timeout={int(busy_timeout * 1000)}"
                    f" -c statement_timeout={_STATEMENT_TIMEOUT_MS}",
                },
            )
        else:
            engine = create_async_engine(
                f"sqlite+aiosqlite:///{config.sqlite_path}",
                poolclass=AsyncAdaptedQueuePool,
                pool_size=1,
                max_overflow=0,
                pool_reset_on_return=None,  # every step ends with COMMIT or ROLLBACK itself
                connect_args={"timeout": busy_timeout},  # SQLite's busy timeout
            )
            event.listen(engine.sync_engine, "connect", _configure_sqlite)
            event.listen(engine.sync_engine, "begin", _begin_sqlite)
        return cls(engine, config)

    @property
    def closed(self) -> bool:
        return self._closed

    def describe(self) -> str:
        """Engine and place, never a credential."""
        if self.config.database_url:
            return f"postgresql {shown_url(self.config.database_url).partition('://')[2]}"
        return f"sqlite {self.config.sqlite_path}"

    def insert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        """The dialect's INSERT, which has ``on_conflict_do_nothing`` and ``on_conflict_do_update``."""
        return sqlite.insert(table) if self.dialect == "sqlite" else postgresql.insert(table)

    async def execute(self, statement: Executable, params: list[dict[str, Any]] | None = None) -> int:
        """One writing statement as a step of its own; returns how many rows it changed."""

        async def step(conn: AsyncConnection) -> int:
            result = await conn.execute(statement, params)
            return int(getattr(result, "rowcount", 0))

        return await self.write(step)

    async def write(self, step: Step[T]) -> T:
        return await self._attempt(step, write=True)

    async def read(self, step: Step[T]) -> T:
        return await self._attempt(step, write=False)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection of its own outside the step runner, for migrations (which manage their transaction)."""
        async with self._exclusive():
            try:
                async with self.engine.connect() as conn:
                    yield conn
            except DBAPIError as err:
                raise await self._error(err) from err

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._exclusive():
            try:
                await self.engine.dispose()
            except (SQLAlchemyError, OSError, sqlite3.Error) as err:
                log.warning("closing the database failed: %s", err)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        if self._lock is None:
            yield
        else:
            async with self._lock:
                yield

    async def _attempt(self, step: Step[T], *, write: bool) -> T:
        """Run ``step`` in a transaction; retry while the database is busy, then give up with a clear error."""
        delay = FIRST_BACKOFF
        attempt = 1
        while True:
            async with self._exclusive():
                if self._closed:
                    raise StorageError("the storage is closed")
                try:
                    async with self.engine.connect() as conn:
                        if self.dialect == "sqlite":
                            conn.sync_connection.info["begin"] = "BEGIN IMMEDIATE" if write else "BEGIN"  # type: ignore[union-attr]
                        async with conn.begin():
                            return await step(conn)
                except DBAPIError as err:
                    if not self._retryable(err) or attempt == ATTEMPTS:
                        raise await self._error(err) from err
                except SQLAlchemyError as err:
                    log.error("database error: %s", err)
                    raise StorageError("the database failed; the log has the details") from err
            log.info("database busy (attempt %d of %d), retrying in %.2f s", attempt, ATTEMPTS, delay)
            await asyncio.sleep(delay * random.uniform(1.0, 1.5))
            delay *= 2
            attempt += 1

    def _retryable(self, err: DBAPIError) -> bool:
        if err.connection_invalidated:
            return True  # the server went away between steps; the pool reconnects
        if self.dialect == "sqlite":
            return _sqlite_busy(err.orig)
        return _sqlstate(err.orig) in _PG_RETRY | _PG_BUSY

    async def _error(self, err: DBAPIError) -> StorageError:
        """The user-safe error for a database failure; the driver's own message goes to the log."""
        orig = err.orig
        if self.dialect == "sqlite":
            code = getattr(orig, "sqlite_errorcode", None)
            primary = code & 0xFF if isinstance(code, int) else None
            if _sqlite_busy(orig):
                log.warning("database busy after %d attempts: %s", ATTEMPTS, orig)
                return StorageError("the database is busy, try again")
            log.error("database error: %s", orig)
            full = primary == sqlite3.SQLITE_FULL or (
                primary == sqlite3.SQLITE_IOERR
                and await asyncio.to_thread(disk_almost_full, self.config.data_dir)
            )
            if full:
                return StorageError(
                    "the disk is full, so nothing could be saved; free some space and try again"
                )
            if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                return StorageError("the database file is damaged; restore it from a backup or move it away")
            return StorageError("the database failed; the log has the details")
        state = _sqlstate(orig)
        if state in _PG_BUSY or state in _PG_RETRY:
            log.warning("database busy after %d attempts: %s", ATTEMPTS, orig)
            return StorageError("the database is busy, try again")
        log.error("database error: %s", orig)
        if state in _PG_FULL:
            return StorageError(
                "the database server's disk is full, so nothing could be saved; free some space and try again"
            )
        if err.connection_invalidated or state is None or state.startswith("08"):
            return StorageError(f"cannot reach the database ({self.describe()}); is it running?")
        return StorageError("the database failed; the log has the details")


def disk_almost_full(path: Path) -> bool:
    """Whether the filesystem holding ``path`` has (almost) no space left for an ordinary user. Blocking."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < ALMOST_FULL_BYTES


def _configure_sqlite(dbapi_connection: Any, record: Any) -> None:
    """Per-connection settings, outside any transaction (where SQLite ignores some of them)."""
    # The driver must not open transactions by itself: every step says BEGIN (or BEGIN IMMEDIATE) itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        mode = cursor.fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StorageError(
                "the database cannot use write-ahead logging here; put HUGGINGGPT_DATA_DIR on a local disk"
            )
        # NORMAL in WAL mode: a step is atomic and survives any process crash; a power cut may lose the last
        # few commits (never half of one). FULL fsyncs every commit, measured here at 5-10x slower under load.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _begin_sqlite(conn: Any) -> None:
    conn.exec_driver_sql(conn.info.get("begin", "BEGIN"))


def _sqlite_busy(err: BaseException | None) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _sqlstate(err: BaseException | None) -> str | None:
    state = getattr(err, "sqlstate", None)
    return state if isinstance(state, str) else None
