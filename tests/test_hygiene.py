"""The shared test setup keeps one test's leftovers out of the next (tests/conftest.py).

A test that drops an LLM client without closing it must not make a later test fail: openai's client, when
garbage-collected inside a running loop, schedules its own ``aclose()`` there, and that fails on connections
of the earlier test's loop ("Event loop is closed"). CI failed this way in a Discord test that had nothing to
do with the leak. The two tests below run in order: the first leaks, the second collects it.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from agent.events import LLMUsage
from agent.llm import OpenAILLM
from agent.settings import Settings
from tests.fakes.llm_server import ThreadedServer, start_in_thread

_left: dict[str, Any] = {}


async def test_a_client_dropped_with_an_open_connection() -> None:
    server = start_in_thread(["hello"])  # outlives this test's loop, so the connection stays open
    llm = OpenAILLM(Settings(openai_base_url=f"{server.base_url}", llm_model="m"), max_retries=0)
    assert await llm.complete([{"role": "user", "content": "hi"}], usage=LLMUsage()) == "hello"
    _left.update(server=server, llm=llm)  # not closed: the fixture must see to it


async def test_a_later_test_does_not_see_the_earlier_tests_client_finalized() -> None:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    server: ThreadedServer = _left.pop("server")
    _left.pop("llm")
    gc.collect()
    for _ in range(10):
        await asyncio.sleep(0)
    server.stop()
    assert not errors, [str(e.get("exception") or e.get("message")) for e in errors]
