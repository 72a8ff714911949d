"""The storage contract on both engines (SQLite files, and a throwaway PostgreSQL): round trips, restarts,
deletion, failures and concurrency; and the SQLite-only cases (WAL, its busy lock, damaged files, the
pre-Alembic schema versions)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

import storage.database
import storage.storage
from agent.resources import Origin, Resource
from storage import (
    ConflictError,
    Conversation,
    Message,
    NotFoundError,
    RunEnd,
    Storage,
    StorageConfig,
    StorageError,
    TaskRecord,
    TurnBusyError,
    schema,
)
from storage.files import FileStore
from tests.fakes.legacy_schema import make_legacy_database
from tests.fakes.reliability import database_is_sound, db_rows


class Clock:
    """A clock that ticks one second per reading, so every timestamp is predictable."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def data_dir(storage_config: StorageConfig) -> Path:
    return storage_config.data_dir


@pytest.fixture
async def store(storage_config: StorageConfig) -> AsyncIterator[Storage]:
    async with await Storage.open(storage_config, clock=Clock()) as opened:
        yield opened


@pytest.fixture
def sqlite_dir(tmp_path: Path) -> Path:
    """A data dir for the tests of SQLite itself."""
    return tmp_path / "data"


def stored_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "files").rglob("*") if p.is_file())


def raw(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(data_dir / "hugginggpt.db")


async def test_open_creates_a_versioned_wal_database(sqlite_dir: Path) -> None:
    async with await Storage.open(sqlite_dir) as opened:
        assert opened.path == sqlite_dir / "hugginggpt.db"
        assert opened.data_dir == sqlite_dir
        assert await opened.ping()
        assert opened.describe() == f"sqlite {opened.path}; files in {sqlite_dir / 'files'}"
    db = raw(sqlite_dir)
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(schema.HEAD,)]
    # An older release, which knew only user_version 1 and 2, refuses the file instead of misusing it.
    assert db.execute("PRAGMA user_version").fetchone()[0] == int(schema.HEAD) == 4
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


async def test_ping_is_false_once_closed(store: Storage) -> None:
    await store.close()
    assert not await store.ping()
    with pytest.raises(StorageError, match="closed"):
        await store.messages("any")


async def test_conversation_round_trip(store: Storage) -> None:
    made = await store.create_conversation("discord", external_id="thread-1", owner="alice", title="Cats")
    assert made == Conversation(made.id, "discord", "thread-1", "alice", 1001.0, "Cats")
    assert made.id.isalnum() and made.id.islower() and len(made.id) == 12
    assert await store.get_conversation(made.id) == made
    assert await store.find_conversation("discord", "thread-1") == made
    assert await store.find_conversation("cli", "thread-1") is None
    assert await store.get_conversation("nope") is None

    terminal = await store.create_conversation("cli", conversation_id="mine")
    assert await store.get_conversation("mine") == terminal
    assert terminal.external_id is None and terminal.owner is None and terminal.title is None
    with pytest.raises(ConflictError):
        await store.create_conversation("discord", external_id="thread-1")
    with pytest.raises(ConflictError):
        await store.create_conversation("cli", conversation_id="mine")


async def test_open_conversation_creates_once_and_then_gets(store: Storage) -> None:
    made = await store.open_conversation("cli", conversation_id="c1")
    assert made == Conversation("c1", "cli", None, None, made.created_at, None)
    assert await store.open_conversation("cli", conversation_id="c1") == made
    thread = await store.open_conversation("discord", external_id="t9", owner="bob", title="Dogs")
    assert await store.open_conversation("discord", external_id="t9", owner="eve") == thread
    assert thread.owner == "bob" and await store.find_conversation("discord", "t9") == thread
    fresh = await store.open_conversation("cli")
    assert fresh.id not in ("c1", thread.id) and await store.get_conversation(fresh.id) == fresh
    with pytest.raises(ConflictError, match="another id"):  # the thread belongs to another conversation
        await store.open_conversation("discord", external_id="t9", conversation_id="c2")


