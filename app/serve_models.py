"""``hugginggpt serve-models``: the local expert models behind the Hugging Face task API, for other machines.

A bot process whose ``HUGGINGGPT_ENDPOINTS`` file maps ``local/...`` ids to this server runs Whisper, YOLO
and the other local models over HTTP, through the same ``AsyncInferenceClient`` calls it makes to Hugging
Face, and loads none of their packages itself. The server is a thin HTTP front on a ``Backend`` (the
``LocalBackend``): the bounds that backend applies inside a bot process apply here unchanged, and the server
adds what a network peer needs:

- a body over ``HUGGINGGPT_MAX_ATTACHMENT_MB`` is refused with 413 (by its Content-Length before reading, or
  as it streams in), and a body must arrive within 60 s;
- media are decoded by the backend itself, as in the bot: under its pixel and media-duration limits, in
  the backend's own workers; what does not decode is answered 400 with the reason;
- each model runs at most ``SERVE_MODELS_CONCURRENCY`` requests at once, with ``SERVE_MODELS_QUEUE`` more
  waiting; past that it answers 503 with ``Retry-After`` (estimated from its recent run times) before reading
  the body. The HF backend honours the header;
- a run takes at most ``HUGGINGGPT_TASK_TIMEOUT``; past it the answer is 500, not 504, which the client
  would take as "busy" and send again to burn the same CPU.

Routes: ``POST /models/<model id>`` (e.g. ``/models/local/whisper-tiny.en``) and ``GET /health``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.backends import Backend, TaskInput, TaskIO
from agent.catalog import ModelInfo
from agent.errors import AgentError, ModelError, ModelTimeoutError, ResourceError, RetryableModelError
from agent.events import LLMUsage
from agent.plan import PlannedTask, TaskOutput
from agent.resources import MemoryResourceStore, Origin, Resource, extension_for
from agent.settings import Settings
from agent.tasks import TASKS, Modality

__all__ = ["SERVED_TASKS", "ModelServer", "ServeLimits", "serve_models"]

log = logging.getLogger(__name__)

# Seconds a client may take to send its body (a slow sender holds a queue place meanwhile).
_READ_SECONDS = 60.0
# The longest wait a 503 asks for: a client waiting longer would rather try another model.
_MAX_RETRY_AFTER = 60
# Sentences one sentence-similarity request may compare (each is one run of the encoder).
_MAX_SENTENCES = 32
# The media argument each served task reads from the body; the other served tasks read JSON text.
_MEDIA: dict[str, Modality] = {
    "automatic-speech-recognition": "audio",
    "image-classification": "image",
    "object-detection": "image",
    "canny-control": "image",
}
_TEXT_TASKS = frozenset({"text-to-speech", "sentence-similarity"})
SERVED_TASKS = frozenset(_MEDIA) | _TEXT_TASKS


@dataclass(frozen=True)
class ServeLimits:
    """The bounds of one server (the slice of ``Settings`` it needs)."""

    max_body_bytes: int
    timeout: float
    concurrency: int
    queue: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ServeLimits:
        return cls(
            settings.max_attachment_bytes,
            settings.task_timeout,
            settings.serve_models_concurrency,
            settings.serve_models_queue,
        )


class _Refused(Exception):
    """An HTTP error answer with a message for the client (and optionally ``Retry-After``)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class _Gate:
    """Admission to one model: ``concurrency`` requests run at once and ``queue`` more wait; the rest are
    turned away at once with an estimate of when to come back."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.capacity = concurrency + queue
        self.admitted = 0
        self.running = 0
        self.served = 0  # runs finished, for /health
        self._slots = asyncio.Semaphore(concurrency)
        self._seconds = 1.0  # moving average of one run's time, for Retry-After

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, divided among the running slots."""
        wait = self._seconds * self.admitted / self.concurrency
        return max(1, min(_MAX_RETRY_AFTER, math.ceil(wait)))

    @asynccontextmanager
    async def admitted_request(self) -> AsyncIterator[None]:
        """Hold a place (running or waiting) for the whole request, or raise 503 if there is none."""
        if self.admitted >= self.capacity:
            raise _Refused(
                503, "the model is busy: every place in its queue is taken", retry_after=self.retry_after()
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Run: wait for one of the ``concurrency`` slots; the run's time feeds the estimate."""
        async with self._slots:
            self.running += 1
            started = time.monotonic()
            try:
                yield
            finally:
                self.running -= 1
                self.served += 1
                self._seconds = 0.7 * self._seconds + 0.3 * (time.monotonic() - started)


@dataclass
class _Call:
    """One request, parsed: the task's text arguments and its media, as the backend takes them."""

    text: dict[str, str]
    media: bytes | None = None
    mime: str = "application/octet-stream"  # the media's Content-Type, as the client gave it
    sentences: tuple[str, ...] = ()  # sentence-similarity: compared each with ``text["text"]``


class ModelServer:
    """The HTTP front of ``backend`` for ``models`` (each must be one of the ``SERVED_TASKS``)."""

    def __init__(self, backend: Backend, models: Sequence[ModelInfo], limits: ServeLimits) -> None:
        unserved = [m.id for m in models if m.task not in SERVED_TASKS]
        if unserved:
            raise ValueError(f"these models' tasks are not served over the task API: {unserved}")
        self.backend = backend
        self.models = {m.id: m for m in models}
        self.limits = limits
        self._gates = {m.id: _Gate(limits.concurrency, limits.queue) for m in models}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes)
        app.router.add_get("/health", self._health)
        app.router.add_post("/models/{model:.+}", self._model)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        models = {}
        for model in self.models.values():
            gate = self._gates[model.id]
            models[model.id] = {
                "task": model.task,
                "running": gate.running,
                "waiting": gate.admitted - gate.running,
                "served": gate.served,
            }
        return web.json_response({"status": "ok", "models": models})

    async def _model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        try:
            model = self.models.get(model_id)
            if model is None:
                raise _Refused(404, f"model {model_id} is not served here")
            gate = self._gates[model_id]
            async with gate.admitted_request():
                body = await self._body(request)
                call = _parse(model.task, body, request.content_type)
                async with gate.slot():
                    return await self._answer(model, call)
        except _Refused as err:
            headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
            return web.json_response({"error": str(err)}, status=err.status, headers=headers)

    async def _body(self, request: web.Request) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = _Refused(413, f"the body is over the {limit / 1024 / 1024:.1f} MiB limit")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            async with asyncio.timeout(_READ_SECONDS):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as err:
            raise too_large from err
        except TimeoutError as err:
            raise _Refused(408, f"the body did not arrive within {_READ_SECONDS:g} s") from err

    async def _answer(self, model: ModelInfo, call: _Call) -> web.Response:
        """Run the model under the time limit and turn its output, or its error, into the task API's answer."""
        store = MemoryResourceStore()
        try:
            async with asyncio.timeout(self.limits.timeout):
                if model.task == "sentence-similarity":
                    return await self._similarities(model, call, store)
                output = await self._run(model, call, store)
                return await _response(model.task, output, store)
        except ResourceError as err:
            raise _Refused(400, str(err)) from err
        except RetryableModelError as err:
            retry = math.ceil(err.retry_after) if err.retry_after is not None else 1
            raise _Refused(503, str(err), retry_after=min(_MAX_RETRY_AFTER, retry)) from err
        except (ModelTimeoutError, TimeoutError) as err:
            raise _Refused(500, f"{model.id} did not finish within {self.limits.timeout:g} s") from err
        except AgentError as err:
            raise _Refused(500, str(err)) from err
        except Exception as err:
            log.exception("serving %s failed", model.id)
            raise _Refused(500, f"{model.id} failed: internal error") from err

    async def _run(
        self, model: ModelInfo, call: _Call, store: MemoryResourceStore, text: dict[str, str] | None = None
    ) -> TaskOutput:
        task = TASKS[model.task]
        text = call.text if text is None else text
        files: dict[str, Resource] = {}
        modality = _MEDIA.get(model.task)
        if modality is not None and call.media is not None:
            # The Content-Type names the file (its extension) only: the model decodes the bytes, bounded.
            mime = call.mime if call.mime.startswith(f"{modality}/") else "application/octet-stream"
            name = f"input{extension_for(mime)}"
            files[modality] = await store.put(call.media, name=name, mime=mime, origin=Origin("upload"))
        args = {**text, **{key: res.name for key, res in files.items()}}
        inp = TaskInput(task=task, planned=PlannedTask(0, task.name, (), args), text=text, files=files)
        return await self.backend.run(model, inp, _task_io(store))

    async def _similarities(self, model: ModelInfo, call: _Call, store: MemoryResourceStore) -> web.Response:
        scores = []
        for sentence in call.sentences:
            pair = {"text": call.text["text"], "text2": sentence}
            output = await self._run(model, call, store, pair)
            scores.append(output.data)
        return web.json_response(scores)


