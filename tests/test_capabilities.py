"""Capability-aware planning: the planner knows which task types can run in this setup and plans only those.

A runtime is built for three setups — models on this machine only (no Hugging Face), Hugging Face configured,
and only an endpoints file serving one model — and what the planner's server receives is read back: the task
types listed in the prompt and allowed by the reply schema must be exactly the runnable ones. A request that
needs a missing capability is answered plainly, naming it and the setting that enables it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.backends.local import local_models
from agent.catalog import Catalog
from agent.demos import load_demonstrations, runnable
from agent.events import RunResult
from agent.plan_schema import exact_plan_schema
from agent.settings import Settings
from agent.tasks import LLM_TASKS, TASKS
from app.runtime import Runtime
from tests.fakes.llm_server import FakeLLMServer
from tests.fakes.reliability import run_turn

DRAW_A_CAT = json.dumps({"tasks": [], "missing": ["text-to-image"]})


def _local_tasks() -> set[str]:
    """The task types of the local models installed here (the local backend's honest availability)."""
    from agent.backends.local import _SPECS

    return {spec.info.task for spec in _SPECS.values() if spec.missing() is None}


def _listed_task_types(system_prompt: str) -> set[str]:
    """The task types the planner's prompt offers: its "- name: what it does | args | output" lines."""
    return {m.group(1) for m in re.finditer(r"^- ([a-z0-9-]+): .*\|.*\|", system_prompt, re.MULTILINE)}


async def _planner_request(
    tmp_path: Path, llm: FakeLLMServer, **env: str
) -> tuple[Runtime, dict[str, Any], RunResult]:
    settings = Settings.from_mapping(
        {
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "sk-test",
            "HUGGINGGPT_DATA_DIR": str(tmp_path / "data"),
            "HUGGINGGPT_DEMOS": "fixed",
            "HUGGINGGPT_MODEL_SELECTION": "downloads",
            **env,
        }
    )
    runtime = await Runtime.start(settings)
    conversation = (await runtime.conversations.open("cli")).id
    turn = await run_turn(runtime, conversation, "draw a cat")
    return runtime, llm.requests[0], turn.result


def _schema_task_types(body: dict[str, Any]) -> set[str]:
    schema = body["response_format"]["json_schema"]["schema"]
    return set(schema["properties"]["tasks"]["items"]["properties"]["task"]["enum"])


@pytest.mark.parametrize("setup", ["this machine only", "Hugging Face", "one endpoint"])
async def test_the_prompt_and_the_schema_offer_exactly_the_runnable_task_types(
    tmp_path: Path, setup: str
) -> None:
    env: dict[str, str] = {}
    if setup == "Hugging Face":
        env = {"HF_TOKEN": "hf_test"}
    elif setup == "one endpoint":
        endpoints = tmp_path / "endpoints.json"
        endpoints.write_text(json.dumps({"Salesforce/blip-image-captioning-large": "http://127.0.0.1:9"}))
        env = {"HUGGINGGPT_ENDPOINTS": str(endpoints)}
    async with FakeLLMServer([DRAW_A_CAT]) as llm:
        runtime, body, _ = await _planner_request(tmp_path, llm, **env)
        try:
            expected = set(LLM_TASKS) | _local_tasks()
            if setup == "Hugging Face":
                catalog = Catalog.bundled()
                expected |= {t for t in catalog.tasks() if t not in LLM_TASKS}
            elif setup == "one endpoint":
                expected.add("image-to-text")
            assert runtime.agent.task_types == expected
            system = body["messages"][0]["content"]
            assert _listed_task_types(system) == expected
            assert _schema_task_types(body) == expected
            # The grammar a llama.cpp backend would compile allows exactly these too.
            exact = exact_plan_schema(12, (), 100, runtime.agent.task_types)
            named = {t for key, d in exact["$defs"].items() if key.endswith("-tasks") for t in d["enum"]}
            assert named == expected
            assert set(exact["properties"].get("missing", {}).get("items", {}).get("enum", ())) == set(TASKS) - expected
            # The demonstrations shown use only runnable task types (or say what is missing).
            for message in body["messages"][1:-1]:
                if message["role"] == "assistant":
                    reply = json.loads(message["content"])
                    assert {t["task"] for t in reply["tasks"]} <= expected
                    assert set(reply.get("missing", ())) <= set(TASKS) - expected
            if expected != set(TASKS):
                assert "have no model in this setup" in system
        finally:
            await runtime.close()


async def test_a_request_for_a_missing_capability_gets_a_plain_answer_naming_it(tmp_path: Path) -> None:
    async with FakeLLMServer([DRAW_A_CAT]) as llm:
        runtime, _, result = await _planner_request(tmp_path, llm)
        await runtime.close()
    assert result.status == "ok" and not result.plan.tasks
    assert "text-to-image" in result.answer and "HF_TOKEN" in result.answer
    assert result.llm.calls == 1, "the plain answer needs no second LLM call"


def test_offline_demonstrations_keep_their_lessons_with_what_can_run() -> None:
    """Without captioning or visual question answering, the counting demonstration counts with object
    detection, and drawing is shown as a plain "missing" answer rather than dropped."""
    offline = set(LLM_TASKS) | {m.task for m in local_models()}
    shown = {d.request.text: d for d in runnable(load_demonstrations(), offline)}
    counting = shown["How many people are in this picture? Write a short poem about the scene."]
    assert [t["task"] for t in counting.plan] == ["object-detection", "text-generation"]
    drawing = shown["Draw a red sports car and, separately, a blue mountain bike."]
    assert drawing.plan == () and drawing.missing == ("text-to-image",)
    assert "Nice! Now estimate the depth of that image and tell me what breed the cat is." not in shown