async def test_message_round_trip_order_and_limit(store: Storage) -> None:
    conv = await store.create_conversation("discord")
    first = await store.add_message(conv.id, "user", "draw a cat", author="alice", platform_message_id="m1")
    run_id = await store.start_run(conv.id, first.id)
    reply = await store.add_message(
        conv.id, "assistant", "here it is", platform_message_id="m2", run_id=run_id
    )
    third = await store.add_message(conv.id, "user", "now a dog", author="alice")

    assert first == Message(first.id, conv.id, "user", "draw a cat", "alice", "m1", first.created_at, None)
    assert reply.run_id == run_id and reply.author is None
    assert await store.messages(conv.id) == [first, reply, third]
    assert await store.messages(conv.id, limit=2) == [reply, third]
    assert await store.messages(conv.id, limit=0) == []
    assert await store.count_user_turns(conv.id) == 2

    with pytest.raises(ValueError):
        await store.add_message(conv.id, "system", "x")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        await store.add_message("gone", "user", "x")
    with pytest.raises(NotFoundError):
        await store.add_message(conv.id, "assistant", "x", run_id="no-such-run")
    assert len(await store.messages(conv.id)) == 3


async def test_resource_round_trip_and_dedupe(store: Storage, data_dir: Path) -> None:
    a = await store.create_conversation("discord")
    b = await store.create_conversation("discord")
    msg = await store.add_message(a.id, "user", "look", author="alice")
    run_id = await store.start_run(a.id, msg.id)
    png = b"\x89PNG fake image"

    upload = await store.add_resource(
        a.id, png, name="img-1.png", mime="image/png", origin=Origin("upload"), message_id=msg.id
    )
    output = await store.add_resource(
        a.id, b"RIFF wav", name="out-1-2.wav", mime="audio/wav", origin=Origin("task", run_id, 2)
    )
    same_in_b = await store.add_resource(
        b.id, png, name="img-1.png", mime="image/png", origin=Origin("upload")
    )

    digest = hashlib.sha256(png).hexdigest()
    assert upload.sha256 == digest and upload.size == len(png) and upload.kind == "image"
    assert upload.path == data_dir / "files" / digest[:2] / digest
    assert output.kind == "audio" and output.origin == Origin("task", run_id, 2)
    assert await store.resources(a.id) == [upload, output]
    assert await store.resources(b.id) == [same_in_b]
    assert await store.read_resource(upload) == png
    assert await store.read_resource(output) == b"RIFF wav"
    # Identical content is one file, whichever conversation uploaded it.
    assert stored_files(data_dir) == sorted(p for p in (upload.path, output.path) if p)


async def test_duplicate_name_is_refused_and_leaves_no_file(store: Storage, data_dir: Path) -> None:
    conv = await store.create_conversation("cli")
    kept = await store.add_resource(conv.id, b"one", name="a.txt", mime="text/plain", origin=Origin("upload"))
    with pytest.raises(ConflictError, match=r"a\.txt"):
        await store.add_resource(conv.id, b"two", name="a.txt", mime="text/plain", origin=Origin("upload"))
    # Same content as the kept file: its file must survive the failed insert.
    with pytest.raises(ConflictError):
        await store.add_resource(conv.id, b"one", name="a.txt", mime="text/plain", origin=Origin("upload"))
    with pytest.raises(NotFoundError):
        await store.add_resource("gone", b"three", name="b.txt", mime="text/plain", origin=Origin("upload"))
    assert stored_files(data_dir) == [kept.path]
    assert await store.resources(conv.id) == [kept]
    assert db_rows(store.config, "SELECT sha256 FROM blobs") == [(kept.sha256,)]


async def test_next_resource_number_counts_uploads_with_the_prefix(store: Storage) -> None:
    conv = await store.create_conversation("discord")
    assert await store.next_resource_number(conv.id, "img") == 1
    for name in ("img-1.png", "img-2.jpg", "aud-1.wav", "imgx.png"):
        await store.add_resource(conv.id, name.encode(), name=name, mime="image/png", origin=Origin("upload"))
    run_id = await store.start_run(conv.id, None)
    await store.add_resource(
        conv.id, b"o", name="img-9.png", mime="image/png", origin=Origin("task", run_id, 1)
    )
    assert await store.next_resource_number(conv.id, "img") == 3
    assert await store.next_resource_number(conv.id, "aud") == 2
    assert await store.next_resource_number(conv.id, "vid") == 1


async def test_resource_store_adapter(store: Storage) -> None:
    conv = await store.create_conversation("cli")
    run_id = await store.start_run(conv.id, None)
    files = store.resource_store(conv.id)
    made = await files.put(b"hello", name="out-1-1.txt", mime="text/plain", origin=Origin("task", run_id, 1))
    assert await files.read(made) == b"hello"
    assert await store.resources(conv.id) == [made]


