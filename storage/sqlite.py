"""The storage API on SQLite: conversations, messages, resources, runs and their task records.

One aiosqlite connection per ``Storage``. An asyncio lock gives each logical step the connection to itself,
inside one transaction (``BEGIN IMMEDIATE`` when it writes), so a crash never leaves half a step behind and
concurrent coroutines never see each other's uncommitted rows. When another process holds the write lock,
SQLite's busy timeout waits for it, then the step is retried with backoff, then ``StorageError`` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import secrets
import sqlite3
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite

from agent.resources import Origin, Resource, ResourceStore, kind_of_mime

from . import schema
from .errors import ConflictError, NotFoundError, StorageError
from .files import FileStore
from .records import RUN_STATUSES, Conversation, Message, Role, Run, RunStatus, TaskRecord
from .sessions import SessionLock, live_sessions

__all__ = ["DB_NAME", "ConversationResources", "Storage"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Step = Callable[[aiosqlite.Connection], Awaitable[T]]

DB_NAME = "hugginggpt.db"
_ATTEMPTS = 6
_FIRST_BACKOFF = 0.05
_ID_ALPHABET = string.ascii_lowercase + string.digits
_INTERRUPTED = "the program stopped before this request finished"

# Fixed selections for ``_load_runs``; never built from input.
_RUN_BY_ID = "id = ?"
_RUNS_OF_CONVERSATION = "conversation_id = ?"
ORPHAN_GRACE_SECONDS = 24 * 3600.0
"""How old an unreferenced stored file must be before a sweep removes it."""
_SWEEP_MARKER = "last-file-sweep"  # in the data dir; its time is the last sweep's
_SWEEP_BATCH = 500  # digests per query (SQLite allows 32,766 parameters)
_RUNS_TO_REPORT = "status = 'interrupted' AND reported = 0"


class Storage:
    """Everything the bot and the CLI keep between restarts, in ``data_dir`` (a database and a file store)."""

    def __init__(
        self,
        data_dir: Path,
        db: aiosqlite.Connection,
        files: FileStore,
        session: SessionLock,
        clock: Callable[[], float],
    ) -> None:
        self.data_dir = data_dir
        self.path = data_dir / DB_NAME
        self._db = db
        self._files = files
        self._session = session
        self._clock = clock
        self._lock = asyncio.Lock()
        # Held from a file's write to its row's commit, and from a delete's commit to its unlinks, so a
        # /reset cannot remove a file that an upload with the same content is about to reference.
        self._files_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls, data_dir: Path, *, clock: Callable[[], float] = time.time, busy_timeout: float = 5.0
    ) -> Storage:
        """Open or create the store, migrate its schema, and mark runs whose process died ``interrupted``.

        ``busy_timeout`` is how long one attempt waits for another process's write lock.
        """
        data_dir = Path(data_dir)
        files = FileStore(data_dir / "files")
        try:
            session = await asyncio.to_thread(_prepare, data_dir, files)
        except OSError as err:
            raise StorageError(f"cannot use the data directory {data_dir}: {err.strerror or err}") from err
        try:
            # ``timeout`` is SQLite's busy timeout; ``isolation_level=None`` lets us issue BEGIN ourselves.
            db = await aiosqlite.connect(data_dir / DB_NAME, isolation_level=None, timeout=busy_timeout)
        except sqlite3.Error as err:
            await asyncio.to_thread(session.release)
            raise _storage_error(err) from err
        db.row_factory = sqlite3.Row
        storage = cls(data_dir, db, files, session, clock)
        try:
            await storage._attempt(_configure)
            found = await storage._write(schema.migrate)
            if found < schema.VERSION:
                log.info("migrated %s from schema version %d to %d", storage.path, found, schema.VERSION)
            live = await asyncio.to_thread(live_sessions, session.path.parent)
            await storage._write(lambda db: storage._interrupt_dead_runs(db, live))
            if await asyncio.to_thread(_sweep_due, data_dir / _SWEEP_MARKER, ORPHAN_GRACE_SECONDS, time.time()):
                await storage.sweep_orphan_files()
        except BaseException:
            await storage.close()
            raise
        return storage

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            try:
                await self._db.close()
            except sqlite3.Error as err:
                log.warning("closing the database failed: %s", err)
        await asyncio.to_thread(self._session.release)

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # Conversations

    async def create_conversation(
        self,
        platform: str,
        *,
        external_id: str | None = None,
        owner: str | None = None,
        title: str | None = None,
        conversation_id: str | None = None,
    ) -> Conversation:
        conversation = Conversation(
            id=conversation_id or _new_id(),
            platform=platform,
            external_id=external_id,
            owner=owner,
            created_at=self._clock(),
            title=title,
        )

        async def step(db: aiosqlite.Connection) -> None:
            try:
                await db.execute(
                    "INSERT INTO conversations (id, platform, external_id, owner, title, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (conversation.id, platform, external_id, owner, title, conversation.created_at),
                )
            except sqlite3.IntegrityError as err:
                raise ConflictError("this conversation already exists") from err

        await self._write(step)
        return conversation

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        row = await self._read(
            lambda db: _one(db, "SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        )
        return _conversation(row) if row else None

    async def find_conversation(self, platform: str, external_id: str) -> Conversation | None:
        row = await self._read(
            lambda db: _one(
                db,
                "SELECT * FROM conversations WHERE platform = ? AND external_id = ?",
                (platform, external_id),
            )
        )
        return _conversation(row) if row else None

    async def delete_conversation(self, conversation_id: str) -> None:
        """Remove the conversation with its messages, runs and resources, then the files nobody else uses."""

        async def step(db: aiosqlite.Connection) -> list[str]:
            rows = await _all(
                db,
                "SELECT DISTINCT sha256 FROM resources AS mine WHERE conversation_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM resources AS other WHERE other.sha256 = mine.sha256"
                " AND other.conversation_id != mine.conversation_id)",
                (conversation_id,),
            )
            await db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            return [row[0] for row in rows]

        async with self._files_lock:
            unused = await self._write(step)
            await self._remove_files(unused)

    # Messages

    async def add_message(
        self,
        conversation_id: str,
        role: Role,
        text: str,
        *,
        author: str | None = None,
        platform_message_id: str | None = None,
        run_id: str | None = None,
    ) -> Message:
        if role not in ("user", "assistant"):
            raise ValueError(f"a message's role is 'user' or 'assistant', not {role!r}")
        message = Message(
            id=_new_id(),
            conversation_id=conversation_id,
            role=role,
            text=text,
            author=author,
            platform_message_id=platform_message_id,
            created_at=self._clock(),
            run_id=run_id,
        )

        async def step(db: aiosqlite.Connection) -> None:
            await _require_conversation(db, conversation_id)
            try:
                await db.execute(
                    "INSERT INTO messages"
                    " (id, conversation_id, role, text, author, platform_message_id, created_at, run_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message.id,
                        conversation_id,
                        role,
                        text,
                        author,
                        platform_message_id,
                        message.created_at,
                        run_id,
                    ),
                )
            except sqlite3.IntegrityError as err:
                raise NotFoundError(f"run {run_id} does not exist") from err

        await self._write(step)
        return message

    async def messages(self, conversation_id: str, limit: int | None = None) -> list[Message]:
        """Oldest first; with ``limit``, only the last ``limit`` messages."""
        params: tuple[Any, ...]
        if limit is None:
            sql, params = (
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY rowid",
                (conversation_id,),
            )
        else:
            sql = (
                "SELECT * FROM (SELECT rowid AS seq, * FROM messages WHERE conversation_id = ?"
                " ORDER BY rowid DESC LIMIT ?) ORDER BY seq"
            )
            params = (conversation_id, max(limit, 0))
        rows = await self._read(lambda db: _all(db, sql, params))
        return [_message(row) for row in rows]

    async def count_user_turns(self, conversation_id: str) -> int:
        row = await self._read(
            lambda db: _one(
                db,
                "SELECT count(*) FROM messages WHERE conversation_id = ? AND role = 'user'",
                (conversation_id,),
            )
        )
        return int(row[0]) if row else 0

    # Resources

    async def add_resource(
        self,
        conversation_id: str,
        data: bytes,
        *,
        name: str,
        mime: str,
        origin: Origin,
        message_id: str | None = None,
    ) -> Resource:
        """Store the file (once per content), then its row; a file whose row fails is removed again."""
        async with self._files_lock:
            try:
                digest, created = await asyncio.to_thread(self._files.put, data)
            except OSError as err:
                raise _file_error(err, name) from err
            resource = Resource(
                name=name,
                kind=kind_of_mime(mime),
                mime=mime,
                sha256=digest,
                size=len(data),
                path=self._files.path_for(digest),
                id=_new_id(),
                origin=origin,
            )

            async def step(db: aiosqlite.Connection) -> None:
                await _require_conversation(db, conversation_id)
                try:
                    await db.execute(
                        "INSERT INTO resources (id, conversation_id, name, kind, mime, size, sha256, origin,"
                        " run_id, task_id, message_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            resource.id,
                            conversation_id,
                            name,
                            resource.kind,
                            mime,
                            resource.size,
                            digest,
                            origin.source,
                            origin.run_id,
                            origin.task_id,
                            message_id,
                            self._clock(),
                        ),
                    )
                except sqlite3.IntegrityError as err:
                    if "UNIQUE" in str(err):
                        raise ConflictError(
                            f"a file named {name} already exists in this conversation"
                        ) from err
                    raise NotFoundError(f"the run or message that {name} belongs to does not exist") from err

            try:
                await self._write(step)
            except BaseException:
                if created:
                    await self._remove_unreferenced(digest)
                raise
        return resource

    async def resources(self, conversation_id: str) -> list[Resource]:
        """The conversation's files in the order they were added."""
        rows = await self._read(
            lambda db: _all(
                db, "SELECT * FROM resources WHERE conversation_id = ? ORDER BY rowid", (conversation_id,)
            )
        )
        return [self._resource(row) for row in rows]

    async def read_resource(self, resource: Resource) -> bytes:
        """The file's bytes, checked against its sha256."""
        try:
            return await asyncio.to_thread(self._files.read, resource.sha256)
        except FileNotFoundError as err:
            raise StorageError(f"the file {resource.name} is missing from storage") from err
        except ValueError as err:
            raise StorageError(f"the file {resource.name} is damaged in storage") from err
        except OSError as err:
            raise StorageError(f"could not read the file {resource.name}: {err.strerror or err}") from err

    async def next_resource_number(self, conversation_id: str, prefix: str) -> int:
        """The number for the next upload named ``{prefix}-N.ext``: one more than the uploads named so."""
        head = f"{prefix}-"
        row = await self._read(
            lambda db: _one(
                db,
                "SELECT count(*) FROM resources WHERE conversation_id = ? AND origin = 'upload'"
                " AND substr(name, 1, ?) = ?",
                (conversation_id, len(head), head),
            )
        )
        return 1 + (int(row[0]) if row else 0)

    def resource_store(self, conversation_id: str) -> ResourceStore:
        return ConversationResources(self, conversation_id)

    # Runs

    async def start_run(self, conversation_id: str, request_message_id: str | None) -> str:
        run_id = _new_id()
        now = self._clock()

        async def step(db: aiosqlite.Connection) -> None:
            await _require_conversation(db, conversation_id)
            try:
                await db.execute(
                    "INSERT INTO runs (id, conversation_id, request_message_id, status, created_at, updated_at,"
                    " session) VALUES (?, ?, ?, 'running', ?, ?, ?)",
                    (run_id, conversation_id, request_message_id, now, now, self._session.id),
                )
            except sqlite3.IntegrityError as err:
                raise NotFoundError(f"message {request_message_id} does not exist") from err
            await _add_transition(db, run_id, "running", now)

        await self._write(step)
        return run_id

    async def set_plan(self, run_id: str, plan: list[Any], choices: dict[Any, Any]) -> None:
        """Keep the plan and the model choices (as JSON: integer keys come back as strings)."""
        values = (json.dumps(plan), json.dumps(choices), self._clock(), run_id)
        await self._write(
            lambda db: _update_run(
                db, "UPDATE runs SET plan = ?, choices = ?, updated_at = ? WHERE id = ?", values
            )
        )

    async def record_task(
        self,
        run_id: str,
        task_id: int,
        *,
        task: str,
        model: str | None,
        status: str,
        seconds: float,
        output: Any,
        error: str | None,
    ) -> None:
        """Insert or replace what task ``task_id`` of the run did; ``output`` must be JSON-serialisable."""
        output_json = json.dumps(output)
        now = self._clock()

        async def step(db: aiosqlite.Connection) -> None:
            await _update_run(db, "UPDATE runs SET updated_at = ? WHERE id = ?", (now, run_id))
            await db.execute(
                "INSERT INTO tasks (run_id, task_id, task, model, status, seconds, output, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, task_id) DO UPDATE SET"
                " task = excluded.task, model = excluded.model, status = excluded.status,"
                " seconds = excluded.seconds, output = excluded.output, error = excluded.error",
                (run_id, task_id, task, model, status, seconds, output_json, error),
            )

        await self._write(step)

    async def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        *,
        answer: str | None,
        error: str | None,
        llm_calls: int,
        prompt_tokens: int,
        completion_tokens: int,
        seconds: float,
    ) -> None:
        """Record the outcome. It wins even over an earlier ``interrupted``: it is what really happened."""
        if status == "running" or status not in RUN_STATUSES:
            raise ValueError(f"a run cannot finish with status {status!r}")
        now = self._clock()

        async def step(db: aiosqlite.Connection) -> None:
            await _update_run(
                db,
                "UPDATE runs SET status = ?, answer = ?, error = ?, llm_calls = ?, prompt_tokens = ?,"
                " completion_tokens = ?, seconds = ?, updated_at = ? WHERE id = ?",
                (status, answer, error, llm_calls, prompt_tokens, completion_tokens, seconds, now, run_id),
            )
            await _add_transition(db, run_id, status, now)

        await self._write(step)

    async def mark_interrupted(self, run_id: str, error: str) -> None:
        """Mark a run that will not finish (shutdown, cancellation); does nothing unless it is ``running``."""
        await self._write(lambda db: _interrupt(db, run_id, error, self._clock()))

    async def get_run(self, run_id: str) -> Run | None:
        runs = await self._read(lambda db: _load_runs(db, _RUN_BY_ID, (run_id,)))
        return runs[0] if runs else None

    async def runs(self, conversation_id: str) -> list[Run]:
        """The conversation's runs, oldest first."""
        return await self._read(lambda db: _load_runs(db, _RUNS_OF_CONVERSATION, (conversation_id,)))

    async def unreported_interrupted_runs(self) -> list[Run]:
        """Interrupted runs no front end has told its user about yet (see ``mark_reported``)."""
        return await self._read(lambda db: _load_runs(db, _RUNS_TO_REPORT, ()))

    async def mark_reported(self, run_id: str) -> None:
        await self._write(lambda db: db.execute("UPDATE runs SET reported = 1 WHERE id = ?", (run_id,)))

    async def ping(self) -> bool:
        """Whether the database answers a query (for /status)."""
        try:
            row = await self._read(lambda db: _one(db, "SELECT 1", ()))
        except StorageError:
            return False
        return row is not None

    # Internals

    async def _interrupt_dead_runs(self, db: aiosqlite.Connection, live: set[str]) -> None:
        rows = await _all(db, "SELECT id, session FROM runs WHERE status = 'running'", ())
        dead = [row["id"] for row in rows if row["session"] not in live]
        now = self._clock() if dead else 0.0
        for run_id in dead:
            await _interrupt(db, run_id, _INTERRUPTED, now)

    def _resource(self, row: sqlite3.Row) -> Resource:
        return Resource(
            name=row["name"],
            kind=row["kind"],
            mime=row["mime"],
            sha256=row["sha256"],
            size=row["size"],
            path=self._files.path_for(row["sha256"]),
            id=row["id"],
            origin=Origin(row["origin"], row["run_id"], row["task_id"]),
        )

    async def _remove_unreferenced(self, digest: str) -> None:
        """Remove a file this process just wrote for a row that then failed, unless a row uses it."""
        try:
            row = await self._read(
                lambda db: _one(db, "SELECT 1 FROM resources WHERE sha256 = ? LIMIT 1", (digest,))
            )
        except StorageError as err:
            log.warning("kept file %s: could not check whether a row uses it: %s", digest, err)
            return
        if row is None:
            await self._remove_files([digest])

    async def sweep_orphan_files(self, older_than: float = ORPHAN_GRACE_SECONDS) -> int:
        """Remove stored files no row refers to and temp files a crash left, once ``older_than`` seconds old.

        They come from a process killed between writing a file and its row, or between a delete's commit and
        the file's removal. The age keeps the sweep away from a file another process has just written (or
        just found already stored, which refreshes it) and is about to refer to. Returns how many went.
        """
        now = time.time()  # file times are the wall clock's, whatever clock the rows use
        try:
            digests, temps = await asyncio.to_thread(self._files.stale, older_than, now)
        except OSError as err:
            log.warning("could not list stored files: %s", err)
            return 0
        referenced: set[str] = set()
        for start in range(0, len(digests), _SWEEP_BATCH):
            referenced |= await self._read(_referenced(digests[start : start + _SWEEP_BATCH]))
        orphans = [d for d in digests if d not in referenced]
        if not orphans and not temps:
            return 0
        async with self._files_lock:
            try:
                removed = await asyncio.to_thread(self._files.remove_stale, orphans, temps, older_than, now)
            except OSError as err:
                log.warning("could not remove orphan files: %s", err)
                return 0
        log.info("removed %d orphan file(s) from %s", removed, self._files.root)
        return removed

    async def _remove_files(self, digests: list[str]) -> None:
        # The rows are gone already; a file left behind only costs disk space, so it is logged, not raised.
        try:
            await asyncio.to_thread(self._files.remove, digests)
        except OSError as err:
            log.warning("could not remove stored files: %s", err)

    async def _write(self, step: Step[T]) -> T:
        return await self._attempt(lambda db: _in_transaction(db, step, "BEGIN IMMEDIATE"))

    async def _read(self, step: Step[T]) -> T:
        return await self._attempt(lambda db: _in_transaction(db, step, "BEGIN"))

    async def _attempt(self, action: Step[T]) -> T:
        """Run ``action`` with the connection to itself; retry while the database is busy, then give up."""
        delay = _FIRST_BACKOFF
        attempt = 1
        while True:
            async with self._lock:
                if self._closed:
                    raise StorageError("the storage is closed")
                try:
                    return await action(self._db)
                except sqlite3.Error as err:
                    if not _is_busy(err) or attempt == _ATTEMPTS:
                        raise _storage_error(err) from err
            log.info("database busy (attempt %d of %d), retrying in %.2f s", attempt, _ATTEMPTS, delay)
            await asyncio.sleep(delay * random.uniform(1.0, 1.5))
            delay *= 2
            attempt += 1


