"""Runs many conversations at once until it is killed: the subject of test_reliability_crash.py.

Usage: ``python crash_driver.py DATA_DIR [DATABASE_URL]``. Serves its own LLM and Hugging Face fakes, then keeps 30
conversations busy with turns of one to three tasks (some models slow, some failing). Prints
``FINISHED <run> <status>`` once a run's end is committed (``Conversations.ask`` yields ``Done`` after that).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

from agent.events import Done
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import FakeHF, Fault
from tests.fakes.llm_server import FakeLLMServer, Reply
from tests.fakes.reliability import image_upload, stage, start_runtime

CONVERSATIONS = 30
MODELS = hf_tasks("image-to-text", "text-to-image")
PLANS = [
    [{"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a cat"}}],
    [
        {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
        {"id": 1, "task": "text-to-image", "dep": [], "args": {"text": "a dog"}},
    ],
    [
        {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
        {"id": 1, "task": "text-to-image", "dep": [0], "args": {"text": "<GENERATED>-0"}},
        {"id": 2, "task": "summarization", "dep": [0], "args": {"text": "<GENERATED>-0"}},
    ],
]


def script(body: dict[str, Any]) -> str | Reply:
    rng = random.Random()
    which = stage(body)
    if which == "plan":
        return json.dumps({"tasks": rng.choice(PLANS)})
    if which == "respond":
        return Reply("Here is what the models made of it, task by task.", delay=rng.choice([0, 0.05]))
    return "A summary."


async def main(data_dir: Path, database_url: str | None) -> None:
    rng = random.Random()
    async with FakeHF(MODELS) as hf, FakeLLMServer(script) as llm:
        for model in MODELS:
            hf.script(
                model,
                *(
                    rng.choice([Fault(), Fault.slow(0.05), Fault.slow(0.3), Fault.error(500)])
                    for _ in range(2000)
                ),
            )
        rt = await start_runtime(
            llm.base_url, hf.base_url, data_dir, **({"DATABASE_URL": database_url} if database_url else {})
        )
        upload = await image_upload()

        async def converse(n: int) -> None:
            conversation = (await rt.conversations.open("crash", external_id=str(n))).id
            turn = 0
            while True:
                turn += 1
                async for event in rt.conversations.ask(
                    conversation, f"turn {turn}", uploads=[upload] if turn == 1 else []
                ):
                    if isinstance(event, Done):
                        print("FINISHED", event.result.run_id, event.result.status, flush=True)

        await asyncio.gather(*(converse(n) for n in range(CONVERSATIONS)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), (sys.argv[2:] or [None])[0]))
