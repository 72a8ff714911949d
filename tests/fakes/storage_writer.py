"""Writes to a Storage until it is killed: the subject of tests/test_storage_crash.py.

Usage: ``python storage_writer.py DATA_DIR [DATABASE_URL]`` (``WRITER_HEARTBEAT``: seconds between its
heartbeats, default the storage's). Prints ``READY <conversation> <run>`` once the fixed records are
committed, then ``COMMITTED <n>`` after each loop step has been committed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from agent.resources import Origin
from storage import Storage, StorageConfig, TaskRecord


def payload(n: int) -> bytes:
    """Step ``n``'s file: big enough that a kill often lands inside a write."""
    return f"output {n}\n".encode() * 20_000


async def main(config: StorageConfig) -> None:
    beat = os.environ.get("WRITER_HEARTBEAT")
    storage = await Storage.open(config, **({"heartbeat": float(beat)} if beat else {}))
    conversation = await storage.create_conversation("test", external_id="crash", owner="tester")
    request = await storage.add_message(conversation.id, "user", "draw a cat", author="tester")
    await storage.add_resource(
        conversation.id,
        b"cat picture",
        name="img-1.png",
        mime="image/png",
        origin=Origin("upload"),
        message_id=request.id,
    )
    run_id = await storage.start_run(conversation.id, request.id)
    await storage.set_plan(run_id, [{"id": 1, "task": "text-to-image"}], {"1": {"model": "a/b"}})
    await storage.record_task(
        TaskRecord(run_id, 1, "text-to-image", "a/b", "ok", 1.5, {"text": "done"}, None)
    )
    print("READY", conversation.id, run_id, flush=True)
    n = 0
    while True:
        await storage.add_message(conversation.id, "assistant", f"step {n}", run_id=run_id)
        await storage.add_resource(
            conversation.id,
            payload(n),
            name=f"out-{n}.txt",
            mime="text/plain",
            origin=Origin("task", run_id, 2),
        )
        await storage.record_task(TaskRecord(run_id, 2, "text-generation", None, "ok", 0.1, {"n": n}, None))
        print("COMMITTED", n, flush=True)
        n += 1


if __name__ == "__main__":
    asyncio.run(main(StorageConfig(Path(sys.argv[1]), database_url=(sys.argv[2:] or [None])[0])))
