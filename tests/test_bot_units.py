"""The bot's parts on their own: allow-lists, rate limit, per-thread queue, throttled status, downloads, media
fitting, the plan picture, and pointing discord.py at another server."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from aiohttp import web
from PIL import Image

from agent.errors import ResourceError
from agent.events import Done, LLMUsage, PlanReady, RunResult
from agent.plan import Plan, PlannedTask
from agent.progress import RunProgress
from agent.settings import Settings
from agent.uploads import UploadLimits
from bot.app import use_discord_endpoints
from bot.attachments import Downloader, IncomingFile, read_attachments
from bot.config import DiscordConfig
from bot.graph import draw_plan
from bot.limits import AccessPolicy, RateLimiter, ThreadQueue
from bot.media import FILES_PER_MESSAGE, OutgoingFile, batches
from bot.status import StatusMessage, render_progress
from bot.turn import ThreadRequest, run_in_thread
from storage import StorageError
from tests.fakes.hf_server import png_bytes

# --------------------------------------------------------------------------- access and load


def test_access_policy_from_settings_and_rules() -> None:
    settings = Settings.from_mapping(
        {"DISCORD_ALLOWED_GUILDS": "1", "DISCORD_ALLOWED_CHANNELS": "10, 11", "DISCORD_ALLOWED_ROLES": "100"}
    )
    config = DiscordConfig.from_settings(settings)
    policy = AccessPolicy(config.allowed_guilds, config.allowed_channels, config.allowed_roles)
    assert policy.allows(1, [10], [100])
    assert policy.allows(1, [99, 11], [5, 100])  # a thread of an allowed channel
    assert not policy.allows(2, [10], [100])
    assert not policy.allows(1, [12], [100])
    assert not policy.allows(1, [10], [5])
    assert not policy.allows(None, [10], [100])  # direct messages
    assert AccessPolicy().allows(7, [8], [])


def test_rate_limit_is_a_sliding_minute_per_user() -> None:
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.acquire(1) == 0 and limiter.acquire(1) == 0
    assert limiter.acquire(1) == pytest.approx(60.0)
    assert limiter.acquire(2) == 0  # other users are not affected
    now[0] = 30.0
    assert limiter.acquire(1) == pytest.approx(30.0)
    now[0] = 60.0
    assert limiter.acquire(1) == 0
    assert RateLimiter(0).acquire(1) == 0


async def test_thread_queue_runs_one_request_at_a_time_in_order() -> None:
    queue = ThreadQueue()
    order: list[str] = []

    async def request(name: str, thread: int) -> None:
        async with queue.turn(thread):
            order.append(f"start {name}")
            await asyncio.sleep(0.01)
            order.append(f"end {name}")

    first = asyncio.create_task(request("a", 1))
    await asyncio.sleep(0)
    assert queue.busy(1) and not queue.busy(2)
    await asyncio.gather(first, request("b", 1), request("c", 2))
    assert order.index("end a") < order.index("start b")
    assert not queue.busy(1) and not queue._locks


# --------------------------------------------------------------------------- the status message


@dataclass
class FakeMessage:
    log: list[tuple[float, str, list[str]]]
    id: int = 1

    async def edit(
        self, *, content: str, attachments: list[discord.File] | None = None, view: object = None
    ) -> FakeMessage:
        self.log.append((time.monotonic(), content, [f.filename for f in attachments or []]))
        return self


@dataclass
class FakeChannel:
    log: list[tuple[float, str, list[str]]] = field(default_factory=list)
    fail: bool = False

    async def send(  # type: ignore[assignment]
        self,
        content: str = "",
        *,
        files: list[discord.File] = (),
        suppress_embeds: bool = False,
        view: object = None,
    ) -> FakeMessage:
        if self.fail:
            raise discord.HTTPException(_Response(503), "unavailable")
        self.log.append((time.monotonic(), content, [f.filename for f in files]))
        return FakeMessage(self.log)


@dataclass
class _Response:
    status: int
    reason: str = "error"


async def test_status_edits_at_most_once_per_interval_and_always_shows_the_final_state() -> None:
    channel = FakeChannel()
    status = StatusMessage(channel, interval=0.1)  # type: ignore[arg-type]
    for n in range(30):
        status.show(f"state {n}", file=("plan.png", b"png") if n == 3 else None)
        await asyncio.sleep(0.01)
    await status.finish("final")

    times = [t for t, _, _ in channel.log]
    assert all(b - a >= 0.099 for a, b in itertools.pairwise(times))
    assert len(channel.log) <= 5
    assert channel.log[0][1] == "state 0"
    assert channel.log[-1][1] == "final"
    assert sum(files == ["plan.png"] for _, _, files in channel.log) == 1


async def test_the_answer_is_posted_without_waiting_for_the_final_status_edit() -> None:
    """The final status edit must wait out the edit interval; the answer must not wait for it."""

    @dataclass
    class FakeThread(FakeChannel):
        guild: Any = field(default_factory=lambda: SimpleNamespace(filesize_limit=25 * 1024 * 1024))

    result = RunResult("r1", "ok", Plan(()), {}, [], "Hello!", [], LLMUsage(), 0.1)

    async def ask(*args: Any, **kwargs: Any) -> AsyncIterator[Done]:
        await asyncio.sleep(0.05)  # the first status is written while the agent works
        yield Done(result)

    thread = FakeThread()
    conversations = SimpleNamespace(ask=ask, activity=lambda: None)
    request = ThreadRequest("c1", "hi", (), "alice", None)
    assert await run_in_thread(conversations, thread, request, max_media_seconds=600.0, edit_interval=0.5) is result  # type: ignore[arg-type]
    contents = [content for _, content, _ in thread.log]
    assert contents[0].startswith("**HuggingGPT**")  # the status message, first
    assert contents[1] == "Hello!"  # then the answer, at once
    assert contents[-1].startswith("**HuggingGPT** · done")  # the final status still comes, afterwards


async def test_a_run_that_fails_midway_leaves_the_status_saying_so() -> None:
    """A conversation deleted under a run (or a database failure) left the status at "planning" forever."""

    @dataclass
    class FakeThread(FakeChannel):
        guild: Any = field(default_factory=lambda: SimpleNamespace(filesize_limit=25 * 1024 * 1024))

    async def ask(*args: Any, **kwargs: Any) -> AsyncIterator[PlanReady]:
        yield PlanReady(Plan((PlannedTask(0, "text-to-image", (), {"text": "a cat"}),)))
        raise StorageError("conversation c1 does not exist (it may have been reset)")

    thread = FakeThread()
    request = ThreadRequest("c1", "hi", (), "alice", None)
    with pytest.raises(StorageError):
        await run_in_thread(SimpleNamespace(ask=ask, activity=lambda: None), thread, request, max_media_seconds=600.0, edit_interval=0.0)  # type: ignore[arg-type]
    assert thread.log[-1][1].startswith("**HuggingGPT** · failed")


async def test_a_failing_status_message_does_not_raise() -> None:
    status = StatusMessage(FakeChannel(fail=True), interval=0.0)  # type: ignore[arg-type]
    status.show("one")
    await status.finish("two")
    assert status.message is None


def test_progress_text_has_the_stage_and_one_line_per_task() -> None:
    progress = RunProgress()
    assert render_progress(progress) == "**HuggingGPT** · planning"
    progress.apply(PlanReady(Plan((PlannedTask(0, "text-to-image", (), {"text": "x" * 5000}),))))
    text = render_progress(progress, seconds=1.25)
    assert text.splitlines()[0] == "**HuggingGPT** · choosing models · 1.2s"
    assert "0 text-to-image" in text and len(text) <= 2000


# --------------------------------------------------------------------------- downloads


@asynccontextmanager
async def file_server() -> AsyncIterator[str]:
    async def small(request: web.Request) -> web.Response:
        return web.Response(body=png_bytes())

    async def lying(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length
        await response.prepare(request)
        for _ in range(50):
            await response.write(b"x" * 10_000)
        return response

    async def declared(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * 200_000)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=b"late")

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    for name, handler in {"small.png": small, "lying": lying, "declared": declared, "slow": slow, "missing": missing}.items():
        app.router.add_get(f"/{name}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_downloads_are_capped_while_streaming_and_time_out() -> None:
    downloader = Downloader(timeout=aiohttp.ClientTimeout(total=0.5))
    async with file_server() as base:
        assert await downloader.fetch(f"{base}/small.png", name="a.png", max_bytes=10_000) == png_bytes()
        with pytest.raises(ResourceError, match=r"lying\.bin: more than the 98 KiB limit"):
            await downloader.fetch(f"{base}/lying", name="lying.bin", max_bytes=100_000)
        with pytest.raises(ResourceError, match=r"declared\.bin: 195 KiB is over the 98 KiB limit"):
            await downloader.fetch(f"{base}/declared", name="declared.bin", max_bytes=100_000)
        with pytest.raises(ResourceError, match=r"slow\.bin: the download timed out"):
            await downloader.fetch(f"{base}/slow", name="slow.bin", max_bytes=100_000)
        with pytest.raises(ResourceError, match=r"gone\.png: could not download it \(HTTP 404\)"):
            await downloader.fetch(f"{base}/missing", name="gone.png", max_bytes=100_000)
    with pytest.raises(ResourceError, match=r"down\.png: could not download it$"):
        await downloader.fetch(f"{base}/small.png", name="down.png", max_bytes=10_000)
    await downloader.aclose()


async def test_read_attachments_keeps_the_good_files_and_names_the_others() -> None:
    downloader = Downloader()
    async with file_server() as base:
        files = [
            IncomingFile("big.png", f"{base}/small.png", 10_000_000),  # refused before downloading
            IncomingFile("ok.png", f"{base}/small.png", len(png_bytes())),
            IncomingFile("text.txt", f"{base}/declared", 200_000),
        ]
        uploads, problems = await read_attachments(files, downloader, UploadLimits(1_000_000, 600.0, 2048))
    await downloader.aclose()
    assert [(u.filename, u.kind, u.mime) for u in uploads] == [("ok.png", "image", "image/png")]
    assert problems == ["big.png: 9.5 MiB is over the 977 KiB limit", "text.txt: not an image, audio or video file I can read"]


# --------------------------------------------------------------------------- generated files (more in test_media.py)


def test_files_are_batched_by_count_and_total_size() -> None:
    files = [OutgoingFile(f"{n}.png", b"x" * 100) for n in range(25)]
    assert [len(b) for b in batches(files, 10_000)] == [FILES_PER_MESSAGE, FILES_PER_MESSAGE, 5]
    assert [len(b) for b in batches(files[:5], 250)] == [2, 2, 1]
    assert batches([], 10) == []


def test_the_plan_picture_is_a_png_laid_out_by_depth() -> None:
    plan = Plan((
        PlannedTask(0, "image-to-text", (), {"image": "img-1.png"}),
        PlannedTask(1, "object-detection", (), {"image": "img-1.png"}),
        PlannedTask(2, "text-to-speech", (0,), {"text": "<GENERATED>-0"}),
        PlannedTask(3, "image-to-image", (1, 2), {"image": "<GENERATED>-1"}),
    ))
    with Image.open(io.BytesIO(draw_plan(plan))) as img:
        assert img.format == "PNG"
        assert img.width > img.height  # three columns, two rows


# --------------------------------------------------------------------------- Discord-compatible servers


def test_discord_endpoints_can_point_at_another_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    use_discord_endpoints("", "")
    assert discord.http.Route.BASE == "https://discord.com/api/v10"
    use_discord_endpoints("http://spacebar.local:3001/", "ws://spacebar.local:3002")
    assert discord.http.Route.BASE == "http://spacebar.local:3001/api/v10"
    assert discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY == yarl.URL("ws://spacebar.local:3002")
    use_discord_endpoints("http://spacebar.local:3001/api/v9", "")
    assert discord.http.Route("GET", "/users/@me").url == "http://spacebar.local:3001/api/v9/users/@me"
