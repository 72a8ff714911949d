"""Backends run a task on a model: Hugging Face inference, self-hosted endpoints, the LLM itself, local models.

A backend says which catalog models it handles and whether it is live; the executor asks ``Backends`` for
the one that runs a given model. Each backend gets what it needs (clients, settings) in its constructor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..catalog import ModelInfo
from ..events import LLMUsage
from ..plan import PlannedTask, TaskOutput
from ..resources import Resource
from ..tasks import TaskType

__all__ = ["Backend", "BackendStatus", "Backends", "TaskIO", "TaskInput"]


@dataclass(frozen=True)
class TaskInput:
    """A task's arguments with placeholders and resource names resolved.

    ``text`` holds the text arguments by key, ``files`` the media arguments by key (``image``, ``audio``, ...).
    """

    task: TaskType
    planned: PlannedTask
    text: dict[str, str] = field(default_factory=dict)
    files: dict[str, Resource] = field(default_factory=dict)


@dataclass
class TaskIO:
    """What a backend may do besides computing: read input files, save output files, count LLM usage."""

    read: Callable[[Resource], Awaitable[bytes]]
    save: Callable[[bytes, str], Awaitable[Resource]]  # (data, mime) -> stored resource named for this task
    usage: LLMUsage


@dataclass(frozen=True)
class BackendStatus:
    name: str
    live: bool
    detail: str


class Backend(Protocol):
    name: str
    retry_timeouts: bool
    """Whether a model that timed out is asked again: yes for a server (it may be busy for a moment), no for
    a model computing on this machine (it would burn the same CPU time again)."""

    def handles(self, model: ModelInfo) -> bool:
        """True if this backend is the one that runs ``model`` (by its id prefix or configuration)."""
        ...

    def available(self, model: ModelInfo) -> bool:
        """True if ``model`` can run here now (configured, installed); cheap, no network."""
        ...

    async def status(self) -> BackendStatus: ...

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput: ...


class Backends:
    """The backends of one deployment, asked in order: the first that handles a model runs it."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)

    def for_model(self, model: ModelInfo) -> Backend | None:
        return next((b for b in self.backends if b.handles(model)), None)

    def available(self, model: ModelInfo) -> bool:
        backend = self.for_model(model)
        return backend is not None and backend.available(model)

    async def status(self) -> list[BackendStatus]:
        return [await b.status() for b in self.backends]
