"""``hugginggpt serve-models`` in a subprocess on 127.0.0.1: the local models over the Hugging Face task API.

A ``hugginggpt ask`` process whose endpoints file maps ``local/...`` ids to the server runs ASR and detection
there through the real ``AsyncInferenceClient``; the server's bounds (body size, saturation) are checked with
real HTTP clients, and the HF backend reads its 503 as "busy, come back after Retry-After".
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest

from agent.backends import TaskInput, TaskIO
from agent.backends.hf import HFBackend
from agent.backends.local import LocalBackend, local_models
from agent.catalog import ModelInfo
from agent.errors import RetryableModelError
from agent.events import LLMUsage
from agent.plan import PlannedTask
from agent.resources import MemoryResourceStore, Origin
from agent.settings import Settings
from agent.tasks import TASKS
from tests.fakes.llm_server import start_in_thread as start_llm
from tests.fakes.net import unused_port
from tests.test_local_backends import png, stop_sign

pytestmark = pytest.mark.local

WHISPER = "local/whisper-tiny.en"
YOLO = "local/yolov3-tiny"
MODELS = {m.id: m for m in local_models()}
LIMIT_MB = 1


def _installed(*ids: str) -> None:
    backend = LocalBackend(Settings(), None)
    for model_id in ids:
        if not backend.available(MODELS[model_id]):
            pytest.skip(f"{model_id} is not installed here")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")


class Server:
    def __init__(self, url: str, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.process = process

    def health(self) -> dict[str, Any]:
        reply: dict[str, Any] = httpx2.get(f"{self.url}/health", timeout=5).json()
        return reply


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """serve-models with a 1 MiB body limit, 5 s of audio, one request per model at a time and no queue."""
    _installed(WHISPER, YOLO)
    port = unused_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUGGINGGPT_", "SERVE_MODELS_"))}
    env.update(
        HUGGINGGPT_MAX_ATTACHMENT_MB=str(LIMIT_MB),
        SERVE_MODELS_CONCURRENCY="1",
        SERVE_MODELS_QUEUE="0",
        HUGGINGGPT_MAX_MEDIA_SECONDS="5",
        HUGGINGGPT_DATA_DIR=str(tmp_path_factory.mktemp("serve") / "data"),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve-models", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path_factory.mktemp("serve-cwd"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    served = Server(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 60
    while True:
        try:
            served.health()
            break
        except httpx2.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"serve-models did not start: {process.communicate()[1].decode()}"
                ) from None
            time.sleep(0.2)
    yield served
    process.terminate()
    assert process.wait(timeout=20) == 0, "SIGTERM stops the server cleanly"
    assert process.stderr is not None
    process.stderr.close()


def _speech(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=30)
    return path


def test_health_lists_the_served_models(server: Server) -> None:
    models = server.health()["models"]
    assert models[WHISPER]["task"] == "automatic-speech-recognition"
    assert models[YOLO]["task"] == "object-detection"
    assert "local/tesseract-docqa" not in models, "document questions need the controller LLM"


def test_ask_runs_speech_recognition_and_detection_on_the_model_server(
    tmp_path: Path, server: Server
) -> None:
    """A separate ``ask`` process plans ASR and detection; both run on serve-models, over HTTP."""
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({m: f"{server.url}/models/{m}" for m in (WHISPER, YOLO)}))
    plan = {
        "tasks": [
            {"id": 0, "task": "automatic-speech-recognition", "dep": [], "args": {"audio": "aud-1.wav"}},
            {"id": 1, "task": "object-detection", "dep": [], "args": {"image": "img-1.png"}},
        ]
    }

    def script(body: dict[str, Any]) -> str:
        system = str(body["messages"][0]["content"])
        return json.dumps(plan) if "You are the planner" in system else "Transcribed and boxed."

    photo = tmp_path / "sign.png"
    photo.write_bytes(png(stop_sign()))
    speech = _speech(tmp_path, "The quick brown fox jumps over the lazy dog.")
    before = {m: server.health()["models"][m]["served"] for m in (WHISPER, YOLO)}
    llm = start_llm(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUGGINGGPT_", "HF_"))}
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY="sk-test",
        LLM_MODEL="fake-model",
        HUGGINGGPT_ENDPOINTS=str(endpoints),
        HUGGINGGPT_DEMOS="fixed",
        HUGGINGGPT_MODEL_SELECTION="downloads",
        HUGGINGGPT_DATA_DIR=str(tmp_path / "data"),
    )
    try:
        attach = ["--attach", str(speech), "--attach", str(photo)]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "ask",
                "--json",
                *attach,
                "transcribe this and box the objects",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        llm.stop()
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)
    tasks = {t["id"]: t for t in trace["tasks"]}
    assert [tasks[0]["model"], tasks[1]["model"]] == [WHISPER, YOLO]
    assert all(t["status"] == "ok" for t in tasks.values()), tasks
    words = tasks[0]["output"]["text"].lower()
    assert all(w in words for w in ("quick", "brown", "fox", "lazy")), words
    boxes = tasks[1]["output"]["data"]
    assert boxes[0]["label"] == "stop sign" and set(boxes[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}
    assert [Path(f).name for f in trace["files"]] == ["out-1-1.png"], "the HF backend drew the boxes"
    after = server.health()["models"]
    assert {m: after[m]["served"] - before[m] for m in before} == {WHISPER: 1, YOLO: 1}, "the server ran both"


async def test_a_body_over_the_limit_is_refused_with_413(server: Server) -> None:
    over = b"\0" * (LIMIT_MB * 1024 * 1024 + 4096)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(over), 65536):
            yield over[start : start + 65536]

    async with aiohttp.ClientSession() as session:
        # Declared in Content-Length: refused before the body is read.
        async with session.post(f"{server.url}/models/{WHISPER}", data=over) as reply:
            assert reply.status == 413
            assert "1.0 MiB limit" in (await reply.json())["error"]
        # Chunked, with no length: refused as it streams in past the limit.
        async with session.post(f"{server.url}/models/{WHISPER}", data=chunks()) as reply:
            assert reply.status == 413
    assert server.health()["models"][WHISPER]["waiting"] == 0, "refused requests give their place back"


async def test_bad_requests_are_answered_plainly(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/models/local/nope", data=b"x") as reply:
            assert reply.status == 404 and "not served here" in (await reply.json())["error"]
        async with session.post(f"{server.url}/models/{WHISPER}", data=png(stop_sign(64))) as reply:
            assert reply.status == 400
            assert "holds no audio" in (await reply.json())["error"]
        async with session.post(f"{server.url}/models/{YOLO}", data=b"not an image at all") as reply:
            assert reply.status == 400


async def test_a_saturated_model_answers_503_with_retry_after_which_the_hf_backend_reads(
    server: Server, tmp_path: Path
) -> None:
    """With one place per model, a request still sending its body holds it: the next one is turned away
    at once with Retry-After, and the HF backend raises its retryable error carrying that wait."""
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"RIFF"
        await release.wait()
        yield b"\0" * 100

    async with aiohttp.ClientSession() as session:
        holder = asyncio.create_task(session.post(f"{server.url}/models/{WHISPER}", data=slow_body()))
        try:
            for _ in range(200):
                if (await asyncio.to_thread(server.health))["models"][WHISPER]["waiting"] == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the first request never took its place")
            async with session.post(f"{server.url}/models/{WHISPER}", data=b"RIFF") as busy:
                assert busy.status == 503
                assert int(busy.headers["Retry-After"]) >= 1
                assert "busy" in (await busy.json())["error"]
            endpoints = tmp_path / "endpoints.json"
            endpoints.write_text(json.dumps({WHISPER: f"{server.url}/models/{WHISPER}"}))
            backend = HFBackend(Settings(endpoints_file=str(endpoints), task_timeout=10))
            try:
                with pytest.raises(RetryableModelError, match="busy") as caught:
                    await _hf_transcribe(backend, _speech(tmp_path, "hello").read_bytes())
            finally:
                await backend.aclose()
            assert caught.value.retry_after is not None and caught.value.retry_after >= 1
        finally:
            release.set()
            reply = await holder
            assert reply.status == 400, "the held request ends normally (its body is not audio)"
            reply.release()


async def _hf_transcribe(backend: HFBackend, wav: bytes) -> None:
    store = MemoryResourceStore()
    audio = await store.put(wav, name="aud-1.wav", mime="audio/wav", origin=Origin("upload"))
    task = TASKS["automatic-speech-recognition"]
    inp = TaskInput(task, PlannedTask(0, task.name, (), {"audio": audio.name}), {}, {"audio": audio})

    async def save(data: bytes, mime: str) -> Any:
        raise AssertionError("ASR makes no file")

    model = ModelInfo(WHISPER, task.name)
    assert backend.handles(model), "the endpoints file's ids are the HF backend's, local/ ones included"
    await backend.run(model, inp, TaskIO(read=store.read, save=save, usage=LLMUsage()))


async def test_a_run_over_the_task_timeout_is_answered_500_without_a_retry_invitation(tmp_path: Path) -> None:
    """The run is bounded by HUGGINGGPT_TASK_TIMEOUT; the answer is a plain 500 (a 503/504 would make the HF
    backend send the same CPU-heavy request again)."""
    _installed(WHISPER)
    from aiohttp.test_utils import TestServer

    from app.serve_models import ModelServer, ServeLimits

    speech = _speech(tmp_path, " ".join(["The quick brown fox jumps over the lazy dog."] * 6)).read_bytes()
    limits = ServeLimits(max_body_bytes=10 * 1024 * 1024, timeout=0.2, concurrency=1, queue=0)
    async with LocalBackend(Settings(), None) as backend:
        server = TestServer(ModelServer(backend, [MODELS[WHISPER]], limits).app(), host="127.0.0.1")
        async with server, aiohttp.ClientSession() as session:
            async with session.post(server.make_url(f"/models/{WHISPER}"), data=speech) as reply:
                assert reply.status == 500
                assert "did not finish within 0.2 s" in (await reply.json())["error"]
                assert "Retry-After" not in reply.headers


async def test_the_other_served_models_answer_in_the_shapes_the_hf_backend_reads(
    server: Server, tmp_path: Path
) -> None:
    """Text-to-speech, classification, similarity and Canny, each through the HF backend's real client."""
    served = ["local/espeak-ng", "local/efficientnet-lite0", "local/all-MiniLM-L6-v2", "local/opencv-canny"]
    available = set(server.health()["models"])
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({m: f"{server.url}/models/{m}" for m in served}))
    backend = HFBackend(Settings(endpoints_file=str(endpoints), task_timeout=120))
    store = MemoryResourceStore()
    image = await store.put(png(stop_sign()), name="img-1.png", mime="image/png", origin=Origin("upload"))

    async def save(data: bytes, mime: str) -> Any:
        return await store.put(data, name=f"out{len(store.resources)}", mime=mime, origin=Origin("task"))

    async def run(model_id: str, text: dict[str, str], files: dict[str, Any]) -> Any:
        if model_id not in available:
            pytest.skip(f"{model_id} is not installed here")
        model = MODELS[model_id]
        task = TASKS[model.task]
        args = {**text, **{k: r.name for k, r in files.items()}}
        inp = TaskInput(task, PlannedTask(0, task.name, (), args), text, files)
        return await backend.run(model, inp, TaskIO(read=store.read, save=save, usage=LLMUsage()))

    try:
        spoken = await run("local/espeak-ng", {"text": "Hello from the model server."}, {})
        assert spoken.resources[0].mime == "audio/wav"
        labels = await run("local/efficientnet-lite0", {}, {"image": image})
        assert len(labels.data) == 5 and all(0 <= x["score"] <= 1 for x in labels.data)
        similar = await run("local/all-MiniLM-L6-v2", {"text": "a cat sleeps", "text2": "a kitten naps"}, {})
        assert 0.3 < similar.data <= 1.0
        edges = await run("local/opencv-canny", {}, {"image": image})
        assert edges.resources[0].mime == "image/png"
    finally:
        await backend.aclose()


async def test_audio_longer_than_the_media_limit_is_refused(server: Server, tmp_path: Path) -> None:
    """The server's Whisper stops decoding at HUGGINGGPT_MAX_MEDIA_SECONDS (5 s here), as in the bot."""
    speech = _speech(tmp_path, " ".join(["The quick brown fox jumps over the lazy dog."] * 4)).read_bytes()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/models/{WHISPER}", data=speech) as reply:
            assert reply.status == 400
            assert "longer than the 5 s limit" in (await reply.json())["error"]
