"""Hugging Face models: HF Inference, Inference Providers and self-hosted endpoints, through one client.

Every Hub model id (any id no other backend claims) runs here. A model is called at
``{HF_INFERENCE_BASE_URL}/models/{id}``, or at its own URL when ``HUGGINGGPT_ENDPOINTS`` names one; passing a
URL (never a bare id) keeps ``AsyncInferenceClient`` from making blocking Hub lookups. With
``HF_INFERENCE_PROVIDER=auto`` the provider of each model is looked up once, by us, and cached.
Input media go as bytes with their MIME type: the client would download URLs with a blocking client and
re-encodes Pillow images.

Every call goes through one httpx2 client made bounded by ``agent.http``: an answer over
``HUGGINGGPT_MAX_OUTPUT_MB`` is refused as it streams in (the model is not asked again: the next candidate
is), and a redirect to another server is refused. The executor bounds each attempt's time.

ControlNet tasks go through ``image_to_image``: ``{c}-control`` sends the photo alone (the endpoint returns
the control map), ``{c}-text-to-image`` sends the control image with the prompt, which is what a diffusers
ControlNet endpoint reads. Tasks the client has no method for here (depth estimation, tabular
classification of a table image, text-to-video outside Inference Providers) are posted as raw bytes with
the same headers and error handling.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled
from huggingface_hub.hf_api import ModelInfo as HubModelInfo
from huggingface_hub.inference._common import MimeBytes
from huggingface_hub.inference._providers._common import HARDCODED_MODEL_INFERENCE_MAPPING
from huggingface_hub.utils import build_hf_headers, get_async_session, hf_raise_for_status
from PIL import Image

from .. import postprocess
from ..catalog import ModelInfo
from ..catalog_refresh import hub_endpoint
from ..errors import (
    AgentError,
    BackendUnavailableError,
    ConfigurationError,
    ExecutionError,
    ModelError,
    ModelTimeoutError,
    ResourceError,
    RetryableModelError,
)
from ..http import (
    MAX_REDIRECTS,
    RedirectRefusedError,
    ResponseTooLargeError,
    bound_client,
    public_url,
    retry_after_seconds,
)
from ..logs import redact
from ..plan import TaskOutput
from ..settings import Settings
from ..tasks import LLM_TASKS, TASKS
from ..text import valid_text
from . import Backend, BackendStatus, TaskInput, TaskIO

__all__ = ["HFBackend", "load_endpoints"]

log = logging.getLogger(__name__)

_DEFAULT_BASE_URL = Settings().hf_inference_base_url.rstrip("/")
_PROVIDER_MODES = ("hf-inference", "auto")
_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_TOP_LABELS = 5


def load_endpoints(path: str) -> dict[str, str]:
    """The ``HUGGINGGPT_ENDPOINTS`` file: a JSON object mapping model ids to endpoint URLs ('' means none)."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigurationError(f"HUGGINGGPT_ENDPOINTS: there is no file at {path}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigurationError(f"HUGGINGGPT_ENDPOINTS: cannot read {path} ({err})") from err
    except json.JSONDecodeError as err:
        raise ConfigurationError(
            f"HUGGINGGPT_ENDPOINTS: {path} is not valid JSON ({err.msg}, line {err.lineno})"
        ) from err
    if not isinstance(raw, dict):
        raise ConfigurationError(f'HUGGINGGPT_ENDPOINTS: {path} must hold an object {{"model id": "url"}}')
    for model, url in raw.items():
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"HUGGINGGPT_ENDPOINTS: the endpoint of {model} must be an http(s) URL")
    return {model: url.rstrip("/") for model, url in raw.items()}


@dataclass
class _Call:
    """One task for one model: its text arguments, its media as bytes tagged with their MIME type, and where
    it goes: the client of the provider that serves it, and the ``model`` to pass that client."""

    model: str
    task: str
    text: dict[str, str]
    media: dict[str, MimeBytes]
    client: AsyncInferenceClient
    target: str


@dataclass
class _Result:
    text: str | None = None
    data: Any = None
    files: list[tuple[bytes, str]] = field(default_factory=list)  # (content, mime)


