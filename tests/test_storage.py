"""Storage on real SQLite files: round trips, migrations, restarts, deletion, failures and concurrency."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import storage.sqlite
from agent.resources import Origin, Resource
from storage import (
    ConflictError,
    Conversation,
    Message,
    NotFoundError,
    Storage,
    StorageError,
    TaskRecord,
    schema,
)
from storage.files import FileStore


class Clock:
    """A clock that ticks one second per reading, so every timestamp is predictable."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def store(data_dir: Path) -> AsyncIterator[Storage]:
    async with await Storage.open(data_dir, clock=Clock()) as opened:
        yield opened


def stored_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "files").rglob("*") if p.is_file())


def raw(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(data_dir / "hugginggpt.db")


async def test_open_creates_a_versioned_wal_database(data_dir: Path) -> None:
    async with await Storage.open(data_dir) as opened:
        assert opened.path == data_dir / "hugginggpt.db"
        assert opened.data_dir == data_dir
        assert await opened.ping()
    db = raw(data_dir)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION == 2
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


async def test_run_round_trip(data_dir: Path) -> None:
    async with await Storage.open(data_dir, clock=Clock()) as store:
        conv = await store.create_conversation("discord")
        msg = await store.add_message(conv.id, "user", "caption this")  # t=1002
        run_id = await store.start_run(conv.id, msg.id)  # t=1003
        plan = [{"id": 1, "task": "image-to-text", "dep": [-1], "args": {"image": "img-1.png"}}]
        choices = {"1": {"model": "nlpconnect/vit-gpt2", "reason": "popular"}}
        await store.set_plan(run_id, plan, choices)  # t=1004
        await store.record_task(
            run_id,
            1,
            task="image-to-text",
            model="a/b",
            status="failed",
            seconds=0.5,
            output=None,
            error="503",
        )
        await store.record_task(
            run_id,
            1,
            task="image-to-text",
            model="c/d",
            status="ok",
            seconds=1.25,
            output={"text": "a cat"},
            error=None,
        )
        await store.record_task(
            run_id, 2, task="tts", model=None, status="skipped", seconds=0.0, output=None, error=None
        )
        running = await store.get_run(run_id)
        assert running is not None and running.status == "running" and running.answer is None
        await store.finish_run(
            run_id,
            "partial",
            answer="A cat.",
            error=None,
            llm_calls=3,
            prompt_tokens=120,
            completion_tokens=45,
            seconds=2.5,
        )
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
            await store.record_task(
                "nope", 1, task="t", model=None, status="ok", seconds=0, output=None, error=None
            )
        with pytest.raises(NotFoundError):
            await store.finish_run(
                "nope",
                "ok",
                answer="",
                error=None,
                llm_calls=0,
                prompt_tokens=0,
                completion_tokens=0,
                seconds=0,
            )
        with pytest.raises(ValueError):
            await store.finish_run(
                second,
                "running",
                answer="",
                error=None,
                llm_calls=0,
                prompt_tokens=0,
                completion_tokens=0,
                seconds=0,
            )
        with pytest.raises(NotFoundError):
            await store.start_run("gone", None)

    async with await Storage.open(data_dir) as reopened:  # everything above was committed
        assert await reopened.get_run(run_id) == run


async def test_mark_interrupted_and_reporting(store: Storage) -> None:
    conv = await store.create_conversation("discord")
    cancelled = await store.start_run(conv.id, None)
    done = await store.start_run(conv.id, None)
    await store.finish_run(
        done, "ok", answer="hi", error=None, llm_calls=1, prompt_tokens=1, completion_tokens=1, seconds=1
    )
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


async def test_restart_marks_running_runs_interrupted(data_dir: Path) -> None:
    async with await Storage.open(data_dir, clock=Clock(1000)) as first:
        conv = await first.create_conversation("discord")
        left = await first.start_run(conv.id, None)
        done = await first.start_run(conv.id, None)
        await first.finish_run(
            done, "ok", answer="x", error=None, llm_calls=0, prompt_tokens=0, completion_tokens=0, seconds=0
        )
    async with await Storage.open(data_dir, clock=Clock(5000)) as second:
        run = await second.get_run(left)
        assert run is not None
        assert run.status == "interrupted" and run.error
        assert run.transitions == [("running", 1002.0), ("interrupted", 5001.0)]
        finished = await second.get_run(done)
        assert finished is not None and finished.status == "ok"
        assert [r.id for r in await second.unreported_interrupted_runs()] == [left]


async def test_a_second_process_does_not_interrupt_live_runs(data_dir: Path) -> None:
    """A CLI opening the bot's data directory must leave the bot's running requests alone."""
    bot = await Storage.open(data_dir)
    conv = await bot.create_conversation("discord")
    run_id = await bot.start_run(conv.id, None)
    async with await Storage.open(data_dir) as cli:
        run = await cli.get_run(run_id)
        assert run is not None and run.status == "running"
    await bot.close()
    async with await Storage.open(data_dir) as later:
        run = await later.get_run(run_id)
        assert run is not None and run.status == "interrupted"


async def test_delete_conversation_removes_rows_and_unshared_files(store: Storage, data_dir: Path) -> None:
    a = await store.create_conversation("discord", external_id="a")
    b = await store.create_conversation("discord", external_id="b")
    msg = await store.add_message(a.id, "user", "hi")
    run_id = await store.start_run(a.id, msg.id)
    await store.add_message(a.id, "assistant", "hello", run_id=run_id)
    await store.record_task(run_id, 1, task="t", model=None, status="ok", seconds=0, output=None, error=None)
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
    db = raw(data_dir)
    counts = {
        t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "tasks", "run_transitions")
    }
    db.close()
    assert counts == {"runs": 0, "tasks": 0, "run_transitions": 0}  # cascaded, nothing orphaned

    await store.delete_conversation(b.id)
    await store.delete_conversation(b.id)  # a second /reset is harmless
    assert stored_files(data_dir) == []
    # The name is free again: a new conversation for the same thread can start over.
    await store.create_conversation("discord", external_id="a")