def _task_io(store: MemoryResourceStore) -> TaskIO:
    async def save(data: bytes, mime: str) -> Resource:
        return await store.put(data, name=f"output{extension_for(mime)}", mime=mime, origin=Origin("task"))

    return TaskIO(read=store.read, save=save, usage=LLMUsage())


def _parse(task: str, body: bytes, content_type: str) -> _Call:
    """The request as the HF task API sends it: media as the raw body, or as JSON ``{"inputs": base64,
    "parameters": {...}}`` when there are parameters; text tasks as JSON ``{"inputs": ...}``."""
    if task in _MEDIA:
        if content_type != "application/json":
            return _Call(text={}, media=body, mime=content_type)
        inputs = _json_inputs(body)
        if not isinstance(inputs, str):
            raise _Refused(400, '"inputs" must be the base64 content of the file')
        try:
            return _Call(text={}, media=base64.b64decode(inputs, validate=True))
        except (binascii.Error, ValueError) as err:
            raise _Refused(400, '"inputs" is not valid base64') from err
    inputs = _json_inputs(body)
    if task == "text-to-speech":
        if not isinstance(inputs, str) or not inputs.strip():
            raise _Refused(400, '"inputs" must be the text to read')
        return _Call(text={"text": inputs})
    # sentence-similarity
    source = inputs.get("source_sentence") if isinstance(inputs, dict) else None
    sentences = inputs.get("sentences") if isinstance(inputs, dict) else None
    if (
        not isinstance(source, str)
        or not isinstance(sentences, list)
        or not all(isinstance(s, str) for s in sentences)
    ):
        raise _Refused(400, '"inputs" must be {"source_sentence": text, "sentences": [text, ...]}')
    if not 1 <= len(sentences) <= _MAX_SENTENCES:
        raise _Refused(400, f"between 1 and {_MAX_SENTENCES} sentences can be compared in one request")
    return _Call(text={"text": source}, sentences=tuple(sentences))


def _json_inputs(body: bytes) -> Any:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise _Refused(400, "the body is not valid JSON") from err
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise _Refused(400, 'the body must be a JSON object with "inputs"')
    return payload["inputs"]


async def _response(task: str, output: TaskOutput, store: MemoryResourceStore) -> web.Response:
    """The task API's answer: ASR ``{"text"}``, labels and boxes as their lists, made files as their bytes."""
    if task == "automatic-speech-recognition":
        return web.json_response({"text": output.text or ""})
    if task in ("image-classification", "object-detection"):
        return web.json_response(output.data)
    if not output.resources:
        raise ModelError(f"the {task} model made no file")
    made = output.resources[0]
    return web.Response(body=await store.read(made), content_type=made.mime)


async def serve_models(
    backend: Backend,
    models: Sequence[ModelInfo],
    limits: ServeLimits,
    host: str,
    port: int,
) -> int:
    """Serve ``models`` on ``host:port`` until SIGTERM or SIGINT; 0 on a clean stop."""
    server = ModelServer(backend, models, limits)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info(
            "serving %d models at http://%s:%d: %s", len(models), host, port, ", ".join(m.id for m in models)
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0
