"""Stage 4: the answer is streamed from a prompt holding the request, the plan, the models and the results."""

from __future__ import annotations

import json

import pytest

from agent.errors import GenerationError
from agent.events import LLMUsage
from agent.llm import OpenAILLM, estimate_message_tokens
from agent.plan import ModelChoice, Plan, PlannedTask, TaskOutput, TaskResult
from agent.prompts import load_prompt
from agent.request import ChatTurn, Request
from agent.resources import Origin, Resource
from agent.responder import Responder
from agent.settings import Settings
from tests.fakes.llm_server import FakeLLMServer, Reply

IMAGE = Resource("out-2-1.png", "image", "image/png", "d" * 64, 5, origin=Origin("task", "r", 1))
PLAN = Plan(
    (
        PlannedTask(0, "image-to-text", (), {"image": "img-1.png"}),
        PlannedTask(1, "text-to-image", (0,), {"text": "<GENERATED>-0"}),
        PlannedTask(2, "text-to-speech", (0,), {"text": "<GENERATED>-0"}),
    )
)
CHOICES = {
    0: ModelChoice(0, "cap/a", "best for photos", ("cap/a", "cap/b")),
    1: ModelChoice(1, "draw/x", "the only one", ("draw/x",)),
    2: ModelChoice(2, "tts/y", "most downloaded", ("tts/y",)),
}
RESULTS = [
    TaskResult(0, "image-to-text", "cap/a", "ok", 1.0, TaskOutput(text="a dog on a beach " + "z" * 50_000)),
    TaskResult(1, "text-to-image", "draw/x", "ok", 2.0, TaskOutput(resources=[IMAGE])),
    TaskResult(2, "text-to-speech", "tts/y", "failed", 0.5, error="tts/y answered HTTP 503"),
]
REQUEST = Request(
    "What is in img-1.png? Draw it again.",
    history=(ChatTurn("user", "hello"), ChatTurn("assistant", "Hi! How can I help?")),
    attachments=("img-1.png",),
    turn=2,
)


def make_responder(base_url: str, context_tokens: int = 8192) -> Responder:
    settings = Settings(openai_base_url=base_url, llm_context_tokens=context_tokens)
    return Responder(OpenAILLM(settings, max_retries=0))


async def collect(responder: Responder, request: Request, plan: Plan, usage: LLMUsage) -> list[str]:
    return [c async for c in responder.respond(request, plan, CHOICES, RESULTS if plan else [], usage)]


async def test_answer_streams_from_a_prompt_with_plan_models_and_results() -> None:
    answer = "It shows a dog on a beach. I drew it again as out-2-1.png; reading it aloud failed."
    async with FakeLLMServer([answer]) as server:
        usage = LLMUsage()
        chunks = await collect(make_responder(server.base_url), REQUEST, PLAN, usage)
    assert len(chunks) > 1 and "".join(chunks) == answer
    assert usage.calls == 1
    messages = server.requests[0]["messages"]
    assert messages[0] == {"role": "system", "content": load_prompt("responder_system.txt")}
    assert messages[1:3] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]
    prompt = messages[-1]["content"]
    assert "What is in img-1.png? Draw it again." in prompt
    assert "Files attached to the request: img-1.png" in prompt
    assert "Files made by the tasks: out-2-1.png" in prompt
    workflow = json.loads(prompt.split("(JSON):\n", 1)[1].split("\n\nFiles made", 1)[0])
    assert [w["model"] for w in workflow] == ["cap/a", "draw/x", "tts/y"]
    assert workflow[0]["why this model"] == "best for photos"
    assert workflow[0]["output"].startswith("a dog on a beach") and len(workflow[0]["output"]) <= 1500
    assert workflow[1]["files"] == ["out-2-1.png"]
    assert workflow[2]["status"] == "failed" and workflow[2]["error"] == "tts/y answered HTTP 503"


async def test_prompt_fits_a_small_context_with_the_newest_turns() -> None:
    history = tuple(
        ChatTurn("user" if i % 2 == 0 else "assistant", f"turn {i} " + "w" * 600) for i in range(30)
    )
    request = Request("and?", history=history)
    async with FakeLLMServer(["ok"]) as server:
        responder = make_responder(server.base_url, context_tokens=3000)
        await collect(responder, request, PLAN, LLMUsage())
    messages = server.requests[0]["messages"]
    assert estimate_message_tokens(messages) + responder.reply_tokens <= 3000
    assert "turn 29 " in messages[-2]["content"] and "turn 0 " not in json.dumps(messages)


async def test_empty_plan_is_a_plain_chat_answer() -> None:
    request = Request(
        "thanks! what was my first message?", history=REQUEST.history, attachments=("img-2.jpg",)
    )
    async with FakeLLMServer(["You said hello."]) as server:
        text = "".join(await collect(make_responder(server.base_url), request, Plan(), LLMUsage()))
    assert text == "You said hello."
    messages = server.requests[0]["messages"]
    assert messages[0]["content"] == load_prompt("chat_system.txt")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "thanks! what was my first message?\n\n(Attached: img-2.jpg)"


async def test_roles_alternate_starting_with_the_user() -> None:
    history = (ChatTurn("assistant", "orphan"), ChatTurn("user", "first"), ChatTurn("user", "second"))
    async with FakeLLMServer(["ok"]) as server:
        await collect(make_responder(server.base_url), Request("third", history=history), Plan(), LLMUsage())
    messages = server.requests[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "first\n\nsecond\n\nthird"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply.error(500, "down"), "the answer could not be written: .*HTTP 500"),
        (Reply(text="one two three four", cut_after=2), "the answer could not be written: .*midway"),
        (Reply(text="  "), "empty answer"),
    ],
)
async def test_llm_failures_are_generation_errors(reply: Reply, message: str) -> None:
    async with FakeLLMServer([reply]) as server:
        with pytest.raises(GenerationError, match=message):
            await collect(make_responder(server.base_url), REQUEST, PLAN, LLMUsage())
