"""Shared test setup: no test may reach the network, and none may read the developer's .env."""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from hypothesis import settings

# Tests never fail on a wall-clock threshold: Hypothesis's per-example deadline (200 ms) would make property
# tests fail on a busy 2-core machine for no fault of the code.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "HF_", "HUGGINGGPT_", "DISCORD_", "LOCAL_LLM_")) or name == "LLM_MODEL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HUGGINGGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _http_clients_closed_after_each_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every httpx client a test opened and left open (openai's and huggingface_hub's both use one).

    Left open, such a client is finalized whenever the garbage collector gets to it, often inside a later
    test: openai's client then schedules ``aclose()`` on that test's running loop, which fails on the
    connections of the earlier, closed loop, and the later test sees an error that is not its own.
    Product code closes what it opens (Runtime, OpenAILLM, HFBackend); this is for tests that build an LLM or
    backend for one call and drop it.
    """
    opened: weakref.WeakSet[httpx2.AsyncClient] = weakref.WeakSet()
    init = httpx2.AsyncClient.__init__

    def tracked(self: httpx2.AsyncClient, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        opened.add(self)

    monkeypatch.setattr(httpx2.AsyncClient, "__init__", tracked)
    yield
    for client in list(opened):
        if not client.is_closed:
            # httpx marks the client closed before closing its connections, so even when those belong to a
            # loop that is gone (the RuntimeError below), no finalizer will try again later.
            with contextlib.suppress(RuntimeError):
                asyncio.run(client.aclose())
