"""Stage 1, task planning: the LLM turns a request into a typed ``Plan`` of tasks with dependencies.

The prompt is the paper's: a specification of the output format and of the task types that can run here,
demonstrations (request → plan), then the chat log, the conversation's files and the request. Everything that
stays the same from one request to the next comes first, so a backend that caches a prompt prefix reads it
once. A backend that compiles a schema into a grammar gets the request's own schema (``exact_plan_schema``),
which already holds most rules, so even a tiny model writes plans that run; other servers get the plain
``plan_schema``. The reply is parsed leniently (JSON repair, code fences, prose around it, a bare list or
``{"tasks": [...]}``) but validated strictly (``Plan.from_raw``), so the executor only ever sees plans it can
run. A rejected plan is sent back once with the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from functools import cache, partial
from typing import Any

from .demos import Demonstration, DemoSelector, FixedDemos
from .errors import PlanningError, PlanParseError, PlanValidationError
from .events import LLMUsage
from .grammar import GRAMMAR_MAX_REPEAT
from .llm import LLM, estimate_message_tokens, estimate_tokens
from .plan import Plan, TaskResult
from .plan_schema import exact_plan_schema, plan_schema
from .prompts import prompt_template
from .replies import parse_json_reply
from .request import ChatTurn, Request
from .tasks import TASKS
from .text import clip
from .vision import IMAGE_PROMPT_TOKENS, PromptImage

__all__ = ["DEMO_COUNT", "Planner", "parse_plan_text", "plan_messages"]

log = logging.getLogger(__name__)

DEMO_COUNT = 8
_TEXT_SLACK_CHARS = 100  # what a text argument may add to the words it quotes
_TURN_MAX_CHARS = 1500
_FILES_SHOWN = 30
_RETRY_ECHO_CHARS = 4000


async def parse_plan_text(text: str) -> Any:
    """The JSON value in an LLM's plan reply, repaired if need be; ``PlanParseError`` if there is none."""
    if not text.strip():
        raise PlanParseError("the LLM's plan reply was empty")
    value = await parse_json_reply(text)
    if not isinstance(value, list | dict):
        raise PlanParseError(f"the LLM's plan reply holds no JSON plan (it began: {clip(text.strip(), 80)})")
    return value


def _text_bound(request: Request) -> int:
    """How long a text argument of this request's plan may be: a text argument quotes the request or a
    recent turn (or names an earlier task's output), so a little over the longest of those, and never more
    than a llama.cpp grammar can hold (the exact schema is only ever compiled into one)."""
    quoted = max((len(t.text) for t in request.history[-2:]), default=0)
    return min(GRAMMAR_MAX_REPEAT, max(len(request.text), min(quoted, _TURN_MAX_CHARS)) + _TEXT_SLACK_CHARS)


def plan_messages(
    request: Request,
    demos: Sequence[Demonstration],
    budget_tokens: int,
    *,
    max_tasks: int,
    task_types: Collection[str] | None = None,
) -> list[dict[str, str]]:
    """The planning prompt, cut to ``budget_tokens``: oldest chat turns go first, then demonstrations."""
    system = {"role": "system", "content": system_prompt(max_tasks, task_types)}
    shots = list(demos)
    while True:
        head = [system]
        for demo in shots:
            head.append({"role": "user", "content": _render_request(demo.request, demo.request.history)})
            head.append({"role": "assistant", "content": json.dumps(demo.reply())})
        turns = _fit_history(request, head, budget_tokens)
        if turns is not None:
            return [*head, {"role": "user", "content": _render_request(request, turns)}]
        if not shots:
            raise PlanningError(
                "the request is too long for the LLM's context window "
                "(LLM_CONTEXT_TOKENS); shorten it or start a new conversation"
            )
        shots.pop()


