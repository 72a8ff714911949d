"""The records the storage API takes and returns. Plain frozen dataclasses, so no backend type leaks to callers."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Protocol, get_args

from agent.resources import Resource

__all__ = [
    "RUN_STATUSES",
    "ChatSettings",
    "Conversation",
    "Message",
    "NewUpload",
    "Role",
    "Run",
    "RunEnd",
    "RunStatus",
    "TaskRecord",
    "Turn",
    "Usage",
]

Role = Literal["user", "assistant"]
RunStatus = Literal["running", "ok", "partial", "failed", "interrupted", "cancelled"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)


@dataclass(frozen=True)
class Conversation:
    """A chat: a Discord thread or channel (``external_id``) or a terminal session (``external_id`` None).

    ``guild_id`` is the Discord guild it is in, so usage can be counted per guild.
    """

    id: str
    platform: str
    external_id: str | None
    owner: str | None
    created_at: float
    title: str | None
    guild_id: str | None = None


@dataclass(frozen=True)
class Message:
    """One turn. An assistant message names the run that produced it; a user message may start one."""

    id: str
    conversation_id: str
    role: Role
    text: str
    author: str | None
    platform_message_id: str | None
    created_at: float
    run_id: str | None


@dataclass(frozen=True)
class TaskRecord:
    """What one planned task did in a run. ``output`` is JSON (a ``TaskOutput.to_json()``)."""

    run_id: str
    task_id: int
    task: str
    model: str | None
    status: str
    seconds: float
    output: Any
    error: str | None


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: what ``finish_run`` records."""

    status: RunStatus
    answer: str | None = None
    error: str | None = None
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Run:
    """One request's trip through the four stages, persisted as it happens.

    ``transitions`` lists every status the run took with its time, oldest first. ``choices`` went through
    JSON, so its keys are strings. ``reported`` tells whether a front end has told the user about an
    interrupted run.
    """

    id: str
    conversation_id: str
    request_message_id: str | None
    status: RunStatus
    plan: list[Any] | None
    choices: dict[str, Any] | None
    answer: str | None
    error: str | None
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float | None
    created_at: float
    updated_at: float
    transitions: list[tuple[str, float]]
    tasks: list[TaskRecord]
    reported: bool


class NewUpload(Protocol):
    """A user's file for ``begin_turn`` (``agent.uploads.Upload`` is one): its bytes, kind and MIME type.

    Its conversation name (``img-2.png``) is chosen by the storage from ``kind`` and ``mime``.
    """

    @property
    def data(self) -> bytes: ...

    @property
    def kind(self) -> Literal["text", "image", "audio", "video"]: ...

    @property
    def mime(self) -> str: ...


@dataclass(frozen=True)
class Turn:
    """What ``begin_turn`` wrote and read in its one transaction.

    ``history`` holds the conversation's messages before ``message`` (the last ``history_limit``), oldest
    first; ``resources`` every file of the conversation, the new uploads (``attached``) included; ``turn``
    counts the conversation's user messages, this one included.
    """

    message: Message
    run_id: str
    turn: int
    attached: list[Resource]
    history: list[Message]
    resources: list[Resource]


@dataclass(frozen=True)
class ChatSettings:
    """What ``/config`` set for a guild or one channel. None inherits: from the guild's, then the deployment's
    settings."""

    llm_model: str | None = None
    model_selection: str | None = None
    max_tasks: int | None = None
    task_types: tuple[str, ...] | None = None
    mention_required: bool | None = None

    def over(self, base: ChatSettings) -> ChatSettings:
        """These settings where set, ``base``'s elsewhere (a channel's over its guild's)."""
        mine = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{name: value for name, value in mine.items() if value is not None})


@dataclass(frozen=True)
class Usage:
    """What one user (or, with ``user`` empty, everyone counted) used in a period: runs started, LLM tokens
    (prompt and completion) of the runs that ended, and seconds the expert models worked."""

    user: str
    runs: int
    tokens: int
    model_seconds: float
