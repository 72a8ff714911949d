"""The DAG scheduler: concurrency, order, data flow, failures, retries, fallbacks, timeouts, cancellation.

Most tests drive the executor with ``ScriptedBackend``, a backend of our own protocol whose models are
async functions; the last ones run real plans over the HF backend and the fake inference server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from agent.backends import Backend, Backends, BackendStatus, TaskInput, TaskIO
from agent.backends.hf import HFBackend
from agent.catalog import Catalog, ModelInfo
from agent.config import ExecutionConfig
from agent.errors import ModelError, PlanValidationError, RetryableModelError
from agent.events import Event, LLMUsage, TaskEnded, TaskStarted
from agent.executor import MAX_RETRY_AFTER, MAX_TASK_TEXT_CHARS, Executor
from agent.plan import ModelChoice, Plan, PlannedTask, TaskOutput, TaskResult
from agent.request import Request
from agent.resources import MemoryResourceStore, Origin, Resource
from agent.settings import Settings
from tests.fakes.hf_server import FakeHF, Fault, png_bytes

Model = Callable[[TaskInput, TaskIO], Awaitable[TaskOutput]]


@dataclass
class ScriptedBackend(Backend):
    """Runs ``fake/...`` models, each an async function; records every call."""

    models: dict[str, Model]
    unavailable: set[str] = field(default_factory=set)
    calls: list[tuple[str, int]] = field(default_factory=list)
    name: str = "scripted"
    retry_timeouts: bool = True
    prefix: str | None = "fake/"
    enable_hint: str = "a scripted model"

    def available(self, model: ModelInfo) -> bool:
        return model.id in self.models and model.id not in self.unavailable

    async def status(self) -> BackendStatus:
        return BackendStatus(self.name, True, "scripted")

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        self.calls.append((model.id, inp.planned.id))
        return await self.models[model.id](inp, io)


def text(value: str) -> Model:
    async def model(inp: TaskInput, io: TaskIO) -> TaskOutput:
        return TaskOutput(text=value)

    return model


def echo(inp: TaskInput, io: TaskIO) -> Awaitable[TaskOutput]:
    async def model() -> TaskOutput:
        return TaskOutput(text=inp.text["text"])

    return model()


def failing(error: Exception) -> Model:
    async def model(inp: TaskInput, io: TaskIO) -> TaskOutput:
        raise error

    return model


async def draw(inp: TaskInput, io: TaskIO) -> TaskOutput:
    return TaskOutput(resources=[await io.save(png_bytes(), "image/png")])


def task(id: int, name: str, dep: tuple[int, ...] = (), **args: str) -> PlannedTask:
    return PlannedTask(id, name, dep, args)


def choose(plan: Plan, model: str, *candidates: str) -> dict[int, ModelChoice]:
    return {t.id: ModelChoice(t.id, model, "test", candidates) for t in plan.tasks}


@dataclass
class Run:
    events: list[Event]
    store: MemoryResourceStore

    def terminal(self) -> dict[int, TaskResult]:
        """Each task's result, from its single ``TaskEnded`` (asserts there is exactly one)."""
        out: dict[int, TaskResult] = {}
        for e in self.events:
            if isinstance(e, TaskEnded):
                assert e.result.id not in out, f"two terminal events for task {e.result.id}"
                out[e.result.id] = e.result
        return out

    def finished(self, task_id: int) -> TaskResult:
        result = self.terminal()[task_id]
        assert result.status == "ok" and result.output is not None, result
        return result

    def failed(self, task_id: int) -> TaskResult:
        result = self.terminal()[task_id]
        assert result.status == "failed" and result.error, result
        return result

    def skipped(self, task_id: int) -> TaskResult:
        result = self.terminal()[task_id]
        assert result.status == "skipped", result
        return result


def executor(
    backend: ScriptedBackend | HFBackend, sleeps: list[float] | None = None, **settings: object
) -> Executor:
    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return Executor(Backends([backend]), Catalog([]), ExecutionConfig(**settings), sleep=sleep)  # type: ignore[arg-type]


async def execute(
    ex: Executor,
    plan: Plan,
    choices: dict[int, ModelChoice],
    request: Request | None = None,
    store: MemoryResourceStore | None = None,
) -> Run:
    store = store or MemoryResourceStore()
    events: list[Event] = []
    async with asyncio.timeout(5):  # a scheduling bug must fail, not hang
        async for event in ex.execute(
            plan, choices, request or Request("hi", run_id="run-1"), store, LLMUsage()
        ):
            events.append(event)
    run = Run(events, store)
    assert set(run.terminal()) == {t.id for t in plan.tasks}
    return run


