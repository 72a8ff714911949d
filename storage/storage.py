"""The storage API: conversations, messages, resources (files stored once per content) and runs with every
status change, on SQLite or PostgreSQL, with file contents on local disk or in an S3 bucket.

Each public method is one transaction (``Database``), so a crash never leaves half a step behind. Writes to
one conversation lock its row first (on SQLite the write lock covers it), so numbering messages, runs and
uploads inside the transaction is atomic across processes, and the database itself allows one running run
per conversation.

Contents and rows meet in the ``blobs`` table. Adding a resource first upserts its blob row (refreshing its
time) and commits, then puts the content, then inserts the resource while holding a key-share lock on that
blob row. A sweep removes a content only while holding the blob row's update lock, after checking that no
resource refers to it and that it was untouched for a day: an adder either waits for the sweep and puts the
content again, or finds the row gone and starts over, so no resource ever points at a removed content.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Integer, Row, Table, and_, bindparam, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement

from agent.resources import Origin, Resource, ResourceStore, extension_for, kind_of_mime, name_prefix

from . import schema
from .blobs import BlobStore, digest_of, open_blob_store
from .config import StorageConfig
from .database import Database, db_now
from .errors import ConflictError, NotFoundError, StorageError, TurnBusyError
from .liveness import OPEN_HERE, Identity, owner_alive
from .records import (
    RUN_STATUSES,
    ChatSettings,
    Conversation,
    Message,
    NewUpload,
    Role,
    Run,
    RunEnd,
    TaskRecord,
    Turn,
    Usage,
)
from .tables import (
    blobs,
    chat_settings,
    conversations,
    maintenance,
    messages,
    processes,
    resources,
    run_transitions,
    runs,
    tasks,
)

__all__ = ["ORPHAN_GRACE_SECONDS", "ConversationResources", "Storage"]

log = logging.getLogger(__name__)

ORPHAN_GRACE_SECONDS = 24 * 3600.0
"""How long a content no resource refers to is kept before a sweep removes it."""
HEARTBEAT_SECONDS = 10.0
"""How often a process says it is alive and reaps the runs of dead ones."""
HEARTBEAT_TIMEOUT = 60.0
"""Silence after which a process on another machine counts as dead."""
_SWEEP_EVERY = 24 * 3600.0
_SWEEP_CHECK_SECONDS = 3600.0  # how often a running process asks whether a sweep is due
_SWEEP_JOB = "blob-sweep"
_BATCH = 500
_BLOB_ATTEMPTS = 3
_ID_ALPHABET = string.ascii_lowercase + string.digits
_INTERRUPTED = "the program stopped before this request finished"


class _BlobGone(Exception):
    """A sweep removed a content between its put and the row referring to it: start over."""


class Storage:
    """Everything the bot and the CLI keep between restarts: a database and a blob store."""

    def __init__(
        self,
        config: StorageConfig,
        db: Database,
        blob_store: BlobStore,
        *,
        clock: Callable[[], float],
        heartbeat: float,
        heartbeat_timeout: float,
    ) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self._db = db
        self._blobs = blob_store
        self._clock = clock
        self._heartbeat = heartbeat
        self._heartbeat_timeout = heartbeat_timeout
        self._me = Identity.current()
        self._id = _new_id()
        self._active: set[str] = set()  # runs this Storage started that have not ended
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        # Upserts differ by dialect; built once (``excluded`` makes a new alias, at a millisecond each time).
        task = db.insert(tasks)
        changed = {c.name: task.excluded[c.name] for c in tasks.c if c.name not in ("run_id", "task_id")}
        self._upsert_task = task.on_conflict_do_update(index_elements=["run_id", "task_id"], set_=changed)
        blob = db.insert(blobs)
        self._touch_blob = blob.on_conflict_do_update(
            index_elements=["sha256"], set_={"touched_at": blob.excluded.touched_at}
        ).returning(blobs.c.generation)

    @classmethod
    async def open(
        cls,
        location: StorageConfig | Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        heartbeat: float = HEARTBEAT_SECONDS,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    ) -> Storage:
        """Open or create the store, upgrade its schema, say this process is alive, and mark the runs of dead
        processes ``interrupted``. A ``Path`` is a data directory with SQLite and local files.

        ``busy_timeout`` is how long one attempt waits for a lock another process holds; ``heartbeat`` how
        often this process says it is alive and reaps the runs of dead ones (see ``liveness``).
        """
        config = location if isinstance(location, StorageConfig) else StorageConfig(Path(location))
        try:
            await asyncio.to_thread(config.data_dir.mkdir, parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(
                f"cannot use the data directory {config.data_dir}: {err.strerror or err}"
            ) from err
        db = Database(config, busy_timeout=busy_timeout)
        try:
            blob_store = open_blob_store(config)
        except BaseException:
            await db.close()
            raise
        storage = cls(
            config, db, blob_store, clock=clock, heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout
        )
        try:
            found, reached = await schema.upgrade(db)
            if found != reached:
                log.info("upgraded %s from schema revision %s to %s", db.describe(), found, reached)
            await storage._register()
            await storage.reap()
            await storage._sweep_if_due()
        except BaseException:
            await storage.close()
            raise
        storage._keeper = asyncio.create_task(storage._keep(), name=f"storage-keeper-{storage._id}")
        return storage

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        OPEN_HERE.discard(self._id)
        with contextlib.suppress(StorageError):
            await self._db.execute(delete(processes).where(processes.c.id == self._id))
        await self._db.close()
        try:
            await self._blobs.close()
        except StorageError as err:
            log.warning("closing the blob store failed: %s", err)

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        """The SQLite file (when the database is SQLite)."""
        return self.config.sqlite_path

    def describe(self) -> str:
        """Engine, host and blob store, never a credential: for ``status``."""
        return f"{self._db.describe()}; {self._blobs.describe()}"

    # Conversations

    async def create_conversation(
        self,
        platform: str,
        *,
        external_id: str | None = None,
        owner: str | None = None,
        title: str | None = None,
        conversation_id: str | None = None,
        guild_id: str | None = None,
    ) -> Conversation:
        """A new conversation; ``ConflictError`` if its id or its ``(platform, external_id)`` is taken."""
        conversation = self._conversation(platform, external_id, owner, title, conversation_id, guild_id)

        def step(conn: Connection) -> None:
            try:
                conn.execute(conversations.insert().values(**_row(conversation)))
            except IntegrityError as err:
                raise ConflictError("this conversation already exists") from err

        await self._db.write(step)
        return conversation

    async def open_conversation(
        self,
        platform: str,
        *,
        external_id: str | None = None,
        conversation_id: str | None = None,
        owner: str | None = None,
        title: str | None = None,
        guild_id: str | None = None,
    ) -> Conversation:
        """The conversation with ``conversation_id`` (or ``platform`` + ``external_id``), created if there is
        none: atomic, so two processes opening the same one at once get the same conversation."""
        conversation = self._conversation(platform, external_id, owner, title, conversation_id, guild_id)
        if conversation_id is not None:
            key: ColumnElement[bool] = conversations.c.id == conversation_id
        elif external_id is not None:
            key = and_(conversations.c.platform == platform, conversations.c.external_id == external_id)
        else:
            key = conversations.c.id == conversation.id

        def step(conn: Connection) -> Row[Any] | None:
            insert = self._db.insert(conversations).values(**_row(conversation)).on_conflict_do_nothing()
            conn.execute(insert)
            return (conn.execute(select(conversations).where(key))).first()

        row = await self._db.write(step)
        if row is None:  # the id is new but the platform's channel belongs to another conversation
            raise ConflictError("this conversation already exists under another id")
        return _conversation(row)

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        row = await self._db.read(
            lambda c: _first(c, select(conversations).where(conversations.c.id == conversation_id))
        )
        return _conversation(row) if row else None

    async def find_conversation(self, platform: str, external_id: str) -> Conversation | None:
        query = select(conversations).where(
            conversations.c.platform == platform, conversations.c.external_id == external_id
        )
        row = await self._db.read(lambda c: _first(c, query))
        return _conversation(row) if row else None

    async def delete_conversation(self, conversation_id: str) -> None:
        """Remove the conversation with its messages, runs and resources, then the contents nobody else uses."""

        def step(conn: Connection) -> list[str]:
            mine = select(resources.c.sha256).where(resources.c.conversation_id == conversation_id).distinct()
            digests = list((conn.execute(mine)).scalars())
            conn.execute(delete(conversations).where(conversations.c.id == conversation_id))
            return digests

        for digest in await self._db.write(step):
            await self._remove_blob(digest, older_than=None)

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

        def step(conn: Connection) -> None:
            _lock_conversation(conn, conversation_id)
            try:
                _insert_message(conn, message)
            except IntegrityError as err:
                raise NotFoundError(f"run {run_id} does not exist") from err

        await self._db.write(step)
        return message

    async def messages(self, conversation_id: str, limit: int | None = None) -> list[Message]:
        """Oldest first; with ``limit``, only the last ``limit`` messages."""
        rows = await self._db.read(lambda c: _history(c, conversation_id, limit, before=None))
        return [_message(row) for row in rows]

    async def count_user_turns(self, conversation_id: str) -> int:
        return await self._db.read(lambda c: _user_turns(c, conversation_id))

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
        """Store the content (once per content), then the resource row that names it in the conversation."""
        for attempt in range(1, _BLOB_ATTEMPTS + 1):
            digest, generation = await self._put_blob(data, name)
            resource = self._resource_for(name, mime, digest, len(data), origin)

            row = partial(
                self._add_resource_row,
                conversation_id=conversation_id,
                resource=resource,
                generation=generation,
                message_id=message_id,
            )
            try:
                await self._db.write(row)
            except _BlobGone:
                log.info("the content of %s was swept while being added (attempt %d); again", name, attempt)
                continue
            except StorageError:
                await self._remove_blob(digest, older_than=None)  # unless another row uses it
                raise
            return resource
        raise StorageError(f"could not store {name}: its content kept being removed; try again")

    async def resources(self, conversation_id: str) -> list[Resource]:
        """The conversation's files in the order they were added."""
        rows = await self._db.read(lambda c: _resources_of(c, conversation_id))
        return [self._resource(row) for row in rows]

    async def read_resource(self, resource: Resource) -> bytes:
        """The file's bytes, checked against its sha256."""
        return await self._blobs.get(resource.sha256, resource.size, name=resource.name)

    async def next_resource_number(self, conversation_id: str, prefix: str) -> int:
        """The number for the next upload named ``{prefix}-N.ext``: one more than the uploads named so."""
        return 1 + await self._db.read(lambda c: _uploads_named(c, conversation_id, prefix))

    def resource_store(self, conversation_id: str) -> ResourceStore:
        return ConversationResources(self, conversation_id)

    # Runs

    async def begin_turn(
        self,
        conversation_id: str,
        text: str,
        uploads: Sequence[NewUpload],
        *,
        author: str | None = None,
        platform_message_id: str | None = None,
        history_limit: int | None = None,
    ) -> Turn:
        """Start a user's turn in one transaction: the message, its uploads (named ``img-N``/``aud-N``/…,
        numbered inside it), and a ``running`` run owned by this process. The contents are stored first.

        ``TurnBusyError`` if another run of the conversation is still running (nothing is written: wait for
        it to end, or for its process to be reaped, and call again); ``NotFoundError`` if the conversation
        does not exist.
        """
        for attempt in range(1, _BLOB_ATTEMPTS + 1):
            names = [f"upload {n + 1}" for n in range(len(uploads))]
            stored = [await self._put_blob(u.data, name) for u, name in zip(uploads, names, strict=True)]
            try:
                turn = await self._db.write(
                    partial(
                        self._begin_turn,
                        conversation_id=conversation_id,
                        text=text,
                        uploads=uploads,
                        stored=stored,
                        author=author,
                        platform_message_id=platform_message_id,
                        history_limit=history_limit,
                    )
                )
            except _BlobGone:
                log.info("an upload's content was swept while being added (attempt %d); again", attempt)
                continue
            self._active.add(turn.run_id)
            return turn
        raise StorageError("could not store the attachments: their content kept being removed; try again")

    async def start_run(self, conversation_id: str, request_message_id: str | None) -> str:
        """A ``running`` run owned by this process; ``TurnBusyError`` if another run of it is running."""
        run_id = _new_id()

        def step(conn: Connection) -> None:
            _lock_conversation(conn, conversation_id)
            try:
                self._insert_run(conn, run_id, conversation_id, request_message_id)
            except IntegrityError as err:
                raise NotFoundError(f"message {request_message_id} does not exist") from err

        await self._db.write(step)
        self._active.add(run_id)
        return run_id

    async def set_plan(self, run_id: str, plan: list[Any], choices: dict[Any, Any]) -> None:
        """Keep the plan and the model choices (as JSON: integer keys come back as strings)."""
        values = {"plan": json.dumps(plan), "choices": json.dumps(choices), "updated_at": self._clock()}
        await self._db.write(lambda c: _update_run(c, run_id, values))

    async def record_task(self, record: TaskRecord) -> None:
        """Insert or replace what the task did; its ``output`` must be JSON-serialisable."""
        row = {
            "run_id": record.run_id,
            "task_id": record.task_id,
            "task": record.task,
            "model": record.model,
            "status": record.status,
            "seconds": record.seconds,
            "output": json.dumps(record.output),
            "error": record.error,
        }
        now = self._clock()

        def step(conn: Connection) -> None:
            _update_run(conn, record.run_id, {"updated_at": now})
            conn.execute(self._upsert_task, row)

        await self._db.write(step)

    async def finish_run(self, run_id: str, end: RunEnd) -> None:
        """Record the outcome. It wins even over an earlier ``interrupted``: it is what really happened."""
        if end.status == "running" or end.status not in RUN_STATUSES:
            raise ValueError(f"a run cannot finish with status {end.status!r}")
        now = self._clock()
        values = {
            "status": end.status,
            "answer": end.answer,
            "error": end.error,
            "llm_calls": end.llm_calls,
            "prompt_tokens": end.prompt_tokens,
            "completion_tokens": end.completion_tokens,
            "seconds": end.seconds,
            "updated_at": now,
        }

        def step(conn: Connection) -> None:
            _update_run(conn, run_id, values)
            _add_transition(conn, run_id, end.status, now)

        try:
            await self._db.write(step)
        finally:
            self._active.discard(run_id)  # ended, or beyond saving: the reaper may take it

    async def mark_interrupted(self, run_id: str, error: str) -> None:
        """Mark a run that will not finish (shutdown, cancellation); does nothing unless it is ``running``."""
        try:
            await self._db.write(lambda c: _interrupt(c, run_id, error, self._clock()))
        finally:
            self._active.discard(run_id)

    async def get_run(self, run_id: str) -> Run | None:
        found = await self._db.read(lambda c: _load_runs(c, runs.c.id == run_id))
        return found[0] if found else None

    async def runs(self, conversation_id: str) -> list[Run]:
        """The conversation's runs, oldest first."""
        return await self._db.read(lambda c: _load_runs(c, runs.c.conversation_id == conversation_id))

    async def unreported_interrupted_runs(self) -> list[Run]:
        """Interrupted runs no front end has told its user about yet (see ``mark_reported``)."""
        return await self._db.read(
            lambda c: _load_runs(c, and_(runs.c.status == "interrupted", runs.c.reported == 0))
        )

    async def request_of(self, run_id: str) -> tuple[Message, list[str]] | None:
        """The user message that started the run and the names of the files attached to it (for a retry);
        None if the run or its message is gone."""

        def step(conn: Connection) -> tuple[Message, list[str]] | None:
            row = _first(
                conn,
                select(messages)
                .join(runs, runs.c.request_message_id == messages.c.id)
                .where(runs.c.id == run_id),
            )
            if row is None:
                return None
            attached = (
                select(resources.c.name).where(resources.c.message_id == row.id).order_by(resources.c.seq)
            )
            return _message(row), _scalars(conn, attached)

        return await self._db.read(step)

    async def mark_reported(self, run_id: str) -> None:
        await self._db.execute(update(runs).where(runs.c.id == run_id).values(reported=1))

    async def ping(self) -> bool:
        """Whether the database answers a query (for /status)."""
        try:
            await self._db.read(lambda c: c.execute(select(1)))
        except StorageError:
            return False
        return True

    # Settings per guild and channel

    async def chat_settings(self, guild_id: str, channel_id: str | None = None) -> ChatSettings:
        """What was set for the guild (``channel_id`` None) or for one of its channels; all None if nothing."""
        query = select(chat_settings).where(
            chat_settings.c.guild_id == guild_id, chat_settings.c.channel_id == (channel_id or "")
        )
        row = await self._db.read(lambda c: _first(c, query))
        if row is None:
            return ChatSettings()
        return ChatSettings(
            llm_model=row.llm_model,
            model_selection=row.model_selection,
            max_tasks=row.max_tasks,
            task_types=None if row.task_types is None else tuple(json.loads(row.task_types)),
            mention_required=None if row.mention_required is None else bool(row.mention_required),
        )

    async def set_chat_settings(
        self, guild_id: str, channel_id: str | None, settings: ChatSettings, *, by: str | None = None
    ) -> None:
        """Replace what is set for the guild (``channel_id`` None) or one channel; None fields inherit."""
        row = {
            "guild_id": guild_id,
            "channel_id": channel_id or "",
            "llm_model": settings.llm_model,
            "model_selection": settings.model_selection,
            "max_tasks": settings.max_tasks,
            "task_types": None if settings.task_types is None else json.dumps(list(settings.task_types)),
            "mention_required": None if settings.mention_required is None else int(settings.mention_required),
            "updated_by": by,
            "updated_at": self._clock(),
        }
        upsert = self._db.insert(chat_settings).values(**row)
        changed = {k: upsert.excluded[k] for k in row if k not in ("guild_id", "channel_id")}
        statement = upsert.on_conflict_do_update(index_elements=["guild_id", "channel_id"], set_=changed)
        await self._db.execute(statement)

    # Usage

    async def usage(
        self, since: float, *, user: str | None = None, guild_id: str | None = None, limit: int = 10
    ) -> list[Usage]:
        """Per user, the runs they started since ``since`` (only in ``guild_id``'s conversations, if given),
        most tokens first, at most ``limit`` users. Counted from the stored runs and their request messages."""
        query = _usage_query(since, user, guild_id, by_user=True).limit(max(limit, 0))
        rows = await self._db.read(lambda c: list(c.execute(query).all()))
        return [
            Usage(row.user, int(row.runs), int(row.tokens or 0), float(row.seconds or 0.0)) for row in rows
        ]

    async def usage_total(self, since: float, *, guild_id: str | None = None) -> Usage:
        """Everyone's runs since ``since`` together (in ``guild_id``'s conversations, if given)."""
        query = _usage_query(since, None, guild_id, by_user=False)
        row = await self._db.read(lambda c: c.execute(query).one())
        return Usage("", int(row.runs), int(row.tokens or 0), float(row.seconds or 0.0))

    # Liveness

    async def reap(self) -> int:
        """Mark ``interrupted`` the running runs whose process is dead (see ``liveness``), and the runs of
        this one that were given up; forget dead processes. Returns how many runs were marked."""
        now, owners, running = await self._db.read(_liveness_rows)
        alive = {o.id for o in owners if owner_alive(o, self._me, now, self._heartbeat_timeout)}
        dead_runs = [
            r.id
            for r in running
            if (r.session not in alive) or (r.session == self._id and r.id not in self._active)
        ]
        dead_owners = [o.id for o in owners if o.id not in alive]
        if not dead_runs and not dead_owners:
            return 0

        def step(conn: Connection) -> int:
            marked = 0
            stamp = self._clock()
            for run_id in dead_runs:
                marked += _interrupt(conn, run_id, _INTERRUPTED, stamp)
            if dead_owners:
                conn.execute(delete(processes).where(processes.c.id.in_(dead_owners)))
            return marked

        marked = await self._db.write(step)
        if marked:
            log.info("marked %d run(s) of stopped processes interrupted", marked)
        return marked

    async def _register(self) -> None:
        me = self._me
        row = {
            "id": self._id,
            "host": me.host,
            "machine": me.machine,
            "pid": me.pid,
            "started": me.started,
            "created_at": time.time(),
        }
        OPEN_HERE.add(self._id)

        def step(conn: Connection) -> None:
            beat = conn.execute(
                update(processes).where(processes.c.id == self._id).values(heartbeat_at=db_now())
            )
            if beat.rowcount == 0:
                conn.execute(processes.insert().values(**row, heartbeat_at=db_now()))

        await self._db.write(step)

    async def _keep(self) -> None:
        """Heartbeat and reaper, for as long as the storage is open; now and then the blob sweep."""
        last_check = time.monotonic()
        while True:
            await asyncio.sleep(self._heartbeat)
            try:
                await self._register()  # a heartbeat; re-registers if a reaper took this process for dead
                await self.reap()
                if time.monotonic() - last_check >= _SWEEP_CHECK_SECONDS:
                    last_check = time.monotonic()
                    await self._sweep_if_due()
            except StorageError as err:
                log.warning("heartbeat failed (will try again): %s", err)

    # Blobs

    async def sweep_orphan_files(self, older_than: float = ORPHAN_GRACE_SECONDS) -> int:
        """Remove contents no resource refers to, untouched for ``older_than`` seconds, and what interrupted
        writes left behind. Returns how many contents went.

        They come from a process killed between storing a content and its row, or from a delete whose
        content removal failed. Contents found in the store without a blob row (older releases, a crash) get
        one first, dated by their file time; the removal itself is arbitrated in the database (see above).
        """
        now = time.time()  # blob times are the wall clock's, whatever clock the rows use
        try:
            async for batch in self._blobs.listing():
                rows = [
                    {"sha256": d, "size": size, "touched_at": mtime, "generation": _new_id()}
                    for d, size, mtime in batch
                ]
                adopt = self._db.insert(blobs).values(rows).on_conflict_do_nothing(index_elements=["sha256"])
                await self._db.execute(adopt)
            leftovers = await self._blobs.remove_leftovers(older_than, now)
        except (StorageError, OSError) as err:
            log.warning("could not list the stored contents: %s", err)
            return 0
        removed = 0
        cutoff = now - older_than
        orphan = and_(blobs.c.touched_at < cutoff, ~exists().where(resources.c.sha256 == blobs.c.sha256))
        seen: set[str] = set()
        while True:
            query = select(blobs.c.sha256).where(orphan, blobs.c.sha256.not_in(seen)).limit(_BATCH)
            digests = await self._db.read(partial(_scalars, query=query))
            if not digests:
                break
            seen.update(digests)
            for digest in digests:
                removed += await self._remove_blob(digest, older_than=older_than)
        if removed or leftovers:
            log.info(
                "removed %d orphan content(s) and %d leftover(s) from %s",
                removed,
                leftovers,
                self._blobs.describe(),
            )
        return removed

    async def _sweep_if_due(self) -> None:
        """Sweep if no process has in a day: one of all the processes sharing the database does it."""
        now = time.time()

        def step(conn: Connection) -> bool:
            claim = conn.execute(
                update(maintenance)
                .where(maintenance.c.name == _SWEEP_JOB, maintenance.c.at <= now - _SWEEP_EVERY)
                .values(at=now)
            )
            if claim.rowcount:
                return True
            first = (
                self._db.insert(maintenance)
                .values(name=_SWEEP_JOB, at=now)
                .on_conflict_do_nothing()
                .returning(maintenance.c.name)
            )
            return (conn.execute(first)).first() is not None

        if await self._db.write(step):
            await self.sweep_orphan_files()

    async def _put_blob(self, data: bytes, name: str) -> tuple[str, str]:
        """Refresh (or create) the blob row, commit, then store the content: see the module's docstring.
        Returns the digest and the row's generation, which the row referring to it must find unchanged."""
        digest = await asyncio.to_thread(digest_of, data)
        now = time.time()
        row = {"sha256": digest, "size": len(data), "touched_at": now, "generation": _new_id()}
        generation = await self._db.write(lambda conn: conn.execute(self._touch_blob, row).scalar_one())
        await self._blobs.put(digest, data, name=name)
        return digest, str(generation)

    async def _remove_blob(self, digest: str, *, older_than: float | None) -> int:
        """Remove the content and its row if nothing refers to it (and, with ``older_than``, it is that
        old), holding the row's lock throughout. Returns 1 if removed."""

        def step(conn: Connection) -> int:
            held = (
                conn.execute(select(blobs.c.touched_at).where(blobs.c.sha256 == digest).with_for_update())
            ).first()
            if held is None:
                return 0
            if older_than is not None and held.touched_at >= time.time() - older_than:
                return 0
            if (conn.execute(select(resources.c.id).where(resources.c.sha256 == digest).limit(1))).first():
                return 0
            self._db.wait(self._blobs.delete(digest))  # still holding the row
            conn.execute(delete(blobs).where(blobs.c.sha256 == digest))
            return 1

        try:
            return await self._db.write(step)
        except StorageError as err:
            # The rows are gone already; a content left behind only costs space until a sweep.
            log.warning("could not remove stored content %s: %s", digest, err)
            return 0

    # Internals

    def _conversation(
        self,
        platform: str,
        external_id: str | None,
        owner: str | None,
        title: str | None,
        conversation_id: str | None,
        guild_id: str | None,
    ) -> Conversation:
        return Conversation(
            id=conversation_id or _new_id(),
            platform=platform,
            external_id=external_id,
            owner=owner,
            created_at=self._clock(),
            title=title,
            guild_id=guild_id,
        )

    def _resource_for(self, name: str, mime: str, digest: str, size: int, origin: Origin) -> Resource:
        return Resource(
            name=name,
            kind=kind_of_mime(mime),
            mime=mime,
            sha256=digest,
            size=size,
            path=self._blobs.path(digest),
            id=_new_id(),
            origin=origin,
        )

    def _resource(self, row: Row[Any]) -> Resource:
        return Resource(
            name=row.name,
            kind=row.kind,
            mime=row.mime,
            sha256=row.sha256,
            size=row.size,
            path=self._blobs.path(row.sha256),
            id=row.id,
            origin=Origin(row.origin, row.run_id, row.task_id),
        )

    def _add_resource_row(
        self,
        conn: Connection,
        *,
        conversation_id: str,
        resource: Resource,
        generation: str,
        message_id: str | None,
    ) -> None:
        _lock_conversation(conn, conversation_id)
        _hold_blob(conn, resource.sha256, generation)
        seq = _next_seq(conn, resources, conversation_id)
        try:
            _insert_resource(conn, conversation_id, resource, seq, message_id, self._clock())
        except IntegrityError as err:
            raise _resource_conflict(err, resource.name) from err

    def _insert_run(
        self, conn: Connection, run_id: str, conversation_id: str, request_message_id: str | None
    ) -> None:
        """Insert a running run; the conversation is locked. ``TurnBusyError`` if one is running already."""
        _check_idle(conn, conversation_id)
        now = self._clock()
        seq = _next_seq(conn, runs, conversation_id)
        conn.execute(
            runs.insert(),
            {
                "id": run_id,
                "conversation_id": conversation_id,
                "seq": seq,
                "request_message_id": request_message_id,
                "status": "running",
                "created_at": now,
                "updated_at": now,
                "session": self._id,
            },
        )
        _add_transition(conn, run_id, "running", now)

    def _begin_turn(
        self,
        conn: Connection,
        conversation_id: str,
        text: str,
        uploads: Sequence[NewUpload],
        stored: list[tuple[str, str]],
        author: str | None,
        platform_message_id: str | None,
        history_limit: int | None,
    ) -> Turn:
        _lock_conversation(conn, conversation_id)
        _check_idle(conn, conversation_id)
        message = Message(
            _new_id(), conversation_id, "user", text, author, platform_message_id, self._clock(), None
        )
        seq = _insert_message(conn, message)
        history = _history(conn, conversation_id, history_limit, before=seq)
        attached: list[Resource] = []
        numbers: dict[str, int] = {}
        for upload, (digest, generation) in zip(uploads, stored, strict=True):
            _hold_blob(conn, digest, generation)
            prefix = name_prefix(upload.kind)
            if prefix not in numbers:
                numbers[prefix] = _uploads_named(conn, conversation_id, prefix)
            numbers[prefix] += 1
            name = f"{prefix}-{numbers[prefix]}{extension_for(upload.mime)}"
            resource = self._resource_for(name, upload.mime, digest, len(upload.data), Origin("upload"))
            resource_seq = _next_seq(conn, resources, conversation_id)
            try:
                _insert_resource(conn, conversation_id, resource, resource_seq, message.id, self._clock())
            except IntegrityError as err:
                raise _resource_conflict(err, name) from err
            attached.append(resource)
        run_id = _new_id()
        self._insert_run(conn, run_id, conversation_id, message.id)
        turn = _user_turns(conn, conversation_id)
        every = [self._resource(row) for row in _resources_of(conn, conversation_id)]
        return Turn(message, run_id, turn, attached, [_message(r) for r in history], every)


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