async def test_read_resource_detects_missing_and_damaged_files(store: Storage) -> None:
    conv = await store.create_conversation("cli")
    res = await store.add_resource(
        conv.id, b"original", name="a.txt", mime="text/plain", origin=Origin("upload")
    )
    assert res.path is not None
    res.path.write_bytes(b"tampered")
    with pytest.raises(StorageError, match="damaged"):
        await store.read_resource(res)
    res.path.unlink()
    with pytest.raises(StorageError, match="missing"):
        await store.read_resource(res)


async def test_disk_full_while_writing_a_file(
    store: Storage, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv = await store.create_conversation("cli")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="disk is full"):
        await store.add_resource(
            conv.id, b"big" * 1000, name="img-1.png", mime="image/png", origin=Origin("upload")
        )
    monkeypatch.undo()
    assert [p for p in (data_dir / "files").rglob("*") if p.is_file()] == []  # temp file removed too
    assert await store.resources(conv.id) == []
    again = await store.add_resource(
        conv.id, b"big" * 1000, name="img-1.png", mime="image/png", origin=Origin("upload")
    )
    assert await store.read_resource(again) == b"big" * 1000


async def test_run_round_trip(storage_config: StorageConfig) -> None:
    async with await Storage.open(storage_config, clock=Clock()) as store:
        conv = await store.create_conversation("discord")
        msg = await store.add_message(conv.id, "user", "caption this")  # t=1002
        run_id = await store.start_run(conv.id, msg.id)  # t=1003
        plan = [{"id": 1, "task": "image-to-text", "dep": [-1], "args": {"image": "img-1.png"}}]
        choices = {"1": {"model": "nlpconnect/vit-gpt2", "reason": "popular"}}
        await store.set_plan(run_id, plan, choices)  # t=1004
        await store.record_task(TaskRecord(run_id, 1, "image-to-text", "a/b", "failed", 0.5, None, "503"))
        await store.record_task(
            TaskRecord(run_id, 1, "image-to-text", "c/d", "ok", 1.25, {"text": "a cat"}, None)
        )
        await store.record_task(TaskRecord(run_id, 2, "tts", None, "skipped", 0.0, None, None))
        running = await store.get_run(run_id)
        assert running is not None and running.status == "running" and running.answer is None
        await store.finish_run(run_id, RunEnd("partial", "A cat.", None, 3, 120, 45, 2.5))
        run = await store.get_run(run_id)
        assert run is not None
        assert (run.id, run.conversation_id, run.request_message_id) == (run_id, conv.id, msg.id)
        assert (run.status, run.plan, run.choices, run.answer, run.error) == (
            "partial",
            plan,
            choices,
            "A cat.",
            None,
        )
        assert (run.llm_calls, run.prompt_tokens, run.completion_tokens, run.seconds) == (3, 120, 45, 2.5)
        assert run.transitions == [("running", 1003.0), ("partial", run.updated_at)]
        assert run.created_at == 1003.0 and run.updated_at > 1004.0
        assert run.tasks == [
            TaskRecord(run_id, 1, "image-to-text", "c/d", "ok", 1.25, {"text": "a cat"}, None),
            TaskRecord(run_id, 2, "tts", None, "skipped", 0.0, None, None),
        ]
        assert not run.reported
        second = await store.start_run(conv.id, None)
        assert [r.id for r in await store.runs(conv.id)] == [run_id, second]
        assert await store.get_run("nope") is None

        with pytest.raises(NotFoundError):
            await store.set_plan("nope", [], {})
        with pytest.raises(NotFoundError):
            await store.record_task(TaskRecord("nope", 1, "t", None, "ok", 0, None, None))
        with pytest.raises(NotFoundError):
            await store.finish_run("nope", RunEnd("ok", ""))
        with pytest.raises(ValueError):
            await store.finish_run(second, RunEnd("running", ""))
        with pytest.raises(NotFoundError):
            await store.start_run("gone", None)

    async with await Storage.open(storage_config) as reopened:  # everything above was committed
        assert await reopened.get_run(run_id) == run