# Scheduling.


async def test_independent_tasks_run_at_the_same_time() -> None:
    both_running = asyncio.Barrier(2)  # passes only when two runs are in progress together

    async def meet(inp: TaskInput, io: TaskIO) -> TaskOutput:
        await both_running.wait()
        return TaskOutput(text="met")

    plan = Plan((task(1, "image-to-text", image="img-1.png"), task(2, "text-to-speech", text="hello")))
    img = Resource("img-1.png", "image", "image/png", "0", 1)
    run = await execute(
        executor(ScriptedBackend({"fake/m": meet})),
        plan,
        choose(plan, "fake/m"),
        Request("x", resources=(img,)),
    )
    assert run.finished(1).output.text == run.finished(2).output.text == "met"


async def test_a_task_starts_when_its_last_dependency_finishes() -> None:
    release_slow = asyncio.Event()
    log: list[str] = []

    def logged(name: str, gate: asyncio.Event | None = None) -> Model:
        async def model(inp: TaskInput, io: TaskIO) -> TaskOutput:
            log.append(f"start {name}")
            if gate is not None:
                await gate.wait()
            log.append(f"end {name}")
            if name == "fast":
                release_slow.set()  # only after fast ended: the joiner must still wait for slow
            return TaskOutput(text=name)

        return model

    backend = ScriptedBackend(
        {"fake/fast": logged("fast"), "fake/slow": logged("slow", release_slow), "fake/join": logged("join")}
    )
    plan = Plan(
        (
            task(1, "text-classification", text="a"),
            task(2, "text-classification", text="b"),
            task(3, "sentence-similarity", (1, 2), text="<GENERATED>-1", text2="<GENERATED>-2"),
        )
    )
    choices = {
        1: ModelChoice(1, "fake/fast", ""),
        2: ModelChoice(2, "fake/slow", ""),
        3: ModelChoice(3, "fake/join", ""),
    }
    run = await execute(executor(backend), plan, choices)
    assert log.index("start join") > log.index("end slow") > log.index("end fast")
    started_3 = next(i for i, e in enumerate(run.events) if isinstance(e, TaskStarted) and e.task_id == 3)
    finished_2 = next(i for i, e in enumerate(run.events) if isinstance(e, TaskEnded) and e.result.id == 2)
    assert started_3 > finished_2


async def test_generated_outputs_flow_into_dependent_tasks() -> None:
    seen: dict[str, object] = {}

    async def caption(inp: TaskInput, io: TaskIO) -> TaskOutput:
        image = inp.files["image"]
        seen["image"] = image
        seen["bytes"] = await io.read(image)
        return TaskOutput(text="a red square")

    backend = ScriptedBackend({"fake/draw": draw, "fake/caption": caption, "fake/echo": echo})
    plan = Plan(
        (
            task(1, "text-to-image", text="a red square"),
            task(2, "image-to-text", (1,), image="<GENERATED>-1"),
            task(3, "text-to-speech", (2,), text="It shows <GENERATED>-2, look!"),
        )
    )
    choices = {
        1: ModelChoice(1, "fake/draw", ""),
        2: ModelChoice(2, "fake/caption", ""),
        3: ModelChoice(3, "fake/echo", ""),
    }
    run = await execute(executor(backend), plan, choices, Request("draw", turn=4, run_id="r9"))
    [made] = run.finished(1).output.resources
    assert made.name == "out-4-1.png"
    assert made.origin == Origin("task", run_id="r9", task_id=1)
    assert seen["image"] == made and seen["bytes"] == png_bytes()
    assert run.finished(3).output.text == "It shows a red square, look!"


def test_a_plan_that_uses_an_output_it_does_not_wait_for_cannot_be_made() -> None:
    """The executor waits for ``dep`` only: a ``Plan`` guarantees it holds every ``<GENERATED>-N`` named."""
    with pytest.raises(PlanValidationError, match="does not depend on"):
        Plan((task(1, "text-classification", text="x"), task(2, "text-to-speech", text="<GENERATED>-1")))


