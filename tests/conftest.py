"""Shared test setup: no test may reach the network, and none may read the developer's .env (or use the
developer's database or bucket). Storage tests run on both engines: ``storage_config`` is SQLite, then a
fresh database of the session's throwaway PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import settings

from storage import StorageConfig
from tests.fakes.postgres import PostgresCluster, postgres_bin

# Tests never fail on a wall-clock threshold: Hypothesis's per-example deadline (200 ms) would make property
# tests fail on a busy 2-core machine for no fault of the code.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the whole session, started on first use."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed: run scripts/system-deps.sh (Debian's postgresql)")
    cluster = PostgresCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def database_url(postgres: PostgresCluster) -> Iterator[str]:
    """A fresh PostgreSQL database at the newest schema revision, dropped after the test."""
    url = postgres.new_database()
    try:
        yield url
    finally:
        postgres.drop(url)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The database engine a storage test runs on; both, one after the other."""
    return str(request.param)


@pytest.fixture
def storage_config(engine: str, request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    """Where a test's storage lives: ``tmp_path/data``, with a fresh PostgreSQL database for that engine."""
    url = request.getfixturevalue("database_url") if engine == "postgresql" else None
    return StorageConfig(tmp_path / "data", database_url=url)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in list(os.environ):
        if name.startswith(
            ("OPENAI_", "HF_", "HUGGINGGPT_", "DISCORD_", "LOCAL_LLM_", "AWS_", "PG")
        ) or name in (
            "LLM_MODEL",
            "DATABASE_URL",
            "BLOB_URL",
        ):
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
