"""Stage 2, model selection: pick a model for each planned task, as the paper does, by in-context choice.

Candidates come from the catalog, those that can run here first, most downloaded first. The LLM only sees
tasks with a real choice (two or more runnable candidates), all in one call; everything else, and every
reply the LLM gets wrong, falls back to the top-ranked candidate with a reason saying so. Selection never
fails a run: the executor tries the ranked candidates in ``ModelChoice.candidates`` anyway.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from typing import Any, Literal

from .backends import Backends
from .backends.llm_tasks import llm_model_id
from .catalog import Catalog, ModelInfo
from .errors import LLMError, PlanParseError
from .events import LLMUsage
from .llm import LLM
from .plan import ModelChoice, Plan, PlannedTask
from .prompts import load_prompt, prompt_template
from .replies import parse_json_reply
from .request import Request
from .tasks import LLM_TASKS
from .text import clip

__all__ = ["Selector", "selection_schema"]

log = logging.getLogger(__name__)

_DESCRIPTION_CHARS = 160
_ARG_CHARS = 200
_REASON_CHARS = 300
_TOP = "using the most downloaded one"


def selection_schema(model_ids: Sequence[str]) -> dict[str, Any]:
    """JSON schema of the selector's reply: one choice per task, the id one of ``model_ids``."""
    choice = {
        "type": "object",
        "properties": {
            "task_id": {"type": "integer"},
            "id": {"type": "string", "enum": sorted(set(model_ids))},
            "reason": {"type": "string", "maxLength": _REASON_CHARS},
        },
        "required": ["task_id", "id", "reason"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"choices": {"type": "array", "items": choice}},
        "required": ["choices"],
        "additionalProperties": False,
    }


