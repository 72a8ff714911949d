"""The local expert models, on inputs the tests make: speech from espeak-ng, text and shapes drawn with
Pillow, a synthetic stop sign, and the sample photos scikit-learn ships; and how they are bounded: a timeout
or a shutdown kills the work, a long transcription holds up nobody else, audio is decoded no further than
the length limit.

The tests share one backend, so each model's worker process starts (and loads its model) once, and one event
loop (the workers' queues belong to it)."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import math
import os
import shutil
import subprocess
import threading
import wave
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image, ImageDraw, ImageFont

from agent.backends import TaskInput, TaskIO
from agent.backends.local import LocalBackend, local_models
from agent.catalog import Catalog, ModelInfo
from agent.errors import ModelError, ResourceError
from agent.events import LLMUsage
from agent.plan import PlannedTask, TaskOutput
from agent.resources import MemoryResourceStore, Origin, Resource
from agent.settings import Settings
from agent.tasks import TASKS
from tests.fakes.media import silent_flac
from tests.fakes.procs import cpu_seconds, working_threads

MODELS = {m.id: m for m in local_models()}
# Long enough to keep Whisper busy for seconds, short enough to decode quickly: the tests' length limit.
MAX_SECONDS = 120.0
shared_loop = pytest.mark.asyncio(loop_scope="module")


class ScriptedLLM:
    """Answers every call with ``answer`` and keeps the messages it was sent."""

    model = "scripted"
    context_tokens = 4096

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[list[dict[str, str]]] = []

    async def complete(
        self, messages: list[dict[str, str]], *, usage: LLMUsage, max_tokens: int | None = None
    ) -> str:
        self.calls.append(messages)
        usage.add(100, 5)
        return self.answer


@pytest.fixture(scope="module")
def llm() -> ScriptedLLM:
    return ScriptedLLM("431.50 EUR")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(llm: ScriptedLLM) -> AsyncIterator[LocalBackend]:
    """One backend for the module, so each model loads once; its workers are killed at the end."""
    backend = LocalBackend(Settings(max_media_seconds=MAX_SECONDS), llm)  # type: ignore[arg-type]
    yield backend
    await backend.aclose()


class Run:
    """Runs one task on a local model with its files in a memory store."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.store = MemoryResourceStore()
        self.usage = LLMUsage()
        self.saved: list[Resource] = []

    async def __call__(
        self, model_id: str, text: dict[str, str] | None = None, **files: tuple[bytes, str]
    ) -> TaskOutput:
        model = MODELS[model_id]
        if not self.backend.available(model):
            pytest.skip(f"{model_id} is not installed here")
        stored = {
            key: await self.store.put(data, name=f"in-{key}", mime=mime, origin=Origin("upload"))
            for key, (data, mime) in files.items()
        }
        task = TASKS[model.task]
        planned = PlannedTask(0, task.name, (), {**(text or {}), **{k: r.name for k, r in stored.items()}})

        async def save(data: bytes, mime: str) -> Resource:
            res = await self.store.put(data, name=f"out-{len(self.saved)}", mime=mime, origin=Origin("task"))
            self.saved.append(res)
            return res

        io_ = TaskIO(read=self.store.read, save=save, usage=self.usage)
        return await self.backend.run(model, TaskInput(task, planned, dict(text or {}), stored), io_)

    async def file(self, output: TaskOutput, index: int = 0) -> bytes:
        return await self.store.read(output.resources[index])


@pytest.fixture
def run(backend: LocalBackend) -> Run:
    return Run(backend)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def stop_sign(size: int = 416) -> Image.Image:
    """A red octagon saying STOP on a post: YOLO's COCO classes include stop signs."""
    image = Image.new("RGB", (size, size), (120, 160, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size * 0.47, size * 0.5, size * 0.53, size), fill=(90, 90, 90))
    cx, cy, r = size / 2, size * 0.4, size * 0.3
    corners = [
        (cx + r * math.cos(math.pi / 8 + k * math.pi / 4), cy + r * math.sin(math.pi / 8 + k * math.pi / 4))
        for k in range(8)
    ]
    draw.polygon(corners, fill=(200, 16, 32), outline=(255, 255, 255), width=6)
    draw.text((cx, cy), "STOP", fill="white", font=ImageFont.load_default(size=int(size * 0.14)), anchor="mm")
    return image