# Statements shared by the steps above. Each takes the step's connection.


def _usage_query(since: float, user: str | None, guild_id: str | None, *, by_user: bool) -> Any:
    """Runs since ``since`` with their requester, tokens and the seconds their tasks took."""
    seconds = (
        select(tasks.c.run_id, func.sum(tasks.c.seconds).label("seconds")).group_by(tasks.c.run_id).subquery()
    )
    source = runs.join(messages, runs.c.request_message_id == messages.c.id).outerjoin(
        seconds, seconds.c.run_id == runs.c.id
    )
    where = [runs.c.created_at >= since, messages.c.author.is_not(None)]
    if user is not None:
        where.append(messages.c.author == user)
    if guild_id is not None:
        source = source.join(conversations, conversations.c.id == runs.c.conversation_id)
        where.append(conversations.c.guild_id == guild_id)
    tokens = func.sum(runs.c.prompt_tokens + runs.c.completion_tokens)
    columns = [
        func.count(runs.c.id).label("runs"),
        tokens.label("tokens"),
        func.sum(seconds.c.seconds).label("seconds"),
    ]
    if not by_user:
        return select(*columns).select_from(source).where(*where)
    return (
        select(messages.c.author.label("user"), *columns)
        .select_from(source)
        .where(*where)
        .group_by(messages.c.author)
        .order_by(tokens.desc(), func.count(runs.c.id).desc(), messages.c.author)
    )


