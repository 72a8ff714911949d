"""Helpers for the fault and abuse suite (``tests/test_reliability_*.py``): a whole agent ``Runtime`` on the
loopback fakes, one user turn run to its end under a time limit, and readers of what a run left behind.

Everything goes through the real clients (``AsyncOpenAI``, ``AsyncInferenceClient``, SQLAlchemy) over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from agent.events import Done, Event, RunResult
from agent.settings import Settings
from agent.uploads import Upload, UploadLimits, check_uploads
from app.runtime import Runtime
from storage import StorageConfig

from .hf_server import FakeHF, png_bytes
from .llm_server import FakeLLMServer, Reply, Script

__all__ = [
    "RUN_LIMIT",
    "Agent",
    "Turn",
    "Watch",
    "agent_on",
    "database_is_sound",
    "db_rows",
    "image_upload",
    "plan_json",
    "run_turn",
    "stage",
    "stage_script",
    "start_runtime",
]

RUN_LIMIT = 60.0
"""Harness limit for one turn: a run that has not ended by then is a hang, whatever the machine's speed."""


def stage(body: dict[str, Any]) -> str:
    """Which stage of the agent sent an LLM request: ``plan``, ``select``, ``respond``, or ``task``."""
    if body.get("stream"):
        return "respond"
    system = str((body.get("messages") or [{}])[0].get("content", ""))
    if "You are the planner" in system:
        return "plan"
    if "You are the model selector" in system:
        return "select"
    return "task"


def stage_script(
    plans: Sequence[str | Reply],
    answers: Sequence[str | Reply] = ("Done.",),
    *,
    select: str | Reply = '{"choices": []}',
    task: str | Reply = "a text task's result",
) -> Callable[[dict[str, Any]], str | Reply]:
    """A ``FakeLLMServer`` script by stage: plans and answers consumed in order (the last repeats)."""
    plans_left, answers_left = list(plans), list(answers)

    def reply(body: dict[str, Any]) -> str | Reply:
        which = stage(body)
        if which == "plan":
            return plans_left.pop(0) if len(plans_left) > 1 else plans_left[0]
        if which == "respond":
            return answers_left.pop(0) if len(answers_left) > 1 else answers_left[0]
        return select if which == "select" else task

    return reply


async def start_runtime(llm_url: str, hf_url: str, data_dir: Path, **env: str) -> Runtime:
    """A runtime on the fakes: models chosen by downloads, fixed demonstrations, short timeouts unless
    overridden by ``env``."""
    values = {
        "OPENAI_BASE_URL": llm_url,
        "OPENAI_API_KEY": "sk-test-reliability",
        "LLM_MODEL": "fake-model",
        "LLM_TIMEOUT": "5",
        "HF_INFERENCE_BASE_URL": hf_url,
        "HF_TOKEN": "hf_test_reliability",
        "HUGGINGGPT_DATA_DIR": str(data_dir),
        "HUGGINGGPT_MODEL_SELECTION": "downloads",
        "HUGGINGGPT_DEMOS": "fixed",  # no sentence encoder to load in every test
        "LLM_VISION": "off",  # no image probe in the LLM calls of tests not about images (test_vision.py)
        "HUGGINGGPT_TASK_TIMEOUT": "5",
        **env,
    }
    return await Runtime.start(Settings.from_mapping(values))


@dataclass
class Agent:
    """A runtime on the fakes, with a fresh conversation, and the fakes themselves."""

    rt: Runtime
    llm: FakeLLMServer
    hf: FakeHF
    conversation: str
    data_dir: Path

    @property
    def store(self) -> StorageConfig:
        """Where the runtime keeps its rows and files, for ``db_rows``."""
        return self.rt.storage.config

    async def turn(self, text: str, uploads: Sequence[Upload] = (), **kwargs: Any) -> Turn:
        return await run_turn(self.rt, self.conversation, text, uploads, **kwargs)