def sample_photo(name: str) -> bytes:
    """A photo shipped by scikit-learn (china.jpg: a temple; flower.jpg: a daisy)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-learn (which ships sample photos) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images" / name
    if not path.is_file():
        pytest.skip(f"scikit-learn does not ship {name}")
    return path.read_bytes()


def labels_of(data: Sequence[dict[str, Any]]) -> list[str]:
    return [d["label"] for d in data]


# Registration: cheap, no model loaded.


def test_every_local_model_is_a_known_task_and_registered_in_the_catalog(backend: LocalBackend) -> None:
    assert len(MODELS) == 7
    for model in MODELS.values():
        assert model.id.startswith("local/") and model.task in TASKS and model.downloads == 0
        assert backend.handles(model)
    catalog = Catalog([ModelInfo("org/asr", "automatic-speech-recognition", downloads=10**6)]).with_models(
        MODELS.values()
    )
    ranked = catalog.candidates("automatic-speech-recognition", backend.available)
    if backend.available(MODELS["local/whisper-tiny.en"]):
        assert ranked[0].id == "local/whisper-tiny.en", "an available local model comes before a Hub one"


def test_unknown_or_uninstalled_models_are_not_available(backend: LocalBackend, monkeypatch) -> None:
    assert not backend.available(ModelInfo("local/nope", "text-to-speech"))
    assert not backend.handles(ModelInfo("org/model", "text-to-speech"))
    fresh = LocalBackend(Settings(), ScriptedLLM(""))  # type: ignore[arg-type]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not fresh.available(MODELS["local/espeak-ng"])


@shared_loop
async def test_a_model_refuses_another_task(backend: LocalBackend) -> None:
    task = TASKS["text-to-image"]
    inp = TaskInput(task, PlannedTask(0, task.name, (), {"text": "x"}), {"text": "x"})
    io_ = TaskIO(read=MemoryResourceStore().read, save=None, usage=LLMUsage())  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="does text-to-speech"):
        await backend.run(MODELS["local/espeak-ng"], inp, io_)


# The models themselves.


@pytest.mark.local
@shared_loop
async def test_speech_round_trip(run: Run) -> None:
    """espeak-ng speaks a sentence; Whisper writes it back."""
    spoken = await run("local/espeak-ng", {"text": "The quick brown fox jumps over the lazy dog."})
    assert spoken.resources[0].mime == "audio/wav"
    wav = await run.file(spoken)
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getnframes() * 8 + 44 >= len(wav) - 64, "the WAV header holds the real sizes"
        assert w.getnframes() / w.getframerate() > 1.0
    heard = await run("local/whisper-tiny.en", audio=(wav, "audio/wav"))
    words = (heard.text or "").lower()
    for word in ("quick", "brown", "fox", "lazy"):
        assert word in words


@pytest.mark.local
@shared_loop
async def test_undecodable_audio_is_a_resource_error(run: Run) -> None:
    with pytest.raises(Exception, match="cannot be decoded"):
        await run("local/whisper-tiny.en", audio=(b"not audio at all" * 10, "audio/wav"))


@pytest.mark.local
@shared_loop
async def test_document_question_is_answered_from_ocr_text(run: Run, llm: ScriptedLLM) -> None:
    page = Image.new("RGB", (900, 300), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=36)
    draw.text((40, 40), "INVOICE 2041", fill="black", font=font)
    draw.text((40, 130), "Total amount due: 431.50 EUR", fill="black", font=font)
    out = await run(
        "local/tesseract-docqa", {"text": "What is the total amount due?"}, image=(png(page), "image/png")
    )
    assert out.text == "431.50 EUR"
    assert "431.50" in out.data["ocr_text"] and "INVOICE" in out.data["ocr_text"]
    prompt = llm.calls[-1][-1]["content"]
    assert "Total amount due: 431.50 EUR" in prompt and "What is the total amount due?" in prompt
    assert run.usage.calls == 1 and run.usage.prompt_tokens == 100


@pytest.mark.local
@shared_loop
async def test_canny_finds_the_edges_of_a_drawn_shape(run: Run) -> None:
    picture = Image.new("RGB", (200, 160), "white")
    ImageDraw.Draw(picture).rectangle((50, 40, 150, 120), fill="black")
    out = await run("local/opencv-canny", image=(png(picture), "image/png"))
    edges = Image.open(io.BytesIO(await run.file(out)))
    assert edges.size == (200, 160)
    top_side = [edges.getpixel((x, y)) for x in range(60, 140) for y in range(38, 43)]
    assert top_side.count(255) >= 80, "the top side is an edge"
    assert edges.getpixel((100, 80)) == 0 and edges.getpixel((10, 10)) == 0, "flat areas are not"


@pytest.mark.local
@shared_loop
async def test_classification_labels_photos(run: Run) -> None:
    flower = await run("local/efficientnet-lite0", image=(sample_photo("flower.jpg"), "image/jpeg"))
    assert len(flower.data) == 5
    scores = [d["score"] for d in flower.data]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert "daisy" in labels_of(flower.data)
    assert flower.text and flower.text.startswith(f"{flower.data[0]['label']} (")
    temple = await run("local/efficientnet-lite0", image=(sample_photo("china.jpg"), "image/jpeg"))
    assert {"palace", "bell tower", "monastery", "dome", "church", "castle"} & set(labels_of(temple.data))


@pytest.mark.local
@shared_loop
async def test_detection_boxes_a_stop_sign(run: Run) -> None:
    out = await run("local/yolov3-tiny", image=(png(stop_sign()), "image/png"))
    assert out.data, out.text
    best = out.data[0]
    assert best["label"] == "stop sign" and best["score"] > 0.5
    box = best["box"]
    assert 0 <= box["xmin"] < box["xmax"] < 416 and 0 <= box["ymin"] < box["ymax"] < 416
    assert box["xmin"] < 208 < box["xmax"] and box["ymin"] < 166 < box["ymax"], "the box is around the sign"
    drawn = Image.open(io.BytesIO(await run.file(out)))
    assert drawn.format == "PNG" and drawn.size == (416, 416)
    assert out.text and out.text.startswith("stop sign (")


@pytest.mark.local
@shared_loop
async def test_detection_on_a_photo_without_objects_is_empty_but_well_formed(run: Run) -> None:
    out = await run("local/yolov3-tiny", image=(png(Image.new("RGB", (300, 200), "gray")), "image/png"))
    assert out.data == [] and out.text == "no objects found" and len(out.resources) == 1


@pytest.mark.local
@shared_loop
async def test_sentence_similarity_orders_related_above_unrelated(run: Run) -> None:
    related = await run(
        "local/all-MiniLM-L6-v2",
        {"text": "A cat sleeps on the sofa.", "text2": "A kitten naps on the couch."},
    )
    unrelated = await run(
        "local/all-MiniLM-L6-v2",
        {"text": "A cat sleeps on the sofa.", "text2": "Interest rates rose in May."},
    )
    assert related.data > 0.6 > 0.2 > unrelated.data
    assert related.text == f"{related.data:.3f}"


@pytest.mark.local
@shared_loop
async def test_status_lists_the_installed_models(backend: LocalBackend) -> None:
    if not backend.available(MODELS["local/whisper-tiny.en"]):
        pytest.skip("Whisper is not installed here")
    status = await backend.status()
    assert status.live and "whisper-tiny.en" in status.detail


# Bounds: where the work runs, and that it stops.


def noise_wav(seconds: float) -> bytes:
    """Pink noise at 16 kHz: Whisper works hard on it (each 30 s window is retried at rising temperatures)."""
    return subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", f"anoisesrc=d={seconds}:c=pink:r=16000:a=0.3",
         "-f", "wav", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip


async def transcribing(backend: LocalBackend) -> int:
    """The Whisper worker's pid, once it has spent a CPU-second on the job (it is past loading, computing)."""
    worker = backend.worker("whisper")
    for _ in range(1200):
        pid = worker.pid
        if pid is not None and worker.busy and (cpu_seconds(pid) or 0.0) > 1.0:
            return pid
        await asyncio.sleep(0.05)
    raise AssertionError("Whisper never started working in its worker process")


