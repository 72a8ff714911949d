"""The agent: HuggingGPT's four stages run in order, as one async stream of progress events.

``Agent.run`` plans, selects models, executes the plan and streams the answer, yielding typed events
(``agent.events``); the last event is always ``Done`` with the whole ``RunResult``. Failures of a stage end
the run with status ``failed`` and a user-safe message; failures of single tasks make it ``partial``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence

from .backends import Backends
from .catalog import Catalog
from .config import ExecutionConfig
from .demos import DemoSelector
from .errors import AgentError, GenerationError
from .events import (
    Done,
    Event,
    LLMUsage,
    ModelsSelected,
    PlanReady,
    Replan,
    Replanning,
    ResponseChunk,
    RunResult,
    RunStatus,
    TaskEnded,
)
from .executor import Executor
from .llm import LLM
from .plan import ModelChoice, Plan, TaskResult
from .planner import Planner
from .request import Request
from .resources import Resource, ResourceStore
from .responder import Responder
from .selector import Selector
from .tasks import TASKS
from .vision import PromptImage, prompt_images

__all__ = ["Agent"]

log = logging.getLogger(__name__)


class Agent:
    """Plans over models with an LLM. Stateless between runs: the conversation comes in the ``Request``.

    ``task_types`` are the task types the planner may use: those some backend can run here (the runtime
    works them out); None allows every registered one.
    """

    def __init__(
        self,
        llm: LLM,
        catalog: Catalog,
        backends: Backends,
        config: ExecutionConfig,
        *,
        demos: DemoSelector | None = None,
        task_types: Collection[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.llm = llm
        self.catalog = catalog
        self.backends = backends
        self.config = config
        self.task_types = None if task_types is None else frozenset(task_types)
        unavailable = () if self.task_types is None else tuple(t for t in TASKS if t not in self.task_types)
        self.planner = Planner(llm, demos, max_tasks=config.max_tasks, task_types=self.task_types)
        self.selector = Selector(llm, catalog, backends, top_k=config.top_k, mode=config.model_selection)
        self.executor = Executor(backends, catalog, config)
        self.responder = Responder(llm, unavailable=unavailable)
        self._clock = clock

    async def run(
        self, request: Request, store: ResourceStore, *, dry_run: bool = False
    ) -> AsyncIterator[Event]:
        """Run the four stages. ``dry_run`` plans and selects models, then stops: every task ``skipped``."""
        run_id = request.run_id or uuid.uuid4().hex[:12]
        started = self._clock()
        usage = LLMUsage()
        plan = Plan()
        choices: dict[int, ModelChoice] = {}
        results: dict[int, TaskResult] = {}
        files: list[Resource] = []
        answer_parts: list[str] = []
        replan: Replan | None = None

        def finish(status: RunStatus, error: str | None = None) -> Done:
            ordered = [results.get(t.id) or TaskResult(t.id, t.task, None, "skipped", error="not run") for t in plan.tasks]
            answer = "".join(answer_parts).strip()
            if status == "failed" and error:
                # An answer cut short must say so, not pass for a whole one.
                answer = f"{answer}\n\n{error}" if answer else error
            return Done(
                RunResult(
                    run_id=run_id,
                    status=status,
                    plan=plan,
                    choices=choices,
                    tasks=ordered,
                    answer=answer,
                    files=files,
                    llm=usage,
                    seconds=self._clock() - started,
                    error=error,
                    replan=replan,
                )
            )

        made: dict[str, PromptImage] = {}

        async def images(*resources: Resource) -> tuple[PromptImage, ...]:
            """The images among ``resources`` (first ones first), for an LLM that sees them (asked once)."""
            if not any(r.kind == "image" for r in resources) or not await self.llm.sees_images(usage):
                return ()
            return await prompt_images(resources, store.read, made=made)

        attached = [r for r in request.resources if r.name in request.attachments]
        earlier = [r for r in reversed(request.resources) if r.name not in request.attachments]

        async def execute() -> AsyncIterator[Event]:
            """Run the tasks of ``plan`` that have no result yet, keeping their results and files."""
            async for event in self.executor.execute(
                plan, choices, request, store, usage, done=dict(results)
            ):
                if isinstance(event, TaskEnded):
                    results[event.result.id] = event.result
                    if event.result.output is not None:
                        files.extend(event.result.output.resources)
                yield event

        try:
            plan = await self.planner.plan(request, usage, await images(*attached, *earlier))
            yield PlanReady(plan)
            if not plan and plan.missing:
                # Nothing here can do it: say what is missing and what would enable it, without pretending.
                answer_parts.append(self.missing_note(plan.missing, alone=True))
                yield ResponseChunk(answer_parts[-1])
                yield finish("ok")
                return
            if plan:
                choices = await self.selector.select(request, plan, usage)
                yield ModelsSelected(choices)
                if dry_run:
                    for t in plan.tasks:
                        chosen = choices[t.id].model if t.id in choices else None
                        results[t.id] = TaskResult(t.id, t.task, chosen or None, "skipped", error="dry run")
                        yield TaskEnded(results[t.id])
                    answer_parts.append(_describe_dry_run(plan, choices))
                    yield finish("ok")
                    return
                async for event in execute():
                    yield event
                failed = tuple(t.id for t in plan.tasks if results[t.id].status == "failed")
                if failed:
                    # At most once a run: the new tasks' failures are answered as they are.
                    yield Replanning(failed)
                    try:
                        shown = await images(*attached, *earlier)
                        whole = await self.planner.replan(request, plan, results, usage, shown)
                    except AgentError as err:
                        log.info("run %s: the replan made no plan: %s", run_id, err)
                        replan = Replan(failed, error=str(err))
                    else:
                        added = whole.tasks[len(plan.tasks) :]
                        replan = Replan(failed, tuple(t.id for t in added))
                        if added:
                            plan = whole
                            yield PlanReady(plan)
                            # Chosen without the LLM: a replan costs one LLM call, not two.
                            new = {t.id for t in added}
                            choices = {
                                **choices,
                                **await self.selector.select(request, plan, usage, only=new),
                            }
                            yield ModelsSelected(choices)
                            async for event in execute():
                                yield event
            ordered = [results[t.id] for t in plan.tasks if t.id in results]
            shown = await images(*attached, *reversed(files), *earlier)
            try:
                async for chunk in self.responder.respond(request, plan, choices, ordered, usage, shown):
                    answer_parts.append(chunk)
                    yield ResponseChunk(chunk)
                if plan.missing:
                    answer_parts.append("\n\n" + self.missing_note(plan.missing, alone=False))
                    yield ResponseChunk(answer_parts[-1])
            except AgentError as err:
                if not ordered:
                    raise GenerationError(f"Writing the answer failed: {err}") from err
                # The tasks' work is not lost: report their results without the LLM's prose.
                fallback = _describe_results(ordered, err)
                answer_parts.append(("\n\n" if answer_parts else "") + fallback)
                yield ResponseChunk(fallback)
                yield finish("partial", f"Writing the answer failed: {err}")
                return
        except AgentError as err:
            log.warning("run %s failed: %s", run_id, err, exc_info=log.isEnabledFor(logging.DEBUG))
            yield finish("failed", str(err))
            return
        # The tasks a replan replaced (failed, or skipped for a failure) do not count against the run.
        replaced = set()
        if replan is not None and replan.added:
            replaced = {i for i, r in results.items() if r.status != "ok" and i not in replan.added}
        statuses = {r.status for r in results.values() if r.id not in replaced}
        yield finish("ok" if statuses <= {"ok"} else "partial")


    def missing_note(self, missing: Sequence[str], *, alone: bool) -> str:
        """What cannot be done here and the setting that would enable it, e.g. "I can't draw an image from a
        description here (text-to-image needs a Hugging Face endpoint: set HF_TOKEN or ...)"."""
        reasons = []
        for name in missing:
            task = TASKS[name]
            ranked = self.catalog.by_task(name)
            why = self.backends.explain(ranked[0].id) if ranked else "has no model in the catalog"
            reasons.append(f"{task.description} ({name} {why})")
        head = "I can't do that here" if alone else "Part of the request could not be done here"
        return f"{head}: there is no model for it in this setup. Missing: " + "; ".join(reasons) + "."


def _describe_dry_run(plan: Plan, choices: dict[int, ModelChoice]) -> str:
    lines = ["Dry run: this is what would run (nothing was executed)."]
    for t in plan.tasks:
        choice = choices.get(t.id)
        model = choice.model if choice and choice.model else "no available model"
        after = f", after {', '.join(str(d) for d in t.dep)}" if t.dep else ""
        lines.append(f"- task {t.id}: {t.task} with {model}{after}")
    return "\n".join(lines)


def _describe_results(results: list[TaskResult], err: AgentError) -> str:
    lines = [f"I could not write a full answer ({err}). Here is what the tasks produced:"]
    for r in results:
        if r.status == "ok" and r.output is not None:
            shown = r.output.text or ", ".join(f.name for f in r.output.resources) or "done"
            lines.append(f"- task {r.id} ({r.task}, {r.model}): {shown[:500]}")
        else:
            lines.append(f"- task {r.id} ({r.task}): {r.status}: {r.error}")
    return "\n".join(lines)