def _first(conn: Connection, query: Any) -> Row[Any] | None:
    return (conn.execute(query)).first()


def _scalar(conn: Connection, query: Any) -> Any:
    return (conn.execute(query)).scalar_one()


def _scalars(conn: Connection, query: Any) -> list[Any]:
    return list((conn.execute(query)).scalars())


# The statements every run makes, built once: SQLAlchemy builds and checks a statement on each construction.
_LOCK_CONVERSATION = (
    select(conversations.c.id).where(conversations.c.id == bindparam("cid")).with_for_update(key_share=True)
)
_HOLD_BLOB = (
    select(blobs.c.sha256)
    .where(blobs.c.sha256 == bindparam("digest"), blobs.c.generation == bindparam("generation"))
    .with_for_update(read=True, key_share=True)
)
_NEXT_SEQ = {
    table.name: select(func.coalesce(func.max(table.c.seq), 0) + 1).where(parent == bindparam("parent"))
    for table, parent in (
        (messages, messages.c.conversation_id),
        (runs, runs.c.conversation_id),
        (resources, resources.c.conversation_id),
        (run_transitions, run_transitions.c.run_id),
    )
}
_UPDATE_RUN = update(runs).where(runs.c.id == bindparam("run_key"))
_RUNNING = select(runs.c.id).where(runs.c.conversation_id == bindparam("cid"), runs.c.status == "running")
_NO_END = 2**31 - 1  # "before" no position: the largest `seq` (a 32-bit INTEGER on PostgreSQL)
_IN_CONVERSATION = select(messages).where(
    messages.c.conversation_id == bindparam("cid"), messages.c.seq < bindparam("before")
)
_MESSAGES = _IN_CONVERSATION.order_by(messages.c.seq)
_LAST_MESSAGES = _IN_CONVERSATION.order_by(messages.c.seq.desc()).limit(bindparam("limit", type_=Integer))
_USER_TURNS = select(func.count()).where(
    messages.c.conversation_id == bindparam("cid"), messages.c.role == "user"
)
_RESOURCES = (
    select(resources).where(resources.c.conversation_id == bindparam("cid")).order_by(resources.c.seq)
)
_UPLOADS_NAMED = select(func.count()).where(
    resources.c.conversation_id == bindparam("cid"),
    resources.c.origin == "upload",
    func.substr(resources.c.name, 1, bindparam("length", type_=Integer)) == bindparam("head"),
)