@pytest.mark.local
@shared_loop
async def test_audio_already_in_the_conversation_is_decoded_no_further_than_the_limit(run: Run) -> None:
    # Five minutes, made by an earlier task (so never checked as an upload), and a header that says nothing.
    with pytest.raises(ResourceError, match=r"^the audio is longer than the 2 min limit$"):
        await run("local/whisper-tiny.en", audio=(silent_flac(300), "audio/flac"))


@pytest.mark.local
@shared_loop
async def test_a_timed_out_transcription_stops_using_cpu_at_once(run: Run, backend: LocalBackend) -> None:
    audio = noise_wav(110)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline:  # as the executor bounds a task
            job = asyncio.create_task(run("local/whisper-tiny.en", audio=(audio, "audio/wav")))
            pid = await transcribing(backend)
            deadline.reschedule(asyncio.get_running_loop().time())
            await job
    assert cpu_seconds(pid) is None, "the worker process is gone"
    busy = []
    for _ in range(20):
        await asyncio.sleep(0.05)
        busy.append(bool(working_threads()))
    assert sum(busy) <= 2, "no thread of this process goes on transcribing"


@pytest.mark.local
@shared_loop
async def test_a_long_transcription_holds_up_neither_a_classification_nor_the_loops_threads(
    run: Run, backend: LocalBackend
) -> None:
    """Seven transcriptions (more than the loop's default executor has threads on 2 cores) queue on
    Whisper's worker; a tiny PNG's classification and the default executor (DNS lookups, file reads: what a
    text-only request needs) go on meanwhile."""
    tiny = (png(Image.new("RGB", (32, 32), "red")), "image/png")
    await run("local/efficientnet-lite0", image=tiny)  # its worker started and its model loaded
    audio = noise_wav(110)
    long_jobs = [
        asyncio.create_task(run("local/whisper-tiny.en", audio=(audio, "audio/wav"))) for _ in range(7)
    ]
    pid = await transcribing(backend)
    labels = await run("local/efficientnet-lite0", image=tiny)
    await asyncio.get_running_loop().getaddrinfo("localhost", 80)
    await asyncio.to_thread(sum, [1, 2])
    assert labels.data and not any(job.done() for job in long_jobs)
    assert backend.worker("whisper").waiting == 6
    for job in long_jobs:
        job.cancel()
    await asyncio.gather(*long_jobs, return_exceptions=True)
    assert cpu_seconds(pid) is None


