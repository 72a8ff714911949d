"""The loopback world the agent benchmarks run in: the scripted LLM and the HF fake, each on its own thread.

The fakes run on their own event loops so that the loop under measurement carries only the agent's work
(they still share the GIL). The agent is built as ``Runtime`` builds it, minus the optional parts that would
make figures depend on what is installed: the Hugging Face backend only, the fixed demonstrations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.backends import Backends
from agent.backends.hf import HFBackend
from agent.catalog import Catalog
from agent.llm import OpenAILLM
from agent.pipeline import Agent
from agent.settings import Settings

from .common import use_test_fakes
from .controller import ScriptedController

__all__ = ["Loopback", "build_agent", "close_agent", "loopback"]


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
    use_test_fakes()
    from fakes import hf_server, llm_server

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


def build_agent(world: Loopback) -> Agent:
    """The agent over the fakes; ``close_agent`` it afterwards."""
    backends = Backends([HFBackend(world.settings)])
    return Agent(world.settings, OpenAILLM(world.settings), world.catalog, backends)


async def close_agent(agent: Agent) -> None:
    """Close the HTTP clients the agent's LLM and backends hold, as ``Runtime.close`` does."""
    for client in (*agent.backends.backends, agent.llm):
        aclose = getattr(client, "aclose", None)
        if aclose is not None:
            await aclose()
