"""The state of a run as a front end shows it: each task waiting, running, ok, failed or skipped.

Both the terminal and the Discord status message render this one model, fed with the agent's events. A
task's state uses the result's own words (``ok``, ``failed``, ``skipped``) plus the two a result cannot have
yet (``waiting``, ``running``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .events import Done, Event, ModelsSelected, PlanReady, Replanning, TaskEnded, TaskStarted
from .plan import Plan, TaskStatus

__all__ = ["LLM_STAGES", "RunProgress", "TaskState"]

State = Literal["waiting", "running"] | TaskStatus
_ICONS: dict[State, str] = {"waiting": "⏳", "running": "⚙️", "ok": "✅", "failed": "❌", "skipped": "⏭️"}


@dataclass
class TaskState:
    id: int
    task: str
    dep: tuple[int, ...]
    model: str | None = None
    state: State = "waiting"
    seconds: float | None = None
    note: str | None = None


# Stages in which a run waits for the controller LLM (where what the LLM is busy with is worth showing).
LLM_STAGES = frozenset({"planning", "replanning", "choosing models", "answering"})


@dataclass
class RunProgress:
    """``busy`` is what keeps the run waiting on the LLM (loading it, queued behind other requests), as the
    front end last heard it from ``LLM.activity``; it is shown only in the LLM's stages."""

    plan: Plan | None = None
    tasks: dict[int, TaskState] = field(default_factory=dict)
    stage: str = "planning"
    busy: str | None = None
    replanned: str | None = None

    @property
    def headline(self) -> str:
        """The stage, with what the LLM is busy with when that is what the run waits for."""
        return f"{self.stage} ({self.busy})" if self.busy and self.stage in LLM_STAGES else self.stage

    def apply(self, event: Event) -> bool:
        """Update from ``event``; True if what is shown changed."""
        if isinstance(event, PlanReady):
            # After a replan the plan keeps the tasks that ran, and their states.
            self.plan = event.plan
            self.tasks = {
                t.id: self.tasks.get(t.id) or TaskState(t.id, t.task, t.dep) for t in event.plan.tasks
            }
            self.stage = "choosing models" if event.plan else "answering"
        elif isinstance(event, Replanning):
            self.stage = "replanning"
            failed = ", ".join(map(str, event.failed))
            self.replanned = (
                f"replanned once, after task{'s' if len(event.failed) > 1 else ''} {failed} failed"
            )
        elif isinstance(event, ModelsSelected):
            for task_id, choice in event.choices.items():
                if task_id in self.tasks and self.tasks[task_id].state == "waiting":
                    self.tasks[task_id].model = choice.model or None
            self.stage = "running"
        elif isinstance(event, TaskStarted):
            self._set(event.task_id, "running", model=event.model)
        elif isinstance(event, TaskEnded):
            result = event.result
            note = result.error if result.status != "ok" else None
            seconds = result.seconds if result.status != "skipped" else None
            self._set(result.id, result.status, model=result.model, seconds=seconds, note=note)
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
        if self.replanned:
            out.append(f"🔁 {self.replanned}" if icons else f"[replan] {self.replanned}")
        return out