def _lock_conversation(conn: Connection, conversation_id: str) -> None:
    """Lock the conversation's row for this transaction (PostgreSQL; SQLite's write lock covers it), so the
    numbering below is atomic and a concurrent delete waits; ``NotFoundError`` if it does not exist."""
    if conn.execute(_LOCK_CONVERSATION, {"cid": conversation_id}).first() is None:
        raise NotFoundError(f"conversation {conversation_id} does not exist (it may have been reset)")


def _hold_blob(conn: Connection, digest: str, generation: str) -> None:
    """Key-share lock on the blob row a resource is about to refer to; ``_BlobGone`` if the row is gone, or
    is not the one this process refreshed before storing the content (removed, then made again by a sweep
    that found the content listed, or by another adder: the content may have been deleted in between)."""
    if conn.execute(_HOLD_BLOB, {"digest": digest, "generation": generation}).first() is None:
        raise _BlobGone(digest)


def _next_seq(conn: Connection, table: Table, parent_id: str) -> int:
    """The next position in the parent (conversation or run); the parent's row is locked by the caller."""
    return int(conn.execute(_NEXT_SEQ[table.name], {"parent": parent_id}).scalar_one())


def _insert_message(conn: Connection, message: Message) -> int:
    seq = _next_seq(conn, messages, message.conversation_id)
    conn.execute(
        messages.insert(),
        {
            "id": message.id,
            "conversation_id": message.conversation_id,
            "seq": seq,
            "role": message.role,
            "text": message.text,
            "author": message.author,
            "platform_message_id": message.platform_message_id,
            "created_at": message.created_at,
            "run_id": message.run_id,
        },
    )
    return seq


