"""kill -9 a process in the middle of a run: what it committed survives and the run reads ``interrupted``.

On both engines: at the next start (SQLite, PostgreSQL), and — the case of several processes sharing one
database — without any restart, by the reaper of another process that was running all along.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from storage import Storage, StorageConfig
from tests.fakes.reliability import database_is_sound
from tests.fakes.storage_writer import payload

ROOT = Path(__file__).resolve().parent.parent
WRITER = ROOT / "tests" / "fakes" / "storage_writer.py"


async def kill_writer_mid_run(config: StorageConfig) -> tuple[str, str, int]:
    """Start the writer, let it commit a few steps, kill -9 it; its conversation, run and last step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(config.data_dir), *([config.database_url] if config.database_url else [])]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WRITER), *args, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    ready = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
    _, conversation_id, run_id = ready.decode().split()
    # Let it get a few steps in, then kill it wherever it happens to be.
    committed = -1
    while committed < 5:
        committed = int((await asyncio.wait_for(proc.stdout.readline(), timeout=30)).split()[1])
    await asyncio.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    for line in (await proc.stdout.read()).splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == b"COMMITTED":  # not a line the kill cut short
            committed = int(words[1])
    assert await proc.wait() == -signal.SIGKILL
    return conversation_id, run_id, committed


async def nothing_committed_is_lost(
    store: Storage, conversation_id: str, run_id: str, committed: int
) -> None:
    conv = await store.find_conversation("test", "crash")
    assert conv is not None and conv.id == conversation_id and conv.owner == "tester"

    messages = await store.messages(conversation_id)
    assert (messages[0].role, messages[0].text) == ("user", "draw a cat")
    steps = [m.text for m in messages[1:]]
    assert len(steps) > committed  # everything announced as committed is there ...
    assert steps == [f"step {n}" for n in range(len(steps))]  # ... in order, with no gap or half step

    upload, *outputs = await store.resources(conversation_id)
    assert await store.read_resource(upload) == b"cat picture"
    assert len(outputs) > committed
    for n, resource in enumerate(outputs):  # every row has its complete file
        assert resource.name == f"out-{n}.txt"
        assert await store.read_resource(resource) == payload(n)

    run = await store.get_run(run_id)
    assert run is not None
    assert run.status == "interrupted" and run.error
    assert [status for status, _ in run.transitions] == ["running", "interrupted"]
    assert run.plan == [{"id": 1, "task": "text-to-image"}]
    assert [t.task_id for t in run.tasks] == [1, 2]
    assert run.tasks[1].output["n"] >= committed
    assert [r.id for r in await store.unreported_interrupted_runs()] == [run_id]


async def test_kill_9_mid_run_keeps_committed_records(storage_config: StorageConfig) -> None:
    conversation_id, run_id, committed = await kill_writer_mid_run(storage_config)
    async with await Storage.open(storage_config) as store:  # the restart
        await nothing_committed_is_lost(store, conversation_id, run_id, committed)
    database_is_sound(storage_config)


async def test_another_process_reaps_a_killed_writer_without_a_restart(storage_config: StorageConfig) -> None:
    """Two processes on one database: the survivor's periodic reaper marks the dead one's run
    interrupted while it keeps running, and the run of a live process is left alone."""
    async with await Storage.open(storage_config, heartbeat=0.1) as survivor:
        mine = await survivor.create_conversation("test", external_id="mine")
        live_run = await survivor.start_run(mine.id, None)
        conversation_id, run_id, committed = await kill_writer_mid_run(storage_config)
        for _ in range(100):  # the heartbeat loop, not an explicit call, notices
            run = await survivor.get_run(run_id)
            assert run is not None
            if run.status != "running":
                break
            await asyncio.sleep(0.1)
        await nothing_committed_is_lost(survivor, conversation_id, run_id, committed)
        alive = await survivor.get_run(live_run)
        assert alive is not None and alive.status == "running"
    database_is_sound(storage_config)
