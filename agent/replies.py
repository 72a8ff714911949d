"""Reading the JSON value in an LLM's reply: strictly on the event loop, leniently in a child process.

Models wrap JSON in reasoning blocks, code fences and prose, and small ones write it broken (a trailing comma,
a missing bracket). The strict reading (``json.JSONDecoder.raw_decode``) is linear and runs on the loop. The
lenient one (``json_repair``) is quadratic on some inputs (4 KB of ``b}]}{`` takes 2.6 s, 40 KB minutes), so
it runs in a ``ProcessWorker`` under a time limit: when it runs over, the child is killed and the reply is
refused. Replies longer than ``MAX_JSON_REPLY_CHARS`` are refused unread.

One child per event loop, started on the first repair and kept (starting one costs a fraction of a second);
the children of loops that have closed are stopped on the next repair, and a child ends with its process.
This module imports little on purpose: the child imports it to run ``_repair``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import json_repair

from .errors import PlanParseError
from .workers import WorkerCrashedError, loop_worker

__all__ = ["MAX_JSON_REPLY_CHARS", "REPAIR_SECONDS", "parse_json_reply"]

MAX_JSON_REPLY_CHARS = 32_000
"""Longest reply read as JSON: four times the 2,048-token replies the planner asks for."""
REPAIR_SECONDS = 5.0
"""Time limit of one lenient repair (a broken 8,000-character plan takes milliseconds)."""


async def parse_json_reply(text: str, *, repair_seconds: float = REPAIR_SECONDS) -> Any:
    """The first JSON object or array in an LLM reply, repaired if need be; None if there is none.

    Tolerates what models wrap JSON in: reasoning blocks, code fences, prose before and after. Raises
    ``PlanParseError`` (a ``ValueError``) when the reply is longer than ``MAX_JSON_REPLY_CHARS`` or its repair
    takes longer than ``repair_seconds``; nothing else.
    """
    if len(text) > MAX_JSON_REPLY_CHARS:
        raise PlanParseError(
            f"the LLM's reply is {len(text):,} characters long; at most {MAX_JSON_REPLY_CHARS:,} are read as JSON"
        )
    body = _json_part(text)
    if body is None:
        return None
    try:
        return json.JSONDecoder().raw_decode(body)[0]
    except (ValueError, RecursionError):
        pass
    worker = await loop_worker("json-repair")
    try:
        async with asyncio.timeout(repair_seconds):
            return await worker.run(_repair, body)
    except TimeoutError as err:
        raise PlanParseError(
            f"the LLM's reply is not valid JSON and could not be repaired within {repair_seconds:g} s"
        ) from err
    except WorkerCrashedError:  # killed by the system (out of memory): the reply is as unreadable as any
        return None


def _json_part(text: str) -> str | None:
    """The reply from its first ``{`` or ``[`` on, once reasoning blocks and a code fence are taken off.

    With ``str.find`` only, so that hostile text (a thousand unclosed ``<think>``) costs linear time.
    """
    body = _without_think_blocks(text)
    fence = body.find("```")
    if fence >= 0:
        start = fence + 3
        while start < len(body) and body[start].isascii() and body[start].isalpha():
            start += 1
        end = body.find("```", start)
        if end >= 0:
            body = body[start:end].strip()
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    return body[min(starts) :] if starts else None


def _without_think_blocks(text: str) -> str:
    parts: list[str] = []
    at = 0
    while (start := text.find("<think>", at)) >= 0:
        end = text.find("</think>", start)
        if end < 0:
            break
        parts.append(text[at:start])
        at = end + len("</think>")
    parts.append(text[at:])
    return "".join(parts)


def _repair(body: str) -> Any:
    """In the worker: ``body`` read leniently; None if even that fails."""
    try:
        value = json_repair.loads(body)
    except Exception:  # the repairer's failure modes are undocumented; unreadable is all we need to know
        return None
    # Several values in a row come back as a list of them: keep the first.
    if isinstance(value, list) and len(value) > 1 and isinstance(value[0], dict if body[0] == "{" else list):
        return value[0]
    return value
