"""A scripted OpenAI-compatible chat server on 127.0.0.1, so tests drive the real ``openai`` client over HTTP.

Replies come from a *script*: a list consumed one reply per chat request, or a callable
``(request_json) -> reply``. A reply is a plain string (the assistant's text) or a ``Reply`` for faults::

    async with FakeLLMServer(["hello", Reply.error(503, headers={"Retry-After": "0"}), "again"]) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        ...
        assert server.requests[0]["messages"][0]["role"] == "system"

    server = start_in_thread(['{"tasks": []}', "Hi!"])  # for subprocess (CLI) tests
    try:
        env["OPENAI_BASE_URL"] = server.base_url
    finally:
        server.stop()

Endpoints: ``POST /v1/chat/completions`` (also ``/chat/completions``) with and without ``stream``,
``GET /v1/models``. Streams are SSE ``data: {...}`` chunks, then a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. Every chat request body is appended to
``requests`` (also the rejected ones), its headers to ``headers``. Usage is ``prompt_tokens(messages)`` and ``completion_tokens(text)``.
``reject_formats`` lists ``response_format`` types refused without consuming the script: with HTTP
``reject_status`` (400 by default, as vLLM and OpenAI do; llama-cpp-python's server answers 500 with a
pydantic validation error, reproduced word for word). An exhausted script answers HTTP 500 ``fake LLM server: script exhausted``.

Images: every request's image parts are decoded and appended to ``images`` (one list per request, also for
requests without any: ``ImagePart`` with the name the text part before it gives, the size in pixels and
bytes). A server made with ``vision=False`` (the default, as a text-only model behind vLLM or llama.cpp
without a projector) refuses a request with image parts with HTTP 400, without consuming the script; usage
counts ``IMAGE_TOKENS`` for each image part.

Misbehaviours a hostile or broken server shows: ``Reply(trickle=s)`` sends the answer in small pieces ``s``
seconds apart (a streamed chunk, or 16 bytes of a plain body, at a time); ``Reply(endless=True)`` never stops
sending (words, or body bytes); ``Reply(keepalive=s)`` streams nothing but SSE comments, every ``s`` seconds,
for ever; ``Reply.redirect(url)`` points the client elsewhere. ``bytes_sent`` counts the body bytes written by
these, so a test can see how much a client read before it stopped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

__all__ = [
    "IMAGE_TOKENS",
    "FakeLLMServer",
    "ImagePart",
    "Reply",
    "Script",
    "ThreadedServer",
    "completion_tokens",
    "image_parts",
    "prompt_tokens",
    "start_in_thread",
]


@dataclass
class Reply:
    """One scripted answer. ``body`` (if set) is sent verbatim instead of a completion.

    ``cut_after``: for a stream, drop the connection after that many content chunks; for a plain request,
    drop it before any body. ``send_usage=False`` leaves usage out (some servers do). ``finish_reason=None``
    ends a stream cleanly but without its finishing chunk, as a server that gave up would.
    """

    text: str = ""
    status: int = 200
    body: str | bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut_after: int | None = None
    send_usage: bool = True
    finish_reason: str | None = "stop"
    trickle: float = 0.0
    endless: bool = False
    keepalive: float = 0.0

    @classmethod
    def error(
        cls, status: int, message: str = "scripted error", headers: dict[str, str] | None = None
    ) -> Reply:
        body = json.dumps({"error": {"message": message, "type": "fake_error", "code": status}})
        return cls(status=status, body=body, headers=headers or {})

    @classmethod
    def invalid_json(cls) -> Reply:
        return cls(body='{"id": "chatcmpl-x", "choices": [')

    @classmethod
    def redirect(cls, location: str, status: int = 307) -> Reply:
        return cls(status=status, body="", headers={"Location": location})


Script = Sequence[str | Reply] | Callable[[dict[str, Any]], str | Reply]


IMAGE_TOKENS = 85
"""Prompt tokens the fake counts for an image part (what OpenAI counts for a low-detail image)."""


@dataclass(frozen=True)
class ImagePart:
    """An image part as the fake received it: the name given just before it, its format and size."""

    name: str
    mime: str
    width: int
    height: int
    bytes: int


def prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """What the fake server reports as prompt tokens: ~4 characters a token plus 4 per message, and
    ``IMAGE_TOKENS`` per image part."""
    total = 3
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            text = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
            total += IMAGE_TOKENS * sum(isinstance(p, dict) and p.get("type") == "image_url" for p in content)
        else:
            text = str(content)
        total += 4 + len(text) // 4
    return total


def image_parts(body: dict[str, Any]) -> list[ImagePart]:
    """The image parts of a chat request, decoded (a part that is not a data URL of an image fails the test)."""
    found = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        name = ""
        for part in content:
            if part.get("type") == "text":
                name = str(part.get("text", "")).removeprefix("Image ").removesuffix(":")
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                head, _, data = url.partition(",")
                assert head.startswith("data:image/") and head.endswith(";base64"), head[:40]
                raw = base64.b64decode(data)
                with Image.open(io.BytesIO(raw)) as image:
                    found.append(ImagePart(name, head[5:-7], image.width, image.height, len(raw)))
    return found


def completion_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeLLMServer:
    """Async context manager serving ``script``; ``base_url`` ends in ``/v1`` like OpenAI's."""

    def __init__(
        self,
        script: Script,
        *,
        reject_formats: Collection[str] = (),
        reject_status: int = 400,
        model: str = "fake-model",
        vision: bool = False,
    ) -> None:
        self._script = script
        self.vision = vision
        self.images: list[list[ImagePart]] = []
        self._next = 0
        self.reject_formats = frozenset(reject_formats)
        self.reject_status = reject_status
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.bytes_sent = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeLLMServer:
        app = web.Application()
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
            app.router.add_get(f"{prefix}/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def chat_requests(self) -> int:
        return len(self.requests)

    def _reply_for(self, body: dict[str, Any]) -> Reply:
        if callable(self._script):
            reply = self._script(body)
        elif self._next < len(self._script):
            reply = self._script[self._next]
            self._next += 1
        else:
            return Reply.error(500, "fake LLM server: script exhausted")
        return Reply(text=reply) if isinstance(reply, str) else reply

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        images = image_parts(body)
        self.images.append(images)
        if images and not self.vision:
            return web.Response(
                status=400,
                body=Reply.error(400, "image input is not supported by this model").body,
                content_type="application/json",
            )
        fmt = (body.get("response_format") or {}).get("type")
        if fmt in self.reject_formats:
            if self.reject_status == 500:  # llama-cpp-python 0.3's server
                message = (
                    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                    f"'msg': \"Input should be 'text' or 'json_object'\", 'input': '{fmt}'}}"
                )
                body = json.dumps({"error": {"message": message, "type": "internal_server_error"}})
            else:
                body = (
                    Reply.error(self.reject_status, f"response_format type {fmt!r} is not supported").body
                    or ""
                )
            return web.Response(status=self.reject_status, text=body, content_type="application/json")
        reply = self._reply_for(body)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.body is not None:
            data = reply.body.encode() if isinstance(reply.body, str) else reply.body
            return web.Response(
                status=reply.status, body=data, headers=reply.headers, content_type="application/json"
            )
        usage = {
            "prompt_tokens": prompt_tokens(body.get("messages") or []),
            "completion_tokens": completion_tokens(reply.text),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, reply, usage if include_usage and reply.send_usage else None)
        if reply.cut_after is not None:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if reply.endless:
            return await self._endless_body(request, reply)
        completion: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.send_usage:
            completion["usage"] = usage
        if reply.trickle:
            return await self._trickled_body(request, reply, json.dumps(completion).encode())
        return web.json_response(completion, status=reply.status, headers=reply.headers)

    async def _trickled_body(self, request: web.Request, reply: Reply, data: bytes) -> web.StreamResponse:
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for at in range(0, len(data), 16):
            await response.write(data[at : at + 16])
            self.bytes_sent += len(data[at : at + 16])
            await asyncio.sleep(reply.trickle)
        await response.write_eof()
        return response

    async def _endless_body(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        """A completion whose content never ends: the client must stop reading on its own."""
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        head = b'{"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "m", '
        head += (
            b'"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "'
        )
        await response.write(head)
        piece = b"endless " * 8192
        with contextlib.suppress(ConnectionError):  # until the client hangs up
            while True:
                await response.write(piece)
                self.bytes_sent += len(piece)
                await asyncio.sleep(reply.trickle)
        return response

    async def _stream(
        self, request: web.Request, reply: Reply, usage: dict[str, int] | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **reply.headers})
        await response.prepare(request)
        model = self.model

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        async def send(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data)
            encoded = f"data: {payload}\n\n".encode()
            await response.write(encoded)
            self.bytes_sent += len(encoded)

        if reply.keepalive:
            with contextlib.suppress(ConnectionError):  # until the client hangs up
                while True:
                    await response.write(b": keep-alive\n\n")
                    self.bytes_sent += 14
                    await asyncio.sleep(reply.keepalive)
            return response
        await send(chunk({"role": "assistant", "content": ""}, None))
        if reply.endless:
            with contextlib.suppress(ConnectionError):
                while True:
                    await send(chunk({"content": "endless "}, None))
                    await asyncio.sleep(reply.trickle)
            return response
        pieces = re.findall(r"\S+\s*|\s+", reply.text)
        for n, piece in enumerate(pieces):
            if reply.cut_after is not None and n >= reply.cut_after:
                assert request.transport is not None
                request.transport.close()
                return response
            await send(chunk({"content": piece}, None))
            if reply.trickle:
                await asyncio.sleep(reply.trickle)
        if reply.finish_reason is not None:
            await send(chunk({}, reply.finish_reason))
        if usage is not None:
            await send(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        await send("[DONE]")
        await response.write_eof()
        return response


@dataclass
class ThreadedServer:
    """A ``FakeLLMServer`` running on its own loop in a daemon thread; ``stop()`` shuts it down."""

    base_url: str
    server: FakeLLMServer
    stop: Callable[[], None]

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.server.requests


def start_in_thread(
    script: Script, *, reject_formats: Collection[str] = (), vision: bool = False
) -> ThreadedServer:
    """Serve ``script`` from a background thread, for code that runs its own loop or another process."""
    server = FakeLLMServer(script, reject_formats=reject_formats, vision=vision)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    done: asyncio.Future[None] = loop.create_future()

    async def main() -> None:
        async with server:
            ready.set()
            await done

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(timeout=10):
        raise RuntimeError("the fake LLM server did not start within 10 s")

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def stop() -> None:
        loop.call_soon_threadsafe(finish)
        thread.join(timeout=10)
        loop.close()

    return ThreadedServer(base_url=server.base_url, server=server, stop=stop)
