"""Stage 3: run a plan's tasks on their chosen models, as a DAG, streaming progress events.

Each task waits for the tasks it depends on (``dep``, which holds every ``<GENERATED>-N`` it names: a ``Plan``
is sound by construction, so nothing is checked again here) and starts the moment the last of them finishes;
independent tasks run at the same time. A task that fails takes its
dependents down with it (they are skipped, with the reason) while the rest of the plan goes on. Models are
called with a timeout, retried with backoff when the failure is transient (honouring ``Retry-After``), and
replaced by the next candidate model when they keep failing. A failure of the store itself (disk full,
database unusable) is no model's fault: it stops the whole run.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from .backends import Backend, Backends, TaskInput, TaskIO
from .catalog import Catalog, ModelInfo
from .config import ExecutionConfig
from .errors import (
    AgentError,
    BackendUnavailableError,
    ExecutionError,
    ModelTimeoutError,
    ResourceStoreError,
    RetryableModelError,
)
from .events import Event, LLMUsage, TaskEnded, TaskStarted
from .plan import GENERATED_RE, ModelChoice, Plan, PlannedTask, TaskOutput, TaskResult
from .request import Request
from .resources import Origin, Resource, ResourceStore, extension_for
from .tasks import TASKS, Modality, TaskType

__all__ = ["MAX_RETRY_AFTER", "MAX_TASK_TEXT_CHARS", "Executor"]

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 30.0
"""Longest wait, in seconds, before retrying a model, whatever its ``Retry-After`` asks for."""
_BACKOFF_BASE = 1.0
MAX_TASK_TEXT_CHARS = 16_000
"""Longest text a task receives in one argument once ``<GENERATED>-N`` is replaced by an earlier task's
output: a model's 1 MB answer must not become a 1 MB prompt. A longer text is cut, with a note saying so."""


@dataclass(frozen=True)
class _Outcome:
    """How a task ended, as its dependents need to know: its output, or why they cannot run."""

    output: TaskOutput | None = None
    reason: str = ""


@dataclass
class _Attempts:
    """The models a task tried and the last error, for the failure message."""

    tried: list[str] = field(default_factory=list)
    last: AgentError | None = None


