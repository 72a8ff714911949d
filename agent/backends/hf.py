"""Hugging Face models: HF Inference, Inference Providers and self-hosted endpoints, through one client.

Every Hub model id (any id no other backend claims) runs here. A model is called at
``{HF_INFERENCE_BASE_URL}/models/{id}``, or at its own URL when ``HUGGINGGPT_ENDPOINTS`` names one; passing a
URL (never a bare id) keeps ``AsyncInferenceClient`` from making blocking Hub lookups. With
``HF_INFERENCE_PROVIDER=auto`` the provider of each model is looked up once, in a thread, and cached.
Input media go as bytes with their MIME type: the client would download URLs with a blocking client and
re-encodes Pillow images.

ControlNet tasks go through ``image_to_image``: ``{c}-control`` sends the photo alone (the endpoint returns
the control map), ``{c}-text-to-image`` sends the control image with the prompt, which is what a diffusers
ControlNet endpoint reads. Tasks the client has no method for here (depth estimation, tabular
classification of a table image, text-to-video outside Inference Providers) are posted as raw bytes with
the same headers and error handling.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled
from huggingface_hub.inference._common import MimeBytes
from huggingface_hub.inference._providers import get_provider_helper
from huggingface_hub.utils import build_hf_headers, get_async_session, hf_raise_for_status
from PIL import Image

from .. import postprocess
from ..catalog import ModelInfo
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
from ..plan import TaskOutput
from ..request import valid_text
from ..settings import Settings
from ..tasks import LLM_TASKS, TASKS
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
    """One task for one model: its text arguments and its media as bytes tagged with their MIME type."""

    model: str
    task: str
    text: dict[str, str]
    media: dict[str, MimeBytes]


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
        self._client = AsyncInferenceClient(
            provider=settings.hf_inference_provider,  # type: ignore[arg-type]
            token=self._token,
            timeout=settings.task_timeout,
        )
        self._http: httpx2.AsyncClient | None = None
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

    def available(self, model: ModelInfo) -> bool:
        """Configured for it, and its task is one this backend runs (LLM-handled tasks are not)."""
        return model.task in self._handlers and (model.id in self.endpoints or self.hf_configured)

    async def status(self) -> BackendStatus:
        parts: list[str] = []
        if self.hf_configured:
            token = "token set" if self._token else "no token"
            routing = ", Inference Providers routing" if self._auto else ""
            parts.append(f"Hugging Face inference at {self._base} ({token}{routing})")
        if self.endpoints:
            parts.append(f"{len(self.endpoints)} self-hosted endpoint(s)")
        live = bool(parts)
        detail = "; ".join(parts) if live else "not configured: set HF_TOKEN or HUGGINGGPT_ENDPOINTS"
        return BackendStatus(self.name, live, detail)

    async def aclose(self) -> None:
        await self._client.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        task = inp.task.name
        handler = self._handlers.get(task)
        if handler is None:
            reason = "it is done by the controller LLM" if task in LLM_TASKS else "it is not supported"
            raise ModelError(f"task {task} does not run on Hugging Face models here: {reason}")
        media = {key: MimeBytes(await io.read(res), res.mime) for key, res in inp.files.items()}
        call = _Call(model.id, task, dict(inp.text), media)
        with self._mapped_errors(model.id, task):
            result = await handler(call)
        output = TaskOutput(text=result.text, data=result.data)
        for content, mime in result.files:
            output.resources.append(await io.save(content, mime))
        return output

    # Where to send a call.

    def _url(self, model: str) -> str:
        return self.endpoints.get(model) or f"{self._base}/models/{model}"

    async def _target(self, call: _Call) -> str:
        """What to pass the client as ``model``: a URL, or (auto routing, another provider) the bare id."""
        if call.model in self.endpoints or not self._auto:
            return self._url(call.model)
        provider = self._providers.get(call.model)
        if provider is None:
            provider = await asyncio.to_thread(self._route, call.model, call.task)
            self._providers[call.model] = provider
        return self._url(call.model) if provider == "hf-inference" else call.model

    @staticmethod
    def _route(model: str, task: str) -> str:
        """Blocking Hub lookup of the provider serving ``model``; the client caches the mapping it fetches."""
        try:
            return get_provider_helper("auto", task=task, model=model).provider
        except (ValueError, HfHubHTTPError) as err:
            raise ModelError(f"no Inference Provider serves model {model} for {task}") from err

    async def _post(self, call: _Call, body: bytes, content_type: str) -> tuple[bytes, str]:
        """A raw POST (tasks without a client method), with the client's headers and error types."""
        if self._http is None:
            self._http = get_async_session()
        headers = build_hf_headers(token=self._token, headers={"Content-Type": content_type})
        response = await self._http.post(
            self._url(call.model), content=body, headers=headers, timeout=self.settings.task_timeout
        )
        hf_raise_for_status(response)
        return response.content, response.headers.get("Content-Type", "")

    # Task handlers: call the model, convert its answer.

    async def _text_classification(self, call: _Call) -> _Result:
        items = await self._client.text_classification(call.text["text"], model=await self._target(call))
        return _labels(items)

    async def _token_classification(self, call: _Call) -> _Result:
        items = await self._client.token_classification(call.text["text"], model=await self._target(call))
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
        answer = await self._client.question_answering(
            question=call.text["text"], context=context, model=await self._target(call)
        )
        return _best_answer(answer if isinstance(answer, list) else [answer])

    async def _sentence_similarity(self, call: _Call) -> _Result:
        scores = await self._client.sentence_similarity(
            call.text["text"], [call.text["text2"]], model=await self._target(call)
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
        items = await self._client.object_detection(call.media["image"], model=await self._target(call))
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
        return _labels(
            await self._client.image_classification(call.media["image"], model=await self._target(call))
        )

    async def _audio_classification(self, call: _Call) -> _Result:
        return _labels(
            await self._client.audio_classification(call.media["audio"], model=await self._target(call))
        )

    async def _image_to_text(self, call: _Call) -> _Result:
        out = await self._client.image_to_text(call.media["image"], model=await self._target(call))
        return _Result(text=_str(out["generated_text"]))

    async def _text_to_image(self, call: _Call) -> _Result:
        image = await self._client.text_to_image(call.text["text"], model=await self._target(call))
        return await self._image(call, image)

    async def _image_to_image(self, call: _Call) -> _Result:
        image = await self._client.image_to_image(
            call.media["image"], prompt=call.text.get("text") or None, model=await self._target(call)
        )
        return await self._image(call, image)

    async def _image_segmentation(self, call: _Call) -> _Result:
        items = await self._client.image_segmentation(call.media["image"], model=await self._target(call))
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
        answers = await self._client.visual_question_answering(
            call.media["image"], question=call.text["text"], model=await self._target(call)
        )
        return _best_answer(answers)

    async def _document_question_answering(self, call: _Call) -> _Result:
        answers = await self._client.document_question_answering(
            call.media["image"], question=call.text["text"], model=await self._target(call)
        )
        return _best_answer(answers)

    async def _text_to_video(self, call: _Call) -> _Result:
        target = await self._target(call)
        if target.startswith(("http://", "https://")):
            body = json.dumps({"inputs": call.text["text"]}).encode()
            content, _ = await self._post(call, body, "application/json")
        else:
            content = await self._client.text_to_video(call.text["text"], model=target)
        mime = _sniff_video(content)
        if mime is None:
            raise ValueError("not a video")
        return _Result(files=[(content, mime)])

    async def _text_to_speech(self, call: _Call) -> _Result:
        content = await self._client.text_to_speech(call.text["text"], model=await self._target(call))
        mime = _sniff_audio(content)
        if mime is None:
            raise ValueError("not audio")
        return _Result(files=[(content, mime)])

    async def _speech_recognition(self, call: _Call) -> _Result:
        out = await self._client.automatic_speech_recognition(
            call.media["audio"], model=await self._target(call)
        )
        return _Result(text=_str(out["text"]))

    async def _audio_to_audio(self, call: _Call) -> _Result:
        items = await self._client.audio_to_audio(call.media["audio"], model=await self._target(call))
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
        text = " ".join(text.split())[:200]
        for secret in self.settings.secrets:
            text = text.replace(secret, "***")
        return text


def _retry_after(response: httpx2.Response) -> float | None:
    """Seconds to wait: the ``Retry-After`` header (seconds or HTTP date), else HF's ``estimated_time``."""
    header = response.headers.get("Retry-After")
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
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