class HFBackend(Backend):
    """Runs Hub models over HTTP: every id no other backend claims. Create one per process and ``aclose()``
    it at shutdown."""

    name = "hf"
    enable_hint = "a Hugging Face endpoint: set HF_TOKEN or HUGGINGGPT_ENDPOINTS"

    def __init__(self, settings: Settings) -> None:
        if settings.hf_inference_provider not in _PROVIDER_MODES:
            raise ConfigurationError("HF_INFERENCE_PROVIDER must be 'hf-inference' or 'auto'")
        self.settings = settings
        self.endpoints = load_endpoints(settings.endpoints_file)
        self._base = settings.hf_inference_base_url.rstrip("/")
        self._auto = settings.hf_inference_provider == "auto"
        self._token = settings.hf_token or None
        self._secrets = settings.secrets
        # One HTTP client for every call, the inference client's and our own: bodies capped, redirects kept
        # within the server (agent.http). huggingface_hub's factory adds its offline check and error reading.
        self._http = bound_client(get_async_session(), max_body_bytes=settings.max_output_bytes)
        self._clients: dict[str, AsyncInferenceClient] = {}
        self._providers: dict[str, str] = {}
        self._handlers: dict[str, Callable[[_Call], Awaitable[_Result]]] = {
            "text-classification": self._text_classification,
            "token-classification": self._token_classification,
            "question-answering": self._question_answering,
            "sentence-similarity": self._sentence_similarity,
            "tabular-classification": self._tabular_classification,
            "object-detection": self._object_detection,
            "image-classification": self._image_classification,
            "image-to-text": self._image_to_text,
            "text-to-image": self._text_to_image,
            "image-to-image": self._image_to_image,
            "image-segmentation": self._image_segmentation,
            "depth-estimation": self._depth_estimation,
            "visual-question-answering": self._visual_question_answering,
            "document-question-answering": self._document_question_answering,
            "text-to-video": self._text_to_video,
            "text-to-speech": self._text_to_speech,
            "automatic-speech-recognition": self._speech_recognition,
            "audio-to-audio": self._audio_to_audio,
            "audio-classification": self._audio_classification,
        }
        for name in TASKS:
            if name.endswith("-control") or (name.endswith("-text-to-image") and name != "text-to-image"):
                self._handlers[name] = self._image_to_image

    @property
    def hf_configured(self) -> bool:
        """Hugging Face inference is usable: a token, or a base URL pointing somewhere else (a proxy, a TGI)."""
        return bool(self._token) or self._base != _DEFAULT_BASE_URL

    def handles(self, model: ModelInfo) -> bool:
        """Ids the endpoints file maps are claimed whatever their prefix: a ``local/...`` id mapped to a
        ``serve-models`` server runs there, not in this process."""
        return model.id in self.endpoints

    def available(self, model: ModelInfo) -> bool:
        """Configured for it, and its task is one this backend runs (LLM-handled tasks are not)."""
        return model.task in self._handlers and (model.id in self.endpoints or self.hf_configured)

    async def status(self) -> BackendStatus:
        parts: list[str] = []
        if self.hf_configured:
            token = "token set" if self._token else "no token"
            routing = ", Inference Providers routing" if self._auto else ""
            parts.append(f"Hugging Face inference at {public_url(self._base)} ({token}{routing})")
        if self.endpoints:
            parts.append(f"{len(self.endpoints)} self-hosted endpoint(s)")
        live = bool(parts)
        detail = "; ".join(parts) if live else "not configured: set HF_TOKEN or HUGGINGGPT_ENDPOINTS"
        return BackendStatus(self.name, live, detail)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        await self._http.aclose()

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        task = inp.task.name
        handler = self._handlers.get(task)
        if handler is None:
            reason = "it is done by the controller LLM" if task in LLM_TASKS else "it is not supported"
            raise ModelError(f"task {task} does not run on Hugging Face models here: {reason}")
        media = {key: MimeBytes(await io.read(res), res.mime) for key, res in inp.files.items()}
        with self._mapped_errors(model.id, task):
            provider = await self._provider(model.id, task)
            target = self._url(model.id) if provider == "hf-inference" else model.id
            call = _Call(model.id, task, dict(inp.text), media, self._client(provider), target)
            result = await handler(call)
        output = TaskOutput(text=result.text, data=result.data)
        for content, mime in result.files:
            output.resources.append(await io.save(content, mime))
        return output

    # Where to send a call.

    def _url(self, model: str) -> str:
        return self.endpoints.get(model) or f"{self._base}/models/{model}"

    def _client(self, provider: str) -> AsyncInferenceClient:
        """The inference client of ``provider``, made on first use; all of them share our HTTP client."""
        client = self._clients.get(provider)
        if client is None:
            client = AsyncInferenceClient(
                provider=provider,  # type: ignore[arg-type]
                token=self._token,
                timeout=self.settings.task_timeout,
            )
            # The client makes its own httpx2 client on first use unless one is there: ours is (huggingface_hub
            # 2.x reads this attribute in _get_async_client; tests/test_hf_backend.py checks the cap holds).
            client._async_client = self._http
            self._clients[provider] = client
        return client

    async def _provider(self, model: str, task: str) -> str:
        """Who serves ``model``: ``hf-inference`` unless ``HF_INFERENCE_PROVIDER=auto`` routes it elsewhere.

        With auto routing, the Hub's provider mapping is fetched once per model through our bounded client
        (huggingface_hub would fetch it with a blocking, unbounded one) and handed to huggingface_hub's own
        mapping table, so that the provider's client never fetches it itself.
        """
        if model in self.endpoints or not self._auto:
            return "hf-inference"
        provider = self._providers.get(model)
        if provider is not None:
            return provider
        response = await self._http.get(
            f"{hub_endpoint()}/api/models/{model}",
            params={"expand": "inferenceProviderMapping"},
            headers=build_hf_headers(token=self._token),
            timeout=self.settings.task_timeout,
        )
        if response.status_code == 404:
            raise ModelError(f"no Inference Provider serves model {model} for {task}")
        hf_raise_for_status(response)
        mappings = HubModelInfo(**response.json()).inference_provider_mapping or []
        if not mappings:
            raise ModelError(f"no Inference Provider serves model {model} for {task}")
        first = mappings[0]
        if first.provider != "hf-inference":
            HARDCODED_MODEL_INFERENCE_MAPPING.setdefault(first.provider, {})[model] = first
        self._providers[model] = first.provider
        return first.provider

    async def _post(self, call: _Call, body: bytes, content_type: str) -> tuple[bytes, str]:
        """A raw POST (tasks without a client method), with the client's headers and error types."""
        headers = build_hf_headers(token=self._token, headers={"Content-Type": content_type})
        response = await self._http.post(
            self._url(call.model), content=body, headers=headers, timeout=self.settings.task_timeout
        )
        hf_raise_for_status(response)
        return response.content, response.headers.get("Content-Type", "")

    # Task handlers: call the model, convert its answer.

    async def _text_classification(self, call: _Call) -> _Result:
        items = await call.client.text_classification(call.text["text"], model=call.target)
        return _labels(items)

    async def _token_classification(self, call: _Call) -> _Result:
        items = await call.client.token_classification(call.text["text"], model=call.target)
        entities = [
            {
                "entity": _str(item.get("entity_group") or item.get("entity")),
                "word": _str(item["word"]),
                "score": _score(item["score"]),
                "start": item.get("start"),
                "end": item.get("end"),
            }
            for item in items
        ]
        summary = ", ".join(f"{e['word']} ({e['entity']}, {e['score']:.2f})" for e in entities)
        return _Result(text=summary or "no entities found", data=entities)

    async def _question_answering(self, call: _Call) -> _Result:
        context = call.text.get("context")
        if not context:
            raise ExecutionError("question-answering needs a context text to find the answer in")
        answer = await call.client.question_answering(
            question=call.text["text"], context=context, model=call.target
        )
        return _best_answer(answer if isinstance(answer, list) else [answer])

    async def _sentence_similarity(self, call: _Call) -> _Result:
        scores = await call.client.sentence_similarity(
            call.text["text"], [call.text["text2"]], model=call.target
        )
        score = _score(scores[0])
        return _Result(text=f"{score:.3f}", data=score)

    async def _tabular_classification(self, call: _Call) -> _Result:
        table = call.media["image"]
        content, _ = await self._post(call, table, table.mime_type or "application/octet-stream")
        rows = json.loads(content)
        if not isinstance(rows, list) or not all(isinstance(r, str | int | float) for r in rows):
            raise ValueError("expected a list of labels")
        return _Result(text=", ".join(f"row {i}: {r}" for i, r in enumerate(rows, 1)), data=rows)

    async def _object_detection(self, call: _Call) -> _Result:
        items = await call.client.object_detection(call.media["image"], model=call.target)
        boxes = [
            {
                "label": _str(item["label"]),
                "score": _score(item["score"]),
                "box": {k: int(_score(item["box"][k])) for k in ("xmin", "ymin", "xmax", "ymax")},
            }
            for item in items
        ]
        drawn = await asyncio.to_thread(postprocess.draw_boxes, call.media["image"], boxes)
        return _Result(text=_summary(boxes) or "no objects found", data=boxes, files=[(drawn, "image/png")])

    async def _image_classification(self, call: _Call) -> _Result:
        return _labels(await call.client.image_classification(call.media["image"], model=call.target))

    async def _audio_classification(self, call: _Call) -> _Result:
        return _labels(await call.client.audio_classification(call.media["audio"], model=call.target))

    async def _image_to_text(self, call: _Call) -> _Result:
        out = await call.client.image_to_text(call.media["image"], model=call.target)
        return _Result(text=_str(out["generated_text"]))

    async def _text_to_image(self, call: _Call) -> _Result:
        image = await call.client.text_to_image(call.text["text"], model=call.target)
        return await self._image(call, image)

    async def _image_to_image(self, call: _Call) -> _Result:
        image = await call.client.image_to_image(
            call.media["image"], prompt=call.text.get("text") or None, model=call.target
        )
        return await self._image(call, image)

    async def _image_segmentation(self, call: _Call) -> _Result:
        items = await call.client.image_segmentation(call.media["image"], model=call.target)
        segments = [
            {"label": _str(item["label"]), "score": item.get("score"), "mask": item["mask"]} for item in items
        ]
        drawn = await asyncio.to_thread(postprocess.overlay_masks, call.media["image"], segments)
        data = [{"label": s["label"], "score": s["score"]} for s in segments]
        return _Result(text=_summary(data) or "no segments found", data=data, files=[(drawn, "image/png")])

    async def _depth_estimation(self, call: _Call) -> _Result:
        """HF Inference answers ``{"depth": base64 PNG, "predicted_depth": ...}``; endpoints may send the image."""
        image = call.media["image"]
        content, content_type = await self._post(call, image, image.mime_type or "application/octet-stream")
        if content_type.startswith("image/"):
            return await self._image(call, content)
        depth = json.loads(content)["depth"]
        return await self._image(call, base64.b64decode(_str(depth), validate=True))

    async def _visual_question_answering(self, call: _Call) -> _Result:
        answers = await call.client.visual_question_answering(
            call.media["image"], question=call.text["text"], model=call.target
        )
        return _best_answer(answers)

    async def _document_question_answering(self, call: _Call) -> _Result:
        answers = await call.client.document_question_answering(
            call.media["image"], question=call.text["text"], model=call.target
        )
        return _best_answer(answers)

    async def _text_to_video(self, call: _Call) -> _Result:
        if call.target.startswith(("http://", "https://")):
            body = json.dumps({"inputs": call.text["text"]}).encode()
            content, _ = await self._post(call, body, "application/json")
        else:
            content = await call.client.text_to_video(call.text["text"], model=call.target)
        mime = _sniff_video(content)
        if mime is None:
            raise ValueError("not a video")
        return _Result(files=[(content, mime)])

    async def _text_to_speech(self, call: _Call) -> _Result:
        content = await call.client.text_to_speech(call.text["text"], model=call.target)
        mime = _sniff_audio(content)
        if mime is None:
            raise ValueError("not audio")
        return _Result(files=[(content, mime)])

    async def _speech_recognition(self, call: _Call) -> _Result:
        out = await call.client.automatic_speech_recognition(call.media["audio"], model=call.target)
        return _Result(text=_str(out["text"]))

    async def _audio_to_audio(self, call: _Call) -> _Result:
        items = await call.client.audio_to_audio(call.media["audio"], model=call.target)
        files: list[tuple[bytes, str]] = []
        labels: list[str] = []
        for item in items:
            blob = item["blob"]
            mime = _sniff_audio(blob) if isinstance(blob, bytes) else None
            if mime is None:
                raise ValueError("not audio")
            files.append((blob, mime))
            labels.append(_str(item.get("label") or "audio"))
        return _Result(text=", ".join(labels), data=labels, files=files)

    async def _image(self, call: _Call, image: bytes | Image.Image) -> _Result:
        """A model's image answer as a validated PNG (decoded off the event loop)."""
        try:
            png = await asyncio.to_thread(postprocess.to_png, image)
        except ResourceError as err:
            raise ModelError(
                f"model {call.model} returned an unreadable response for task {call.task} ({err})"
            ) from err
        return _Result(files=[(png, "image/png")])

    # Errors.

    @contextmanager
    def _mapped_errors(self, model: str, task: str) -> Iterator[None]:
        """Turn what the client and the wire raise into the agent's errors, with messages a user can act on."""
        try:
            yield
        except AgentError:
            raise
        except InferenceTimeoutError as err:
            raise ModelTimeoutError(f"model {model} did not answer in time for {task}") from err
        except HfHubHTTPError as err:
            raise self._http_error(err.response, model, task) from err
        except OfflineModeIsEnabled as err:
            raise BackendUnavailableError(
                f"model {model} cannot be reached: HF_HUB_OFFLINE is set (unset it to call models)"
            ) from err
        except ResponseTooLargeError as err:
            raise ModelError(
                f"model {model} sent more than {self.settings.max_output_mb:g} MiB for {task}; the answer was "
                "refused (HUGGINGGPT_MAX_OUTPUT_MB)"
            ) from err
        except RedirectRefusedError as err:
            raise ModelError(
                f"model {model} redirected the request to another server, which is never followed"
            ) from err
        except httpx2.TooManyRedirects as err:
            raise ModelError(f"model {model} redirected the request more than {MAX_REDIRECTS} times") from err
        except httpx2.DecodingError as err:
            raise ModelError(f"model {model} returned an unreadable response for task {task}") from err
        except httpx2.TimeoutException as err:
            raise ModelTimeoutError(f"model {model} did not answer in time for {task}") from err
        except httpx2.ConnectError as err:
            raise RetryableModelError(f"could not connect to model {model}") from err
        except (httpx2.NetworkError, httpx2.RemoteProtocolError) as err:
            raise RetryableModelError(f"the connection to model {model} was lost") from err
        except httpx2.TransportError as err:
            raise ModelError(f"could not call model {model} ({type(err).__name__})") from err
        except Image.DecompressionBombError as err:
            raise ModelError(f"model {model} returned an image too large to open for task {task}") from err
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError) as err:
            log.warning("unreadable answer from %s for %s: %r", model, task, err)
            raise ModelError(f"model {model} returned an unreadable response for task {task}") from err

    def _http_error(self, response: httpx2.Response, model: str, task: str) -> ModelError:
        status = response.status_code
        detail = self._server_message(response)
        suffix = f": {detail}" if detail else ""
        if status in _RETRYABLE_STATUS:
            what = "is rate limited" if status == 429 else "is loading or busy"
            return RetryableModelError(
                f"model {model} {what} (HTTP {status}{suffix})", retry_after=_retry_after(response)
            )
        if status in (401, 403):
            return ModelError(f"model {model} refused the request (HTTP {status}{suffix}): check HF_TOKEN")
        if status == 404:
            return ModelError(f"model {model} is not served for {task} (HTTP 404{suffix})")
        return ModelError(f"model {model} failed on {task} (HTTP {status}{suffix})")

    def _server_message(self, response: httpx2.Response) -> str:
        """The server's own error text, short, on one line, without secrets."""
        try:
            text = response.text
        except httpx2.ResponseNotRead:
            return ""
        try:
            body = json.loads(text)
            error = body.get("error") if isinstance(body, dict) else None
            text = "; ".join(map(str, error)) if isinstance(error, list) else str(error or "")
        except ValueError:
            pass
        return redact(" ".join(text.split()), self._secrets)[:200]


