"""Stage 2: which tasks reach the LLM (in one call), and the fallbacks when they do not or it answers wrong."""

from __future__ import annotations

import json
from typing import Any

from agent.backends import Backend, Backends, BackendStatus, TaskInput, TaskIO
from agent.catalog import Catalog, ModelInfo
from agent.events import LLMUsage
from agent.llm import OpenAILLM
from agent.plan import Plan, PlannedTask, TaskOutput
from agent.request import Request
from agent.selector import Selector
from agent.settings import Settings
from tests.fakes.llm_server import FakeLLMServer, Reply

RUNNABLE = {"cap/a", "cap/b", "det/d", "det/e", "det/f", "tts/f", "sum/s"}
MODELS = [
    ModelInfo(
        "cap/a", "image-to-text", downloads=1000, description="captions photos " + "very " * 100 + "well"
    ),
    ModelInfo("cap/b", "image-to-text", downloads=500, description="captions drawings"),
    ModelInfo("cap/c", "image-to-text", downloads=9000, description="needs a GPU we do not have"),
    ModelInfo("det/d", "object-detection", downloads=30),
    ModelInfo("det/e", "object-detection", downloads=20),
    ModelInfo("det/f", "object-detection", downloads=10),
    ModelInfo("tts/f", "text-to-speech", downloads=5),
    ModelInfo("tts/g", "text-to-speech", downloads=50),
    ModelInfo("vid/h", "text-to-video", downloads=7),
    ModelInfo("vid/i", "text-to-video", downloads=9),
    ModelInfo("sum/s", "summarization", downloads=99),
]


class RunnableSet(Backend):
    """A backend for every model (the catch-all), runnable only for the ids in ``RUNNABLE``."""

    name = "fake"

    def available(self, model: ModelInfo) -> bool:
        return model.id in RUNNABLE

    async def status(self) -> BackendStatus:
        return BackendStatus(self.name, True, "")

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        return TaskOutput(text="unused")


def task(task_id: int, name: str, **args: str) -> PlannedTask:
    return PlannedTask(task_id, name, (), args or {"image": "img-1.png"})


def make_selector(base_url: str, **settings_kw: Any) -> Selector:
    settings = Settings(openai_base_url=base_url, llm_model="ctrl", **settings_kw)
    return Selector(
        OpenAILLM(settings, max_retries=0),
        Catalog(MODELS),
        Backends([RunnableSet()]),
        top_k=settings.top_k,
        mode=settings.model_selection,
    )


def reply(*choices: tuple[Any, str, str]) -> str:
    return json.dumps({"choices": [{"task_id": t, "id": m, "reason": r} for t, m, r in choices]})


REQUEST = Request("caption img-1.png and find objects in it", attachments=("img-1.png",))
OPEN_PLAN = Plan((task(0, "image-to-text"), task(1, "object-detection"), task(2, "image-to-text")))


async def test_all_open_choices_are_made_in_one_llm_call() -> None:
    answer = reply((0, "cap/b", "drawings need it"), (1, "det/e", "small and good"), (2, "cap/a", "photo"))
    async with FakeLLMServer([answer]) as server:
        usage = LLMUsage()
        choices = await make_selector(server.base_url, top_k=2).select(REQUEST, OPEN_PLAN, usage)
    assert len(server.requests) == 1 and usage.calls == 1
    assert choices[0].model == "cap/b" and choices[0].reason == "drawings need it"
    assert choices[0].candidates == ("cap/b", "cap/a", "cap/c")  # chosen first, then the ranked rest
    assert choices[1].model == "det/e" and choices[1].candidates == ("det/e", "det/d", "det/f")
    assert choices[2].model == "cap/a"
    prompt = server.requests[0]["messages"][-1]["content"]
    assert "caption img-1.png and find objects in it" in prompt
    assert "Task 0 (image-to-text)" in prompt and "Task 2 (image-to-text)" in prompt
    assert "det/d" in prompt and "det/e" in prompt and "det/f" not in prompt  # top-K only
    assert "cap/c" not in prompt  # not runnable here
    assert "very " * 40 not in prompt  # descriptions are cut
    schema = server.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["choices"]["items"]["properties"]["id"]["enum"] == [
        "cap/a",
        "cap/b",
        "det/d",
        "det/e",
    ]


