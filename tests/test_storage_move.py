"""Moving a deployment to PostgreSQL: a real schema-v2 SQLite file with data (built with that release's own
DDL) is adopted in place, then ``hugginggpt storage migrate --to postgresql://…`` copies it whole. Nothing is
lost: every record read back through the API is equal, every file readable; running it again changes
nothing, and a target holding someone else's data or a source still in use is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from storage import Storage, StorageConfig, StorageError, migrate_storage
from storage.files import FileStore
from tests.fakes.legacy_schema import make_legacy_database
from tests.fakes.reliability import db_rows

PICTURES = [b"a cat", b"a dog", b"the cat again, drawn"]


def make_v2_deployment(data_dir: Path) -> None:
    """What the last release before Alembic left: two conversations, files shared between them, a finished
    run with its tasks and transitions, an interrupted run not yet reported, and one left running."""
    files = FileStore(data_dir / "files")
    digests = []
    for picture in PICTURES:
        digest = hashlib.sha256(picture).hexdigest()
        files.path(digest).parent.mkdir(parents=True, exist_ok=True)
        files.path(digest).write_bytes(picture)
        digests.append(digest)
    cat, dog, drawn = digests
    db = make_legacy_database(data_dir / "hugginggpt.db", 2)
    db.executescript(
        f"""
        INSERT INTO conversations VALUES ('c1', 'discord', 'thread-1', 'alice', 'Cats', 10.0),
                                         ('c2', 'cli', NULL, NULL, NULL, 11.0);
        INSERT INTO messages VALUES ('m1', 'c1', 'user', 'draw my cat', 'alice', 'p1', 12.0, NULL);
        INSERT INTO runs (id, conversation_id, request_message_id, status, plan, choices, answer, error, llm_calls,
                          prompt_tokens, completion_tokens, seconds, created_at, updated_at, reported, session)
            VALUES ('r1', 'c1', 'm1', 'ok', '[{{"id": 0, "task": "text-to-image"}}]', '{{"0": {{"model": "x/y"}}}}',
                    'Here.', NULL, 3, 300, 40, 4.5, 13.0, 17.5, 1, 'old-session');
        INSERT INTO messages VALUES ('m2', 'c1', 'assistant', 'Here.', NULL, 'p2', 17.0, 'r1'),
                                    ('m3', 'c1', 'user', 'and a dog', 'alice', 'p3', 20.0, NULL);
        INSERT INTO runs (id, conversation_id, request_message_id, status, error, created_at, updated_at, reported,
                          session)
            VALUES ('r2', 'c1', 'm3', 'interrupted', 'the program stopped', 21.0, 25.0, 0, 'old-session');
        INSERT INTO messages VALUES ('m4', 'c2', 'user', 'describe', NULL, NULL, 30.0, NULL);
        INSERT INTO runs (id, conversation_id, request_message_id, status, created_at, updated_at, session)
            VALUES ('r3', 'c2', 'm4', 'running', 31.0, 31.0, 'dead-session');
        INSERT INTO run_transitions VALUES ('r1', 'running', 13.0), ('r1', 'ok', 17.5),
                                           ('r2', 'running', 21.0), ('r2', 'interrupted', 25.0),
                                           ('r3', 'running', 31.0);
        INSERT INTO tasks VALUES ('r1', 0, 'text-to-image', 'x/y', 'ok', 2.5, '{{"files": ["out-1-0.png"]}}', NULL),
                                 ('r1', 1, 'image-to-text', NULL, 'skipped', 0.0, 'null', 'no model');
        INSERT INTO resources VALUES
            ('f1', 'c1', 'img-1.png', 'image', 'image/png', 5, '{cat}', 'upload', NULL, NULL, 'm1', 12.0),
            ('f2', 'c1', 'out-1-0.png', 'image', 'image/png', 20, '{drawn}', 'task', 'r1', 0, NULL, 16.0),
            ('f3', 'c1', 'img-2.png', 'image', 'image/png', 5, '{dog}', 'upload', NULL, NULL, 'm3', 20.0),
            ('f4', 'c2', 'img-1.png', 'image', 'image/png', 5, '{cat}', 'upload', NULL, NULL, 'm4', 30.0);
        """
    )
    db.close()


async def snapshot(store: Storage, conversation_ids: list[str]) -> dict[str, Any]:
    """Everything the API returns about each conversation, file contents included."""
    found: dict[str, Any] = {}
    for cid in conversation_ids:
        resources = await store.resources(cid)
        found[cid] = {
            "conversation": await store.get_conversation(cid),
            "messages": await store.messages(cid),
            "runs": await store.runs(cid),
            "resources": [(r.name, r.kind, r.mime, r.sha256, r.size, r.id, r.origin) for r in resources],
            "contents": [await store.read_resource(r) for r in resources],
        }
    found["unreported"] = [r.id for r in await store.unreported_interrupted_runs()]
    return found


def test_a_v2_sqlite_deployment_moves_to_postgresql_with_nothing_lost(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"  # HUGGINGGPT_DATA_DIR (conftest)
    make_v2_deployment(data_dir)
    source, target = StorageConfig(data_dir), StorageConfig(data_dir, database_url=database_url)

    assert main(["storage", "migrate", "--to", database_url]) == 0
    out = capsys.readouterr().out
    assert "2 conversations, 4 messages, 3 runs" in out and "contents left in place (same store)" in out
    assert "DATABASE_URL=postgresql://" in out
    tables = ("conversations", "messages", "runs", "run_transitions", "tasks", "resources", "blobs")
    counts = {t: db_rows(source, f"SELECT count(*) FROM {t}") for t in tables}
    assert counts == {t: db_rows(target, f"SELECT count(*) FROM {t}") for t in tables}
    assert counts["run_transitions"] == [(6,)]  # the source's restart interrupted r3: 5 + 1

    async def compare() -> None:
        async with await Storage.open(source) as old, await Storage.open(target) as new:
            before = await snapshot(old, ["c1", "c2"])
            after = await snapshot(new, ["c1", "c2"])
        assert after == before
        assert [m.text for m in before["c1"]["messages"]] == ["draw my cat", "Here.", "and a dog"]
        assert [r.status for r in before["c1"]["runs"]] == ["ok", "interrupted"]
        assert before["c2"]["runs"][0].status == "interrupted"  # its process is long gone
        assert before["c1"]["contents"] == [b"a cat", b"the cat again, drawn", b"a dog"]
        assert sorted(before["unreported"]) == ["r2", "r3"]

    asyncio.run(compare())
    assert main(["storage", "migrate", "--to", database_url]) == 0  # again: nothing new, nothing doubled
    assert counts == {t: db_rows(target, f"SELECT count(*) FROM {t}") for t in tables}


async def test_a_target_with_other_conversations_or_a_source_in_use_is_refused(
    tmp_path: Path, database_url: str
) -> None:
    source = StorageConfig(tmp_path / "data")
    target = StorageConfig(tmp_path / "data", database_url=database_url)
    async with await Storage.open(target) as dst:
        await dst.create_conversation("cli", conversation_id="theirs")
        async with await Storage.open(source) as src:
            await src.create_conversation("cli", conversation_id="ours")
            with pytest.raises(StorageError, match="already holds other conversations"):
                await migrate_storage(src, dst)
            await dst.delete_conversation("theirs")
            async with await Storage.open(source):  # the bot, still running on the source
                with pytest.raises(StorageError, match="stop the bot"):
                    await migrate_storage(src, dst)
            report = await migrate_storage(src, dst)
    assert report.rows["conversations"] == 1
    assert db_rows(target, "SELECT id FROM conversations") == [("ours",)]


def test_the_target_must_be_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["storage", "migrate", "--to", "mysql://db/x"]) == 1
    assert "DATABASE_URL must be a postgresql:// URL" in capsys.readouterr().err