def _insert_resource(
    conn: Connection,
    conversation_id: str,
    resource: Resource,
    seq: int,
    message_id: str | None,
    now: float,
) -> None:
    conn.execute(
        resources.insert(),
        {
            "id": resource.id,
            "conversation_id": conversation_id,
            "seq": seq,
            "name": resource.name,
            "kind": resource.kind,
            "mime": resource.mime,
            "size": resource.size,
            "sha256": resource.sha256,
            "origin": resource.origin.source,
            "run_id": resource.origin.run_id,
            "task_id": resource.origin.task_id,
            "message_id": message_id,
            "created_at": now,
        },
    )


def _resource_conflict(err: IntegrityError, name: str) -> StorageError:
    if "unique" in str(err.orig).lower():
        return ConflictError(f"a file named {name} already exists in this conversation")
    return NotFoundError(f"the run or message that {name} belongs to does not exist")


def _check_idle(conn: Connection, conversation_id: str) -> None:
    """``TurnBusyError`` if a run of the conversation is running (the conversation is locked)."""
    busy = conn.execute(_RUNNING, {"cid": conversation_id}).first()
    if busy is not None:
        raise TurnBusyError(conversation_id, busy.id)


def _history(
    conn: Connection, conversation_id: str, limit: int | None, *, before: int | None
) -> list[Row[Any]]:
    """The conversation's messages (before position ``before``), the last ``limit`` of them, oldest first."""
    params = {"cid": conversation_id, "before": before if before is not None else _NO_END}
    if limit is None:
        return list(conn.execute(_MESSAGES, params).all())
    return list(conn.execute(_LAST_MESSAGES, {**params, "limit": max(limit, 0)}).all())[::-1]