async def test_no_llm_call_when_there_is_nothing_to_choose() -> None:
    plan = Plan(
        (
            task(0, "text-to-speech", text="hi"),  # one runnable candidate
            task(1, "text-to-video", text="waves"),  # none runnable: most downloaded
            task(2, "summarization", text="long text"),  # the LLM does it itself
            task(3, "tabular-classification"),  # nothing in the catalog
        )
    )
    async with FakeLLMServer([]) as server:
        choices = await make_selector(server.base_url).select(REQUEST, plan, LLMUsage())
    assert server.requests == []
    assert (choices[0].model, choices[0].candidates) == ("tts/f", ("tts/f", "tts/g"))
    assert choices[0].reason == "the only model for this task that can run here"
    assert (choices[1].model, choices[1].candidates) == ("vid/i", ("vid/i", "vid/h"))
    assert "can run here" in choices[1].reason
    assert choices[2].model == "llm/ctrl" and choices[2].candidates == ("llm/ctrl", "sum/s")
    assert (
        choices[3].model == "" and "no model in the catalog does tabular-classification" in choices[3].reason
    )
    assert list(choices) == [0, 1, 2, 3]


async def test_llm_tasks_name_the_llm_that_really_runs() -> None:
    """The embedded LLM's name is its weights', not LLM_MODEL's (which names a server's model)."""
    plan = Plan((task(0, "summarization", text="long text"),))
    async with FakeLLMServer([]) as server:
        selector = make_selector(server.base_url)
        selector.llm.model = "qwen2.5-coder-1.5b-instruct-q4_k_m"
        choices = await selector.select(REQUEST, plan, LLMUsage())
    assert choices[0].model == "llm/qwen2.5-coder-1.5b-instruct-q4_k_m"
    assert "(qwen2.5-coder-1.5b-instruct-q4_k_m)" in choices[0].reason


async def test_downloads_mode_never_asks_the_llm() -> None:
    async with FakeLLMServer([]) as server:
        choices = await make_selector(server.base_url, model_selection="downloads").select(
            REQUEST, OPEN_PLAN, LLMUsage()
        )
    assert server.requests == []
    assert [choices[i].model for i in range(3)] == ["cap/a", "det/d", "cap/a"]
    assert "most downloaded" in choices[0].reason


async def test_invented_or_missing_choices_fall_back_to_the_top_candidate() -> None:
    answer = reply((0, "made/up-model", "sounds right"), ("1", "det/f", "outside the top 2"))
    async with FakeLLMServer([answer]) as server:
        choices = await make_selector(server.base_url, top_k=2).select(REQUEST, OPEN_PLAN, LLMUsage())
    assert choices[0].model == "cap/a" and "'made/up-model', which is not a candidate" in choices[0].reason
    assert choices[1].model == "det/d" and "'det/f', which is not a candidate" in choices[1].reason
    assert choices[2].model == "cap/a" and "gave no choice" in choices[2].reason


async def test_numeric_string_task_ids_and_a_bare_list_are_understood() -> None:
    answer = json.dumps([{"task_id": "1", "id": "det/e", "reason": "ok"}])
    async with FakeLLMServer([answer]) as server:
        choices = await make_selector(server.base_url).select(REQUEST, OPEN_PLAN, LLMUsage())
    assert choices[1].model == "det/e"


async def test_a_malformed_reply_never_fails_the_run() -> None:
    async with FakeLLMServer(["I like all of them!"]) as server:
        choices = await make_selector(server.base_url).select(REQUEST, OPEN_PLAN, LLMUsage())
    assert [choices[i].model for i in range(3)] == ["cap/a", "det/d", "cap/a"]
    assert all("could not be read" in choices[i].reason for i in range(3))


async def test_an_llm_failure_falls_back_too() -> None:
    async with FakeLLMServer([Reply.error(500, "boom")]) as server:
        choices = await make_selector(server.base_url).select(REQUEST, OPEN_PLAN, LLMUsage())
    assert choices[0].model == "cap/a" and "model selection by the LLM failed" in choices[0].reason
    assert choices[0].candidates == ("cap/a", "cap/b", "cap/c")