async def test_one_running_run_per_conversation(store: Storage, storage_config: StorageConfig) -> None:
    conv = await store.create_conversation("cli")
    other = await store.create_conversation("cli")
    first = await store.start_run(conv.id, None)
    with pytest.raises(TurnBusyError) as busy:
        await store.start_run(conv.id, None)
    assert busy.value.run_id == first and "still working on an earlier request" in str(busy.value)
    await store.start_run(other.id, None)  # another conversation is not held up
    # The database itself refuses a second running run, whoever writes it.
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):
        db_rows(
            storage_config,
            "INSERT INTO runs (id, conversation_id, seq, status, created_at, updated_at)"
            " VALUES (?, ?, 9, 'running', 0, 0)",
            ("sneaky", conv.id),
        )
    await store.finish_run(first, RunEnd("ok", "done"))
    assert (await store.start_run(conv.id, None)) != first


async def test_mark_interrupted_and_reporting(store: Storage) -> None:
    conv = await store.create_conversation("discord")
    done = await store.start_run(conv.id, None)
    await store.finish_run(done, RunEnd("ok", "hi", None, 1, 1, 1, 1))
    cancelled = await store.start_run(conv.id, None)
    await store.mark_interrupted(cancelled, "the bot is shutting down")
    await store.mark_interrupted(done, "too late")  # finished runs keep their outcome

    run = await store.get_run(cancelled)
    assert run is not None and run.status == "interrupted" and run.error == "the bot is shutting down"
    assert [status for status, _ in run.transitions] == ["running", "interrupted"]
    finished = await store.get_run(done)
    assert finished is not None and finished.status == "ok" and finished.error is None
    assert [r.id for r in await store.unreported_interrupted_runs()] == [cancelled]
    await store.mark_reported(cancelled)
    assert await store.unreported_interrupted_runs() == []
    reported = await store.get_run(cancelled)
    assert reported is not None and reported.reported


async def test_restart_marks_running_runs_interrupted(storage_config: StorageConfig) -> None:
    async with await Storage.open(storage_config, clock=Clock(1000)) as first:
        conv = await first.create_conversation("discord")
        left = await first.start_run(conv.id, None)
        other = await first.create_conversation("discord")
        done = await first.start_run(other.id, None)
        await first.finish_run(done, RunEnd("ok", "x"))
    async with await Storage.open(storage_config, clock=Clock(5000)) as second:
        run = await second.get_run(left)
        assert run is not None
        assert run.status == "interrupted" and run.error
        assert run.transitions == [("running", 1002.0), ("interrupted", 5001.0)]
        finished = await second.get_run(done)
        assert finished is not None and finished.status == "ok"
        assert [r.id for r in await second.unreported_interrupted_runs()] == [left]


async def test_a_second_process_does_not_interrupt_live_runs(storage_config: StorageConfig) -> None:
    """A CLI opening the bot's storage must leave the bot's running requests alone."""
    bot = await Storage.open(storage_config)
    conv = await bot.create_conversation("discord")
    run_id = await bot.start_run(conv.id, None)
    async with await Storage.open(storage_config) as cli:
        assert await cli.reap() == 0
        run = await cli.get_run(run_id)
        assert run is not None and run.status == "running"
    await bot.close()
    async with await Storage.open(storage_config) as later:
        run = await later.get_run(run_id)
        assert run is not None and run.status == "interrupted"


async def test_delete_conversation_removes_rows_and_unshared_files(store: Storage, data_dir: Path) -> None:
    a = await store.create_conversation("discord", external_id="a")
    b = await store.create_conversation("discord", external_id="b")
    msg = await store.add_message(a.id, "user", "hi")
    run_id = await store.start_run(a.id, msg.id)
    await store.add_message(a.id, "assistant", "hello", run_id=run_id)
    await store.record_task(TaskRecord(run_id, 1, "t", None, "ok", 0, None, None))
    shared = await store.add_resource(
        a.id, b"shared", name="img-1.png", mime="image/png", origin=Origin("upload")
    )
    own = await store.add_resource(
        a.id, b"own", name="out-1-1.png", mime="image/png", origin=Origin("task", run_id, 1)
    )
    await store.add_resource(a.id, b"shared", name="img-2.png", mime="image/png", origin=Origin("upload"))
    in_b = await store.add_resource(
        b.id, b"shared", name="img-1.png", mime="image/png", origin=Origin("upload")
    )
    b_msg = await store.add_message(b.id, "user", "keep me")

    await store.delete_conversation(a.id)
    assert await store.get_conversation(a.id) is None
    assert await store.find_conversation("discord", "a") is None
    assert await store.messages(a.id) == []
    assert await store.resources(a.id) == []
    assert await store.runs(a.id) == [] and await store.get_run(run_id) is None
    assert own.path is not None and not own.path.exists()
    assert stored_files(data_dir) == [shared.path]
    assert await store.messages(b.id) == [b_msg]
    assert await store.read_resource(in_b) == b"shared"
    counts = {
        t: db_rows(store.config, f"SELECT count(*) FROM {t}")[0][0]
        for t in ("runs", "tasks", "run_transitions", "blobs")
    }
    assert counts == {"runs": 0, "tasks": 0, "run_transitions": 0, "blobs": 1}  # cascaded, nothing orphaned

    await store.delete_conversation(b.id)
    await store.delete_conversation(b.id)  # a second /reset is harmless
    assert stored_files(data_dir) == []
    assert db_rows(store.config, "SELECT count(*) FROM blobs") == [(0,)]
    # The name is free again: a new conversation for the same thread can start over.
    await store.create_conversation("discord", external_id="a")


