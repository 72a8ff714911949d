"""Agent overhead: what our code adds around the LLM and the models, alone and under concurrent load.

Overhead per run is the run's wall time minus the time spent inside LLM calls and model calls (the union of
those intervals, measured by wrapping the LLM and the backend), with zero-latency loopback fakes, for
``Agent.run`` alone and for the full ``Conversations.ask`` path with SQLite storage. Then 10, 100 and 500
conversations ask at once: event-loop lag (a ticker measures how late its sleeps wake), throughput, and
peak memory (``ru_maxrss``, the process's peak resident set).
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.agent import Agent
from agent.backends import Backend, BackendStatus, TaskInput, TaskIO
from agent.catalog import ModelInfo
from agent.events import Done, Event, LLMUsage, RunResult
from agent.llm import LLM
from agent.plan import TaskOutput
from agent.request import Request
from agent.resources import MemoryResourceStore
from agent.vision import PromptImage
from app.conversations import Conversations

from .common import Result, Target, percentile, run_main
from .controller import ScriptedController
from .harness import loopback, runtime_on

__all__ = ["Meter", "TimedBackend", "TimedLLM", "main", "run"]

NAME = "overhead"
TEXT = "Draw a lighthouse at dusk, then describe the picture you made."
PLAN: list[dict[str, Any]] = [
    {"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a lighthouse at dusk"}},
    {"id": 1, "task": "image-to-text", "dep": [0], "args": {"image": "<GENERATED>-0"}},
]
TICK = 0.005
TARGET_OVERHEAD_MS = 5.0
TARGET_LAG_P99_MS = 50.0


@dataclass
class Meter:
    """Intervals spent waiting on the LLM or a model; ``inside`` is their union within a window."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    enabled: bool = True

    @contextmanager
    def span(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append((start, time.perf_counter()))

    def inside(self, start: float, end: float) -> float:
        total, reach = 0.0, start
        for low, high in sorted(self.spans):
            low, high = max(low, reach), min(high, end)
            if high > low:
                total += high - low
                reach = high
        return total


class TimedLLM:
    """An ``LLM`` that records the time spent inside each call (for streams: waiting for each chunk)."""

    def __init__(self, llm: LLM, meter: Meter) -> None:
        self._llm = llm
        self._meter = meter
        self.model = llm.model
        self.context_tokens = llm.context_tokens

    async def complete(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        with self._meter.span():
            return await self._llm.complete(messages, **kwargs)

    async def complete_json(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        with self._meter.span():
            return await self._llm.complete_json(messages, **kwargs)

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        usage: LLMUsage,
        max_tokens: int | None = None,
        images: Sequence[PromptImage] = (),
    ) -> AsyncIterator[str]:
        chunks = aiter(self._llm.stream(messages, usage=usage, max_tokens=max_tokens, images=images))
        while True:
            with self._meter.span():
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
            yield chunk

    async def sees_images(self, usage: LLMUsage) -> bool:
        return await self._llm.sees_images(usage)

    async def status(self) -> BackendStatus:
        return await self._llm.status()

    async def aclose(self) -> None:
        await self._llm.aclose()

    def activity(self) -> str | None:
        return self._llm.activity()


class TimedBackend(Backend):
    """A ``Backend`` that records the time spent inside ``run``."""

    def __init__(self, backend: Backend, meter: Meter) -> None:
        self._backend = backend
        self._meter = meter
        self.name = backend.name
        self.prefix = backend.prefix
        self.enable_hint = backend.enable_hint
        self.retry_timeouts = backend.retry_timeouts

    def available(self, model: ModelInfo) -> bool:
        return self._backend.available(model)

    async def status(self) -> BackendStatus:
        return await self._backend.status()

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        with self._meter.span():
            return await self._backend.run(model, inp, io)

    async def aclose(self) -> None:
        await self._backend.aclose()


async def _finish(events: AsyncIterator[Event]) -> RunResult:
    result = None
    async for event in events:
        if isinstance(event, Done):
            result = event.result
    assert result is not None
    if result.status != "ok":
        raise RuntimeError(f"a benchmark run ended {result.status}: {result.error}")
    return result


async def _overheads(
    agent: Agent, conversations: Conversations, meter: Meter, runs: int
) -> dict[str, list[float]]:
    """Overhead (ms) of ``runs`` sequential runs, each way; the first run of each is a warm-up."""
    out: dict[str, list[float]] = {"agent": [], "conversation": []}
    conversation = await conversations.open("bench")
    for n in range(runs + 1):
        for way in out:
            meter.spans.clear()
            start = time.perf_counter()
            if way == "agent":
                await _finish(agent.run(Request(TEXT, run_id=f"o{n}"), MemoryResourceStore()))
            else:
                await _finish(conversations.ask(conversation.id, TEXT))
            end = time.perf_counter()
            if n:
                out[way].append(1000 * (end - start - meter.inside(start, end)))
    return out


async def _ticker(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(TICK)
        lags.append(1000 * (time.perf_counter() - start - TICK))


async def _load(conversations: Conversations, count: int) -> dict[str, float]:
    """``count`` conversations ask at once; loop lag, throughput and run latency."""
    ids = [(await conversations.open("bench")).id for _ in range(count)]
    latencies: list[float] = []

    async def ask(conversation_id: str) -> None:
        start = time.perf_counter()
        await _finish(conversations.ask(conversation_id, TEXT))
        latencies.append(time.perf_counter() - start)

    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(stop, lags))
    start = time.perf_counter()
    await asyncio.gather(*(ask(i) for i in ids))
    wall = time.perf_counter() - start
    stop.set()
    await ticker
    return {
        "conversations": count,
        "seconds": round(wall, 3),
        "runs_per_second": round(count / wall, 2),
        "run_p50_s": round(percentile(latencies, 50), 3),
        "run_p99_s": round(percentile(latencies, 99), 3),
        "lag_p50_ms": round(percentile(lags, 50), 2),
        "lag_p99_ms": round(percentile(lags, 99), 2),
        "lag_max_ms": round(max(lags, default=0.0), 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


async def measure(runs: int, levels: Sequence[int]) -> dict[str, Any]:
    meter = Meter()
    with tempfile.TemporaryDirectory() as tmp, loopback(ScriptedController({TEXT: PLAN}), Path(tmp)) as world:
        async with runtime_on(
            world,
            wrap_llm=lambda llm: TimedLLM(llm, meter),
            wrap_backend=lambda backend: TimedBackend(backend, meter),
        ) as runtime:
            overheads = await _overheads(runtime.agent, runtime.conversations, meter, runs)
            # The meter's spans are not needed under load: it only adds to every call.
            meter.enabled = False
            load = [await _load(runtime.conversations, n) for n in levels]
    return {"overhead_ms": overheads, "load": load}


async def run(smoke: bool) -> Result:
    runs, levels = (5, (2, 5)) if smoke else (100, (10, 100, 500))
    measured = await measure(runs, levels)
    overheads = measured["overhead_ms"]
    stats = {
        way: {
            "p50": round(percentile(v, 50), 3),
            "p95": round(percentile(v, 95), 3),
            "mean": round(statistics.fmean(v), 3),
        }
        for way, v in overheads.items()
    }
    rows: list[list[Any]] = [
        [
            "1 (sequential)",
            f"{stats['agent']['p50']:.2f} / {stats['agent']['p95']:.2f}",
            f"{stats['conversation']['p50']:.2f} / {stats['conversation']['p95']:.2f}",
            None,
            None,
            None,
            None,
            None,
        ]
    ]
    for level in measured["load"]:
        rows.append(
            [
                level["conversations"],
                None,
                None,
                level["lag_p50_ms"],
                level["lag_p99_ms"],
                level["runs_per_second"],
                f"{level['run_p50_s']:.2f} / {level['run_p99_s']:.2f}",
                level["peak_rss_mib"],
            ]
        )
    at_100 = next((lv for lv in measured["load"] if lv["conversations"] == 100), None)
    agent_p50 = stats["agent"]["p50"]
    lag_target = (
        Target(
            "event-loop lag p99 at 100 conversations",
            f"< {TARGET_LAG_P99_MS:g} ms",
            f"{at_100['lag_p99_ms']:.1f} ms",
            at_100["lag_p99_ms"] < TARGET_LAG_P99_MS,
        )
        if at_100
        else Target("event-loop lag p99 at 100 conversations", f"< {TARGET_LAG_P99_MS:g} ms", "not run", None)
    )
    biggest = measured["load"][-1]
    return Result(
        name=NAME,
        title="Agent overhead, event-loop lag and throughput",
        smoke=smoke,
        headers=[
            "conversations",
            "overhead/run, Agent.run (ms p50 / p95)",
            "overhead/run, Conversations.ask (ms p50 / p95)",
            "loop lag p50 (ms)",
            "loop lag p99 (ms)",
            "runs/s",
            "run latency (s p50 / p99)",
            "peak RSS (MiB)",
        ],
        rows=rows,
        summary=(
            f"overhead: {agent_p50:.2f} ms per run in Agent.run, {stats['conversation']['p50']:.2f} ms with "
            f"storage (target < {TARGET_OVERHEAD_MS:g} ms); loop lag p99 "
            + (f"{at_100['lag_p99_ms']:.1f} ms at 100 conversations" if at_100 else "not measured at 100")
            + f"; {biggest['runs_per_second']} runs/s at {biggest['conversations']}"
        ),
        data={"overhead_ms": stats, "runs": runs, "load": measured["load"], "tick_s": TICK},
        notes=[
            "Each run: plan (2 tasks: text-to-image, then image-to-text of its output), one selection call, "
            "two model calls, streamed answer; LLM and HF fakes on their own threads, zero added latency.",
            "Overhead = wall time minus the union of time inside LLM calls and backend.run, over "
            f"{runs} sequential runs after a warm-up.",
            f"Loop lag: a ticker sleeping {TICK * 1000:g} ms, lateness of each wake-up. Peak RSS is the "
            "process's peak so far (ru_maxrss), so it only grows down the table.",
        ],
        targets=[
            Target(
                "agent overhead per run (p50)",
                f"< {TARGET_OVERHEAD_MS:g} ms",
                f"{agent_p50:.2f} ms",
                agent_p50 < TARGET_OVERHEAD_MS,
            ),
            lag_target,
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
