"""LLM economy: controller calls and tokens per request, for requests of 1, 3 and 5 tasks.

The agent runs end to end over the loopback fakes with scripted plans, so the prompts are our real prompts
(system rules, task list, demonstrations, files, results) and only the LLM's answers are canned. Every
task has several candidate models, so model selection is asked of the LLM, as in the paper. Tokens are the
fake server's usage (about 4 characters a token, the estimator the agent itself uses), and, when the
embedded model is installed, counted again with SmolLM2's real tokenizer (through llama.cpp). tiktoken is
not used: its encodings are downloaded at run time, which this machine cannot do.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.events import Done, RunResult
from agent.request import Request
from agent.resources import MemoryResourceStore, Origin

from .common import Result, Target, run_main
from .controller import ScriptedController, stage_of
from .embedded import embedded_models, token_counter
from .harness import loopback, runtime_on

__all__ = ["PLANS", "REFERENCE", "main", "run"]

NAME = "economy"
MAX_CALLS = 3

_IMG = "img-1.png"
PLANS: dict[int, tuple[str, list[dict[str, Any]]]] = {
    1: ("What is in this picture?", [{"id": 0, "task": "image-to-text", "dep": [], "args": {"image": _IMG}}]),
    3: (
        "Describe this picture, find the objects in it, and read the description aloud.",
        [
            {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": _IMG}},
            {"id": 1, "task": "object-detection", "dep": [], "args": {"image": _IMG}},
            {"id": 2, "task": "text-to-speech", "dep": [0], "args": {"text": "<GENERATED>-0"}},
        ],
    ),
    5: (
        "Describe this picture, find the objects, classify it, read the description aloud, "
        "and draw a new picture from the description.",
        [
            {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": _IMG}},
            {"id": 1, "task": "object-detection", "dep": [], "args": {"image": _IMG}},
            {"id": 2, "task": "image-classification", "dep": [], "args": {"image": _IMG}},
            {"id": 3, "task": "text-to-speech", "dep": [0], "args": {"text": "<GENERATED>-0"}},
            {"id": 4, "task": "text-to-image", "dep": [0], "args": {"text": "<GENERATED>-0"}},
        ],
    ),
}

REFERENCE = {"plan": (1300, 1700), "select_per_task": (700, 925)}
"""The reference implementation's prompt sizes in tokens: stage 1 before any history, and one selection
call per task with more than one candidate; its response call comes on top."""


def _reference(tasks: int) -> tuple[int, str]:
    low = REFERENCE["plan"][0] + tasks * REFERENCE["select_per_task"][0]
    high = REFERENCE["plan"][1] + tasks * REFERENCE["select_per_task"][1]
    return tasks + 2, f"{low:,}–{high:,} + response"


async def _one(agent: Any, text: str, png: bytes, tasks: int) -> RunResult:
    store = MemoryResourceStore()
    image = await store.put(png, name=_IMG, mime="image/png", origin=Origin("upload"))
    request = Request(text, resources=(image,), attachments=(_IMG,), run_id=f"economy-{tasks}")
    result: RunResult | None = None
    async for event in agent.run(request, store):
        if isinstance(event, Done):
            result = event.result
    assert result is not None
    if result.status != "ok" or len(result.tasks) != tasks:
        raise RuntimeError(f"the {tasks}-task run ended {result.status}: {result.error}")
    return result


async def measure(count: Callable[[str], int] | None) -> list[dict[str, Any]]:
    from tests.fakes.hf_server import png_bytes
    from tests.fakes.llm_server import prompt_tokens

    rows = []
    with tempfile.TemporaryDirectory() as tmp, loopback(ScriptedController(dict(PLANS.values())), Path(tmp)) as world:
        async with runtime_on(world) as runtime:
            agent = runtime.agent
            for tasks, (text, _) in PLANS.items():
                sent = len(world.llm_requests)
                result = await _one(agent, text, png_bytes(), tasks)
                bodies = world.llm_requests[sent:]
                by_stage: dict[str, dict[str, int]] = {}
                for body in bodies:
                    messages = body["messages"]
                    stage = by_stage.setdefault(stage_of(messages), {"calls": 0, "prompt_tokens": 0, "counted": 0})
                    stage["calls"] += 1
                    stage["prompt_tokens"] += prompt_tokens(messages)
                    if count is not None:
                        stage["counted"] += sum(4 + count(str(m.get("content") or "")) for m in messages)
                rows.append(
                    {
                        "tasks": tasks,
                        "llm": result.llm.to_json(),
                        "stages": by_stage,
                        "counted_prompt_tokens": sum(s["counted"] for s in by_stage.values()) if count else None,
                    }
                )
    return rows


async def run(smoke: bool) -> Result:
    models = [] if smoke else embedded_models()
    count = token_counter(models[0]) if models else None
    measured = await measure(count)
    rows: list[list[Any]] = []
    for m in measured:
        stages = m["stages"]
        calls, reference_tokens = _reference(m["tasks"])
        rows.append(
            [
                m["tasks"],
                m["llm"]["calls"],
                stages.get("plan", {}).get("prompt_tokens", 0),
                stages.get("select", {}).get("prompt_tokens", 0),
                stages.get("respond", {}).get("prompt_tokens", 0),
                m["llm"]["prompt_tokens"],
                m["llm"]["completion_tokens"],
                m["counted_prompt_tokens"],
                calls,
                reference_tokens,
            ]
        )
    worst_calls = max(m["llm"]["calls"] for m in measured)
    five = next(m for m in measured if m["tasks"] == 5)
    five_plan_select = sum(five["stages"].get(s, {}).get("prompt_tokens", 0) for s in ("plan", "select"))
    reference_calls, reference_tokens = _reference(5)
    tokenizer = f"SmolLM2 tokenizer ({models[0].label})" if count else None
    return Result(
        name=NAME,
        title="LLM economy: calls and tokens per request",
        smoke=smoke,
        headers=[
            "tasks",
            "LLM calls",
            "plan prompt",
            "select prompt",
            "respond prompt",
            "prompt tokens",
            "completion tokens",
            "prompt tokens (SmolLM2 tokenizer)",
            "reference calls",
            "reference prompt tokens",
        ],
        rows=rows,
        summary=(
            f"economy: at most {worst_calls} LLM calls per request (target ≤ {MAX_CALLS}); 5 tasks: "
            f"{five['llm']['calls']} calls, {five_plan_select:,} prompt tokens to plan and select "
            f"({five['llm']['prompt_tokens']:,} with the answer) vs the reference's {reference_calls} calls, "
            f"{reference_tokens} tokens"
        ),
        data={"runs": measured, "reference": REFERENCE, "tokenizer": tokenizer or "~4 characters a token"},
        notes=[
            "Token columns without a tokenizer name use ~4 characters a token (the fake server's usage, the "
            "same estimate the agent budgets with); "
            + (f"the {tokenizer} column re-counts the same prompts." if tokenizer else "no real tokenizer was installed."),
            "Every task has ≥ 2 runnable candidates (bundled catalog, top-5 shown), so selection asks the LLM: "
            "one call for all tasks. Fixed demonstrations (8), no chat history.",
            "Reference: 1,300–1,700 tokens for stage 1 before history, plus 700–925 per task for selection "
            "(one call per task), plus the response call (not counted here).",
        ],
        targets=[Target("LLM calls per request", f"≤ {MAX_CALLS}", str(worst_calls), worst_calls <= MAX_CALLS)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