V1_PICTURE = b"v1 picture"


def make_v1_database(data_dir: Path) -> None:
    """A database as the first release left it: migration 1 only, with a finished and a running run."""
    data_dir.mkdir(parents=True)
    files = FileStore(data_dir / "files")
    digest, _ = files.put(V1_PICTURE)
    db = raw(data_dir)
    for statement in schema.MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
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
        INSERT INTO resources VALUES ('f1', 'c1', 'out-1-1.png', 'image', 'image/png', 10, '{digest}', 'task',
                                      'r1', 1, NULL, 15.0);
        """
    )
    db.close()


async def test_orphan_and_temp_files_are_swept_once_old_and_never_a_referenced_or_young_one(
    data_dir: Path,
) -> None:
    day = storage.sqlite.ORPHAN_GRACE_SECONDS
    async with await Storage.open(data_dir) as opened:
        conversation = await opened.create_conversation("cli")
        kept = await opened.add_resource(
            conversation.id, b"kept", name="img-1.png", mime="image/png", origin=Origin("upload")
        )
    files = FileStore(data_dir / "files")
    # What a kill -9 leaves: a file whose row was never written, and a half-written temp file.
    orphan, _ = files.put(b"orphan")
    young, _ = files.put(b"young orphan")
    temp = files.path_for(orphan).parent / f".{orphan[:16]}.x.tmp"
    temp.write_bytes(b"half")
    long_ago = time.time() - day - 60
    for path in (files.path_for(orphan), temp, kept.path):
        assert path is not None
        os.utime(path, (long_ago, long_ago))

    async with await Storage.open(data_dir):  # swept on the first open, a moment ago: not again
        pass
    assert files.path_for(orphan).exists() and temp.exists()

    marker = data_dir / "last-file-sweep"
    os.utime(marker, (long_ago, long_ago))
    async with await Storage.open(data_dir) as reopened:  # a day later, the open sweeps
        assert await reopened.read_resource(kept) == b"kept"
        assert await reopened.sweep_orphan_files() == 0  # nothing left to take
    assert not files.path_for(orphan).exists() and not temp.exists()
    assert files.path_for(young).exists()
    assert time.time() - marker.stat().st_mtime < 60  # and marks when it did


async def test_storing_content_that_is_already_there_makes_it_young_again(data_dir: Path) -> None:
    """A process that finds the bytes stored already is about to write a row for them: no sweep may take
    the file in between."""
    files = FileStore(data_dir / "files")
    digest, _ = files.put(b"same bytes")
    long_ago = time.time() - storage.sqlite.ORPHAN_GRACE_SECONDS - 60
    os.utime(files.path_for(digest), (long_ago, long_ago))
    assert files.put(b"same bytes") == (digest, False)
    async with await Storage.open(data_dir) as opened:
        assert await opened.sweep_orphan_files() == 0
    assert files.path_for(digest).exists()


async def test_migrates_a_version_1_database_with_data(data_dir: Path) -> None:
    make_v1_database(data_dir)
    async with await Storage.open(data_dir, clock=Clock(100)) as store:
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
    db = raw(data_dir)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
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


async def test_a_failing_migration_changes_nothing(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with await Storage.open(data_dir) as store:
        await store.create_conversation("cli", conversation_id="keep")
    broken = ("CREATE TABLE half_done (x INTEGER)", "ALTER TABLE no_such_table ADD COLUMN y TEXT")
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    monkeypatch.setattr(schema, "VERSION", 3)
    with pytest.raises(StorageError):
        await Storage.open(data_dir)
    db = raw(data_dir)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    db.close()
    monkeypatch.undo()
    async with await Storage.open(data_dir) as store:
        assert await store.get_conversation("keep") is not None


async def test_busy_database_is_retried_then_reported(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.sqlite, "_FIRST_BACKOFF", 0.01)
    async with await Storage.open(data_dir, busy_timeout=0.02) as store:
        conv = await store.create_conversation("cli")
        other = raw(data_dir)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
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
            await store.record_task(
                run_id, 1, task="t", model=None, status="ok", seconds=0, output=turn, error=None
            )
            await store.finish_run(
                run_id,
                "ok",
                answer="a",
                error=None,
                llm_calls=1,
                prompt_tokens=1,
                completion_tokens=1,
                seconds=0,
            )
            await store.add_message(conv.id, "assistant", f"re {turn}", run_id=run_id)

    await asyncio.gather(*(chat(conv) for conv in conversations))
    for conv in conversations:
        texts = [m.text for m in await store.messages(conv.id)]
        assert texts == [t for turn in range(4) for t in (f"{conv.external_id}:{turn}", f"re {turn}")]
        assert [r.tasks[0].output for r in await store.runs(conv.id)] == list(range(4))


async def test_two_connections_on_one_file_write_concurrently(data_dir: Path) -> None:
    async with await Storage.open(data_dir) as one, await Storage.open(data_dir) as two:
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
    db = raw(data_dir)
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 200
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


async def test_a_damaged_database_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "hugginggpt.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="damaged"):
        await Storage.open(tmp_path)
