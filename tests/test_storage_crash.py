"""kill -9 a process in the middle of a run: what it committed survives and the run reads ``interrupted``."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

from storage import Storage
from tests.fakes.storage_writer import payload

ROOT = Path(__file__).resolve().parent.parent
WRITER = ROOT / "tests" / "fakes" / "storage_writer.py"


async def test_kill_9_mid_run_keeps_committed_records(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WRITER), str(data_dir), stdout=asyncio.subprocess.PIPE, env=env
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

    async with await Storage.open(data_dir) as store:
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

    db = sqlite3.connect(data_dir / "hugginggpt.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()
