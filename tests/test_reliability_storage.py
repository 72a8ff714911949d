"""Faults of the storage in the middle of a run, on both engines: the disk fills up while a task's output is
saved, another process holds the database's lock, a cancellation lands as a transaction begins. The run must
fail cleanly, with no half-written file and no row pointing at nothing, and the next run must work.
Storage-level cases (temp files, busy retries, damaged files, migrations) are in test_storage.py; a full
disk under the database itself in test_storage_disk.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event

import storage.database
from app.conversations import Conversations
from storage import Storage, StorageConfig
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.reliability import (
    Agent,
    agent_on,
    database_is_sound,
    db_rows,
    image_upload,
    plan_json,
    run_turn,
    stage,
    stage_script,
)

MODELS = hf_tasks("text-to-image", "image-to-text")
DRAW = plan_json({"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a red cat"}})
DRAW_AND_DESCRIBE = plan_json(
    {"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a red cat"}},
    {"id": 1, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
)


def stored_files(data_dir: Path) -> set[str]:
    """Every file under the file store, temp files included."""
    return {p.name for p in (data_dir / "files").rglob("*") if p.is_file()}


@pytest.fixture
def disk() -> Iterator[dict[str, bool]]:
    """``disk["full"] = True`` makes every fsync fail with ENOSPC, as a full disk does on a real write."""
    state = {"full": False}
    real = os.fsync

    def fsync(fd: int) -> None:
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    os.fsync = fsync
    try:
        yield state
    finally:
        os.fsync = real


def engine_env(config: StorageConfig) -> dict[str, str]:
    """The settings that put a runtime on ``config``'s database."""
    return {"DATABASE_URL": config.database_url} if config.database_url else {}


async def test_disk_full_while_saving_an_output_fails_the_run_cleanly(
    disk: dict[str, bool], storage_config: StorageConfig
) -> None:
    answers = stage_script([DRAW_AND_DESCRIBE, DRAW], ["Here is your cat."])
    plans = 0

    def script(body: dict[str, Any]) -> Any:
        nonlocal plans
        if stage(body) == "plan":
            plans += 1
            disk["full"] = plans == 1  # the upload is stored; the disk fills up before the models answer
        return answers(body)

    async with agent_on(script, MODELS, storage_config.data_dir, **engine_env(storage_config)) as agent:
        upload = await image_upload()
        turn = await agent.turn("draw a cat and describe my photo", [upload])
        result = turn.result
        assert result.status == "failed"
        assert result.answer.startswith("the disk is full") and "out-1-0.png" in result.answer
        # No other model was asked to redo the work: the store, not the model, failed.
        assert [r.model for r in agent.hf.requests if MODELS[r.model] == "text-to-image"] == [
            result.tasks[0].model
        ]
        # Nothing half-done remains: the upload's file and row only, no temp file, no row for the output.
        assert stored_files(agent.data_dir) == {db_rows(agent.store, "SELECT sha256 FROM resources")[0][0]}
        assert db_rows(agent.store, "SELECT name FROM resources") == [("img-1.png",)]
        ((status, error),) = db_rows(agent.store, "SELECT status, error FROM runs")
        assert (status, error) == ("failed", result.error)
        tasks = dict(db_rows(agent.store, "SELECT task_id, status FROM tasks"))
        assert tasks[0] == "failed"
        # Space is freed: the same conversation goes on.
        again = await agent.turn("draw it again")
        assert again.result.status == "ok"
        assert {f.name for f in again.result.files} == {"out-2-0.png"}
        assert len(stored_files(agent.data_dir)) == 2


class _OnBusyGiveUp(logging.Handler):
    """Calls ``then`` when the storage reports that it gave up waiting for the write lock."""

    def __init__(self, then: Any) -> None:
        super().__init__()
        self.then = then

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("database busy after"):
            self.then()


@pytest.fixture
def quick_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.database, "FIRST_BACKOFF", 0.01)


async def _short_wait_storage(agent: Agent) -> Storage:
    """Swap the runtime's storage for one that waits 50 ms a try for a lock (the default waits 5 s)."""
    config = agent.rt.storage.config
    await agent.rt.storage.close()
    short = await Storage.open(config, busy_timeout=0.05)
    agent.rt.storage = short
    agent.rt.conversations = Conversations(agent.rt.agent, short)
    return short


