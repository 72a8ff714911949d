"""The database, SQLite or PostgreSQL, and the transaction discipline every storage step goes through.

A step is a plain function of a SQLAlchemy ``Connection`` run inside one transaction: it commits whole or not
at all, and the same statements serve both engines. How a step reaches its database differs:

- SQLite allows one writer. Its connection lives in one thread of its own and a whole step runs there at once
  (one hand-over per step: each statement sent separately through an async driver cost 5 ms a step under
  load). A writing step starts with ``BEGIN IMMEDIATE``, taking the write lock up front (no deadlock between
  two readers that both want to write). A cancelled caller stops waiting, but its step still ends in that
  thread with COMMIT or ROLLBACK, so the connection is never left inside a transaction.
- PostgreSQL gets a small pool of psycopg connections at READ COMMITTED (SQLAlchemy's async engine; a step
  runs through ``run_sync``). Steps that must not interleave lock the rows they change (``SELECT … FOR
  UPDATE``, which SQLite's compiler drops: there the write lock covers it).

Both retry what is worth retrying — another process holding the lock (SQLite busy, PostgreSQL lock timeout),
a serialization failure or deadlock, a connection lost between steps — with backoff, then raise
``StorageError`` with a message a user can act on; the driver's own wording goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql import expression
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.schema import Table
from sqlalchemy.types import Float
from sqlalchemy.util import await_only

from .config import StorageConfig, shown_url
from .errors import StorageError

__all__ = ["Database", "Step", "db_now", "disk_almost_full"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Step = Callable[[Connection], T]

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
_ADVISORY_KEY = 0x6867_7074_0001  # "hgpt" + 1: any constant all our processes agree on


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

    def __init__(self, config: StorageConfig, *, busy_timeout: float) -> None:
        """The engine for ``config`` (no connection is made yet). ``busy_timeout`` is how long one attempt
        waits for a lock another process holds. Call from the event loop that will use it."""
        self.config = config
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._async: AsyncEngine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._held: Connection | None = None  # SQLite's connection, used only in its thread
        if config.database_url:
            self.dialect = "postgresql"
            self._async = create_async_engine(
                make_url(config.database_url).set(drivername="postgresql+psycopg"),
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
            self.engine: Engine = self._async.sync_engine
        else:
            self.dialect = "sqlite"
            self.engine = create_engine(
                f"sqlite:///{config.sqlite_path}",
                poolclass=QueuePool,
                pool_size=1,
                max_overflow=0,
                pool_reset_on_return=None,  # every step ends with COMMIT or ROLLBACK itself
                # SQLite's busy timeout; the connection is only ever used by the one thread below.
                connect_args={"timeout": busy_timeout, "check_same_thread": False},
            )
            event.listen(self.engine, "connect", _configure_sqlite)
            event.listen(self.engine, "begin", _begin_sqlite)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite")

    def describe(self) -> str:
        """Engine and place, never a credential."""
        if self.config.database_url:
            return f"postgresql {shown_url(self.config.database_url).partition('://')[2]}"
        return f"sqlite {self.config.sqlite_path}"

    def insert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        """The dialect's INSERT, which has ``on_conflict_do_nothing`` and ``on_conflict_do_update``."""
        return sqlite.insert(table) if self.dialect == "sqlite" else postgresql.insert(table)

    async def write(self, step: Step[T]) -> T:
        return await self._attempt(step, write=True)

    async def read(self, step: Step[T]) -> T:
        return await self._attempt(step, write=False)

    async def execute(self, statement: Executable, params: list[dict[str, Any]] | None = None) -> int:
        """One writing statement as a step of its own; returns how many rows it changed."""

        def step(conn: Connection) -> int:
            return int(getattr(conn.execute(statement, params), "rowcount", 0))

        return await self.write(step)

    def wait(self, work: Coroutine[Any, Any, T]) -> T:
        """Inside a step: wait for async work (removing a stored content) while the transaction stays open."""
        if self._thread is not None:
            return asyncio.run_coroutine_threadsafe(work, self._loop).result()
        return await_only(work)

    async def migrate(self, upgrade: Step[T]) -> T:
        """Run ``upgrade`` in one transaction under the migration lock: SQLite's write lock (with foreign key
        actions off, so rebuilt tables fire none), or a PostgreSQL advisory lock."""
        try:
            if self._thread is not None:
                return await self._loop.run_in_executor(self._thread, self._migrate_sqlite, upgrade)
            assert self._async is not None
            async with self._async.connect() as conn, conn.begin():
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_KEY})
                return await conn.run_sync(upgrade)
        except DBAPIError as err:
            raise await self._error(err) from err

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                await self._loop.run_in_executor(self._thread, self._close_sqlite)
                self._thread.shutdown(wait=False)
            elif self._async is not None:
                await self._async.dispose()
        except (SQLAlchemyError, OSError, sqlite3.Error) as err:
            log.warning("closing the database failed: %s", err)

    async def _attempt(self, step: Step[T], *, write: bool) -> T:
        """Run ``step`` in a transaction; retry while the database is busy, then give up with a clear error."""
        delay = FIRST_BACKOFF
        attempt = 1
        while True:
            if self._closed:
                raise StorageError("the storage is closed")
            try:
                return await self._run(step, write)
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

    async def _run(self, step: Step[T], write: bool) -> T:
        if self._thread is not None:
            begin = "BEGIN IMMEDIATE" if write else "BEGIN"
            return await self._loop.run_in_executor(self._thread, self._sqlite_step, step, begin)
        assert self._async is not None
        async with self._async.connect() as conn, conn.begin():
            return await conn.run_sync(step)

    def _sqlite_step(self, step: Step[T], begin: str) -> T:
        """In the SQLite thread: the whole step, from BEGIN to COMMIT or ROLLBACK, on the connection the
        thread keeps (a new one after a failure that invalidated it)."""
        conn = self._connection()
        conn.info["begin"] = begin
        with conn.begin():
            return step(conn)

    def _connection(self) -> Connection:
        if self._held is None or self._held.invalidated or self._held.closed:
            self._held = self.engine.connect()
        return self._held

    def _close_sqlite(self) -> None:
        if self._held is not None:
            self._held.close()
        self.engine.dispose()

    def _migrate_sqlite(self, upgrade: Step[T]) -> T:
        conn = self._connection()
        _pragma(conn, "foreign_keys = OFF")
        try:
            conn.info["begin"] = "BEGIN IMMEDIATE"
            with conn.begin():
                return upgrade(conn)
        finally:
            _pragma(conn, "foreign_keys = ON")

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


def _pragma(conn: Connection, setting: str) -> None:
    """A PRAGMA outside any transaction (inside one SQLite ignores ``foreign_keys``), on the driver's cursor:
    SQLAlchemy would begin a transaction first."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA {setting}")
    finally:
        cursor.close()


def _sqlite_busy(err: BaseException | None) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _sqlstate(err: BaseException | None) -> str | None:
    state = getattr(err, "sqlstate", None)
    return state if isinstance(state, str) else None
