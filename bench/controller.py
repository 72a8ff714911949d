"""A scripted controller LLM for ``tests/fakes/llm_server.py``: it answers each stage the way a good LLM would.

The benchmarks that measure our own code (token budget, overhead, scheduling, Discord latency) need the real
prompts sent over the real client, but a deterministic answer: the plan registered for the request, the
first candidate model for each task, a short answer. The stage is recognised by its system prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.prompts import load_prompt

__all__ = ["ScriptedController", "request_of", "stage_of"]

_PLANNER = load_prompt("planner_system.txt")[:40]
_SELECTOR = load_prompt("selector_system.txt")[:40]
_REQUEST_MARK = "\n\nRequest: "
_TASK_RE = re.compile(r"^Task (\d+) \(", re.MULTILINE)
_CANDIDATE_RE = re.compile(r"^- (\S+) \(\d+ downloads", re.MULTILINE)


def request_of(messages: list[dict[str, Any]]) -> str:
    """The request text of a planning prompt (its last user message holding one; a retry follows it)."""
    for message in reversed(messages):
        content = str(message.get("content") or "")
        if message.get("role") == "user" and _REQUEST_MARK in content:
            return content.split(_REQUEST_MARK, 1)[1].strip()
    return ""


def stage_of(messages: list[dict[str, Any]]) -> str:
    """Which stage a chat request comes from: ``plan``, ``select`` or ``respond`` (anything else)."""
    system = str(messages[0].get("content") or "") if messages and messages[0].get("role") == "system" else ""
    if system.startswith(_PLANNER):
        return "plan"
    if system.startswith(_SELECTOR):
        return "select"
    return "respond"


@dataclass
class ScriptedController:
    """A ``FakeLLMServer`` script: ``plans`` maps request texts to plan task lists (others get no tasks)."""

    plans: Mapping[str, list[dict[str, Any]]] = field(default_factory=dict)
    answer: str = "Here is what the models found: the picture shows a red square. (scripted answer)"

    def __post_init__(self) -> None:
        self._by_text = {text.strip(): tasks for text, tasks in self.plans.items()}

    def __call__(self, body: dict[str, Any]) -> str:
        messages = body.get("messages") or []
        stage = stage_of(messages)
        if stage == "plan":
            return json.dumps({"tasks": self._by_text.get(request_of(messages), [])})
        if stage == "select":
            return json.dumps({"choices": _first_candidates(str(messages[-1].get("content") or ""))})
        return self.answer


def _first_candidates(listing: str) -> list[dict[str, Any]]:
    """Choose the first candidate of every task in the selector's listing."""
    choices = []
    blocks = _TASK_RE.split(listing)
    # split() gives [before, id, block, id, block, ...]
    for task_id, block in zip(blocks[1::2], blocks[2::2], strict=True):
        first = _CANDIDATE_RE.search(block)
        if first is not None:
            choices.append({"task_id": int(task_id), "id": first.group(1), "reason": "listed first"})
    return choices
