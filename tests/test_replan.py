"""One bounded replan: when a task fails on every model it could run on, the planner gets one more call with
what ran and what failed; the new tasks run (the ones that finished are not run again) and the answer is
written from them. Through the real ``AsyncOpenAI`` and ``AsyncInferenceClient`` against the fakes.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.catalog import Catalog
from agent.events import ModelsSelected, PlanReady, Replan, Replanning
from agent.progress import RunProgress
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import Fault
from tests.fakes.reliability import agent_on, image_upload, plan_json, stage, stage_script

CAPTIONERS = [m.id for m in Catalog.bundled().by_task("image-to-text")]
ANSWERERS = [m.id for m in Catalog.bundled().by_task("visual-question-answering")]
MODELS = hf_tasks("image-to-text", "visual-question-answering", "image-classification")
CAPTION = plan_json(
    {"id": 0, "task": "image-classification", "dep": [], "args": {"image": "img-1.png"}},
    {"id": 1, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
)
ASK_INSTEAD = plan_json(
    {
        "id": 2,
        "task": "visual-question-answering",
        "dep": [],
        "args": {"image": "img-1.png", "text": "What is it?"},
    }
)
# Model selection by the LLM: the normal path is plan, select, respond; a failure adds the replan.
LLM_SELECTION = {"HUGGINGGPT_MODEL_SELECTION": "llm"}
DOWN = Fault.error(500, "internal error")


def plans_sent(requests: list[dict]) -> list[dict]:
    return [body for body in requests if stage(body) == "plan"]


async def test_a_task_failing_on_every_model_is_replanned_once_and_the_answer_uses_the_new_task(
    tmp_path: Path,
) -> None:
    script = stage_script([CAPTION, ASK_INSTEAD], ["It is red."])
    async with agent_on(script, MODELS, tmp_path / "data", **LLM_SELECTION) as agent:
        for model in CAPTIONERS:
            agent.hf.script(model, *[DOWN] * 10)
        turn = await agent.turn("what is in this picture?", [await image_upload()])
    result = turn.result
    assert result.status == "ok", result.error  # the failed task was replaced by one that worked
    assert result.replan == Replan(after=(1,), added=(2,))
    assert [(t.id, t.task, t.status) for t in result.tasks] == [
        (0, "image-classification", "ok"),
        (1, "image-to-text", "failed"),
        (2, "visual-question-answering", "ok"),
    ]
    assert [e.failed for e in turn.events if isinstance(e, Replanning)] == [(1,)]
    assert [len(e.plan) for e in turn.events if isinstance(e, PlanReady)] == [2, 3]
    # The classification ran once: finished tasks are not run again.
    classifier = next(t.model for t in result.tasks if t.id == 0)
    assert sum(r.model == classifier for r in agent.hf.requests) == 1
    # The replan request carries what ran and what failed, and asks for new ids.
    replan = plans_sent(agent.llm.requests)[1]["messages"]
    assert "task 0 (image-classification) finished ok" in replan[-1]["content"]
    assert "task 1 (image-to-text) failed" in replan[-1]["content"] and "ids from 2" in replan[-1]["content"]
    assert json.loads(replan[-2]["content"])["tasks"][1]["task"] == "image-to-text"
    # The answer is written from the new task's output.
    respond = next(body for body in agent.llm.requests if stage(body) == "respond")
    workflow = respond["messages"][-1]["content"]
    assert '"task": "visual-question-answering"' in workflow and '"output": "red"' in workflow
    assert [stage(body) for body in agent.llm.requests] == ["plan", "select", "plan", "respond"]
    assert result.llm.calls == 4
    trace = result.to_trace("c", [])
    assert trace["replan"] == {"after": [1], "added": [2], "error": None}
    # Progress shows it: the new task, and the replan itself.
    progress = RunProgress()
    for event in turn.events:
        progress.apply(event)
    assert progress.tasks[2].state == "ok" and progress.tasks[1].state == "failed"
    assert "🔁 replanned once, after task 1 failed" in progress.lines()


async def test_a_second_failure_is_not_replanned_again(tmp_path: Path) -> None:
    again = plan_json(
        {"id": 2, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
    )
    script = stage_script([CAPTION, again, ASK_INSTEAD], ["It failed."])
    async with agent_on(script, MODELS, tmp_path / "data", **LLM_SELECTION) as agent:
        for model in CAPTIONERS:
            agent.hf.script(model, *[DOWN] * 30)
        turn = await agent.turn("what is in this picture?", [await image_upload()])
    result = turn.result
    assert result.status == "partial"
    assert result.replan == Replan(after=(1,), added=(2,))
    assert [(t.id, t.status) for t in result.tasks] == [(0, "ok"), (1, "failed"), (2, "failed")]
    assert sum(isinstance(e, Replanning) for e in turn.events) == 1
    assert [stage(body) for body in agent.llm.requests] == ["plan", "select", "plan", "respond"]
    assert result.llm.calls == 4


async def test_the_normal_path_makes_three_llm_calls_and_no_replan(tmp_path: Path) -> None:
    script = stage_script([CAPTION], ["It is a red square."])
    async with agent_on(script, MODELS, tmp_path / "data", **LLM_SELECTION) as agent:
        turn = await agent.turn("what is in this picture?", [await image_upload()])
    result = turn.result
    assert result.status == "ok" and result.replan is None
    assert [stage(body) for body in agent.llm.requests] == ["plan", "select", "respond"]
    assert result.llm.calls == 3
    assert not any(isinstance(e, Replanning) for e in turn.events)


async def test_a_replan_that_breaks_a_rule_is_not_asked_again_and_the_run_answers(tmp_path: Path) -> None:
    # The new task depends on the task that failed: refused, and the answer says what happened.
    broken = plan_json(
        {
            "id": 2,
            "task": "visual-question-answering",
            "dep": [1],
            "args": {"image": "img-1.png", "text": "?"},
        }
    )
    script = stage_script([CAPTION, broken], ["The caption failed."])
    async with agent_on(script, MODELS, tmp_path / "data", **LLM_SELECTION) as agent:
        for model in CAPTIONERS:
            agent.hf.script(model, *[DOWN] * 10)
        turn = await agent.turn("what is in this picture?", [await image_upload()])
    result = turn.result
    assert result.status == "partial"
    assert result.replan is not None and result.replan.added == () and "task 1" in (result.replan.error or "")
    assert [stage(body) for body in agent.llm.requests] == ["plan", "select", "plan", "respond"]
    assert sum(isinstance(e, ModelsSelected) for e in turn.events) == 1
