"""Faults of the controller LLM, at the level of a whole run: ``Conversations.ask`` on a runtime whose real
``AsyncOpenAI`` client talks to the scripted server over 127.0.0.1.

Whatever the LLM does (garbage, broken plans, HTTP errors, silence, a stream cut midway), the run must end
within the harness limit in a clear, short message for the user, and be recorded with the same outcome.
Unit-level cases (parsing, validation rules, JSON modes) are in test_llm.py and test_planner.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.llm_server import FakeLLMServer, Reply
from tests.fakes.reliability import (
    Agent,
    Turn,
    agent_on,
    db_rows,
    image_upload,
    plan_json,
    stage,
    stage_script,
)

CAPTION = "a red square on a grey background"
MODELS = hf_tasks("image-to-text", "visual-question-answering")
CAPTION_TASK = {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}}
GOOD_PLAN = plan_json(CAPTION_TASK)


def _stages(agent: Agent) -> list[str]:
    return [stage(body) for body in agent.llm.requests]


def assert_recorded(agent: Agent, turn: Turn) -> None:
    """The database holds the run with the outcome the user was shown, and the answer as a message."""
    result = turn.result
    ((status, error, answer),) = db_rows(
        agent.data_dir, "SELECT status, error, answer FROM runs WHERE id = ?", (result.run_id,)
    )
    assert (status, error) == (result.status, result.error)
    assert answer == result.answer
    messages = db_rows(
        agent.data_dir, "SELECT role, text FROM messages WHERE conversation_id = ? ORDER BY rowid",
        (agent.conversation,),
    )
    assert messages[-1] == ("assistant", result.answer)


def assert_clear(message: str) -> None:
    """Short, one paragraph, no internals."""
    assert message and len(message) < 600, message
    for internal in ("Traceback", "Exception", "openai.", "httpx", "aiohttp", "sk-test"):
        assert internal not in message, message


TOO_MANY = plan_json(
    *({"id": n, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}} for n in range(100))
)
BAD_PLANS = {
    "non-JSON": ("Sure! First I will look at the picture, then I will describe it.", "readable plan"),
    "truncated JSON": ('{"tasks": [{"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.p', "not a file"),
    "unknown task type": (plan_json({"id": 0, "task": "hack-the-planet", "dep": [], "args": {}}), "not a known task type"),
    "cycle": (
        plan_json(
            {"id": 0, "task": "text-to-speech", "dep": [1], "args": {"text": "<GENERATED>-1"}},
            {"id": 1, "task": "summarization", "dep": [0], "args": {"text": "hello"}},
        ),
        "form a cycle",
    ),
    "self-dependency": (plan_json({"id": 0, "task": "summarization", "dep": [0], "args": {"text": "x"}}), "depends on itself"),
    "self-reference": (
        plan_json({"id": 0, "task": "summarization", "dep": [], "args": {"text": "<GENERATED>-0"}}),
        "own output",
    ),
    "100 tasks": (TOO_MANY, "at most 12"),
    "dependency on a missing task": (
        plan_json({"id": 0, "task": "summarization", "dep": [7], "args": {"text": "x"}}), "not in the plan"
    ),
}


@pytest.mark.parametrize(("reply", "reason"), BAD_PLANS.values(), ids=BAD_PLANS.keys())
async def test_a_plan_that_stays_broken_fails_the_run_clearly(reply: str, reason: str, tmp_path: Path) -> None:
    async with agent_on(stage_script([reply]), MODELS, tmp_path / "data") as agent:
        turn = await agent.turn("describe this picture", [await image_upload()])
    result = turn.result
    assert result.status == "failed"
    assert reason in result.answer and result.answer == result.error
    assert_clear(result.answer)
    assert _stages(agent) == ["plan", "plan"]  # one re-prompt with the reason, then give up
    assert agent.hf.requests == []  # nothing of a rejected plan ran
    assert_recorded(agent, turn)


async def test_a_broken_plan_is_sent_back_once_and_the_fixed_plan_runs(tmp_path: Path) -> None:
    cycle = BAD_PLANS["cycle"][0]
    script = stage_script([cycle, GOOD_PLAN], ["It shows a red square."])
    async with agent_on(script, MODELS, tmp_path / "data") as agent:
        turn = await agent.turn("describe this picture", [await image_upload()])
    assert turn.result.status == "ok"
    retry = agent.llm.requests[1]["messages"]
    assert "form a cycle" in retry[-1]["content"]  # the re-prompt told the LLM what was wrong
    assert [t.status for t in turn.result.tasks] == ["ok"]
    assert_recorded(agent, turn)


async def test_an_empty_plan_is_a_chat_answer(tmp_path: Path) -> None:
    for empty in ('{"tasks": []}', "[]"):
        async with agent_on(stage_script([empty], ["Hello! How can I help?"]), MODELS, tmp_path / empty) as agent:
            turn = await agent.turn("hi there")
        assert (turn.result.status, turn.result.answer) == ("ok", "Hello! How can I help?")
        assert _stages(agent) == ["plan", "respond"] and agent.hf.requests == []
        assert_recorded(agent, turn)


HTTP_FAULTS = {
    "HTTP 500": (Reply.error(500, "upstream exploded"), "answered HTTP 500: upstream exploded", 3),
    "HTTP 429": (Reply.error(429, "slow down"), "rate limiting requests (HTTP 429)", 3),
    "timeout": (Reply("{}", delay=10), "timed out after 0.5s", 3),
    "unreadable body": (Reply.invalid_json(), "could not be read", 1),
    "connection dropped": (Reply(cut_after=0), "cannot reach", 3),
    # 16 bytes every 50 ms: no read ever waits long, so only a deadline on the whole attempt ends it.
    "trickled reply": (Reply("{" + " " * 400 + "}", trickle=0.05), "timed out after 0.5s", 3),
}


@pytest.mark.parametrize(("fault", "message", "requests"), HTTP_FAULTS.values(), ids=HTTP_FAULTS.keys())
async def test_llm_http_faults_are_retried_within_bounds_then_fail_the_run(
    fault: Reply, message: str, requests: int, tmp_path: Path
) -> None:
    async with agent_on(lambda body: fault, MODELS, tmp_path / "data", LLM_TIMEOUT="0.5") as agent:
        started = time.monotonic()
        turn = await agent.turn("describe this picture", [await image_upload()], limit=30)
        print(f"\n{len(agent.llm.requests)} requests, {time.monotonic() - started:.2f} s to the message")
    result = turn.result
    assert result.status == "failed"
    assert message in result.answer, result.answer
    assert_clear(result.answer)
    assert len(agent.llm.requests) == requests  # the client's bounded retries, then the run gives up
    assert agent.hf.requests == []
    assert_recorded(agent, turn)


async def test_an_answer_cut_midway_keeps_the_tasks_results(tmp_path: Path) -> None:
    cut = Reply("The picture shows a red square on grey, drawn with care.", cut_after=3)
    async with agent_on(stage_script([GOOD_PLAN], [cut]), MODELS, tmp_path / "data") as agent:
        turn = await agent.turn("describe this picture", [await image_upload()])
    result = turn.result
    assert result.status == "partial"
    assert result.answer.startswith("The picture shows")  # what was streamed is kept ...
    assert "midway" in result.answer and CAPTION in result.answer  # ... then what the task produced
    assert [t.status for t in result.tasks] == ["ok"]
    assert_recorded(agent, turn)
    ((task_status,),) = db_rows(agent.data_dir, "SELECT status FROM tasks WHERE run_id = ?", (result.run_id,))
    assert task_status == "ok"


@pytest.mark.parametrize(
    "answer",
    [Reply("Hello there my friend", cut_after=2), Reply.error(500), Reply("", finish_reason=None)],
    ids=["cut midway", "HTTP 500", "empty"],
)
async def test_a_chat_answer_that_fails_fails_the_run(answer: Reply, tmp_path: Path) -> None:
    async with agent_on(stage_script(['{"tasks": []}'], [answer]), MODELS, tmp_path / "data") as agent:
        turn = await agent.turn("hi there", limit=30)
    result = turn.result
    assert result.status == "failed"
    assert result.error and result.answer.endswith(result.error)  # a cut answer says it was cut
    assert_clear(result.answer)
    assert_recorded(agent, turn)


async def test_invented_model_ids_never_reach_the_wire(tmp_path: Path) -> None:
    plan = plan_json(CAPTION_TASK, {"id": 1, "task": "visual-question-answering", "dep": [],
                                    "args": {"image": "img-1.png", "text": "what colour?"}})
    invented = json.dumps({"choices": [
        {"task_id": 0, "id": "../../../admin", "reason": "x"},
        {"task_id": 1, "id": "made-up/vqa", "reason": "y"},
    ]})
    script = stage_script([plan], ["Red."], select=invented)
    async with agent_on(script, MODELS, tmp_path / "data", HUGGINGGPT_MODEL_SELECTION="llm") as agent:
        turn = await agent.turn("describe it and say its colour", [await image_upload()])
    assert turn.result.status == "ok"
    called = {r.model for r in agent.hf.requests}
    assert called <= set(MODELS)  # only catalog models were called, each at its catalog URL
    by_id = {t.id: t for t in turn.result.tasks}
    assert "not a candidate" in turn.result.choices[0].reason and by_id[0].model in MODELS
    assert_recorded(agent, turn)


@pytest.mark.parametrize(
    ("answer", "status"),
    [(Reply(keepalive=0.05), "failed"), (Reply(endless=True), "ok")],
    ids=["SSE keep-alives for ever", "endless answer"],
)
async def test_a_stream_that_never_ends_is_bounded_in_time_and_size(
    answer: Reply, status: str, tmp_path: Path
) -> None:
    """Keep-alives hold a run for LLM_TIMEOUT at most; an endless answer is cut at LLM_MAX_ANSWER_CHARS, with
    a note, and stored as cut (fixed: both held the run as long as the server liked; an endless answer
    printed 5.8 MB and stored 11.8 MB)."""
    env = {"LLM_TIMEOUT": "0.5", "LLM_MAX_ANSWER_CHARS": "3000"}
    async with agent_on(stage_script(['{"tasks": []}'], [answer]), MODELS, tmp_path / "data", **env) as agent:
        started = time.monotonic()
        turn = await agent.turn("hi there", limit=30)
        seconds = time.monotonic() - started
    result = turn.result
    assert result.status == status, result.error
    if status == "failed":
        assert result.answer.endswith("timed out after 0.5s")
        assert_clear(result.answer)
    else:
        assert result.answer.endswith("\n\n[answer cut here: it reached the limit of 3,000 characters]")
        assert len(result.answer) <= 3000 + 100
    assert _stages(agent) == ["plan", "respond"]
    assert_recorded(agent, turn)
    print(
        f"\n{status}: {len(result.answer):,} characters shown and stored, {agent.llm.bytes_sent:,} bytes sent "
        f"by the server, {seconds:.2f} s to the message"
    )


async def test_a_redirect_to_another_host_is_refused_and_that_host_gets_nothing(tmp_path: Path) -> None:
    """Fixed: the client followed it, sending the whole prompt there and using its answer."""
    async with FakeLLMServer([GOOD_PLAN] * 3) as other:
        elsewhere = Reply.redirect(f"{other.base_url}/chat/completions")
        async with agent_on(lambda body: elsewhere, MODELS, tmp_path / "data") as agent:
            turn = await agent.turn("describe this picture", [await image_upload()], limit=30)
    result = turn.result
    assert result.status == "failed"
    assert "redirected the request to another server, which is never followed" in result.answer
    assert other.base_url.split("//")[1].split("/")[0] not in result.answer
    assert_clear(result.answer)
    assert other.requests == [] and len(agent.llm.requests) == 1  # refused, not retried
    assert agent.hf.requests == []
    assert_recorded(agent, turn)