def _user_turns(conn: Connection, conversation_id: str) -> int:
    return int(conn.execute(_USER_TURNS, {"cid": conversation_id}).scalar_one())


def _resources_of(conn: Connection, conversation_id: str) -> list[Row[Any]]:
    return list(conn.execute(_RESOURCES, {"cid": conversation_id}).all())


def _uploads_named(conn: Connection, conversation_id: str, prefix: str) -> int:
    """How many uploads of the conversation are named ``{prefix}-…``."""
    head = f"{prefix}-"
    return int(
        conn.execute(_UPLOADS_NAMED, {"cid": conversation_id, "head": head, "length": len(head)}).scalar_one()
    )


def _update_run(conn: Connection, run_id: str, values: dict[str, Any]) -> None:
    """Update one run; ``NotFoundError`` if there is no such run."""
    result = conn.execute(_UPDATE_RUN, {"run_key": run_id, **values})
    if result.rowcount == 0:
        raise NotFoundError(f"run {run_id} does not exist")


def _add_transition(conn: Connection, run_id: str, status: str, at: float) -> None:
    """Append to the run's transitions; the run's row is locked by the change that goes with it."""
    seq = _next_seq(conn, run_transitions, run_id)
    conn.execute(run_transitions.insert(), {"run_id": run_id, "seq": seq, "status": status, "at": at})