def _retry_after(response: httpx2.Response) -> float | None:
    """Seconds to wait: the ``Retry-After`` header (seconds or HTTP date), else HF's ``estimated_time``."""
    header = retry_after_seconds(response.headers)
    if header is not None:
        return header
    try:
        estimated = json.loads(response.text).get("estimated_time")
        return float(estimated) if estimated is not None else None
    except (ValueError, TypeError, AttributeError, httpx2.ResponseNotRead):
        return None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return valid_text(value)


def _score(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _summary(items: Iterable[Mapping[str, Any]]) -> str:
    """``cat (0.92), dog (0.05)``: the best labels first."""
    ranked = sorted(items, key=lambda i: -(i["score"] or 0.0))[:_TOP_LABELS]
    return ", ".join(
        f"{i['label']} ({i['score']:.2f})" if i["score"] is not None else i["label"] for i in ranked
    )


def _labels(items: Iterable[Mapping[str, Any]]) -> _Result:
    labels: list[dict[str, Any]] = [{"label": _str(i["label"]), "score": _score(i["score"])} for i in items]
    labels.sort(key=lambda i: -i["score"])
    return _Result(text=_summary(labels) or "no labels", data=labels)


def _best_answer(items: Iterable[Mapping[str, Any]]) -> _Result:
    answers: list[dict[str, Any]] = [
        {"answer": _str(i["answer"]), "score": _score(i["score"])} for i in items
    ]
    if not answers:
        raise ValueError("no answer")
    answers.sort(key=lambda a: -a["score"])
    return _Result(text=answers[0]["answer"], data=answers)


def _sniff_audio(data: bytes) -> str | None:
    """The audio MIME type by content: WAV, FLAC, MP3 or Ogg."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[:4] == b"fLaC":
        return "audio/flac"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if data[:4] == b"OggS":
        return "audio/ogg"
    return None


def _sniff_video(data: bytes) -> str | None:
    """The video MIME type by content: MP4 (``ftyp`` box) or WebM (EBML)."""
    if data[4:8] == b"ftyp":
        return "video/mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm"
    return None