async def test_a_long_output_is_cut_before_it_becomes_another_tasks_input() -> None:
    """A model's huge answer must not become a huge prompt for the next task (a 70 KB plan once made a
    100 MB prompt)."""
    seen: list[str] = []

    async def huge(inp: TaskInput, io: TaskIO) -> TaskOutput:
        return TaskOutput(text="word " * 100_000)

    async def record(inp: TaskInput, io: TaskIO) -> TaskOutput:
        seen.append(inp.text["text"])
        return TaskOutput(text="ok")

    backend = ScriptedBackend({"fake/huge": huge, "fake/record": record})
    plan = Plan(
        (
            task(1, "text-generation", text="write a lot"),
            task(2, "summarization", (1,), text="Summarize: <GENERATED>-1"),
        )
    )
    choices = {1: ModelChoice(1, "fake/huge", ""), 2: ModelChoice(2, "fake/record", "")}
    await execute(executor(backend), plan, choices)
    [text_in] = seen
    assert len(text_in) < MAX_TASK_TEXT_CHARS + 100
    assert text_in.startswith("Summarize: word word") and "more characters were cut" in text_in


async def test_second_output_file_gets_a_suffix() -> None:
    async def two(inp: TaskInput, io: TaskIO) -> TaskOutput:
        return TaskOutput(
            resources=[await io.save(png_bytes(), "image/png"), await io.save(b"RIFF", "audio/wav")]
        )

    plan = Plan((task(2, "text-to-image", text="x"),))
    run = await execute(executor(ScriptedBackend({"fake/two": two})), plan, choose(plan, "fake/two"))
    assert [r.name for r in run.finished(2).output.resources] == ["out-1-2.png", "out-1-2-2.wav"]


async def test_resource_names_resolve_to_the_conversation_files() -> None:
    store = MemoryResourceStore()
    image = await store.put(png_bytes(), name="img-1.png", mime="image/png", origin=Origin("upload"))
    notes = await store.put(b"some notes", name="txt-1.txt", mime="text/plain", origin=Origin("upload"))
    got: dict[str, object] = {}

    async def look(inp: TaskInput, io: TaskIO) -> TaskOutput:
        got.update(image=inp.files["image"], question=inp.text["text"])
        return TaskOutput(text="ok")

    plan = Plan((task(1, "visual-question-answering", image="img-1.png", text="txt-1.txt"),))
    request = Request("x", resources=(image, notes))
    await execute(
        executor(ScriptedBackend({"fake/vqa": look})), plan, choose(plan, "fake/vqa"), request, store
    )
    assert got == {"image": image, "question": "some notes"}


def test_a_cyclic_plan_cannot_be_made() -> None:
    """Cycles are refused once, where a Plan is made, so the executor never waits forever."""
    with pytest.raises(PlanValidationError, match="form a cycle"):
        Plan(
            (
                task(1, "text-to-speech", (2,), text="<GENERATED>-2"),
                task(2, "text-to-speech", (1,), text="<GENERATED>-1"),
                task(3, "text-to-speech", text="fine"),
            )
        )


# Failures.


async def test_a_failure_skips_its_dependents_transitively_and_the_rest_runs() -> None:
    backend = ScriptedBackend({"fake/bad": failing(ModelError("model fake/bad broke")), "fake/echo": echo})
    plan = Plan(
        (
            task(1, "image-to-text", image="img-1.png"),
            task(2, "text-to-speech", (1,), text="<GENERATED>-1"),
            task(3, "text-classification", (2,), text="<GENERATED>-2"),
            task(4, "text-to-speech", text="independent"),
        )
    )
    img = Resource("img-1.png", "image", "image/png", "0", 1)
    choices = {**choose(plan, "fake/echo"), 1: ModelChoice(1, "fake/bad", "")}
    run = await execute(executor(backend, task_retries=0), plan, choices, Request("x", resources=(img,)))
    assert "model fake/bad broke" in run.failed(1).error
    assert run.skipped(2).error == "task 1 (image-to-text) failed"
    assert run.skipped(3).error == "task 1 (image-to-text) failed"
    assert run.finished(4).output.text == "independent"
    assert ("fake/echo", 2) not in backend.calls


async def test_a_crashing_model_fails_its_task_without_internals() -> None:
    backend = ScriptedBackend({"fake/crash": failing(RuntimeError("secret internals"))})
    plan = Plan((task(1, "text-to-speech", text="x"),))
    run = await execute(executor(backend), plan, choose(plan, "fake/crash"))
    error = run.failed(1).error
    assert "failed unexpectedly (RuntimeError)" in error and "secret" not in error


async def test_a_model_over_the_task_timeout_fails_with_a_timeout() -> None:
    async def hang(inp: TaskInput, io: TaskIO) -> TaskOutput:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    plan = Plan((task(1, "text-to-speech", text="x"),))
    sleeps: list[float] = []
    ex = executor(ScriptedBackend({"fake/hang": hang}), sleeps, task_timeout=0.05, task_retries=1)
    run = await execute(ex, plan, choose(plan, "fake/hang"))
    assert "did not answer within 0.05 s" in run.failed(1).error
    assert sleeps == [1.0]  # timeouts are retried, with backoff