@pytest.mark.usefixtures("quick_busy")
@pytest.mark.parametrize("released", [True, False], ids=["lock released after the failure", "lock kept"])
async def test_database_locked_mid_run_fails_the_run_cleanly(
    released: bool, storage_config: StorageConfig
) -> None:
    data_dir = storage_config.data_dir
    other: list[Any] = []
    answers = stage_script([DRAW_AND_DESCRIBE], ["Here is your cat."])

    def script(body: dict[str, Any]) -> Any:
        if stage(body) == "plan" and not other:  # another process takes the lock and keeps it
            other.append(lock_runs(storage_config))
        return answers(body)

    def release() -> None:
        if released and other:
            other[0].rollback()

    handler = _OnBusyGiveUp(release)
    logging.getLogger("storage.database").addHandler(handler)
    try:
        async with agent_on(script, MODELS, data_dir, **engine_env(storage_config)) as agent:
            await _short_wait_storage(agent)
            turn = await run_turn(
                agent.rt, agent.conversation, "draw a cat", [await image_upload()], limit=30
            )
            result = turn.result
            assert result.status == "failed"
            assert result.answer == "the database is busy, try again"
            run_id = result.run_id
            other[0].close()
            if released:  # the failure itself was recorded
                assert db_rows(storage_config, "SELECT status, error FROM runs WHERE id = ?", (run_id,)) == [
                    ("failed", "the database is busy, try again")
                ]
    finally:
        logging.getLogger("storage.database").removeHandler(handler)
    # Either way, after a restart nothing is left half-done: the run reads failed or interrupted, never
    # running, no task row or file of it exists, and the database is sound.
    async with await Storage.open(storage_config) as store:
        run = await store.get_run(run_id)
        assert run is not None and run.status == ("failed" if released else "interrupted")
        assert run.tasks == []
        assert [r.name for r in await store.resources(run.conversation_id)] == ["img-1.png"]
        assert len(stored_files(data_dir)) == 1
    database_is_sound(storage_config)


def lock_runs(config: StorageConfig) -> Any:
    """Another process's connection holding what every step of a run needs: SQLite's write lock, or the
    runs table on PostgreSQL. Roll it back to release it."""
    if config.database_url:
        conn = psycopg.connect(config.database_url)
        conn.execute(b"LOCK TABLE runs IN EXCLUSIVE MODE")
        return conn
    db = sqlite3.connect(config.sqlite_path, check_same_thread=False)
    db.execute("BEGIN IMMEDIATE")
    return db


async def test_a_lock_shorter_than_the_wait_is_invisible_to_the_user(storage_config: StorageConfig) -> None:
    answers = stage_script([DRAW_AND_DESCRIBE], ["Here is your cat."])

    def script(body: dict[str, Any]) -> Any:
        if stage(body) == "plan":
            db = lock_runs(storage_config)
            asyncio.get_running_loop().call_later(0.3, lambda: (db.rollback(), db.close()))
        return answers(body)

    async with agent_on(script, MODELS, storage_config.data_dir, **engine_env(storage_config)) as agent:
        turn = await agent.turn("draw a cat", [await image_upload()])
    assert turn.result.status == "ok"


async def test_a_run_cancelled_while_the_database_opens_a_transaction_leaves_it_usable(
    storage_config: StorageConfig,
) -> None:
    """A cancellation (shutdown, a timeout) can land while the database is still starting a transaction
    (SQLite runs BEGIN in its thread; PostgreSQL begins with the first statement); that transaction must
    not stay open, or every later step of every run fails."""
    armed: list[asyncio.Task[Any]] = []

    loop = asyncio.get_running_loop()

    def trap(conn: Any) -> None:  # SQLAlchemy's "begin" event (in SQLite's thread, or the loop's for PostgreSQL)
        if armed:
            loop.call_soon_threadsafe(armed.pop().cancel)  # lands while the transaction begins

    turn: list[asyncio.Task[Any]] = []
    answers = stage_script([DRAW], ["Here is your cat."])

    def script(body: dict[str, Any]) -> Any:
        if stage(body) == "respond" and len(turn) == 1:
            armed.append(turn[0])  # the next storage step of this run is cancelled as it begins
        return answers(body)

    async with agent_on(script, MODELS, storage_config.data_dir, **engine_env(storage_config)) as agent:
        event.listen(agent.rt.storage._db.engine, "begin", trap)
        turn.append(asyncio.create_task(agent.turn("draw a cat")))
        with pytest.raises(asyncio.CancelledError):
            await turn[0]
        assert not armed  # the trap did go off
        again = await agent.turn("draw it again")
        assert again.result.status == "ok"
        statuses = [s for (s,) in db_rows(storage_config, "SELECT status FROM runs ORDER BY created_at")]
    # The agent records its run in a task of its own (so a user can cancel it): cancelling the front end
    # cancels that task, but a storage step already under way completes, and it may have been the last one.
    assert statuses[0] in ("interrupted", "ok") and statuses[1:] == ["ok"]
    database_is_sound(storage_config)