V1_PICTURE = b"v1 picture"


def make_v1_database(data_dir: Path) -> None:
    """A database as the first release left it: migration 1 only, with a finished and a running run."""
    path = FileStore(data_dir / "files").path(hashlib.sha256(V1_PICTURE).hexdigest())
    path.parent.mkdir(parents=True)
    path.write_bytes(V1_PICTURE)
    db = make_legacy_database(data_dir / "hugginggpt.db", 1)
    db.executescript(
        f"""
        INSERT INTO conversations VALUES ('c1', 'discord', 'thread-9', 'bob', 'Old', 10.0);
        INSERT INTO messages VALUES ('m1', 'c1', 'user', 'draw', 'bob', 'p1', 11.0, NULL);
        INSERT INTO runs (id, conversation_id, request_message_id, status, plan, choices, answer, error,
                          llm_calls, prompt_tokens, completion_tokens, seconds, created_at, updated_at)
            VALUES ('r1', 'c1', 'm1', 'ok', '[{{"id": 1}}]', '{{}}', 'done', NULL, 2, 20, 5, 3.0, 12.0, 15.0),
                   ('r2', 'c1', NULL, 'running', NULL, NULL, NULL, NULL, 0, 0, 0, NULL, 16.0, 16.0);
        INSERT INTO messages VALUES ('m2', 'c1', 'assistant', 'here', NULL, 'p2', 15.0, 'r1');
        INSERT INTO tasks VALUES ('r1', 1, 'text-to-image', 'x/y', 'ok', 2.5, '{{"files": ["out-1-1.png"]}}', NULL);
        INSERT INTO resources VALUES ('f1', 'c1', 'out-1-1.png', 'image', 'image/png', 10, '{path.name}', 'task',
                                      'r1', 1, NULL, 15.0);
        """
    )
    db.close()


def write_content(files: FileStore, data: bytes) -> str:
    """What a process killed before its row leaves: a complete content and no row for it."""
    digest = hashlib.sha256(data).hexdigest()
    files.path(digest).parent.mkdir(parents=True, exist_ok=True)
    files.path(digest).write_bytes(data)
    return digest


async def test_orphan_and_temp_files_are_swept_once_old_and_never_a_referenced_or_young_one(
    storage_config: StorageConfig,
) -> None:
    day = storage.storage.ORPHAN_GRACE_SECONDS
    async with await Storage.open(storage_config) as opened:
        conversation = await opened.create_conversation("cli")
        kept = await opened.add_resource(
            conversation.id, b"kept", name="img-1.png", mime="image/png", origin=Origin("upload")
        )
    files = FileStore(storage_config.data_dir / "files")
    orphan = write_content(files, b"orphan")
    young = write_content(files, b"young orphan")
    temp = files.path(orphan).parent / f".{orphan[:16]}.x.tmp"  # a write cut short
    temp.write_bytes(b"half")
    long_ago = time.time() - day - 60
    for path in (files.path(orphan), temp, kept.path):
        assert path is not None
        os.utime(path, (long_ago, long_ago))
    db_rows(storage_config, "UPDATE blobs SET touched_at = ?", (long_ago,))  # the kept one is old too

    async with await Storage.open(storage_config):  # swept on the first open, a moment ago: not again
        pass
    assert files.path(orphan).exists() and temp.exists()

    db_rows(storage_config, "UPDATE maintenance SET at = ?", (long_ago,))
    async with await Storage.open(storage_config) as reopened:  # a day later, the open sweeps
        assert await reopened.read_resource(kept) == b"kept"
        assert await reopened.sweep_orphan_files() == 0  # nothing left to take
    assert not files.path(orphan).exists() and not temp.exists()
    assert files.path(young).exists()  # found, dated by its file time: kept until it is a day old
    blob_rows = sorted(d for (d,) in db_rows(storage_config, "SELECT sha256 FROM blobs"))
    assert blob_rows == sorted([kept.sha256, young])
    ((marked,),) = db_rows(storage_config, "SELECT at FROM maintenance")
    assert time.time() - marked < 60  # and marks when it did


