from __future__ import annotations

from agent.events import Done, LLMUsage, ModelsSelected, PlanReady, RunResult, TaskEnded, TaskStarted
from agent.plan import ModelChoice, Plan, PlannedTask, TaskOutput, TaskResult
from agent.progress import RunProgress

PLAN = Plan(
    (
        PlannedTask(0, "image-to-text", (), {"image": "img-1.png"}),
        PlannedTask(1, "text-to-speech", (0,), {"text": "<GENERATED>-0"}),
        PlannedTask(2, "object-detection", (), {"image": "img-1.png"}),
    )
)


def test_states_follow_events_and_final_lines_show_outcomes() -> None:
    p = RunProgress()
    assert p.apply(PlanReady(PLAN))
    assert [t.state for t in p.tasks.values()] == ["waiting"] * 3
    p.apply(ModelsSelected({0: ModelChoice(0, "blip", "best"), 1: ModelChoice(1, "tts", ""), 2: ModelChoice(2, "", "")}))
    p.apply(TaskStarted(0, "image-to-text", "blip"))
    assert p.tasks[0].state == "running"
    p.apply(TaskEnded(TaskResult(0, "image-to-text", "blip", "ok", 1.25, TaskOutput(text="a cat"))))
    p.apply(TaskEnded(TaskResult(2, "object-detection", None, "failed", 0.5, error="no model available")))
    p.apply(TaskEnded(TaskResult(1, "text-to-speech", None, "skipped", error="task 0 failed")))
    lines = p.lines(icons=False)
    assert lines[0] == "[ok] 0 image-to-text · blip · 1.2s"
    assert lines[1].startswith("[skipped] 1 text-to-speech ← 0") and lines[1].endswith("— task 0 failed")
    assert "no model available" in lines[2]
    assert p.stage == "answering"
    result = RunResult("r", "partial", PLAN, {}, [], "", [], LLMUsage(), 1.0)
    p.apply(Done(result))
    assert p.stage == "done, with failures"


def test_unknown_task_ids_are_ignored() -> None:
    p = RunProgress()
    p.apply(PlanReady(PLAN))
    p.apply(TaskStarted(9, "text-to-image", "m"))
    assert all(t.state == "waiting" for t in p.tasks.values())
