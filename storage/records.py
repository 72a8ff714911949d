"""The records the storage API returns. Plain frozen dataclasses, so no backend type leaks to callers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = ["RUN_STATUSES", "Conversation", "Message", "Role", "Run", "RunStatus", "TaskRecord"]

Role = Literal["user", "assistant"]
RunStatus = Literal["running", "ok", "partial", "failed", "interrupted"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)


@dataclass(frozen=True)
class Conversation:
    """A chat: a Discord thread or channel (``external_id``) or a terminal session (``external_id`` None)."""

    id: str
    platform: str
    external_id: str | None
    owner: str | None
    created_at: float
    title: str | None


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
