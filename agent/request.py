"""What a front end hands the agent: the user's text, the conversation so far, and its resources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .resources import Resource
from .text import valid_text

__all__ = ["ChatTurn", "Request", "valid_text"]


@dataclass(frozen=True)
class ChatTurn:
    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class Request:
    """One user turn.

    ``resources`` are all files of the conversation the LLM may name (earlier uploads and outputs and this
    turn's attachments); ``attachments`` names the ones attached to this very message. ``turn`` numbers the
    user turns of the conversation from 1 and names output files (``out-{turn}-{task}.png``).
    """

    text: str
    history: tuple[ChatTurn, ...] = ()
    resources: tuple[Resource, ...] = ()
    attachments: tuple[str, ...] = ()
    turn: int = 1
    run_id: str = field(default="")

    def resource(self, name: str) -> Resource | None:
        return next((r for r in self.resources if r.name == name), None)
