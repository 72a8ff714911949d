"""The controller LLM as a model: text tasks (summarize, translate, chat, write, rewrite) run on it directly.

Its catalog entries have ids ``llm/<model name>``, one per LLM-handled task, so the selector and executor
treat it like any other model. Instructions per task live in ``agent/prompts/llm_tasks.json``.
"""

from __future__ import annotations

import json
from functools import cache

from ..catalog import ModelInfo
from ..errors import LLMError, LLMTimeoutError, ModelError, ModelTimeoutError
from ..llm import LLM
from ..plan import TaskOutput
from ..prompts import load_prompt
from ..tasks import LLM_TASKS
from . import Backend, BackendStatus, TaskInput, TaskIO

__all__ = ["LLM_MODEL_PREFIX", "LLMTaskBackend", "llm_model_id", "llm_models", "task_instructions"]

LLM_MODEL_PREFIX = "llm/"


@cache
def task_instructions() -> dict[str, str]:
    """The system instruction for each LLM-handled task."""
    instructions: dict[str, str] = json.loads(load_prompt("llm_tasks.json"))
    return instructions


def llm_model_id(model_name: str) -> str:
    """The catalog id of the controller LLM named ``model_name``, as a model that does tasks itself."""
    return f"{LLM_MODEL_PREFIX}{model_name}"


def llm_models(model_name: str) -> list[ModelInfo]:
    """Catalog entries for the controller LLM: one per task it handles, all with the id ``llm/<model_name>``."""
    return [
        ModelInfo(
            id=llm_model_id(model_name),
            task=task,
            description=f"the controller LLM ({model_name}) does this task itself",
            tags=("llm",),
        )
        for task in sorted(LLM_TASKS)
    ]


class LLMTaskBackend(Backend):
    """Runs ``llm/...`` models: the task's instruction as the system message, the text argument as the user's."""

    name = "llm"
    prefix = LLM_MODEL_PREFIX
    enable_hint = "the controller LLM: set OPENAI_BASE_URL or OPENAI_API_KEY, or install the local extras"

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def available(self, model: ModelInfo) -> bool:
        return self.handles(model)

    async def status(self) -> BackendStatus:
        status = await self.llm.status()
        return BackendStatus(self.name, status.live, status.detail)

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        # The task comes from the input, not the catalog entry: all LLM entries share one id.
        instruction = task_instructions().get(inp.task.name)
        if instruction is None:
            raise ModelError(f"the controller LLM does not do {inp.task.name} tasks")
        messages = [
            {"role": "system", "content": instruction},
            {"role": "user", "content": inp.text.get("text", "")},
        ]
        try:
            text = await self.llm.complete(messages, usage=io.usage)
        except LLMTimeoutError as err:
            raise ModelTimeoutError(str(err)) from err
        except LLMError as err:
            raise ModelError(str(err)) from err
        if not text.strip():
            raise ModelError(f"the controller LLM returned no text for {inp.task.name}")
        return TaskOutput(text=text.strip())
