"""Backends run a task on a model: Hugging Face inference, self-hosted endpoints, the LLM itself, local models.

A new backend is one subclass of ``Backend`` in one file: it says which model ids it claims (``prefix``),
whether a model can run now, how to enable it when it cannot, how to run it, and how it closes. The executor
asks ``Backends`` which backend runs a model, and ``Backends.explain`` why one cannot run; nothing else knows
a backend's ids or settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from ..catalog import Catalog, ModelInfo
from ..events import LLMUsage
from ..plan import PlannedTask, TaskOutput
from ..resources import Resource
from ..status import BackendStatus
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


class Backend(ABC):
    """Runs models of some ids. A subclass sets the class attributes and implements the three methods.

    Attributes:
        name: short name in status lines (``hf``, ``local``, ``llm``).
        prefix: the model ids it claims (``"local/"``); None for the one backend that runs every id no other
            backend claims (Hugging Face Hub ids).
        enable_hint: what makes its models runnable, said when one cannot run ("set HF_TOKEN or ...").
        retry_timeouts: whether a model that timed out is asked again: yes for a server (it may be busy for a
            moment), no for a model computing on this machine (it would burn the same CPU time again).

    ``available`` must be cheap (no network): the selector asks it for every candidate. ``run`` raises the
    agent's errors (``ModelError``, ``RetryableModelError``, ``ModelTimeoutError``, ``ResourceError``) with
    messages a user can act on. ``aclose`` releases what the backend holds (clients, worker processes); a
    backend is also an async context manager.
    """

    name: str
    prefix: str | None = None
    enable_hint: str = ""
    retry_timeouts: bool = True

    def handles(self, model: ModelInfo) -> bool:
        """Whether ``model``'s id is this backend's (the catch-all backend is asked last, by ``Backends``)."""
        return self.prefix is not None and model.id.startswith(self.prefix)

    @abstractmethod
    def available(self, model: ModelInfo) -> bool:
        """True if ``model`` can run here now (configured, installed); cheap, no network."""

    @abstractmethod
    async def status(self) -> BackendStatus: ...

    @abstractmethod
    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput: ...

    async def aclose(self) -> None:
        """Release clients and workers; the default holds nothing."""
        return None

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Backends:
    """The backends of one deployment: a model runs on the first backend that claims its id (``handles``:
    by prefix, or the HF backend for the ids its endpoints file maps), else on the catch-all backend (the one
    without a prefix)."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        catch_all = [b for b in self.backends if b.prefix is None]
        if len(catch_all) > 1:
            raise ValueError("at most one backend may run the ids no other backend claims")
        self._catch_all = catch_all[0] if catch_all else None

    def for_model(self, model: ModelInfo) -> Backend | None:
        claimed = next((b for b in self.backends if b.handles(model)), None)
        return claimed or self._catch_all

    def available(self, model: ModelInfo) -> bool:
        backend = self.for_model(model)
        return backend is not None and backend.available(model)

    def runnable_task_types(self, catalog: Catalog) -> frozenset[str]:
        """The task types some model of ``catalog`` can run on these backends now: what may be planned."""
        return frozenset(t for t in catalog.tasks() if any(self.available(m) for m in catalog.by_task(t)))

    def explain(self, model_id: str) -> str:
        """Why ``model_id`` cannot run here, naming what would enable it ("needs …: set …")."""
        backend = self.for_model(ModelInfo(id=model_id, task=""))
        if backend is None:
            return f"has no backend for the model {model_id}"
        return f"needs {backend.enable_hint}" if backend.enable_hint else f"cannot run {model_id} here"

    async def status(self) -> list[BackendStatus]:
        return [await b.status() for b in self.backends]

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()