@asynccontextmanager
async def agent_on(
    script: Script, hf_models: dict[str, str], data_dir: Path, **env: str
) -> AsyncIterator[Agent]:
    """Both fakes and a runtime on them; everything is closed on the way out."""
    async with FakeHF(hf_models) as hf, FakeLLMServer(script) as llm:
        rt = await start_runtime(llm.base_url, hf.base_url, data_dir, **env)
        try:
            conversation = await rt.conversations.open("cli")
            yield Agent(rt, llm, hf, conversation.id, data_dir)
        finally:
            await rt.close()


async def image_upload(name: str = "photo.png", data: bytes | None = None) -> Upload:
    """A PNG (the fake's, unless ``data`` is given) checked as every front end checks attachments."""
    uploads, refused = await check_uploads(
        [(name, data or png_bytes())], UploadLimits.from_settings(Settings())
    )
    assert not refused, refused
    return uploads[0]


@dataclass
class Turn:
    """One user turn: its events in order and the final result."""

    events: list[Event] = field(default_factory=list)

    @property
    def result(self) -> RunResult:
        last = self.events[-1]
        assert isinstance(last, Done), f"the last event is {type(last).__name__}, not Done"
        return last.result


async def run_turn(
    rt: Runtime,
    conversation: str,
    text: str,
    uploads: Sequence[Upload] = (),
    *,
    limit: float = RUN_LIMIT,
    **kwargs: Any,
) -> Turn:
    """Run one turn of ``conversation`` to its end; fail the test if it takes longer than ``limit``."""
    turn = Turn()

    async def consume() -> None:
        async for event in rt.conversations.ask(conversation, text, uploads=uploads, **kwargs):
            turn.events.append(event)

    await asyncio.wait_for(consume(), limit)
    assert sum(isinstance(e, Done) for e in turn.events) == 1, "a turn ends with exactly one Done"
    return turn


def db_rows(where: Path | StorageConfig, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query on the database of a data dir (SQLite) or of a storage config (SQLite or PostgreSQL),
    over a separate plain connection. Write ``?`` for parameters, as SQLite does."""
    config = where if isinstance(where, StorageConfig) else StorageConfig(where)
    if config.database_url:
        with psycopg.connect(config.database_url, autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s").encode(), tuple(params))
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
    db = sqlite3.connect(config.sqlite_path, isolation_level=None)  # each statement commits
    try:
        return [tuple(r) for r in db.execute(sql, tuple(params))]
    finally:
        db.close()


def database_is_sound(where: Path | StorageConfig) -> None:
    """SQLite's own checks pass; on both engines no run is left ``running`` by nobody and every row's
    references hold (PostgreSQL enforces the latter itself)."""
    config = where if isinstance(where, StorageConfig) else StorageConfig(where)
    if not config.database_url:
        assert db_rows(config, "PRAGMA integrity_check") == [("ok",)]
        assert db_rows(config, "PRAGMA foreign_key_check") == []


def plan_json(*tasks: dict[str, Any]) -> str:
    return json.dumps({"tasks": list(tasks)})


@dataclass
class Watch:
    """Files opened and sockets connected by this process (any thread) while the watch is on.

    Built on audit hooks (``open``, ``socket.connect``), which see every open and connect, whichever library
    makes it. Use ``with watch() as seen:``.
    """

    opened: list[str] = field(default_factory=list)
    connected: list[str] = field(default_factory=list)

    def __enter__(self) -> Watch:
        _install_hook()
        _WATCHES.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _WATCHES.remove(self)


_WATCHES: list[Watch] = []
_HOOKED: list[bool] = []


def _install_hook() -> None:
    if _HOOKED:
        return
    _HOOKED.append(True)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if not _WATCHES:
            return
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            for w in _WATCHES:
                w.opened.append(os.fsdecode(args[0]))
        elif event == "socket.connect":
            for w in _WATCHES:
                w.connected.append(str(args[1]))

    sys.addaudithook(hook)  # for the rest of the process: audit hooks cannot be removed; idle when unwatched