def _interrupt(conn: Connection, run_id: str, error: str, now: float) -> int:
    result = conn.execute(
        update(runs)
        .where(runs.c.id == run_id, runs.c.status == "running")
        .values(status="interrupted", error=error, updated_at=now, reported=0)
    )
    if result.rowcount == 0:
        return 0
    _add_transition(conn, run_id, "interrupted", now)
    return 1


def _liveness_rows(conn: Connection) -> tuple[float, list[Any], list[Any]]:
    """The database's time, every process row, and every running run with its owner."""
    now = float((conn.execute(select(db_now()))).scalar_one())
    owners = list((conn.execute(select(processes))).all())
    running = list((conn.execute(select(runs.c.id, runs.c.session).where(runs.c.status == "running"))).all())
    return now, owners, running


def _load_runs(conn: Connection, where: ColumnElement[bool]) -> list[Run]:
    """Runs matching ``where``, with their transitions and tasks, oldest first."""
    order = (runs.c.created_at, runs.c.conversation_id, runs.c.seq)
    rows = list((conn.execute(select(runs).where(where).order_by(*order))).all())
    if not rows:
        return []
    selected = select(runs.c.id).where(where)
    transitions: dict[str, list[tuple[str, float]]] = {}
    query = (
        select(run_transitions)
        .where(run_transitions.c.run_id.in_(selected))
        .order_by(run_transitions.c.run_id, run_transitions.c.seq)
    )
    for row in (conn.execute(query)).all():
        transitions.setdefault(row.run_id, []).append((row.status, row.at))
    found: dict[str, list[TaskRecord]] = {}
    for row in (
        conn.execute(select(tasks).where(tasks.c.run_id.in_(selected)).order_by(tasks.c.task_id))
    ).all():
        found.setdefault(row.run_id, []).append(_task(row))
    return [_run(row, transitions.get(row.id, []), found.get(row.id, [])) for row in rows]