async def test_a_model_on_this_machine_that_times_out_is_not_asked_again() -> None:
    """Retrying a local model that ran out of time would burn the same CPU again (issue: a 1 h recording
    was transcribed three times at once)."""
    calls = 0

    async def hang(inp: TaskInput, io: TaskIO) -> TaskOutput:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    plan = Plan((task(1, "text-to-speech", text="x"),))
    sleeps: list[float] = []
    local = ScriptedBackend({"fake/hang": hang}, retry_timeouts=False)
    run = await execute(executor(local, sleeps, task_timeout=0.05, task_retries=2), plan, choose(plan, "fake/hang"))
    assert "did not answer within 0.05 s" in run.failed(1).error
    assert calls == 1
    assert sleeps == []


async def test_retries_honour_retry_after() -> None:
    attempts = 0

    async def loading(inp: TaskInput, io: TaskIO) -> TaskOutput:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RetryableModelError("model fake/m is loading", retry_after=7)
        return TaskOutput(text="ready")

    sleeps: list[float] = []
    plan = Plan((task(1, "text-to-speech", text="x"),))
    run = await execute(
        executor(ScriptedBackend({"fake/m": loading}), sleeps, task_retries=2), plan, choose(plan, "fake/m")
    )
    assert run.finished(1).output.text == "ready"
    assert sleeps == [7, 7]


async def test_retry_after_is_capped_and_backoff_grows_without_it() -> None:
    waits = iter([1000.0, None])

    async def busy(inp: TaskInput, io: TaskIO) -> TaskOutput:
        raise RetryableModelError("busy", retry_after=next(waits, None))

    sleeps: list[float] = []
    plan = Plan((task(1, "text-to-speech", text="x"),))
    await execute(
        executor(ScriptedBackend({"fake/m": busy}), sleeps, task_retries=3), plan, choose(plan, "fake/m")
    )
    assert sleeps == [MAX_RETRY_AFTER, 2.0, 4.0]


async def test_fallback_to_the_next_candidate_after_retries() -> None:
    backend = ScriptedBackend(
        {"fake/busy": failing(RetryableModelError("model fake/busy is loading")), "fake/ok": text("done")}
    )
    plan = Plan((task(1, "text-to-speech", text="x"),))
    sleeps: list[float] = []
    run = await execute(executor(backend, sleeps, task_retries=2), plan, choose(plan, "fake/busy", "fake/ok"))
    assert [c[0] for c in backend.calls] == ["fake/busy"] * 3 + ["fake/ok"]
    assert len(sleeps) == 2
    assert run.finished(1).model == "fake/ok"
    assert [e.model for e in run.events if isinstance(e, TaskStarted)] == ["fake/busy", "fake/ok"]


async def test_final_errors_skip_retries_and_the_message_lists_the_models() -> None:
    backend = ScriptedBackend(
        {
            "fake/a": failing(ModelError("model fake/a said no")),
            "fake/b": failing(ModelError("model fake/b said no")),
        }
    )
    plan = Plan((task(1, "text-to-speech", text="x"),))
    run = await execute(executor(backend, task_retries=5), plan, choose(plan, "fake/a", "fake/b"))
    assert backend.calls == [("fake/a", 1), ("fake/b", 1)]
    assert run.failed(1).error == "model fake/b said no (models tried: fake/a, fake/b)"


async def test_unavailable_candidates_are_passed_over() -> None:
    backend = ScriptedBackend({"fake/off": text("no"), "fake/on": text("yes")}, unavailable={"fake/off"})
    plan = Plan((task(1, "text-to-speech", text="x"),))
    run = await execute(executor(backend), plan, choose(plan, "fake/off", "fake/on"))
    assert run.finished(1).output.text == "yes"
    assert backend.calls == [("fake/on", 1)]


async def test_no_runnable_model_names_the_setting_that_enables_it() -> None:
    plan = Plan((task(1, "text-to-image", text="a cat"),))
    ex = executor(HFBackend(Settings()))  # no HF_TOKEN, no endpoints
    run = await execute(ex, plan, choose(plan, "stabilityai/stable-diffusion-2-1"))
    assert run.failed(1).error == (
        "task 1 cannot run here: text-to-image needs a Hugging Face endpoint: set HF_TOKEN or HUGGINGGPT_ENDPOINTS"
    )


