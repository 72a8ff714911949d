"""Stage 4, response generation: the LLM answers the user from the plan, the chosen models and the results.

It answers the question first, then says what was done, failures included. Files are named only by their
short names: the front end attaches them, so the answer must not invent paths or links. With an empty plan
the LLM just chats, using the conversation so far.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .errors import GenerationError, LLMError
from .events import LLMUsage
from .llm import LLM, estimate_message_tokens, estimate_tokens
from .plan import ModelChoice, Plan, TaskResult
from .prompts import load_prompt, prompt_template
from .request import Request
from .text import clip
from .vision import IMAGE_PROMPT_TOKENS, PromptImage

__all__ = ["Responder", "workflow_json"]

_TURN_MAX_CHARS = 2000
_OUTPUT_MAX_CHARS = 1500
_OUTPUT_MIN_CHARS = 200
_DATA_MAX_CHARS = 600


def workflow_json(
    plan: Plan, choices: dict[int, ModelChoice], results: Sequence[TaskResult], output_chars: int
) -> list[dict[str, Any]]:
    """What the LLM is told about each task: arguments, model and why, status, output (cut) or error."""
    by_id = {r.id: r for r in results}
    workflow = []
    for task in plan.tasks:
        entry: dict[str, Any] = {"id": task.id, "task": task.task, "args": task.args}
        choice = choices.get(task.id)
        result = by_id.get(task.id)
        entry["model"] = (result.model if result else None) or (choice.model if choice else None) or None
        if choice is not None:
            entry["why this model"] = choice.reason
        entry["status"] = result.status if result else "skipped"
        if result is not None and result.output is not None:
            out = result.output
            if out.text is not None:
                entry["output"] = clip(out.text, output_chars)
            if out.resources:
                entry["files"] = [r.name for r in out.resources]
            if out.data is not None and out.text is None:
                entry["data"] = clip(json.dumps(out.data, ensure_ascii=False, default=str), _DATA_MAX_CHARS)
        if result is not None and result.error:
            entry["error"] = result.error
        workflow.append(entry)
    return workflow


def _alternating(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """User first, then strictly alternating roles: some chat templates (llama.cpp's) reject anything else."""
    out: list[dict[str, str]] = []
    for m in messages:
        if not out and m["role"] != "user":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out


class Responder:
    """Stage 4: ``respond`` streams the answer; an LLM failure becomes ``GenerationError``."""

    def __init__(self, llm: LLM, *, unavailable: Sequence[str] = ()) -> None:
        """``unavailable``: the task types this setup cannot run, so a chat answer never pretends to."""
        self.llm = llm
        self.unavailable = tuple(unavailable)
        self.reply_tokens = min(2048, llm.context_tokens // 4)

    def respond(
        self,
        request: Request,
        plan: Plan,
        choices: dict[int, ModelChoice],
        results: list[TaskResult],
        usage: LLMUsage,
        images: Sequence[PromptImage] = (),
    ) -> AsyncIterator[str]:
        """``images`` (the request's and the tasks') go to an LLM that sees images, named in the text."""
        return self._stream(self.messages(request, plan, choices, results, images=len(images)), usage, images)

    def messages(
        self,
        request: Request,
        plan: Plan,
        choices: dict[int, ModelChoice],
        results: Sequence[TaskResult],
        *,
        images: int = 0,
    ) -> list[dict[str, str]]:
        """The prompt: system rules, the most recent chat turns that fit, then this turn with its results
        (leaving room for ``images`` image parts)."""
        budget = self.llm.context_tokens - self.reply_tokens - IMAGE_PROMPT_TOKENS * images
        if plan:
            system = load_prompt("responder_system.txt")
            # Share half the budget between the task outputs; the chat log gets what is left.
            per_output = (budget * 4 // 2) // max(1, len(plan))
            output_chars = max(_OUTPUT_MIN_CHARS, min(_OUTPUT_MAX_CHARS, per_output))
            files = [r.name for res in results if res.output for r in res.output.resources]
            current = prompt_template("responder_request.txt").substitute(
                text=request.text,
                attachments=", ".join(request.attachments) or "none",
                workflow=json.dumps(
                    workflow_json(plan, choices, results, output_chars), ensure_ascii=False, indent=1
                ),
                files=", ".join(files) or "none",
            )
        else:
            system = load_prompt("chat_system.txt")
            if self.unavailable:
                system += "\n\n" + prompt_template("chat_unavailable.txt").substitute(
                    unavailable=", ".join(self.unavailable)
                )
            attached = f"\n\n(Attached: {', '.join(request.attachments)})" if request.attachments else ""
            current = request.text + attached
        head = [{"role": "system", "content": system}]
        tail = [{"role": "user", "content": current}]
        used = estimate_message_tokens([*head, *tail])
        turns: list[dict[str, str]] = []
        for turn in reversed(request.history):
            message = {"role": turn.role, "content": clip(turn.text, _TURN_MAX_CHARS)}
            cost = 4 + estimate_tokens(message["content"])
            if used + cost > budget:
                break
            turns.append(message)
            used += cost
        return [*head, *_alternating([*reversed(turns), *tail])]

    async def _stream(
        self, messages: list[dict[str, str]], usage: LLMUsage, images: Sequence[PromptImage]
    ) -> AsyncIterator[str]:
        said = False
        try:
            async for chunk in self.llm.stream(
                messages, usage=usage, max_tokens=self.reply_tokens, images=images
            ):
                said = said or bool(chunk.strip())
                yield chunk
        except LLMError as err:
            raise GenerationError(f"the answer could not be written: {err}") from err
        if not said:
            raise GenerationError("the LLM returned an empty answer; try again")
