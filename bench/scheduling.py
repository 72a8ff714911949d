"""Scheduling: how close the executor's makespan comes to the plan's critical path.

Generated plans (chains, fan-out, fan-in; 5 and 10 tasks) run through our ``Executor`` with the real
``HFBackend`` against the loopback HF fake, which answers each task after a known latency. A DAG cannot
finish before its critical path (the longest chain of latencies), so makespan / critical path is the price
of scheduling, HTTP and bookkeeping. Beside it, the same plans under a scheduler in the style of the
reference implementation, which looks for runnable tasks and sleeps 0.5 s whenever it started none.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from agent.backends import Backends, TaskInput, TaskIO
from agent.backends.hf import HFBackend
from agent.catalog import Catalog, ModelInfo
from agent.config import ExecutionConfig
from agent.events import LLMUsage, TaskEnded
from agent.executor import Executor
from agent.plan import GENERATED_RE, ModelChoice, Plan, PlannedTask, TaskOutput
from agent.request import Request
from agent.resources import MemoryResourceStore, Origin, Resource, extension_for
from agent.settings import Settings
from agent.tasks import TASKS

from .common import Result, Target, run_main

__all__ = ["Shape", "critical_path", "main", "poll_schedule", "run", "shapes"]

NAME = "scheduling"
TASK = "text-classification"  # text in, text out: any DAG can be wired with it
POLL_INTERVAL = 0.5  # the reference's ``time.sleep(0.5)`` between scheduling passes
TARGET_RATIO = 1.05
SEED = 20240501


@dataclass(frozen=True)
class Shape:
    """A plan's dependency graph (task id -> the ids it waits for) and each task's model latency."""

    name: str
    deps: dict[int, tuple[int, ...]]
    latency: dict[int, float]

    def plan(self) -> Plan:
        tasks = []
        for task_id, deps in self.deps.items():
            text = " ".join(f"<GENERATED>-{d}" for d in deps) or f"input text {task_id}"
            tasks.append(PlannedTask(id=task_id, task=TASK, dep=deps, args={"text": text}))
        return Plan(tuple(tasks))


def critical_path(deps: dict[int, tuple[int, ...]], latency: dict[int, float]) -> float:
    """The longest sum of latencies along a dependency chain: no scheduler can finish sooner."""
    finish: dict[int, float] = {}

    def end(task_id: int) -> float:
        if task_id not in finish:
            finish[task_id] = max((end(d) for d in deps[task_id]), default=0.0) + latency[task_id]
        return finish[task_id]

    return max(end(t) for t in deps)


def shapes(sizes: Sequence[int], low: float, high: float, rng: random.Random) -> list[Shape]:
    """Chain, fan-out (one root, the rest after it) and fan-in (all but one, then one after them all)."""
    out = []
    for n in sizes:
        graphs: dict[str, dict[int, tuple[int, ...]]] = {
            "chain": {i: (i - 1,) if i else () for i in range(n)},
            "fan-out": {i: (0,) if i else () for i in range(n)},
            "fan-in": {i: tuple(range(n - 1)) if i == n - 1 else () for i in range(n)},
        }
        for kind, deps in graphs.items():
            latency = {i: round(rng.uniform(low, high), 3) for i in deps}
            out.append(Shape(f"{kind} {n}", deps, latency))
    return out


def _model(task_id: int) -> str:
    return f"bench/task-{task_id}"


def _io(store: MemoryResourceStore, task_id: int, usage: LLMUsage) -> TaskIO:
    async def save(data: bytes, mime: str) -> Resource:
        origin = Origin("task", run_id="bench", task_id=task_id)
        return await store.put(data, name=f"out-1-{task_id}{extension_for(mime)}", mime=mime, origin=origin)

    return TaskIO(read=store.read, save=save, usage=usage)


async def poll_schedule(
    plan: Plan,
    run_task: Callable[[PlannedTask, dict[int, TaskOutput]], Awaitable[TaskOutput]],
    interval: float = POLL_INTERVAL,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[int, TaskOutput]:
    """The reference's loop: start every task whose dependencies are done; if none started, sleep ``interval``.

    Written here as the baseline (the reference runs threads; the waiting pattern is what matters).
    """
    done: dict[int, TaskOutput] = {}
    pending = list(plan.tasks)
    running: list[asyncio.Task[None]] = []

    async def start(task: PlannedTask) -> None:
        done[task.id] = await run_task(task, done)

    while pending:
        ready = [t for t in pending if all(d in done for d in t.dep)]
        for task in ready:
            pending.remove(task)
            running.append(asyncio.create_task(start(task)))
        if not ready:
            await sleep(interval)
    await asyncio.gather(*running)
    return done


@dataclass(frozen=True)
class Timing:
    shape: str
    scheduler: str
    critical_path: float
    makespan: float

    @property
    def ratio(self) -> float:
        return self.makespan / self.critical_path


async def _ours(executor: Executor, shape: Shape) -> float:
    plan = shape.plan()
    choices = {t: ModelChoice(t, _model(t), "benchmark") for t in shape.deps}
    store = MemoryResourceStore()
    started = time.perf_counter()
    async for event in executor.execute(plan, choices, Request("bench", run_id="bench"), store, LLMUsage()):
        if isinstance(event, TaskEnded):
            result = event.result
            if result.status != "ok":
                raise RuntimeError(f"{shape.name}: task {result.id} did not run: {result.error}")
            if result.output is None or not result.output.text:
                raise RuntimeError(f"{shape.name}: task {result.id} produced no text")
    return time.perf_counter() - started


async def _baseline(backend: HFBackend, catalog: Catalog, shape: Shape, interval: float) -> float:
    store = MemoryResourceStore()
    usage = LLMUsage()

    async def run_task(task: PlannedTask, done: dict[int, TaskOutput]) -> TaskOutput:
        text = GENERATED_RE.sub(lambda m: done[int(m.group(1))].text or "", task.args["text"])
        model = catalog.get(_model(task.id))
        assert model is not None
        inp = TaskInput(task=TASKS[task.task], planned=task, text={"text": text})
        return await backend.run(model, inp, _io(store, task.id, usage))

    started = time.perf_counter()
    await poll_schedule(shape.plan(), run_task, interval)
    return time.perf_counter() - started


async def measure(sizes: Sequence[int], scale: float, repeats: int) -> list[Timing]:
    """Each shape ``repeats`` times under both schedulers; latencies are 0.2-0.6 s times ``scale``."""
    from tests.fakes.hf_server import Fault, start_in_thread

    plans = shapes(sizes, 0.2 * scale, 0.6 * scale, random.Random(SEED))
    most = max(len(s.deps) for s in plans)
    catalog = Catalog(ModelInfo(id=_model(t), task=TASK) for t in range(most))
    timings: list[Timing] = []
    # The fake serves from its own thread and loop, so the loop under test runs only the scheduler.
    running = start_in_thread({_model(t): TASK for t in range(most)})
    hf = running.server
    try:
        settings = Settings(hf_token="hf_bench", hf_inference_base_url=running.base_url, task_retries=0)
        backend = HFBackend(settings)
        executor = Executor(Backends([backend]), catalog, ExecutionConfig(task_retries=0))
        try:
            # One untimed run first: the HTTP client's session and connections are made on first use.
            await _ours(executor, plans[0])
            await _baseline(backend, catalog, plans[0], POLL_INTERVAL * scale)
            for shape in plans:
                cp = critical_path(shape.deps, shape.latency)
                for _ in range(repeats):
                    for scheduler in ("ours", "reference (0.5 s polling)"):
                        for task_id, seconds in shape.latency.items():
                            hf.script(_model(task_id), Fault.slow(seconds))
                        if scheduler == "ours":
                            makespan = await _ours(executor, shape)
                        else:
                            makespan = await _baseline(backend, catalog, shape, POLL_INTERVAL * scale)
                        timings.append(Timing(shape.name, scheduler, cp, makespan))
        finally:
            await backend.aclose()
    finally:
        running.stop()
    return timings


async def run(smoke: bool) -> Result:
    sizes, scale, repeats = ((3,), 0.1, 1) if smoke else ((5, 10), 1.0, 3)
    timings = await measure(sizes, scale, repeats)
    rows: list[list[str | int | float | None]] = []
    per_shape: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(t.shape for t in timings):
        ours = [t for t in timings if t.shape == name and t.scheduler == "ours"]
        base = [t for t in timings if t.shape == name and t.scheduler != "ours"]
        cp = ours[0].critical_path
        ours_makespan = statistics.median(t.makespan for t in ours)
        base_makespan = statistics.median(t.makespan for t in base)
        per_shape[name] = {
            "critical_path_s": cp,
            "ours_makespan_s": round(ours_makespan, 4),
            "ours_ratio": round(ours_makespan / cp, 4),
            "reference_makespan_s": round(base_makespan, 4),
            "reference_ratio": round(base_makespan / cp, 4),
        }
        rows.append(
            [
                name,
                round(cp, 3),
                round(ours_makespan, 3),
                round(ours_makespan / cp, 3),
                round((ours_makespan - cp) * 1000, 1),
                round(base_makespan, 3),
                round(base_makespan / cp, 3),
            ]
        )
    worst = max(v["ours_ratio"] for v in per_shape.values())
    worst_reference = max(v["reference_ratio"] for v in per_shape.values())
    mean_reference = statistics.mean(v["reference_ratio"] for v in per_shape.values())
    return Result(
        name=NAME,
        title="Scheduling: makespan / critical path",
        smoke=smoke,
        headers=[
            "plan",
            "critical path (s)",
            "ours: makespan (s)",
            "ours: ratio",
            "ours: over CP (ms)",
            "reference: makespan (s)",
            "reference: ratio",
        ],
        rows=rows,
        summary=(
            f"scheduling: worst makespan/critical path {worst:.3f} (target ≤ {TARGET_RATIO}); "
            f"0.5 s polling reference worst {worst_reference:.2f}, mean {mean_reference:.2f}"
        ),
        data={
            "shapes": per_shape,
            "worst_ratio": worst,
            "reference_worst_ratio": worst_reference,
            "repeats": repeats,
            "latency_scale": scale,
            "poll_interval_s": POLL_INTERVAL * scale,
        },
        notes=[
            f"Task latencies drawn uniformly from {0.2 * scale:g}-{0.6 * scale:g} s (seed {SEED}), served by "
            "tests/fakes/hf_server.py; every task is text-classification on its own model, through HFBackend.",
            f"Median of {repeats} run(s) per plan and scheduler; both schedulers call the same backend.",
        ],
        targets=[Target("makespan / critical path", f"≤ {TARGET_RATIO}", f"{worst:.3f} (worst plan)", worst <= TARGET_RATIO)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