class Selector:
    """Stage 2: ``select`` returns a ``ModelChoice`` for every task of the plan, by task id.

    ``mode`` is ``llm`` (the LLM picks among the ``top_k`` runnable candidates) or ``downloads`` (the top
    one). LLM-handled tasks go to the controller LLM itself, under the name it really runs as (an embedded
    model's name is exact only once it is loaded).
    """

    def __init__(
        self,
        llm: LLM,
        catalog: Catalog,
        backends: Backends,
        *,
        top_k: int = 5,
        mode: Literal["llm", "downloads"] = "llm",
    ) -> None:
        self.llm = llm
        self.catalog = catalog
        self.backends = backends
        self.top_k = top_k
        self.mode = mode

    async def select(
        self, request: Request, plan: Plan, usage: LLMUsage, *, only: Collection[int] | None = None
    ) -> dict[int, ModelChoice]:
        """Choices for the tasks of ``plan``, or for the tasks ``only`` names (those a replan added), which
        get the top candidate without an LLM call."""
        tasks = [t for t in plan.tasks if only is None or t.id in only]
        mode = self.mode if only is None else "downloads"
        choices: dict[int, ModelChoice] = {}
        ranked_by_task: dict[int, list[ModelInfo]] = {}
        open_tasks: dict[int, list[ModelInfo]] = {}  # tasks the LLM chooses for, with the candidates it sees
        for task in tasks:
            ranked = self.catalog.candidates(task.task, self.backends.available)
            ranked_by_task[task.id] = ranked
            runnable = [m for m in ranked if self.backends.available(m)]
            if task.task in LLM_TASKS:
                reason = f"the controller LLM ({self.llm.model}) does {task.task} itself"
                choices[task.id] = _choice(task.id, llm_model_id(self.llm.model), reason, ranked)
            elif not ranked:
                choices[task.id] = ModelChoice(task.id, "", f"no model in the catalog does {task.task}")
            elif not runnable:
                reason = f"no model for {task.task} can run here; trying the most downloaded one"
                choices[task.id] = _choice(task.id, ranked[0].id, reason, ranked)
            elif len(runnable) == 1:
                choices[task.id] = _choice(
                    task.id, ranked[0].id, "the only model for this task that can run here", ranked
                )
            elif mode == "downloads":
                reason = "the most downloaded model for this task that can run here"
                choices[task.id] = _choice(task.id, ranked[0].id, reason, ranked)
            else:
                open_tasks[task.id] = runnable[: self.top_k]
        if open_tasks:
            picked = await self._ask(request, plan, open_tasks, usage)
            for task_id in open_tasks:
                model_id, reason = picked[task_id]
                choices[task_id] = _choice(task_id, model_id, reason, ranked_by_task[task_id])
        return {task.id: choices[task.id] for task in tasks}

    async def _ask(
        self, request: Request, plan: Plan, open_tasks: dict[int, list[ModelInfo]], usage: LLMUsage
    ) -> dict[int, tuple[str, str]]:
        """One LLM call for all open tasks: task id -> (model id, reason), falling back to the top candidate."""
        fallback = {
            task_id: (models[0].id, f"the LLM's choice could not be read; {_TOP}")
            for task_id, models in open_tasks.items()
        }
        listing = "\n\n".join(
            _render_task(plan.get(task_id), models) for task_id, models in open_tasks.items()
        )
        messages = [
            {"role": "system", "content": load_prompt("selector_system.txt")},
            {
                "role": "user",
                "content": prompt_template("selector_request.txt").substitute(
                    text=request.text, tasks=listing
                ),
            },
        ]
        schema = selection_schema([m.id for models in open_tasks.values() for m in models])
        try:
            reply = await self.llm.complete_json(
                messages, schema=schema, usage=usage, max_tokens=200 + 120 * len(open_tasks)
            )
            answers = _answers(await parse_json_reply(reply))
        except (LLMError, PlanParseError) as err:
            log.warning("model selection by the LLM failed: %s", err)
            return {
                task_id: (models[0].id, f"model selection by the LLM failed ({err}); {_TOP}")
                for task_id, models in open_tasks.items()
            }
        if answers is None:
            log.warning("unreadable model selection reply: %.200r", reply)
            return fallback
        picked = {}
        for task_id, models in open_tasks.items():
            answer = answers.get(task_id)
            ids = [m.id for m in models]
            if answer is None:
                picked[task_id] = (ids[0], f"the LLM gave no choice for this task; {_TOP}")
            elif answer[0] not in ids:
                picked[task_id] = (
                    ids[0],
                    f"the LLM chose {clip(answer[0], 80)!r}, which is not a candidate; {_TOP}",
                )
            else:
                picked[task_id] = (answer[0], clip(answer[1], _REASON_CHARS) or "chosen by the LLM")
        return picked


def _choice(task_id: int, model_id: str, reason: str, ranked: Sequence[ModelInfo]) -> ModelChoice:
    rest = tuple(m.id for m in ranked if m.id != model_id)
    return ModelChoice(task_id, model_id, reason, candidates=(model_id, *rest))


def _answers(raw: Any) -> dict[int, tuple[str, str]] | None:
    """The reply's choices by task id, or None if the reply has no recognisable choices at all."""
    if isinstance(raw, dict):
        raw = raw.get("choices", [raw])
    if not isinstance(raw, list):
        return None
    answers: dict[int, tuple[str, str]] = {}
    for item in raw:
        if not isinstance(item, dict):
            continue
        task_id = item.get("task_id")
        if isinstance(task_id, str) and task_id.strip().isdigit():
            task_id = int(task_id)
        model_id = item.get("id")
        if isinstance(task_id, int) and not isinstance(task_id, bool) and isinstance(model_id, str):
            answers.setdefault(task_id, (model_id.strip(), str(item.get("reason") or "").strip()))
    return answers or None


def _render_task(task: PlannedTask, models: Sequence[ModelInfo]) -> str:
    args = json.dumps({k: clip(v, _ARG_CHARS) for k, v in task.args.items()}, ensure_ascii=False)
    lines = [f"Task {task.id} ({task.task}), arguments {args}. Candidates:"]
    for m in models:
        about = clip(" ".join(m.description.split()), _DESCRIPTION_CHARS) or "no description"
        lines.append(f"- {m.id} ({m.downloads} downloads, {m.likes} likes): {about}")
    return "\n".join(lines)
