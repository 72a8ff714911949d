"""What a front end hands the agent: the user's text, the conversation so far, and its resources."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .resources import Resource

__all__ = ["ChatTurn", "Request", "valid_text"]

_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so it can be stored and printed as UTF-8.

    Lone surrogates are what Python makes of bytes that are not UTF-8 (a terminal in another encoding) and
    what a JSON ``\\ud800`` escape decodes to; SQLite and UTF-8 streams refuse them.
    """
    return _SURROGATE_RE.sub("\ufffd", text)


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