def _row(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "platform": conversation.platform,
        "external_id": conversation.external_id,
        "owner": conversation.owner,
        "title": conversation.title,
        "created_at": conversation.created_at,
        "guild_id": conversation.guild_id,
    }


def _conversation(row: Row[Any]) -> Conversation:
    return Conversation(
        row.id, row.platform, row.external_id, row.owner, row.created_at, row.title, row.guild_id
    )


def _message(row: Row[Any]) -> Message:
    return Message(
        row.id,
        row.conversation_id,
        row.role,
        row.text,
        row.author,
        row.platform_message_id,
        row.created_at,
        row.run_id,
    )


def _task(row: Row[Any]) -> TaskRecord:
    return TaskRecord(
        row.run_id,
        row.task_id,
        row.task,
        row.model,
        row.status,
        row.seconds,
        json.loads(row.output),
        row.error,
    )


def _run(row: Row[Any], transitions: list[tuple[str, float]], found: list[TaskRecord]) -> Run:
    return Run(
        id=row.id,
        conversation_id=row.conversation_id,
        request_message_id=row.request_message_id,
        status=row.status,
        plan=_json_or_none(row.plan),
        choices=_json_or_none(row.choices),
        answer=row.answer,
        error=row.error,
        llm_calls=row.llm_calls,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        seconds=row.seconds,
        created_at=row.created_at,
        updated_at=row.updated_at,
        transitions=transitions,
        tasks=found,
        reported=bool(row.reported),
    )


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _new_id() -> str:
    """12 lowercase letters and digits: URL-safe, easy to type, and never mistaken for a CLI option."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
