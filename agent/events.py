"""Typed progress events. ``Agent.run`` yields them in order; the last one is always ``Done``.

A task's end is one ``TaskEnded`` carrying its ``TaskResult``: the same object the run's result, the recorder
and the progress display keep, so nobody rebuilds it from parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .plan import ModelChoice, Plan, TaskResult
from .resources import Resource

__all__ = [
    "Done",
    "Event",
    "LLMUsage",
    "ModelsSelected",
    "PlanReady",
    "Replan",
    "Replanning",
    "ResponseChunk",
    "RunResult",
    "RunStatus",
    "TaskEnded",
    "TaskStarted",
]

RunStatus = Literal["ok", "partial", "failed", "cancelled"]


@dataclass
class LLMUsage:
    """LLM calls and tokens of one run. The LLM client adds to the instance it is given."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.calls += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def to_json(self) -> dict[str, int]:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass(frozen=True)
class Replan:
    """The run's one replan: the tasks whose failure caused it, the tasks the new plan added (none when the
    planner had nothing else to try), and why it made no plan if it failed itself."""

    after: tuple[int, ...]
    added: tuple[int, ...] = ()
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"after": list(self.after), "added": list(self.added), "error": self.error}


@dataclass
class RunResult:
    """Everything a run produced; ``to_trace`` is the ``ask --json`` contract."""

    run_id: str
    status: RunStatus
    plan: Plan
    choices: dict[int, ModelChoice]
    tasks: list[TaskResult]
    answer: str
    files: list[Resource]
    llm: LLMUsage
    seconds: float
    error: str | None = None
    replan: Replan | None = None

    def to_trace(self, conversation: str, file_paths: list[str]) -> dict[str, Any]:
        """The ``ask --json`` trace, but for ``backends``, which the front end adds from the runtime."""
        return {
            "conversation": conversation,
            "run_id": self.run_id,
            "status": self.status,
            "plan": self.plan.to_json(),
            "tasks": [t.to_json() for t in self.tasks],
            "answer": self.answer,
            "files": file_paths,
            "llm": self.llm.to_json(),
            "seconds": round(self.seconds, 3),
            "replan": self.replan.to_json() if self.replan else None,
        }


@dataclass(frozen=True)
class PlanReady:
    plan: Plan


@dataclass(frozen=True)
class Replanning:
    """Tasks failed on every model they could run on: the planner is asked, once, to plan around them. A
    ``PlanReady`` with the whole plan (the tasks that ran and the new ones) and a ``ModelsSelected`` follow."""

    failed: tuple[int, ...]


@dataclass(frozen=True)
class ModelsSelected:
    choices: dict[int, ModelChoice]


@dataclass(frozen=True)
class TaskStarted:
    task_id: int
    task: str
    model: str


@dataclass(frozen=True)
class TaskEnded:
    """A task finished, failed or was skipped: ``result.status`` says which."""

    result: TaskResult


@dataclass(frozen=True)
class ResponseChunk:
    text: str


@dataclass(frozen=True)
class Done:
    result: RunResult


Event = PlanReady | Replanning | ModelsSelected | TaskStarted | TaskEnded | ResponseChunk | Done
