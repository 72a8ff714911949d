"""A fake Hugging Face inference server on 127.0.0.1, speaking each task's real wire format.

Usage::

    async with FakeHF({"Salesforce/blip": "image-to-text"}) as hf:
        settings = Settings(hf_token="hf_x", hf_inference_base_url=hf.base_url)
        hf.script("Salesforce/blip", Fault.loading(retry_after=2))   # next request: 503, then normal answers
        ...
        hf.requests[0].body   # what the client sent

Routes: ``POST /models/{model_id}`` (the HF Inference layout) and ``POST /endpoints/{model_id}`` (stands
for a self-hosted endpoint URL of that model); both answer as the task the constructor maps the model to.
``GET /api/models/{model_id}`` answers the Hub's model-info call with ``provider_mappings`` (for
``HF_INFERENCE_PROVIDER=auto``). Unknown models get 404 like the real API. ``POST /providers/together/...``
stands for a third-party provider behind the router (point ``constants.INFERENCE_PROXY_TEMPLATE`` at
``{base_url}/providers/{provider}``); it answers Together's image generation.

Faults (``script``) are used up one per request, in order; then the model answers normally again;
``script_info`` does the same for the model-info call. Beyond HTTP faults: ``Fault.huge(n)`` streams an
``n``-byte body (``None``: endless) 1 MiB at a time, ``Fault.redirect(url)`` sends the client elsewhere;
``bytes_sent`` counts the body bytes ``huge`` wrote, to see how much a client read before it stopped.
For a CLI subprocess, ``start_in_thread(...)`` runs the same server on its own loop in a daemon thread
(faults with a ``barrier`` need the caller's loop, so they only work with ``async with``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "SIZE",
    "FakeHF",
    "Fault",
    "Recorded",
    "RunningHF",
    "png_bytes",
    "start_in_thread",
    "wav_bytes",
]

SIZE = 64
"""Side of the square images the fake makes; its boxes and masks lie inside it."""


def png_bytes(size: int = SIZE, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small real PNG (a coloured square on grey)."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def wav_bytes(seconds: float = 0.1, rate: int = 8000) -> bytes:
    """A small real WAV file (a 440 Hz square-ish tone)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = int(seconds * rate)
        w.writeframes(b"".join(struct.pack("<h", 8000 if (i // 9) % 2 else -8000) for i in range(frames)))
    return out.getvalue()


def _mask_b64() -> str:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 40, 40), fill=255)
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


_MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 32

# Each task's normal answer: (body, content type). JSON bodies are dumped on the way out.
ANSWERS: dict[str, tuple[Any, str]] = {
    "image-to-text": ([{"generated_text": "a red square on a grey background"}], "application/json"),
    "object-detection": (
        [
            {"score": 0.98, "label": "square", "box": {"xmin": 16, "ymin": 16, "xmax": 48, "ymax": 48}},
            {"score": 0.51, "label": "frame", "box": {"xmin": 2, "ymin": 2, "xmax": 60, "ymax": 60}},
        ],
        "application/json",
    ),
    "image-segmentation": ([{"label": "square", "score": 0.97, "mask": _mask_b64()}], "application/json"),
    "image-classification": (
        [{"label": "red square", "score": 0.92}, {"label": "flag", "score": 0.05}],
        "application/json",
    ),
    "audio-classification": (
        [{"label": "beep", "score": 0.88}, {"label": "speech", "score": 0.1}],
        "application/json",
    ),
    "text-classification": (
        [[{"label": "POSITIVE", "score": 0.99}, {"label": "NEGATIVE", "score": 0.01}]],
        "application/json",
    ),
    "token-classification": (
        [
            {"entity_group": "PER", "score": 0.99, "word": "Sarah", "start": 11, "end": 16},
            {"entity_group": "LOC", "score": 0.98, "word": "London", "start": 30, "end": 36},
        ],
        "application/json",
    ),
    "visual-question-answering": (
        [{"answer": "red", "score": 0.93}, {"answer": "pink", "score": 0.04}],
        "application/json",
    ),
    "document-question-answering": (
        [{"answer": "42", "score": 0.8, "start": 3, "end": 3}],
        "application/json",
    ),
    "question-answering": ({"answer": "Paris", "score": 0.97, "start": 0, "end": 5}, "application/json"),
    "sentence-similarity": ([0.87], "application/json"),
    "tabular-classification": (["setosa", "virginica"], "application/json"),
    "automatic-speech-recognition": ({"text": "hello world"}, "application/json"),
    "audio-to-audio": (
        [{"label": "speech", "content-type": "audio/wav", "blob": base64.b64encode(wav_bytes()).decode()}],
        "application/json",
    ),
    "depth-estimation": (
        {"depth": base64.b64encode(png_bytes(colour=(90, 90, 90))).decode(), "predicted_depth": [[1.0]]},
        "application/json",
    ),
    "text-to-image": (png_bytes(colour=(30, 200, 30)), "image/png"),
    "image-to-image": (png_bytes(colour=(30, 30, 200)), "image/png"),
    "text-to-speech": (wav_bytes(), "audio/wav"),
    "text-to-video": (_MP4, "video/mp4"),
}


def _answer_for(task: str) -> tuple[Any, str]:
    """The normal answer of ``task``; ControlNet tasks answer like image-to-image."""
    if task.endswith(("-control", "-text-to-image")) and task != "text-to-image":
        return ANSWERS["image-to-image"]
    return ANSWERS[task]


@dataclass(frozen=True)
class Fault:
    """One scripted answer that replaces the model's normal one (build them with the class methods)."""

    status: int = 200
    body: bytes | None = None  # None: the normal answer
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before answering
    drop: bool = False  # close the connection without answering
    barrier: asyncio.Barrier | None = None  # wait until this many requests are held together
    huge: bool = False  # stream ``size`` zero bytes (None: for ever) instead of ``body``
    size: int | None = None
    declare_length: bool = False  # with ``huge``: announce the size in Content-Length

    @classmethod
    def loading(cls, retry_after: float | None = 1.0, estimated_time: float = 20.0) -> Fault:
        """503 "Model is loading", as HF Inference answers while a model warms up."""
        headers = (("Retry-After", f"{retry_after:g}"),) if retry_after is not None else ()
        body = json.dumps({"error": "Model is loading", "estimated_time": estimated_time}).encode()
        return cls(status=503, body=body, headers=headers)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0) -> Fault:
        headers = (("Retry-After", f"{retry_after:g}"),) if retry_after is not None else ()
        return cls(status=429, body=json.dumps({"error": "Rate limit reached"}).encode(), headers=headers)

    @classmethod
    def error(cls, status: int, message: str = "Bad request") -> Fault:
        return cls(status=status, body=json.dumps({"error": message}).encode())

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """The normal answer, after ``seconds``."""
        return cls(delay=seconds)

    @classmethod
    def hold(cls, barrier: asyncio.Barrier) -> Fault:
        """The normal answer, once ``barrier.parties`` requests have arrived (proves they overlap)."""
        return cls(barrier=barrier)

    @classmethod
    def dropped(cls) -> Fault:
        return cls(drop=True)

    @classmethod
    def malformed(cls) -> Fault:
        return cls(body=b'[{"generated_text": "trunc', content_type="application/json")

    @classmethod
    def huge_body(
        cls, size: int | None, *, declare_length: bool = False, content_type: str = "image/png"
    ) -> Fault:
        """A body of ``size`` bytes (None: endless), streamed 1 MiB at a time."""
        return cls(huge=True, size=size, declare_length=declare_length, content_type=content_type)

    @classmethod
    def redirect(cls, location: str, status: int = 307) -> Fault:
        return cls(status=status, body=b"", headers=(("Location", location),))

    @classmethod
    def wrong_type(cls) -> Fault:
        return cls(body=b"<html><body>Service page</body></html>", content_type="text/html")


@dataclass
class Recorded:
    """One request as the server saw it (inference POSTs and model-info GETs).

    ``start``/``end`` are ``time.monotonic()`` values: when the request arrived and when it was answered.
    """

    model: str
    path: str
    headers: CIMultiDict[str]  # case-insensitive
    body: bytes
    start: float
    end: float = 0.0

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeHF:
    """The server. ``tasks`` maps model ids to task names; ``provider_mappings`` maps model ids to the Hub's
    ``inferenceProviderMapping`` object (for ``GET /api/models/{id}``)."""

    tasks: dict[str, str]
    provider_mappings: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    base_url: str = ""
    bytes_sent: int = 0
    _faults: dict[str, deque[Fault]] = field(default_factory=dict)
    _info_faults: dict[str, deque[Fault]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    def script(self, model: str, *faults: Fault) -> None:
        """Queue answers for the next requests to ``model``."""
        self._faults.setdefault(model, deque()).extend(faults)

    def script_info(self, model: str, *faults: Fault) -> None:
        """Queue answers for the next model-info requests about ``model``."""
        self._info_faults.setdefault(model, deque()).extend(faults)

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/models/{model:.*}", self._infer)
        app.router.add_post("/endpoints/{model:.*}", self._infer)
        app.router.add_get("/api/models/{model:.*}", self._model_info)
        app.router.add_post("/providers/{provider}/{path:.*}", self._provider_call)
        # Short shutdown: a test ending mid-request (a timeout) must not wait for the slow answer.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeHF:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        record = Recorded(
            model, request.path, CIMultiDict(request.headers), await request.read(), time.monotonic()
        )
        self.requests.append(record)
        try:
            task = self.tasks.get(model)
            if task is None:
                return web.json_response({"error": f"Model {model} does not exist"}, status=404)
            queued = self._faults.get(model)
            fault = queued.popleft() if queued else Fault()
            return await self._answer(request, fault, *_answer_for(task))
        finally:
            record.end = time.monotonic()

    async def _answer(
        self, request: web.Request, fault: Fault, normal: Any, normal_type: str
    ) -> web.StreamResponse:
        """``fault``'s answer, or the normal one (``normal``: bytes, or JSON to dump)."""
        if fault.barrier is not None:
            await fault.barrier.wait()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if fault.huge:
            return await self._huge(request, fault)
        body, content_type = (
            (fault.body, fault.content_type) if fault.body is not None else (normal, normal_type)
        )
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return web.Response(
            status=fault.status, body=data, content_type=content_type, headers=dict(fault.headers)
        )

    async def _huge(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        headers = {"Content-Type": fault.content_type}
        if fault.declare_length and fault.size is not None:
            headers["Content-Length"] = str(fault.size)
        response = web.StreamResponse(status=fault.status, headers=headers)
        await response.prepare(request)
        piece = bytes(1 << 20)
        left = fault.size
        try:
            while left is None or left > 0:
                chunk = piece if left is None or left >= len(piece) else piece[:left]
                await response.write(chunk)
                self.bytes_sent += len(chunk)
                if left is not None:
                    left -= len(chunk)
            await response.write_eof()
        except ConnectionError:  # the client stopped reading and hung up, as it should
            pass
        return response

    async def _provider_call(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        self.requests.append(
            Recorded(
                json.loads(body).get("model", ""), request.path, CIMultiDict(request.headers), body, now, now
            )
        )
        if (
            request.match_info["provider"] == "together"
            and request.match_info["path"] == "v1/images/generations"
        ):
            image = base64.b64encode(_answer_for("text-to-image")[0]).decode()
            return web.json_response({"data": [{"b64_json": image}]})
        return web.json_response({"error": "not served"}, status=404)

    async def _model_info(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        now = time.monotonic()
        self.requests.append(Recorded(model, request.path, CIMultiDict(request.headers), b"", now, now))
        queued = self._info_faults.get(model)
        if queued:
            return await self._answer(request, queued.popleft(), None, "application/json")
        if model not in self.tasks:
            return web.json_response({"error": "Repository not found"}, status=404)
        info = {"id": model, "pipeline_tag": self.tasks[model]}
        info["inferenceProviderMapping"] = self.provider_mappings.get(model, {})  # type: ignore[assignment]
        return web.json_response(info)


@dataclass
class RunningHF:
    """A ``FakeHF`` serving from a background thread: ``base_url``, the ``server`` (to script and inspect),
    and ``stop()``."""

    server: FakeHF
    base_url: str
    stop: Callable[[], None]


def start_in_thread(tasks: dict[str, str], **kwargs: Any) -> RunningHF:
    """Start a ``FakeHF`` on its own event loop in a daemon thread (for CLI subprocess tests)."""
    server = FakeHF(tasks, **kwargs)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())
        loop.close()

    thread = threading.Thread(target=serve, name="fake-hf", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the fake HF server did not start")

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return RunningHF(server, server.base_url, stop)