async def test_storing_content_that_is_already_there_makes_it_young_again(
    storage_config: StorageConfig,
) -> None:
    """A process that finds the bytes stored already is about to write a row for them: no sweep may take
    them in between."""
    async with await Storage.open(storage_config) as opened:
        conversation = await opened.create_conversation("cli")
        kept = await opened.add_resource(
            conversation.id, b"same bytes", name="a.txt", mime="text/plain", origin=Origin("upload")
        )
        long_ago = time.time() - storage.storage.ORPHAN_GRACE_SECONDS - 60
        db_rows(storage_config, "UPDATE blobs SET touched_at = ?", (long_ago,))
        db_rows(storage_config, "DELETE FROM resources")  # unreferenced and a day old: a sweep would take it
        digest, _ = await opened._put_blob(b"same bytes", "a.txt")  # about to be referenced again
        assert digest == kept.sha256
        assert await opened.sweep_orphan_files() == 0
        assert kept.path is not None and kept.path.exists()
        db_rows(storage_config, "UPDATE blobs SET touched_at = ?", (long_ago,))
        assert await opened.sweep_orphan_files() == 1  # the same content, not refreshed, does go
        assert not kept.path.exists()


async def test_migrates_a_version_1_database_with_data(sqlite_dir: Path) -> None:
    make_v1_database(sqlite_dir)
    async with await Storage.open(sqlite_dir, clock=Clock(100)) as store:
        conv = await store.find_conversation("discord", "thread-9")
        assert conv == Conversation("c1", "discord", "thread-9", "bob", 10.0, "Old")
        assert [(m.id, m.run_id) for m in await store.messages("c1")] == [("m1", None), ("m2", "r1")]
        (picture,) = await store.resources("c1")
        assert picture.origin == Origin("task", "r1", 1)
        assert await store.read_resource(picture) == V1_PICTURE

        old = await store.get_run("r1")
        assert old is not None
        assert old.transitions == [("running", 12.0), ("ok", 15.0)]  # back-filled
        assert old.reported and old.plan == [{"id": 1}] and old.tasks[0].output == {"files": ["out-1-1.png"]}
        stuck = await store.get_run("r2")
        assert stuck is not None
        assert stuck.status == "interrupted" and stuck.transitions == [
            ("running", 16.0),
            ("interrupted", 101.0),
        ]
        assert [r.id for r in await store.unreported_interrupted_runs()] == ["r2"]

        # The new schema works on the old rows.
        await store.add_message("c1", "user", "again")
        new_run = await store.start_run("c1", None)
        assert (await store.get_run(new_run)) is not None
    db = raw(sqlite_dir)
    assert db.execute("PRAGMA user_version").fetchone()[0] == int(schema.HEAD)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()


async def test_refuses_a_database_from_a_newer_version(tmp_path: Path) -> None:
    data_dir = tmp_path  # an existing directory
    db = raw(data_dir)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StorageError, match="newer"):
        await Storage.open(data_dir)


