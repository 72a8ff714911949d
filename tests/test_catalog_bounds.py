"""``hugginggpt catalog refresh`` against a Hub that never stops answering: a size cap and a deadline hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.catalog_refresh import refresh_catalog
from agent.errors import AgentError


class EndlessHub:
    """Answers every listing with a body that never ends: fast (``pause`` 0) or a byte at a time."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.bytes_sent = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def _list(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        piece = b"[" + b'{"id": "org/m", "downloads": 1}, ' * 30_000 if not self.pause else b" "
        try:
            while True:
                await response.write(piece)
                self.bytes_sent += len(piece)
                await asyncio.sleep(self.pause)
        except ConnectionError:
            return response

    async def __aenter__(self) -> EndlessHub:
        app = web.Application()
        app.router.add_get("/api/models", self._list)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def endless(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[EndlessHub]:
    async with EndlessHub(request.param) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.base_url)  # the refresh's child process inherits it
        yield hub


@pytest.mark.parametrize("endless", [0.0], indirect=True)
async def test_an_endless_listing_is_refused_after_the_size_cap(endless: EndlessHub, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(
        AgentError, match=r"could not reach the Hugging Face Hub at .*over the 33,554,432-byte limit"
    ):
        await refresh_catalog(tmp_path / "data", None)
    assert endless.bytes_sent < 64 << 20
    print(f"\nrefused after {endless.bytes_sent / 2**20:.0f} MiB sent, {time.monotonic() - started:.1f} s")
    assert not (tmp_path / "data" / "catalog.jsonl").exists()


@pytest.mark.parametrize("endless", [0.05], indirect=True)
async def test_a_trickling_hub_is_stopped_at_the_refresh_deadline(
    endless: EndlessHub, tmp_path: Path
) -> None:
    """A byte every 50 ms never trips a read timeout; the deadline kills the refresh's process."""
    started = time.monotonic()
    async with asyncio.timeout(60):
        with pytest.raises(AgentError, match=r"did not finish within 3 s; the catalog is unchanged"):
            await refresh_catalog(tmp_path / "data", None, seconds=3.0)
    print(f"\nstopped after {time.monotonic() - started:.1f} s")
    assert not (tmp_path / "data" / "catalog.jsonl").exists()
