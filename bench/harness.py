"""The loopback world the agent benchmarks run in: the scripted LLM and the HF fake, each on its own thread.

The fakes run on their own event loops so that the loop under measurement carries only the agent's work
(they still share the GIL). The runtime is ``Runtime.start``'s, with the optional parts that would make figures
depend on what is installed replaced: the Hugging Face backend only, the fixed demonstrations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.backends import Backend
from agent.backends.hf import HFBackend
from agent.catalog import Catalog
from agent.demos import FixedDemos
from agent.llm import LLM, OpenAILLM
from agent.settings import Settings
from app.runtime import Runtime

from .controller import ScriptedController

__all__ = ["Loopback", "loopback", "runtime_on"]


@dataclass(frozen=True)
class Loopback:
    """Settings that point the agent at the fakes, what the LLM fake was sent, and the HF fake (``FakeHF``,
    to script latencies with ``hf.script(model, Fault.slow(s))``)."""

    settings: Settings
    llm_requests: list[dict[str, Any]]
    catalog: Catalog
    hf: Any


@contextmanager
def loopback(controller: ScriptedController, data_dir: Path, **overrides: Any) -> Iterator[Loopback]:
    """Start both fakes: the LLM answers as ``controller`` scripts; every catalog model answers."""
    from tests.fakes import hf_server, llm_server

    catalog = Catalog.for_data_dir(data_dir)
    llm = llm_server.start_in_thread(controller)
    try:
        hf = hf_server.start_in_thread({m.id: m.task for m in catalog})
        try:
            settings = Settings(
                openai_base_url=llm.base_url,
                openai_api_key="bench",
                llm_model="bench-llm",
                hf_token="hf_bench",
                hf_inference_base_url=hf.base_url,
                data_dir=data_dir,
            )
            yield Loopback(replace(settings, **overrides), llm.requests, catalog, hf.server)
        finally:
            hf.stop()
    finally:
        llm.stop()


@asynccontextmanager
async def runtime_on(
    world: Loopback,
    *,
    wrap_llm: Callable[[LLM], LLM] | None = None,
    wrap_backend: Callable[[Backend], Backend] | None = None,
) -> AsyncIterator[Runtime]:
    """A runtime over the fakes, storage in the world's data dir; ``wrap_*`` wrap the LLM and the HF
    backend (to meter them). Closed on exit."""
    llm: LLM = OpenAILLM(world.settings)
    hf: Backend = HFBackend(world.settings)
    runtime = await Runtime.start(
        world.settings,
        llm=wrap_llm(llm) if wrap_llm else llm,
        backends=[wrap_backend(hf) if wrap_backend else hf],
        demos=FixedDemos(),
    )
    try:
        yield runtime
    finally:
        await runtime.close()