@dataclass(frozen=True)
class ConversationResources:
    """One conversation's files as the ``ResourceStore`` the executor writes task outputs through."""

    storage: Storage
    conversation_id: str

    async def read(self, resource: Resource) -> bytes:
        return await self.storage.read_resource(resource)

    async def put(self, data: bytes, *, name: str, mime: str, origin: Origin) -> Resource:
        return await self.storage.add_resource(
            self.conversation_id, data, name=name, mime=mime, origin=origin
        )


def _prepare(data_dir: Path, files: FileStore) -> SessionLock:
    data_dir.mkdir(parents=True, exist_ok=True)
    files.root.mkdir(exist_ok=True)
    return SessionLock.acquire(data_dir / "sessions")


async def _configure(db: aiosqlite.Connection) -> None:
    """Per-connection settings; outside any transaction, where SQLite ignores some of them."""
    await db.execute("PRAGMA foreign_keys = ON")
    row = await _one(db, "PRAGMA journal_mode = WAL", ())
    if row is None or str(row[0]).lower() != "wal":
        raise StorageError(
            "the database cannot use write-ahead logging here; put HUGGINGGPT_DATA_DIR on a local disk"
        )
    # NORMAL in WAL mode: a step is atomic and survives any process crash; a power cut may lose the last
    # few commits (never half of one). FULL fsyncs every commit, measured here at 5-10x slower under load.
    await db.execute("PRAGMA synchronous = NORMAL")


