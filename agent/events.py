"""Typed progress events. ``Agent.run`` yields them in order; the last one is always ``Done``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .plan import ModelChoice, Plan, TaskOutput, TaskResult
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
    "TaskFailed",
    "TaskFinished",
    "TaskSkipped",
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
    backends: dict[str, Any] = field(default_factory=dict)

    def to_trace(self, conversation: str, file_paths: list[str]) -> dict[str, Any]:
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
            "backends": self.backends,
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
class TaskFinished:
    task_id: int
    task: str
    model: str
    seconds: float
    output: TaskOutput


@dataclass(frozen=True)
class TaskFailed:
    task_id: int
    task: str
    model: str | None
    seconds: float
    error: str


@dataclass(frozen=True)
class TaskSkipped:
    task_id: int
    task: str
    reason: str


@dataclass(frozen=True)
class ResponseChunk:
    text: str


@dataclass(frozen=True)
class Done:
    result: RunResult


Event = PlanReady | ModelsSelected | TaskStarted | TaskFinished | TaskFailed | TaskSkipped | ResponseChunk | Done