class Executor:
    """Runs plans. One instance serves many runs; it holds no per-run state."""

    def __init__(
        self,
        backends: Backends,
        catalog: Catalog,
        config: ExecutionConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backends = backends
        self.catalog = catalog
        self.config = config
        self.sleep = sleep

    async def execute(
        self,
        plan: Plan,
        choices: dict[int, ModelChoice],
        request: Request,
        store: ResourceStore,
        usage: LLMUsage,
        *,
        done: Mapping[int, TaskResult] | None = None,
    ) -> AsyncIterator[Event]:
        """Yield ``TaskStarted`` (again on each fallback model) and exactly one ``TaskEnded`` per task, as
        they happen. Closing or cancelling the iteration cancels every running task. A
        ``ResourceStoreError`` in any task is raised here, after cancelling the others.

        ``done`` holds the results of tasks of ``plan`` that already ran (before a replan): they are not run
        again, and their outputs feed the tasks that depend on them."""
        done = done or {}
        events: asyncio.Queue[Event] = asyncio.Queue()
        outcomes: dict[int, asyncio.Future[_Outcome]] = {
            t.id: asyncio.get_running_loop().create_future() for t in plan.tasks
        }
        for task_id, result in done.items():
            reason = result.error or f"task {task_id} ({result.task}) {result.status}"
            outcomes[task_id].set_result(
                _Outcome(result.output, reason) if result.status == "ok" else _Outcome(reason=reason)
            )
        run = _Run(self, choices, request, store, usage, events, outcomes)
        workers = [asyncio.create_task(run.task(t)) for t in plan.tasks if t.id not in done]
        try:
            remaining = len(workers)
            while remaining:
                event = await events.get()
                if isinstance(event, TaskEnded):
                    remaining -= 1
                yield event
                if run.fatal is not None and event is run.fatal[1]:
                    raise run.fatal[0]
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


@dataclass
class _Run:
    """The state of one ``execute`` call, shared by its task workers."""

    executor: Executor
    choices: dict[int, ModelChoice]
    request: Request
    store: ResourceStore
    usage: LLMUsage
    events: asyncio.Queue[Event]
    outcomes: dict[int, asyncio.Future[_Outcome]]
    fatal: tuple[ResourceStoreError, TaskEnded] | None = None  # the first store failure, and its event

    async def task(self, planned: PlannedTask) -> None:
        outcome = _Outcome(reason=f"task {planned.id} ({planned.task}) failed")
        try:
            for dep in planned.dep:
                upstream = await self.outcomes[dep]
                if upstream.output is None:
                    outcome = _Outcome(reason=upstream.reason)
                    self._end(TaskResult(planned.id, planned.task, None, "skipped", error=upstream.reason))
                    return
            outcome = await self._run(planned)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s (%s) crashed", planned.id, planned.task)
            error = f"task {planned.id} ({planned.task}) failed unexpectedly (see the log)"
            self._end(TaskResult(planned.id, planned.task, None, "failed", error=error))
        finally:
            self.outcomes[planned.id].set_result(outcome)

    def _end(self, result: TaskResult) -> TaskEnded:
        event = TaskEnded(result)
        self.events.put_nowait(event)
        return event

    async def _run(self, planned: PlannedTask) -> _Outcome:
        """Resolve the inputs, then try the candidate models in turn; emit the terminal event."""
        failed = _Outcome(reason=f"task {planned.id} ({planned.task}) failed")
        started = time.monotonic()
        choice = self.choices.get(planned.id)
        task_type = TASKS[planned.task]
        try:
            if choice is None or not (choice.model or choice.candidates):
                why = choice.reason if choice and choice.reason else "no model was chosen for it"
                raise ExecutionError(f"task {planned.id} ({planned.task}): {why}")
            inp = await self._inputs(planned, task_type)
            runnable = self._runnable(planned, task_type, choice)
        except ResourceStoreError as err:
            return self._stop(planned, choice.model if choice else None, started, err)
        except AgentError as err:
            self._end(TaskResult(planned.id, planned.task, choice.model if choice else None, "failed", error=str(err)))
            return failed
        io = self._io(planned)
        attempts = _Attempts()
        for model, backend in runnable:
            attempts.tried.append(model.id)
            self.events.put_nowait(TaskStarted(planned.id, planned.task, model.id))
            try:
                output = await self._attempts(model, backend, inp, io, attempts)
            except ResourceStoreError as err:
                return self._stop(planned, model.id, started, err)
            if output is not None:
                seconds = time.monotonic() - started
                self._end(TaskResult(planned.id, planned.task, model.id, "ok", seconds, output))
                return _Outcome(output=output)
        message = f"{attempts.last} (models tried: {', '.join(attempts.tried)})"
        seconds = time.monotonic() - started
        self._end(TaskResult(planned.id, planned.task, attempts.tried[-1], "failed", seconds, error=message))
        return failed

    def _stop(
        self, planned: PlannedTask, model: str | None, started: float, err: ResourceStoreError
    ) -> _Outcome:
        """Fail the task for a store failure and have ``execute`` stop the run once the event is out."""
        seconds = time.monotonic() - started
        event = self._end(TaskResult(planned.id, planned.task, model, "failed", seconds, error=str(err)))
        self.fatal = self.fatal or (err, event)
        return _Outcome(reason=str(err))

    def _runnable(
        self, planned: PlannedTask, task_type: TaskType, choice: ModelChoice
    ) -> list[tuple[ModelInfo, Backend]]:
        """The chosen model and its fallbacks that a live backend can run, in order: at most
        ``HUGGINGGPT_TOP_K`` of them, so a task whose models are all down fails in bounded time."""
        runnable: list[tuple[ModelInfo, Backend]] = []
        for model_id in dict.fromkeys(m for m in (choice.model, *choice.candidates) if m):
            if len(runnable) == self.executor.config.top_k:
                break
            model = self.executor.catalog.get(model_id) or ModelInfo(id=model_id, task=task_type.name)
            backend = self.executor.backends.for_model(model)
            if backend is not None and backend.available(model):
                runnable.append((model, backend))
        if not runnable:
            first = choice.model or choice.candidates[0]
            raise BackendUnavailableError(
                f"task {planned.id} cannot run here: {task_type.name} {self.executor.backends.explain(first)}"
            )
        return runnable

    async def _attempts(
        self, model: ModelInfo, backend: Backend, inp: TaskInput, io: TaskIO, attempts: _Attempts
    ) -> TaskOutput | None:
        """Run on one model, retrying transient failures; None once it has failed for good."""
        config = self.executor.config
        for attempt in range(config.task_retries + 1):
            try:
                async with asyncio.timeout(config.task_timeout):
                    return await backend.run(model, inp, io)
            except TimeoutError as err:
                attempts.last = (
                    err
                    if isinstance(err, ModelTimeoutError)
                    else ModelTimeoutError(
                        f"model {model.id} did not answer within {config.task_timeout:g} s "
                        "(HUGGINGGPT_TASK_TIMEOUT)"
                    )
                )
                if not backend.retry_timeouts or (isinstance(err, ModelTimeoutError) and not err.retryable):
                    return None
                retry_after = None
            except RetryableModelError as err:
                attempts.last, retry_after = err, err.retry_after
            except ResourceStoreError:
                raise
            except AgentError as err:
                attempts.last = err
                return None
            except Exception as err:
                log.exception("model %s crashed on task %s", model.id, inp.planned.id)
                attempts.last = ExecutionError(f"model {model.id} failed unexpectedly ({type(err).__name__})")
                return None
            if attempt < config.task_retries:
                delay = retry_after if retry_after is not None else _BACKOFF_BASE * 2**attempt
                await self.executor.sleep(min(max(delay, 0.0), MAX_RETRY_AFTER))
        return None

    async def _inputs(self, planned: PlannedTask, task_type: TaskType) -> TaskInput:
        """The task's arguments with ``<GENERATED>-N`` and resource names replaced by what they stand for."""
        text: dict[str, str] = {}
        files: dict[str, Resource] = {}
        for key, value in planned.args.items():
            arg = task_type.arg(key)
            assert arg is not None, "a Plan only holds its task types' arguments"
            if arg.modality == "text":
                text[key] = await self._text(planned, key, value)
            else:
                files[key] = self._file(planned, value, arg.modality)
        return TaskInput(task=task_type, planned=planned, text=text, files=files)

    async def _text(self, planned: PlannedTask, key: str, value: str) -> str:
        named = self.request.resource(value.strip())
        if named is not None and named.kind == "text":
            return _bounded((await self.store.read(named)).decode("utf-8", errors="replace"))

        def substitute(match: re.Match[str]) -> str:
            dep = int(match.group(1))
            output = self._output(planned, dep)
            if output.text is None:
                raise ExecutionError(
                    f"task {planned.id} ({planned.task}) needs text for {key!r} from task {dep}, "
                    "which produced none"
                )
            return output.text

        return _bounded(GENERATED_RE.sub(substitute, value))

    def _file(self, planned: PlannedTask, value: str, modality: Modality) -> Resource:
        match = GENERATED_RE.fullmatch(value)
        if match is not None:
            dep = int(match.group(1))
            found = next((r for r in self._output(planned, dep).resources if r.kind == modality), None)
            if found is None:
                raise ExecutionError(
                    f"task {planned.id} ({planned.task}) needs {_a(modality)} from task {dep}, "
                    "which produced none"
                )
            return found
        resource = self.request.resource(value)
        assert resource is not None, "a Plan only names the conversation's files"
        return resource

    def _output(self, planned: PlannedTask, dep: int) -> TaskOutput:
        future = self.outcomes.get(dep)
        output = future.result().output if future is not None and future.done() else None
        if output is None:
            raise ExecutionError(
                f"task {planned.id} ({planned.task}) refers to task {dep}, which has no result"
            )
        return output

    def _io(self, planned: PlannedTask) -> TaskIO:
        """Output files are named ``out-{turn}-{task}{ext}``, then ``out-{turn}-{task}-2{ext}``, ..."""
        saved = 0
        origin = Origin("task", run_id=self.request.run_id, task_id=planned.id)

        async def save(data: bytes, mime: str) -> Resource:
            nonlocal saved
            saved += 1
            suffix = "" if saved == 1 else f"-{saved}"
            name = f"out-{self.request.turn}-{planned.id}{suffix}{extension_for(mime)}"
            return await self.store.put(data, name=name, mime=mime, origin=origin)

        return TaskIO(read=self.store.read, save=save, usage=self.usage)


def _a(modality: Modality) -> str:
    return f"an {modality}" if modality[0] in "aeiou" else f"a {modality}"


def _bounded(text: str) -> str:
    """``text`` cut to ``MAX_TASK_TEXT_CHARS``, saying how much was left out."""
    if len(text) <= MAX_TASK_TEXT_CHARS:
        return text
    cut = len(text) - MAX_TASK_TEXT_CHARS
    return f"{text[:MAX_TASK_TEXT_CHARS]}\n[… {cut:,} more characters were cut]"
