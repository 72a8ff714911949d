"""Storage for the run controls, ``/config`` and ``/usage`` on both engines: the 0004 schema matches the
tables the queries use, cancelled runs, settings per guild and channel, usage counted from stored runs, and
the request a retry repeats."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from agent.resources import Origin
from storage import ChatSettings, RunEnd, Storage, StorageConfig, TaskRecord, Usage
from storage.tables import metadata
from tests.fakes.reliability import db_rows


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
async def store(storage_config: StorageConfig) -> AsyncIterator[Storage]:
    async with await Storage.open(storage_config, clock=Clock()) as opened:
        yield opened


async def test_the_migrated_schema_is_the_one_the_queries_use(storage_config: StorageConfig) -> None:
    async with await Storage.open(storage_config):
        pass
    url = storage_config.database_url or f"sqlite:///{storage_config.sqlite_path}"
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    # Alembic cannot compare CHECK constraints; the cancelled run below shows the new one is in force.
    assert [d for d in differences if d[0] != "remove_table" or d[1].name != "alembic_version"] == []


async def test_a_cancelled_run_keeps_its_tasks_and_lets_the_next_one_start(store: Storage) -> None:
    conversation = await store.create_conversation("cli")
    run_id = await store.start_run(conversation.id, None)
    await store.record_task(TaskRecord(run_id, 1, "summarization", "m", "ok", 1.5, {"text": "x"}, None))
    await store.finish_run(run_id, RunEnd("cancelled", answer="Cancelled", prompt_tokens=3))
    run = await store.get_run(run_id)
    assert run is not None and run.status == "cancelled" and [t.task_id for t in run.tasks] == [1]
    assert [status for status, _ in run.transitions] == ["running", "cancelled"]
    assert await store.unreported_interrupted_runs() == []
    await store.start_run(conversation.id, None)  # the running slot is free again


async def test_settings_are_kept_per_guild_and_channel_and_a_channel_overrides_its_guild(
    store: Storage, storage_config: StorageConfig
) -> None:
    assert await store.chat_settings("g1") == ChatSettings()
    await store.set_chat_settings("g1", None, ChatSettings(llm_model="big", max_tasks=3), by="admin")
    await store.set_chat_settings(
        "g1", "c7", ChatSettings(task_types=("summarization",), mention_required=True), by="admin"
    )
    await store.set_chat_settings("g1", None, ChatSettings(llm_model="small", max_tasks=3), by="admin")
    guild = await store.chat_settings("g1")
    channel = await store.chat_settings("g1", "c7")
    assert guild == ChatSettings(llm_model="small", max_tasks=3)
    assert channel == ChatSettings(task_types=("summarization",), mention_required=True)
    assert channel.over(guild) == ChatSettings(
        llm_model="small", max_tasks=3, task_types=("summarization",), mention_required=True
    )
    assert await store.chat_settings("g2", "c7") == ChatSettings()
    assert db_rows(storage_config, "SELECT count(*) FROM chat_settings") == [(2,)]


async def test_usage_is_counted_per_user_and_guild_from_the_stored_runs(store: Storage) -> None:
    here = await store.create_conversation("discord", external_id="t1", guild_id="g1")
    there = await store.create_conversation("discord", external_id="t2", guild_id="g2")

    async def run(conversation_id: str, user: str, tokens: int, seconds: float) -> None:
        turn = await store.begin_turn(conversation_id, "hi", [], author=user)
        if seconds:
            await store.record_task(TaskRecord(turn.run_id, 1, "t", "m", "ok", seconds, None, None))
        await store.finish_run(turn.run_id, RunEnd("ok", prompt_tokens=tokens, completion_tokens=1))

    await run(here.id, "ann", 10, 2.0)
    await run(here.id, "ann", 20, 0.0)
    await run(here.id, "bob", 100, 1.5)
    await run(there.id, "ann", 1000, 0.0)
    since = 0.0
    assert await store.usage(since, guild_id="g1") == [
        Usage("bob", 1, 101, 1.5),
        Usage("ann", 2, 32, 2.0),
    ]
    assert await store.usage(since, user="ann") == [Usage("ann", 3, 1033, 2.0)]
    assert await store.usage(since, guild_id="g1", limit=1) == [Usage("bob", 1, 101, 1.5)]
    assert await store.usage_total(since, guild_id="g1") == Usage("", 3, 133, 3.5)
    assert await store.usage_total(store._clock() + 10) == Usage("", 0, 0, 0.0)


async def test_the_request_of_a_run_is_its_message_and_the_files_attached_to_it(store: Storage) -> None:
    conversation = await store.create_conversation("cli")
    message = await store.add_message(conversation.id, "user", "describe these", author="ann")
    for name in ("img-1.png", "img-2.png"):
        await store.add_resource(
            conversation.id,
            name.encode(),
            name=name,
            mime="image/png",
            origin=Origin("upload"),
            message_id=message.id,
        )
    run_id = await store.start_run(conversation.id, message.id)
    found = await store.request_of(run_id)
    assert found is not None
    assert found[0].text == "describe these" and found[1] == ["img-1.png", "img-2.png"]
    assert await store.request_of("nope") is None
