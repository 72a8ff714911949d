"""Typed plans and task results: what stage 1 produces and stage 3 fills in."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .resources import Resource

__all__ = [
    "GENERATED_RE",
    "ModelChoice",
    "Plan",
    "PlannedTask",
    "TaskOutput",
    "TaskResult",
    "TaskStatus",
]

GENERATED_RE = re.compile(r"<GENERATED>-(\d+)")

TaskStatus = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class PlannedTask:
    """One task of a plan. ``args`` values are literal text, a resource name, or ``<GENERATED>-N``."""

    id: int
    task: str
    dep: tuple[int, ...]
    args: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "dep": list(self.dep), "args": dict(self.args)}


@dataclass(frozen=True)
class Plan:
    tasks: tuple[PlannedTask, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, task_id: int) -> PlannedTask:
        return next(t for t in self.tasks if t.id == task_id)

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.tasks]


@dataclass(frozen=True)
class ModelChoice:
    """Stage 2's answer for one task: the chosen model, why, and the ranked fallbacks after it."""

    task_id: int
    model: str
    reason: str
    candidates: tuple[str, ...] = ()


@dataclass
class TaskOutput:
    """What a task produced: text (for text arguments and the answer), files, and raw structured data."""

    text: str | None = None
    resources: list[Resource] = field(default_factory=list)
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.text is not None:
            out["text"] = self.text
        if self.resources:
            out["files"] = [r.name for r in self.resources]
        if self.data is not None:
            out["data"] = self.data
        return out


@dataclass
class TaskResult:
    id: int
    task: str
    model: str | None
    status: TaskStatus
    seconds: float = 0.0
    output: TaskOutput | None = None
    error: str | None = None
    attempts: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "model": self.model,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "output": self.output.to_json() if self.output else None,
            "error": self.error,
        }