async def test_a_task_without_a_chosen_model_fails_with_the_selector_reason() -> None:
    plan = Plan((task(1, "text-to-speech", text="x"), task(2, "text-to-speech", text="y")))
    choices = {1: ModelChoice(1, "", "no model in the catalog does text-to-speech")}
    backend = ScriptedBackend({})
    run = await execute(executor(backend), plan, choices)
    assert run.failed(1).error == "task 1 (text-to-speech): no model in the catalog does text-to-speech"
    assert run.failed(2).error == "task 2 (text-to-speech): no model was chosen for it"
    assert backend.calls == []


# Cancellation.


async def test_cancelling_the_run_cancels_running_tasks() -> None:
    running = asyncio.Barrier(3)  # two tasks and the test
    cancelled: list[int] = []

    async def block(inp: TaskInput, io: TaskIO) -> TaskOutput:
        try:
            await running.wait()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(inp.planned.id)
            raise
        raise AssertionError("unreachable")

    plan = Plan((task(1, "text-to-speech", text="a"), task(2, "text-to-speech", text="b")))
    ex = executor(ScriptedBackend({"fake/block": block}))

    async def consume() -> None:
        async for _ in ex.execute(
            plan, choose(plan, "fake/block"), Request("x"), MemoryResourceStore(), LLMUsage()
        ):
            pass

    before = asyncio.all_tasks()
    consumer = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await running.wait()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert sorted(cancelled) == [1, 2]
    assert asyncio.all_tasks() == before


async def test_leaving_the_iteration_early_cancels_the_rest() -> None:
    cancelled = asyncio.Event()

    async def block(inp: TaskInput, io: TaskIO) -> TaskOutput:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    plan = Plan((task(1, "text-to-speech", text="a"), task(2, "text-to-speech", text="b")))
    choices = {1: ModelChoice(1, "fake/quick", ""), 2: ModelChoice(2, "fake/block", "")}
    ex = executor(ScriptedBackend({"fake/quick": text("q"), "fake/block": block}))
    events = ex.execute(plan, choices, Request("x"), MemoryResourceStore(), LLMUsage())
    async for event in events:
        if isinstance(event, TaskEnded) and event.result.status == "ok":
            break
    await events.aclose()  # type: ignore[attr-defined]
    assert cancelled.is_set()


# Real wire: the HF backend and the fake inference server.


async def test_a_plan_over_the_real_client_retries_a_loading_model() -> None:
    async with FakeHF({"org/captioner": "image-to-text", "org/speaker": "text-to-speech"}) as hf:
        backend = HFBackend(Settings(hf_token="hf_x", hf_inference_base_url=hf.base_url, task_timeout=5))
        hf.script("org/captioner", Fault.loading(retry_after=2))
        store = MemoryResourceStore()
        image = await store.put(png_bytes(), name="img-1.png", mime="image/png", origin=Origin("upload"))
        plan = Plan(
            (
                task(1, "image-to-text", image="img-1.png"),
                task(2, "text-to-speech", (1,), text="<GENERATED>-1"),
            )
        )
        choices = {1: ModelChoice(1, "org/captioner", ""), 2: ModelChoice(2, "org/speaker", "")}
        sleeps: list[float] = []
        run = await execute(executor(backend, sleeps), plan, choices, Request("x", resources=(image,)), store)
        await backend.aclose()
    assert sleeps == [2.0]
    assert [r.model for r in hf.requests] == ["org/captioner", "org/captioner", "org/speaker"]
    assert hf.requests[1].body == png_bytes()
    assert hf.requests[2].json()["inputs"] == "a red square on a grey background"
    [speech] = run.finished(2).output.resources
    assert speech.name == "out-1-2.wav" and speech.mime == "audio/wav"


async def test_independent_requests_overlap_on_the_wire() -> None:
    async with FakeHF({"org/a": "image-to-text", "org/b": "text-to-image"}) as hf:
        together = asyncio.Barrier(2)
        hf.script("org/a", Fault.hold(together))
        hf.script("org/b", Fault.hold(together))
        backend = HFBackend(Settings(hf_token="hf_x", hf_inference_base_url=hf.base_url, task_timeout=5))
        store = MemoryResourceStore()
        image = await store.put(png_bytes(), name="img-1.png", mime="image/png", origin=Origin("upload"))
        plan = Plan((task(1, "image-to-text", image="img-1.png"), task(2, "text-to-image", text="a cat")))
        choices = {1: ModelChoice(1, "org/a", ""), 2: ModelChoice(2, "org/b", "")}
        run = await execute(executor(backend), plan, choices, Request("x", resources=(image,)), store)
        await backend.aclose()
    run.finished(1), run.finished(2)
    a, b = hf.requests
    assert a.start < b.end and b.start < a.end
