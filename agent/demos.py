"""Demonstrations for the planner: worked examples (request → plan), fixed or chosen by meaning.

The bank is package data (``agent/prompts/demonstrations.json``). A fixed set wastes the prompt on plan shapes
the request does not need; retrieving the bank's requests most similar to the user's (as later HuggingGPT
work does) shows the planner the tasks that matter. Either way a selector only offers demonstrations in the
form that fits what can run here: the plan if its task types can run, else the first of its
``alternatives`` that can (count people with object detection when there is no visual question answering),
else — for the few marked ``says_missing`` — the answer that names what is missing, so the planner learns
to say so instead of pretending; any other demonstration is left out.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from .encoder import SentenceEncoder
from .prompts import load_prompt
from .request import ChatTurn, Request
from .resources import Origin, Resource

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = [
    "DemoSelector",
    "Demonstration",
    "EmbeddingDemoSelector",
    "FixedDemos",
    "load_demonstrations",
    "runnable",
]

# Two demonstrations this similar say the same thing: show one and make room for another plan shape.
_NEAR_DUPLICATE = 0.9


@dataclass(frozen=True)
class Demonstration:
    """One worked example for the prompt: a request (with its history and files) and its plan.

    ``missing`` is set on the form shown where the plan cannot run: the task types it would need.
    """

    request: Request
    plan: tuple[dict[str, Any], ...]
    alternatives: tuple[tuple[dict[str, Any], ...], ...] = ()
    says_missing: bool = False
    missing: tuple[str, ...] = ()

    @property
    def task_types(self) -> set[str]:
        return _types(self.plan)

    def shown_for(self, task_types: Collection[str] | None) -> Demonstration | None:
        """This demonstration as shown where only ``task_types`` can run (all, if None); None if it has no
        form that fits."""
        if task_types is None:
            return self
        for plan in (self.plan, *self.alternatives):
            if _types(plan) <= set(task_types):
                return replace(self, plan=plan, alternatives=())
        if self.says_missing:
            missing = tuple(sorted(_types(self.plan) - set(task_types)))
            return replace(self, plan=(), alternatives=(), missing=missing)
        return None

    def reply(self) -> dict[str, Any]:
        """The planner's reply this demonstration shows."""
        return (
            {"tasks": list(self.plan), "missing": list(self.missing)}
            if self.missing
            else {"tasks": list(self.plan)}
        )


class DemoSelector(Protocol):
    """Chooses the demonstrations shown for a request (fixed, retrieved by similarity, or both).

    ``fixed_count(k)`` says how many of the ``k`` come first and are the same for every request: they belong to
    the prompt's fixed prefix, whose state a backend may keep.
    """

    def fixed_count(self, k: int) -> int: ...

    async def select(self, text: str, k: int) -> list[Demonstration]: ...


def runnable(bank: Sequence[Demonstration], task_types: Collection[str] | None) -> list[Demonstration]:
    """The bank as shown where only ``task_types`` can run (see ``Demonstration.shown_for``)."""
    shown = (d.shown_for(task_types) for d in bank)
    return [d for d in shown if d is not None]


def _types(plan: Sequence[dict[str, Any]]) -> set[str]:
    return {str(t["task"]) for t in plan}


class FixedDemos:
    """The first ``k`` demonstrations of the bank, whose head is ordered to cover the main plan shapes."""

    def __init__(
        self, bank: Sequence[Demonstration] | None = None, task_types: Collection[str] | None = None
    ) -> None:
        self.bank = runnable(load_demonstrations() if bank is None else bank, task_types)

    def fixed_count(self, k: int) -> int:
        return min(k, len(self.bank))

    async def select(self, text: str, k: int) -> list[Demonstration]:
        return self.bank[:k]


class EmbeddingDemoSelector:
    """``DemoSelector`` by cosine similarity of requests, skipping near-duplicates of demonstrations already
    chosen. The choice comes back in bank order, so two requests that share their first demonstrations share
    a prompt prefix, which the embedded LLM's KV cache reuses.

    With ``head`` > 0 the first ``head`` demonstrations of the bank are always shown, first, and only the rest
    are chosen by similarity: the head is then part of the fixed prompt prefix that a new process loads
    instead of reading (the embedded LLM reads about 100 prompt tokens a second on 2 cores, and a
    demonstration is about 100 tokens)."""

    def __init__(
        self,
        bank: Sequence[Demonstration] | None = None,
        encoder: SentenceEncoder | None = None,
        task_types: Collection[str] | None = None,
        head: int = 0,
    ) -> None:
        shown = runnable(load_demonstrations() if bank is None else bank, task_types)
        self.head = shown[:head]
        self.bank = shown[head:]
        self.encoder = encoder or SentenceEncoder()
        self._vectors: NDArray[np.float32] | None = None
        self._lock = threading.Lock()

    def fixed_count(self, k: int) -> int:
        return min(k, len(self.head))

    async def select(self, text: str, k: int) -> list[Demonstration]:
        head = self.head[:k]
        k -= len(head)
        if k <= 0 or not self.bank:
            return head
        chosen = await self.encoder.run(self._select, text, k)
        return [*head, *(self.bank[i] for i in sorted(chosen))]

    def _select(self, text: str, k: int) -> list[int]:
        with self._lock:
            if self._vectors is None:
                self._vectors = self.encoder.encode_blocking([d.request.text for d in self.bank])
        query = self.encoder.encode_blocking([text])[0]
        return _diverse_top_k(self._vectors, self._vectors @ query, k)


@cache
def load_demonstrations() -> tuple[Demonstration, ...]:
    """The bundled demonstration bank (``agent/prompts/demonstrations.json``)."""
    raw = json.loads(load_prompt("demonstrations.json"))
    demos = []
    for item in raw:
        files = tuple(
            Resource(
                name=r["name"],
                kind=r["kind"],
                mime="",
                sha256="",
                size=0,
                origin=Origin(r.get("origin", "upload")),
            )
            for r in item["resources"]
        )
        request = Request(
            text=item["request"],
            history=tuple(ChatTurn(t["role"], t["text"]) for t in item.get("history", ())),
            resources=files,
            attachments=tuple(r["name"] for r in item["resources"] if r["attached"]),
        )
        demos.append(
            Demonstration(
                request=request,
                plan=tuple(item["plan"]),
                alternatives=tuple(tuple(plan) for plan in item.get("alternatives", ())),
                says_missing=bool(item.get("says_missing")),
            )
        )
    return tuple(demos)


def _diverse_top_k(bank: NDArray[np.float32], scores: NDArray[np.float32], k: int) -> list[int]:
    """The ``k`` best-scoring rows, passing over any nearly identical to one already taken (used only if
    there are not ``k`` others)."""
    chosen: list[int] = []
    skipped: list[int] = []
    for i in (int(i) for i in scores.argsort()[::-1]):
        if len(chosen) == k:
            break
        if chosen and float((bank[chosen] @ bank[i]).max()) >= _NEAR_DUPLICATE:
            skipped.append(i)
        else:
            chosen.append(i)
    return chosen + skipped[: k - len(chosen)]
