"""Several processes on one storage, on both engines: conversations opened and turns begun at once are atomic
(issue 11, item 7), two ``ask --conversation SAME`` at once both succeed in order, and liveness across hosts
rests on heartbeats: a process on another machine counts as alive while it beats, dead once it stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import storage.database
from storage import RunEnd, Storage, StorageConfig, StorageError, TurnBusyError
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import Fault, png_bytes
from tests.fakes.hf_server import start_in_thread as start_hf
from tests.fakes.llm_server import start_in_thread as start_llm
from tests.fakes.reliability import database_is_sound, db_rows, plan_json, stage

ROOT = Path(__file__).resolve().parent.parent
WRITER = ROOT / "tests" / "fakes" / "storage_writer.py"


@dataclass(frozen=True)
class Photo:
    data: bytes
    kind: str = "image"
    mime: str = "image/png"


async def test_two_processes_open_the_same_conversation_at_once(storage_config: StorageConfig) -> None:
    async with await Storage.open(storage_config) as one, await Storage.open(storage_config) as two:
        opened = await asyncio.gather(
            *(
                (one if n % 2 else two).open_conversation("discord", external_id="thread-7", owner=str(n))
                for n in range(20)
            )
        )
        assert len({c.id for c in opened}) == 1 and len(set(opened)) == 1
        cli = await asyncio.gather(
            *((one, two)[n % 2].open_conversation("cli", conversation_id="c1") for n in range(10))
        )
        assert {c.id for c in cli} == {"c1"}
    assert db_rows(storage_config, "SELECT count(*) FROM conversations") == [(2,)]


async def test_a_turn_begins_in_one_transaction_and_a_busy_conversation_writes_nothing(
    storage_config: StorageConfig,
) -> None:
    async with await Storage.open(storage_config) as one, await Storage.open(storage_config) as two:
        conv = await one.open_conversation("cli", conversation_id="c1")
        first, second = await asyncio.gather(
            one.begin_turn(conv.id, "from one", [Photo(b"1a"), Photo(b"1b")], author="a"),
            two.begin_turn(conv.id, "from two", [Photo(b"2a")], author="b"),
            return_exceptions=True,
        )
        won, lost = (first, second) if not isinstance(first, BaseException) else (second, first)
        assert isinstance(lost, TurnBusyError) and not isinstance(won, BaseException)
        assert lost.run_id == won.run_id
        # The loser wrote nothing: one message, the winner's files, one run.
        assert [m.text for m in await one.messages(conv.id)] == [won.message.text]
        assert [r.name for r in await one.resources(conv.id)] == [r.name for r in won.attached]
        assert [r.id for r in await one.runs(conv.id)] == [won.run_id]
        assert won.turn == 1 and won.history == []
        winner = one if won.message.text == "from one" else two
        loser, text = (two, "from two") if winner is one else (one, "from one")
        await winner.add_message(conv.id, "assistant", "done", run_id=won.run_id)
        await winner.finish_run(won.run_id, RunEnd("ok", "done"))

        again = await loser.begin_turn(conv.id, text, [Photo(b"3"), Photo(b"4")], history_limit=1)
        assert again.turn == 2 and [m.text for m in again.history] == ["done"]
        names = [r.name for r in await one.resources(conv.id)]
        assert names == [f"img-{n}.png" for n in range(1, len(names) + 1)]  # numbered across processes
        assert [r.name for r in again.resources] == names
        assert again.attached == again.resources[-2:]
        run = await loser.get_run(again.run_id)
        assert run is not None and run.request_message_id == again.message.id and run.status == "running"


def cli_env(storage_config: StorageConfig, llm_url: str, hf_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPENAI_BASE_URL": llm_url,
        "OPENAI_API_KEY": "sk-test",
        "HF_TOKEN": "hf_test",
        "HF_INFERENCE_BASE_URL": hf_url,
        "HUGGINGGPT_DATA_DIR": str(storage_config.data_dir),
        "HUGGINGGPT_MODEL_SELECTION": "downloads",
        "HUGGINGGPT_DEMOS": "fixed",
        "DATABASE_URL": storage_config.database_url or "",
    }


def test_two_asks_on_the_same_conversation_at_once_both_succeed_in_order(
    storage_config: StorageConfig, tmp_path: Path
) -> None:
    """Issue 11, item 7: they used to fail with "conversation already exists" or "img-1.png already exists"
    and leave a user message with no run."""
    draw = plan_json({"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a cat"}})

    def script(body: dict[str, Any]) -> str:
        return draw if stage(body) == "plan" else "Here it is."

    models = hf_tasks("text-to-image")
    llm = start_llm(script)
    hf = start_hf(models)
    for model in models:  # slow enough that the second command arrives while the first one runs
        hf.server.script(model, Fault.slow(1.0), Fault.slow(1.0))
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes())
    env = cli_env(storage_config, llm.base_url, hf.base_url)
    try:
        asks = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.cli",
                    "ask",
                    f"draw cat {n}",
                    "--attach",
                    str(photo),
                    "--conversation",
                    "shared",
                    "--json",
                ],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in (1, 2)
        ]
        outputs = [ask.communicate(timeout=120) for ask in asks]
    finally:
        llm.stop()
        hf.stop()
    for ask, (out, err) in zip(asks, outputs, strict=True):
        assert ask.returncode == 0, err
        assert json.loads(out)["status"] == "ok"
    runs = db_rows(storage_config, "SELECT id, status, created_at, updated_at FROM runs ORDER BY seq")
    assert [status for _, status, _, _ in runs] == ["ok", "ok"]
    assert runs[1][2] >= runs[0][3]  # one after the other: the second began once the first had ended
    messages = db_rows(storage_config, "SELECT role, run_id FROM messages ORDER BY seq")
    assert [role for role, _ in messages] == ["user", "assistant", "user", "assistant"]
    assert [run for role, run in messages if role == "assistant"] == [runs[0][0], runs[1][0]]
    names = [
        n
        for (n,) in db_rows(storage_config, "SELECT name FROM resources WHERE origin = 'upload' ORDER BY seq")
    ]
    assert names == ["img-1.png", "img-2.png"]
    database_is_sound(storage_config)


async def test_a_process_on_another_machine_is_alive_while_it_beats_and_dead_once_it_stops(
    storage_config: StorageConfig,
) -> None:
    """Across hosts a pid means nothing: the reaper goes by the heartbeat's age on the database's clock."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WRITER_HEARTBEAT": "0.1"}
    args = [
        str(storage_config.data_dir),
        *([storage_config.database_url] if storage_config.database_url else []),
    ]
    async with await Storage.open(storage_config, heartbeat=0.1, heartbeat_timeout=1.0) as reaper:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(WRITER), *args, stdout=asyncio.subprocess.PIPE, env=env
        )
        try:
            assert proc.stdout is not None
            _, _, run_id = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode().split()
            # As seen from here, the writer now runs on another machine.
            db_rows(
                storage_config, "UPDATE processes SET machine = 'elsewhere/boot/1' WHERE pid = ?", (proc.pid,)
            )
            await asyncio.sleep(2.0)  # twice the timeout: its heartbeats keep it alive
            run = await reaper.get_run(run_id)
            assert run is not None and run.status == "running"
            proc.send_signal(signal.SIGSTOP)  # the host hangs: no more heartbeats
            for _ in range(150):
                await asyncio.sleep(0.1)
                run = await reaper.get_run(run_id)
                assert run is not None
                if run.status != "running":
                    break
            assert run.status == "interrupted"
            assert db_rows(storage_config, "SELECT count(*) FROM processes WHERE pid = ?", (proc.pid,)) == [
                (0,)
            ]
        finally:
            proc.kill()
            await proc.wait()


async def test_a_run_this_process_gave_up_on_is_reaped(
    sqlite_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When even marking a run interrupted fails (the database locked by another process), the run is no
    longer this process's to finish: its own reaper takes it once the database is free."""
    monkeypatch.setattr(storage.database, "FIRST_BACKOFF", 0.01)
    async with await Storage.open(sqlite_dir, busy_timeout=0.02) as store:
        conv = await store.create_conversation("cli")
        run_id = await store.start_run(conv.id, None)
        other = sqlite3.connect(sqlite_dir / "hugginggpt.db")
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="busy"):
            await store.mark_interrupted(run_id, "the bot is shutting down")
        other.rollback()
        other.close()
        assert await store.reap() == 1
        run = await store.get_run(run_id)
        assert run is not None and run.status == "interrupted"
        assert await store.start_run(conv.id, None)  # the conversation is free again


@pytest.fixture
def sqlite_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
