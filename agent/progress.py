"""The state of a run as a front end shows it: each task waiting, running, done, failed or skipped.

Both the terminal and the Discord status message render this one model, fed with the agent's events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .events import Done, Event, ModelsSelected, PlanReady, TaskFailed, TaskFinished, TaskSkipped, TaskStarted
from .plan import Plan

__all__ = ["RunProgress", "TaskState"]

State = Literal["waiting", "running", "done", "failed", "skipped"]
_ICONS: dict[State, str] = {"waiting": "⏳", "running": "⚙️", "done": "✅", "failed": "❌", "skipped": "⏭️"}


@dataclass
class TaskState:
    id: int
    task: str
    dep: tuple[int, ...]
    model: str | None = None
    state: State = "waiting"
    seconds: float | None = None
    note: str | None = None


@dataclass
class RunProgress:
    plan: Plan | None = None
    tasks: dict[int, TaskState] = field(default_factory=dict)
    stage: str = "planning"

    def apply(self, event: Event) -> bool:
        """Update from ``event``; True if what is shown changed."""
        if isinstance(event, PlanReady):
            self.plan = event.plan
            self.tasks = {t.id: TaskState(t.id, t.task, t.dep) for t in event.plan.tasks}
            self.stage = "choosing models" if event.plan else "answering"
        elif isinstance(event, ModelsSelected):
            for task_id, choice in event.choices.items():
                if task_id in self.tasks:
                    self.tasks[task_id].model = choice.model or None
            self.stage = "running"
        elif isinstance(event, TaskStarted):
            self._set(event.task_id, "running", model=event.model)
        elif isinstance(event, TaskFinished):
            self._set(event.task_id, "done", model=event.model, seconds=event.seconds)
        elif isinstance(event, TaskFailed):
            self._set(event.task_id, "failed", seconds=event.seconds, note=event.error)
        elif isinstance(event, TaskSkipped):
            self._set(event.task_id, "skipped", note=event.reason)
        elif isinstance(event, Done):
            status = event.result.status
            self.stage = {"ok": "done", "partial": "done, with failures", "failed": "failed", "cancelled": "cancelled"}[
                status
            ]
            if status == "cancelled":
                for t in self.tasks.values():
                    if t.state in ("waiting", "running"):
                        t.state, t.note = "skipped", "cancelled"
        else:
            return False
        if self.tasks and all(t.state not in ("waiting", "running") for t in self.tasks.values()):
            if self.stage == "running":
                self.stage = "answering"
        return True

    def _set(self, task_id: int, state: State, **changes: object) -> None:
        t = self.tasks.get(task_id)
        if t is None:
            return
        t.state = state
        for key, value in changes.items():
            if value is not None:
                setattr(t, key, value)

    def lines(self, *, icons: bool = True) -> list[str]:
        out: list[str] = []
        for t in self.tasks.values():
            mark = _ICONS[t.state] if icons else f"[{t.state}]"
            after = f" ← {', '.join(map(str, t.dep))}" if t.dep else ""
            model = f" · {t.model}" if t.model else ""
            secs = f" · {t.seconds:.1f}s" if t.seconds is not None else ""
            note = f" — {t.note}" if t.note and t.state in ("failed", "skipped") else ""
            out.append(f"{mark} {t.id} {t.task}{after}{model}{secs}{note}")
        return out