class Planner:
    """Stage 1: ``plan`` asks the LLM for a plan, validates it, and re-prompts once with the error.

    ``task_types`` are the task types that can run here (default: all): the prompt lists only them, the
    schemas allow only them, and the demonstrations the default selector offers use only them.
    """

    def __init__(
        self,
        llm: LLM,
        demos: DemoSelector | None = None,
        *,
        max_tasks: int = 12,
        task_types: Collection[str] | None = None,
    ) -> None:
        self.llm = llm
        self.max_tasks = max_tasks
        self.task_types = None if task_types is None else frozenset(task_types)
        self.demos = demos or FixedDemos(task_types=self.task_types)
        self.reply_tokens = min(2048, llm.context_tokens // 4)

    async def plan(self, request: Request, usage: LLMUsage, images: Sequence[PromptImage] = ()) -> Plan:
        """``images`` go with the request to an LLM that sees images (named in the text as every file is)."""
        shots = await self.demos.select(request.text, DEMO_COUNT)
        budget = self.llm.context_tokens - self.reply_tokens - IMAGE_PROMPT_TOKENS * len(images)
        schema = plan_schema(self.max_tasks, self.task_types)
        # Made only if the backend asks for it, and once for both attempts.
        exact = cache(
            partial(
                exact_plan_schema, self.max_tasks, request.resources, _text_bound(request), self.task_types
            )
        )
        messages = plan_messages(request, shots, budget, max_tasks=self.max_tasks, task_types=self.task_types)
        # The fixed prefix: the system message and the demonstrations every request gets (those the budget kept).
        shown = (len(messages) - 2) // 2
        fixed = 1 + 2 * min(self.demos.fixed_count(DEMO_COUNT), shown)
        reply = await self.llm.complete_json(
            messages,
            schema=schema,
            exact_schema=exact,
            usage=usage,
            max_tokens=self.reply_tokens,
            cacheable_prefix=fixed,
            images=images,
        )
        try:
            return await self._read(reply, request)
        except PlanningError as err:
            log.info("plan rejected, asking once more: %s", err)
            first_error = str(err)
        echo = {"role": "assistant", "content": clip(reply, _RETRY_ECHO_CHARS)}
        retry = {
            "role": "user",
            "content": prompt_template("planner_retry.txt").substitute(error=first_error),
        }
        extra = estimate_message_tokens([echo, retry])
        messages = plan_messages(
            request, shots, budget - extra, max_tasks=self.max_tasks, task_types=self.task_types
        )
        reply = await self.llm.complete_json(
            [*messages, echo, retry],
            schema=schema,
            exact_schema=exact,
            usage=usage,
            max_tokens=self.reply_tokens,
            images=images,
        )
        try:
            return await self._read(reply, request)
        except PlanParseError as err:
            raise PlanParseError(
                f"the LLM did not reply with a readable plan, even when asked again ({err}); "
                "try rephrasing the request"
            ) from err
        except PlanValidationError as err:
            raise PlanValidationError(
                f"the LLM's plan broke a rule, even when asked again ({err}); try rephrasing the request"
            ) from err

    async def replan(
        self,
        request: Request,
        plan: Plan,
        results: Mapping[int, TaskResult],
        usage: LLMUsage,
        images: Sequence[PromptImage] = (),
    ) -> Plan:
        """One more plan after tasks failed: the planning prompt, the plan that ran, and how each task ended.
        The reply holds new tasks only; they may use the outputs of the tasks that finished ok. Returns the
        whole plan (every task of ``plan``, then the new ones). One LLM call, no re-prompt: a reply that
        breaks a rule raises ``PlanningError`` and the run answers from what it has."""
        kept = [t for t in plan.tasks if results[t.id].status == "ok"]
        next_id = max(t.id for t in plan.tasks) + 1
        echo = {
            "role": "assistant",
            "content": clip(json.dumps({"tasks": plan.to_json()}), _RETRY_ECHO_CHARS),
        }
        outcomes = prompt_template("planner_replan.txt").substitute(
            outcomes="\n".join(_render_outcome(results[t.id]) for t in plan.tasks), next_id=next_id
        )
        ask = {"role": "user", "content": outcomes}
        shots = await self.demos.select(request.text, DEMO_COUNT)
        budget = (
            self.llm.context_tokens
            - self.reply_tokens
            - estimate_message_tokens([echo, ask])
            - IMAGE_PROMPT_TOKENS * len(images)
        )
        messages = plan_messages(request, shots, budget, max_tasks=self.max_tasks, task_types=self.task_types)
        # No exact schema: it numbers tasks from 0, and the new ones continue the plan's numbering.
        reply = await self.llm.complete_json(
            [*messages, echo, ask],
            schema=plan_schema(self.max_tasks, self.task_types),
            usage=usage,
            max_tokens=self.reply_tokens,
            images=images,
        )
        raw = await parse_plan_text(reply)
        items = raw.get("tasks") if isinstance(raw, dict) else raw
        if not isinstance(items, list):
            raise PlanValidationError('the new plan is not a list of tasks (expected {"tasks": [...]})')
        # Checked as one plan with the tasks that finished ok: a new task may depend on those only.
        whole = Plan.from_raw(
            [t.to_json() for t in kept] + items, request.resources, self.max_tasks, self.task_types
        )
        done = {t.id for t in kept}
        return Plan(plan.tasks + tuple(t for t in whole.tasks if t.id not in done), plan.missing)

    async def _read(self, reply: str, request: Request) -> Plan:
        return Plan.from_raw(await parse_plan_text(reply), request.resources, self.max_tasks, self.task_types)


def _fit_history(
    request: Request, head: list[dict[str, str]], budget_tokens: int
) -> tuple[ChatTurn, ...] | None:
    """The most recent chat turns that fit the budget after ``head``; None if not even the request fits."""
    base = estimate_message_tokens([*head, {"role": "user", "content": _render_request(request, ())}])
    if base > budget_tokens:
        return None
    kept: list[ChatTurn] = []
    used = base
    for turn in reversed(request.history):
        clipped = ChatTurn(turn.role, clip(turn.text, _TURN_MAX_CHARS))
        cost = estimate_tokens(_render_turn(clipped)) + 1
        if used + cost > budget_tokens:
            break
        kept.append(clipped)
        used += cost
    return tuple(reversed(kept))


def _render_request(request: Request, turns: Sequence[ChatTurn]) -> str:
    history = "\n".join(_render_turn(t) for t in turns) or "(none)"
    return prompt_template("planner_request.txt").substitute(
        history=history, files=_render_files(request), text=request.text
    )


def _render_outcome(result: TaskResult) -> str:
    if result.status == "ok":
        shown = result.output.to_json() if result.output else {}
        return f"- task {result.id} ({result.task}) finished ok: {clip(json.dumps(shown, ensure_ascii=False), 300)}"
    return (
        f"- task {result.id} ({result.task}) {result.status}: {clip(result.error or 'no reason given', 300)}"
    )


def _render_turn(turn: ChatTurn) -> str:
    return f"{turn.role}: {turn.text}"


def _render_files(request: Request) -> str:
    attached = set(request.attachments)
    shown = [r for r in request.resources if r.name in attached]
    older = [r for r in request.resources if r.name not in attached]
    hidden = max(0, len(older) - max(0, _FILES_SHOWN - len(shown)))
    lines = []
    for r in older[hidden:] + shown:
        if r.name in attached:
            where = "attached to this request"
        elif r.origin.source == "task":
            where = "made by a model earlier in the conversation"
        else:
            where = "uploaded earlier in the conversation"
        lines.append(f"- {r.name} ({r.kind}, {where})")
    if hidden:
        lines.insert(0, f"({hidden} older files not listed)")
    return "\n".join(lines) or "(none)"


def system_prompt(max_tasks: int, task_types: Collection[str] | None = None) -> str:
    """The fixed part of the prompt: the rules, the task types that can run here, and the ones that cannot."""
    lines = []
    missing = []
    for t in TASKS.values():
        if task_types is not None and t.name not in task_types:
            missing.append(t.name)
            continue
        args = ", ".join(f"{a.key}: {a.modality}{'' if a.required else ', optional'}" for a in t.args)
        lines.append(f"- {t.name}: {t.description} | {args} | {t.output}")
    unavailable = (
        prompt_template("planner_unavailable.txt").substitute(unavailable=", ".join(missing))
        if missing
        else ""
    )
    return prompt_template("planner_system.txt").substitute(
        tasks="\n".join(lines), max_tasks=max_tasks, unavailable=unavailable
    )
