"""Discord latency: what a user sees after mentioning the bot, timed on the loopback fake Discord server.

The real bot (``HuggingGPTBot``, in this process, production edit interval of 1 s) connects over HTTP and
the websocket gateway to ``tests/fakes/discord_server.py``; the LLM and HF fakes answer as in the other
benchmarks, each model after a fixed latency. For each mention: time to the thread being created, to the
first edit of the progress message, and to the answer being posted; and how many edits the run made.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.demos import FixedDemos

from .common import Result, percentile, run_main
from .controller import ScriptedController
from .harness import loopback
from .overhead import PLAN, TEXT

__all__ = ["TimedRequests", "main", "run"]

NAME = "discord_latency"
ANSWER_MARK = "(scripted answer)"
TOKEN = "test-token"  # what the fake Discord accepts
QUIET = 1.5  # seconds without a new request after the answer: the run is over


class TimedRequests(list[Any]):
    """The fake Discord's request log, with the moment (``perf_counter``) each request was answered.

    The fake appends from its own thread; ``until`` lets the bot's loop wait for a condition on the log.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.times: list[float] = []
        self._loop = loop
        self._changed = asyncio.Event()

    def append(self, item: Any) -> None:
        self.times.append(time.perf_counter())
        super().append(item)
        self._loop.call_soon_threadsafe(self._changed.set)

    async def until(self, condition: Callable[[], object]) -> None:
        while not condition():
            self._changed.clear()  # a set() already scheduled still runs after this, so no wake-up is lost
            await self._changed.wait()


def _first(log: TimedRequests, start: int, match: Callable[[Any], bool]) -> float | None:
    return next((log.times[i] for i in range(start, len(log)) if match(log[i])), None)


def _is_answer(request: Any) -> bool:
    return request.method == "POST" and request.path.endswith("/messages") and ANSWER_MARK in json.dumps(request.json)


async def measure(runs: int, model_seconds: float, smoke: bool) -> list[dict[str, float]]:
    """``runs`` timed mentions; in full mode after one untimed mention (loads, connections, caches)."""
    warm_up = 0 if smoke else 1
    from app.runtime import Runtime
    from bot.app import HuggingGPTBot, use_discord_endpoints
    from bot.config import DiscordConfig
    from tests.fakes import discord_server

    server = discord_server.start_in_thread()
    log = TimedRequests(asyncio.get_running_loop())
    server.fake.requests = log
    controller = ScriptedController({TEXT: PLAN}, answer=f"The lighthouse picture is ready. {ANSWER_MARK}")
    try:
        with tempfile.TemporaryDirectory() as tmp, loopback(
            controller,
            Path(tmp),
            discord_token=TOKEN,
            discord_api_base=server.api_base,
            discord_gateway_url=server.gateway_url,
            discord_user_runs_per_minute=10_000,
        ) as world:
            # The scripted selector picks each task's first candidate: the most downloaded model.
            chosen = [world.catalog.by_task(t["task"])[0].id for t in PLAN]
            use_discord_endpoints(server.api_base, server.gateway_url)
            # The runtime as the bot's entry point builds it (retrieved demonstrations), before any timing.
            async with await Runtime.start(world.settings) as runtime:
                bot = HuggingGPTBot(runtime, DiscordConfig.from_settings(world.settings))
                await bot.login(TOKEN)
                running = asyncio.create_task(bot.connect())
                try:
                    async with asyncio.timeout(120):
                        await bot.wait_until_ready()
                    if smoke:
                        # The sentence encoder behind retrieved demonstrations takes seconds to load.
                        runtime.agent.planner.demos = FixedDemos()
                    mention = f"<@{discord_server.BOT_ID}> {TEXT}"
                    timed = [
                        await _one(server, log, world.hf, chosen, model_seconds, mention)
                        for _ in range(runs + warm_up)
                    ]
                    return timed[warm_up:]
                finally:
                    await bot.close()
                    await running
    finally:
        server.stop()


async def _one(
    server: Any, log: TimedRequests, hf: Any, models: list[str], seconds: float, mention: str
) -> dict[str, float]:
    """One mention, timed from just before the fake dispatches it until the bot goes quiet."""
    from tests.fakes.hf_server import Fault

    for model in models:
        hf.script(model, Fault.slow(seconds))
    start_index = len(log)
    sent = time.perf_counter()
    dispatched = asyncio.run_coroutine_threadsafe(server.fake.user_message(mention), server.loop)
    await asyncio.wrap_future(dispatched)
    async with asyncio.timeout(60):
        await log.until(lambda: _first(log, start_index, _is_answer) is not None)
    count = len(log)
    while True:
        await asyncio.sleep(QUIET)
        if len(log) == count:
            break
        count = len(log)
    thread = _first(log, start_index, lambda r: r.method == "POST" and r.path.endswith("/threads"))
    status = _first(log, start_index, lambda r: r.method == "POST" and r.path.endswith("/messages"))
    edit = _first(log, start_index, lambda r: r.method == "PATCH")
    answered = _first(log, start_index, _is_answer)
    assert thread is not None and status is not None and answered is not None
    edits = sum(1 for r in log[start_index:] if r.method == "PATCH")
    return {
        "thread_s": thread - sent,
        "status_s": status - sent,
        "first_edit_s": (edit - sent) if edit is not None else float("nan"),
        "answer_s": answered - sent,
        "edits": edits,
    }


async def run(smoke: bool) -> Result:
    runs, model_seconds = (1, 0.0) if smoke else (10, 0.5)
    measured = await measure(runs, model_seconds, smoke)
    rows: list[list[Any]] = []
    stats: dict[str, dict[str, float]] = {}
    steps = (
        ("thread_s", "mention → thread created (ms)"),
        ("status_s", "mention → progress message posted (ms)"),
        ("first_edit_s", "mention → first progress edit (ms)"),
        ("answer_s", "mention → answer posted (ms)"),
    )
    for key, label in steps:
        values = [m[key] for m in measured if m[key] == m[key]]  # NaN: no edit in that run
        stats[key] = {"p50": round(percentile(values, 50), 4), "max": round(max(values, default=float("nan")), 4)}
        rows.append([label, round(1000 * stats[key]["p50"], 1), round(1000 * stats[key]["max"], 1)])
    edits = [m["edits"] for m in measured]
    rows.append(["progress edits per run", statistics.median(edits), max(edits)])
    return Result(
        name=NAME,
        title="Discord: latency seen by the user",
        smoke=smoke,
        headers=["step", "p50", "max"],
        rows=rows,
        summary=(
            f"discord: thread after {1000 * stats['thread_s']['p50']:.0f} ms, progress message after "
            f"{1000 * stats['status_s']['p50']:.0f} ms, first edit after "
            f"{1000 * stats['first_edit_s']['p50']:.0f} ms, answer after {stats['answer_s']['p50']:.2f} s "
            f"(models {2 * model_seconds:g} s), {statistics.median(edits):g} edits per run (p50 of {runs})"
        ),
        data={"runs": measured, "stats": stats, "model_seconds": model_seconds, "edits_median": statistics.median(edits)},
        notes=[
            f"{runs} mention(s) after an untimed one, one after another, each opening its own thread; plan of 2 "
            "tasks (text-to-image, then image-to-text of its output), each model answering after "
            f"{model_seconds:g} s; LLM fake instant; the runtime as the bot builds it (retrieved demonstrations).",
            "The status message is edited at most once a second; the answer is posted at once and the final "
            "status edit follows when that interval allows.",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
