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
        }


@dataclass(frozen=True)
class PlanReady:
    plan: Plan


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


Event = PlanReady | ModelsSelected | TaskStarted | TaskEnded | ResponseChunk | Done