async def _in_transaction(db: aiosqlite.Connection, step: Step[T], begin: str) -> T:
    try:
        # Inside the try: a cancellation while SQLite's thread is still running BEGIN must roll back too, or
        # the connection stays in that transaction and every later BEGIN fails.
        await db.execute(begin)
        result = await step(db)
        await db.execute("COMMIT")
    except BaseException:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.Error as err:
            log.debug("rollback after a failed step: %s", err)
        raise
    return result


async def _one(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
    async with db.execute(sql, params) as cursor:
        row: sqlite3.Row | None = await cursor.fetchone()
    return row


async def _all(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
    return list(await db.execute_fetchall(sql, params))


async def _require_conversation(db: aiosqlite.Connection, conversation_id: str) -> None:
    if await _one(db, "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)) is None:
        raise NotFoundError(f"conversation {conversation_id} does not exist (it may have been reset)")


async def _update_run(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> None:
    """Run an UPDATE of one run, whose id is the last parameter; ``NotFoundError`` if there is no such run."""
    async with db.execute(sql, params) as cursor:
        if cursor.rowcount == 0:
            raise NotFoundError(f"run {params[-1]} does not exist")


async def _add_transition(db: aiosqlite.Connection, run_id: str, status: str, at: float) -> None:
    await db.execute(
        "INSERT INTO run_transitions (run_id, status, at) VALUES (?, ?, ?)", (run_id, status, at)
    )


async def _interrupt(db: aiosqlite.Connection, run_id: str, error: str, now: float) -> None:
    async with db.execute(
        "UPDATE runs SET status = 'interrupted', error = ?, updated_at = ?, reported = 0"
        " WHERE id = ? AND status = 'running'",
        (error, now, run_id),
    ) as cursor:
        changed = cursor.rowcount > 0
    if changed:
        await _add_transition(db, run_id, "interrupted", now)


async def _load_runs(db: aiosqlite.Connection, where: str, params: tuple[Any, ...]) -> list[Run]:
    """Runs matching ``where`` (one of the fixed selections above), with their transitions and tasks."""
    rows = await _all(db, f"SELECT * FROM runs WHERE {where} ORDER BY rowid", params)
    if not rows:
        return []
    selected = f"SELECT id FROM runs WHERE {where}"
    transitions: dict[str, list[tuple[str, float]]] = {}
    for row in await _all(
        db,
        f"SELECT run_id, status, at FROM run_transitions WHERE run_id IN ({selected}) ORDER BY rowid",
        params,
    ):
        transitions.setdefault(row["run_id"], []).append((row["status"], row["at"]))
    tasks: dict[str, list[TaskRecord]] = {}
    for row in await _all(db, f"SELECT * FROM tasks WHERE run_id IN ({selected}) ORDER BY task_id", params):
        tasks.setdefault(row["run_id"], []).append(_task(row))
    return [_run(row, transitions.get(row["id"], []), tasks.get(row["id"], [])) for row in rows]


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        platform=row["platform"],
        external_id=row["external_id"],
        owner=row["owner"],
        created_at=row["created_at"],
        title=row["title"],
    )


def _message(row: sqlite3.Row) -> Message:
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        role=row["role"],
        text=row["text"],
        author=row["author"],
        platform_message_id=row["platform_message_id"],
        created_at=row["created_at"],
        run_id=row["run_id"],
    )


def _task(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        run_id=row["run_id"],
        task_id=row["task_id"],
        task=row["task"],
        model=row["model"],
        status=row["status"],
        seconds=row["seconds"],
        output=json.loads(row["output"]),
        error=row["error"],
    )


def _run(row: sqlite3.Row, transitions: list[tuple[str, float]], tasks: list[TaskRecord]) -> Run:
    return Run(
        id=row["id"],
        conversation_id=row["conversation_id"],
        request_message_id=row["request_message_id"],
        status=row["status"],
        plan=_json_or_none(row["plan"]),
        choices=_json_or_none(row["choices"]),
        answer=row["answer"],
        error=row["error"],
        llm_calls=row["llm_calls"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        seconds=row["seconds"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        transitions=transitions,
        tasks=tasks,
        reported=bool(row["reported"]),
    )


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _new_id() -> str:
    """12 lowercase letters and digits: URL-safe, easy to type, and never mistaken for a CLI option."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def _is_busy(err: sqlite3.Error) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _storage_error(err: sqlite3.Error) -> StorageError:
    """The user-safe error for a database failure; SQLite's own message goes to the log."""
    code = getattr(err, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if _is_busy(err):
        log.warning("database busy after %d attempts: %s", _ATTEMPTS, err)
        return StorageError("the database is busy, try again")
    log.error("database error: %s", err)
    if primary == sqlite3.SQLITE_FULL:
        return StorageError("the disk is full, so nothing could be saved; free some space and try again")
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StorageError("the database file is damaged; restore it from a backup or move it away")
    return StorageError("the database failed; the log has the details")


def _file_error(err: OSError, name: str) -> StorageError:
    log.error("could not store file %s: %s", name, err)
    if err.errno == errno.ENOSPC:
        return StorageError(f"the disk is full, so {name} could not be stored; free some space and try again")
    return StorageError(f"could not store {name}: {err.strerror or err}")


def _referenced(digests: list[str]) -> Step[set[str]]:
    """A read step: which of ``digests`` some resource row refers to."""

    async def step(db: aiosqlite.Connection) -> set[str]:
        marks = ",".join("?" * len(digests))  # placeholders only: the digests are parameters
        rows = await _all(db, f"SELECT DISTINCT sha256 FROM resources WHERE sha256 IN ({marks})", tuple(digests))
        return {row[0] for row in rows}

    return step


def _sweep_due(marker: Path, every: float, now: float) -> bool:
    """Whether the last sweep is ``every`` seconds old (or there was none), marking this one as done:
    walking every stored file on each start would make a CLI call as slow as the store is big. Blocking."""
    with contextlib.suppress(FileNotFoundError):
        if now - marker.stat().st_mtime < every:
            return False
    marker.touch()
    os.utime(marker, (now, now))
    return True