@pytest.mark.local
@shared_loop
async def test_closing_the_backend_kills_its_workers_and_fails_their_jobs(llm: ScriptedLLM) -> None:
    backend = LocalBackend(Settings(max_media_seconds=MAX_SECONDS), llm)  # type: ignore[arg-type]
    run = Run(backend)
    job = asyncio.create_task(run("local/whisper-tiny.en", audio=(noise_wav(110), "audio/wav")))
    pid = await transcribing(backend)
    await backend.aclose()
    with pytest.raises(ModelError, match="worker was closed"):
        await job
    assert cpu_seconds(pid) is None


@pytest.mark.local
@shared_loop
async def test_the_sentence_encoder_does_not_wait_for_the_loops_default_executor(run: Run) -> None:
    """Every thread of the default executor busy (DNS lookups, file reads): sentence similarity still runs."""
    release = threading.Event()
    blockers = [
        asyncio.create_task(asyncio.to_thread(release.wait)) for _ in range((os.cpu_count() or 1) + 4)
    ]
    await asyncio.sleep(0)  # each has taken one of the executor's threads
    try:
        async with asyncio.timeout(120):  # liveness, not speed: before the fix this never finished
            out = await run("local/all-MiniLM-L6-v2", {"text": "A cat sleeps.", "text2": "A kitten naps."})
        assert out.data > 0.5
        assert not any(b.done() for b in blockers)
    finally:
        release.set()
        await asyncio.gather(*blockers)