async def test_refuses_a_database_at_a_newer_revision(storage_config: StorageConfig) -> None:
    async with await Storage.open(storage_config):
        pass
    db_rows(storage_config, "UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(StorageError, match="revision 0099, newer than this program's 0004"):
        await Storage.open(storage_config)


BROKEN_REVISION = """# A revision that fails half-way.
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.execute("CREATE TABLE half_done (x INTEGER)")
    op.execute("ALTER TABLE no_such_table ADD COLUMN y TEXT")
"""


async def test_a_failing_migration_changes_nothing(
    storage_config: StorageConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await Storage.open(storage_config) as store:
        await store.create_conversation("cli", conversation_id="keep")
    scripts = tmp_path / "migrations"
    shutil.copytree(schema.SCRIPTS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "0005_broken.py").write_text(BROKEN_REVISION)
    monkeypatch.setattr(schema, "SCRIPTS", scripts)
    with pytest.raises(StorageError):
        await Storage.open(storage_config)
    assert db_rows(storage_config, "SELECT version_num FROM alembic_version") == [("0004",)]
    tables = (
        "SELECT count(*) FROM sqlite_master WHERE name = 'half_done'"
        if storage_config.engine == "sqlite"
        else "SELECT count(*) FROM pg_tables WHERE tablename = 'half_done'"
    )
    assert db_rows(storage_config, tables) == [(0,)]
    monkeypatch.undo()
    async with await Storage.open(storage_config) as store:
        assert await store.get_conversation("keep") is not None


async def test_busy_database_is_retried_then_reported(
    sqlite_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.database, "FIRST_BACKOFF", 0.01)
    async with await Storage.open(sqlite_dir, busy_timeout=0.02) as store:
        conv = await store.create_conversation("cli")
        other = raw(sqlite_dir)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StorageError, match="the database is busy, try again"):
            await store.add_message(conv.id, "user", "blocked")
        asyncio.get_running_loop().call_later(0.15, other.commit)
        message = await store.add_message(conv.id, "user", "waited")  # succeeds on a retry
        other.close()
        assert await store.messages(conv.id) == [message]


async def test_a_locked_postgresql_row_is_retried_then_reported(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.database, "FIRST_BACKOFF", 0.01)
    config = StorageConfig(tmp_path / "data", database_url=database_url)
    async with await Storage.open(config, busy_timeout=0.02) as store:
        conv = await store.create_conversation("cli")
        other = psycopg.connect(database_url)  # another process holds the conversation's row
        other.execute(b"SELECT * FROM conversations WHERE id = %s FOR UPDATE", (conv.id,))
        with pytest.raises(StorageError, match="the database is busy, try again"):
            await store.add_message(conv.id, "user", "blocked")
        asyncio.get_running_loop().call_later(0.15, other.commit)
        message = await store.add_message(conv.id, "user", "waited")  # succeeds on a retry
        other.close()
        assert await store.messages(conv.id) == [message]


async def test_fifty_conversations_write_concurrently(store: Storage) -> None:
    conversations = await asyncio.gather(
        *(store.create_conversation("discord", external_id=str(i)) for i in range(50))
    )

    async def chat(conv: Conversation) -> None:
        for turn in range(4):
            request = await store.add_message(conv.id, "user", f"{conv.external_id}:{turn}")
            run_id = await store.start_run(conv.id, request.id)
            await store.record_task(TaskRecord(run_id, 1, "t", None, "ok", 0, turn, None))
            await store.finish_run(run_id, RunEnd("ok", "a", None, 1, 1, 1, 0))
            await store.add_message(conv.id, "assistant", f"re {turn}", run_id=run_id)

    await asyncio.gather(*(chat(conv) for conv in conversations))
    for conv in conversations:
        texts = [m.text for m in await store.messages(conv.id)]
        assert texts == [t for turn in range(4) for t in (f"{conv.external_id}:{turn}", f"re {turn}")]
        assert [r.tasks[0].output for r in await store.runs(conv.id)] == list(range(4))


async def test_two_storages_on_one_database_write_concurrently(storage_config: StorageConfig) -> None:
    async with await Storage.open(storage_config) as one, await Storage.open(storage_config) as two:
        conversations = [await one.create_conversation("discord") for _ in range(50)]

        async def chat(index: int, conv: Conversation) -> None:
            for n in range(4):
                writer = one if (index + n) % 2 else two
                await writer.add_message(conv.id, "user", str(n))
                await writer.add_resource(
                    conv.id,
                    f"{index}/{n}".encode(),
                    name=f"img-{n}.png",
                    mime="image/png",
                    origin=Origin("upload"),
                )

        await asyncio.gather(*(chat(i, conv) for i, conv in enumerate(conversations)))
        for i, conv in enumerate(conversations):
            assert [m.text for m in await two.messages(conv.id)] == [str(n) for n in range(4)]
            resources: list[Resource] = await one.resources(conv.id)
            assert [await one.read_resource(r) for r in resources] == [f"{i}/{n}".encode() for n in range(4)]
    assert db_rows(storage_config, "SELECT count(*) FROM messages") == [(200,)]
    database_is_sound(storage_config)


async def test_a_damaged_database_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "hugginggpt.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="damaged"):
        await Storage.open(tmp_path)
