"""Scripts for the fake LLM and HF servers, so front-end tests run the real agent on planned outcomes.

``planning_script`` answers the planner's (non-streamed) requests with the given plans, in order, and the
responder's streamed requests with the given answers. ``hf_tasks`` maps every catalog model of some tasks to
that task, for ``FakeHF``: whichever model the agent picks, the fake answers for it. ``agent_settings`` is
what a test runtime needs to reach both fakes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.catalog import Catalog

from .llm_server import Reply

__all__ = ["agent_settings", "hf_tasks", "plan", "planning_script"]


def plan(*tasks: tuple[str, dict[str, str]]) -> str:
    """A plan reply: tasks ``(name, args)`` numbered from 0, without explicit dependencies."""
    return json.dumps({"tasks": [{"id": n, "task": name, "dep": [-1], "args": args} for n, (name, args) in enumerate(tasks)]})


def planning_script(
    plans: Sequence[str | Reply], answers: Sequence[str | Reply]
) -> Callable[[dict[str, Any]], str | Reply]:
    """A ``FakeLLMServer`` script: plans for plain requests, answers for streamed ones; the last repeats."""
    plans_left, answers_left = list(plans), list(answers)

    def reply(body: dict[str, Any]) -> str | Reply:
        queue = answers_left if body.get("stream") else plans_left
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return reply


def hf_tasks(*tasks: str) -> dict[str, str]:
    return {m.id: task for task in tasks for m in Catalog.bundled().by_task(task)}


def agent_settings(llm_url: str, hf_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a runtime on the fakes; model selection by downloads, so only plans and answers use the LLM."""
    return {
        "OPENAI_BASE_URL": llm_url,
        "OPENAI_API_KEY": "test-key",
        "HF_INFERENCE_BASE_URL": hf_url,
        "HF_TOKEN": "hf_test",
        "HUGGINGGPT_DATA_DIR": str(data_dir),
        "HUGGINGGPT_MODEL_SELECTION": "downloads",
        # Fixed demonstrations: no sentence encoder to load (seconds) in tests that are not about planning.
        "HUGGINGGPT_DEMOS": "fixed",
        # No image probe among the LLM calls (images to the LLM are tested in test_vision.py).
        "LLM_VISION": "off",
        **extra,
    }
