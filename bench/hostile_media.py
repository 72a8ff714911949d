"""Hostile media: what the bounds on user files, local models and model-made audio cost, measured.

Each case runs the real code path (``check_uploads`` as every front end calls it, ``LocalBackend`` with its
worker processes, ``fit_for_upload`` as the bot calls it) and reports the time until the user has a clear
answer, how much the bot's own process grew (its resident set, sampled every 5 ms, minus what it held
before), and the peak resident set of its child processes together (workers, ffmpeg), sampled alike. For a
timed-out transcription: how long until its worker is gone, and whether any CPU is still burnt for it.
The figures go to RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from agent.backends import TaskInput, TaskIO
from agent.backends.local import LocalBackend, local_models
from agent.errors import AgentError
from agent.events import LLMUsage
from agent.plan import PlannedTask, TaskOutput
from agent.resources import MemoryResourceStore, Origin, Resource
from agent.settings import Settings
from agent.tasks import TASKS
from agent.uploads import UploadLimits, check_uploads
from agent.workers import ProcessWorker
from bot.media import fit_for_upload

from .common import Cell, Result, run_main
from .procfs import alive, cpu_seconds, descendants, peak_rss_mb, rss_mb

__all__ = ["main", "run"]

NAME = "hostile_media"
SAMPLE_SECONDS = 0.005
DISCORD_LIMIT = 10 * 1024 * 1024  # a server without boosts


@dataclass
class Measured:
    seconds: float
    bot_mb: float
    children_mb: float
    outcome: str


async def measure(work: Callable[[], Awaitable[str]]) -> Measured:
    """Run ``work`` (which returns what the user is told) while sampling this process and the child processes
    it starts (workers already running are left out: their figures are measured on their own)."""
    before = rss_mb()
    existing = set(descendants())
    peak, children = before, 0.0
    started = time.perf_counter()
    task = asyncio.ensure_future(work())
    while not task.done():
        peak = max(peak, rss_mb())
        children = max(children, sum(rss_mb(p) for p in descendants() if p not in existing))
        await asyncio.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    return Measured(seconds, max(0.0, peak - before), children, task.result())


def _ffmpeg(*args: str) -> bytes:
    return subprocess.run(
        ["ffmpeg", "-loglevel", "error", *args, "pipe:1"], capture_output=True, check=True
    ).stdout


def silent_flac(seconds: float, claimed: float | None = None) -> bytes:
    """8 kHz silence; its header says ``claimed`` seconds if given (a header that lies)."""
    flac = bytearray(
        _ffmpeg(
            "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", str(seconds), "-c:a", "flac", "-f", "flac"
        )
    )
    samples = round((claimed if claimed is not None else seconds) * 8000)
    flac[21] = (flac[21] & 0xF0) | (samples >> 32)
    flac[22:26] = (samples & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(flac)


def noise_wav(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    source = f"anoisesrc=d={seconds}:c=pink:r={rate}:a=0.3"
    return _ffmpeg("-f", "lavfi", "-i", source, "-ac", str(channels), "-f", "wav")


def solid_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def photo_jpeg(width: int, height: int) -> bytes:
    """A JPEG with detail (a gradient and noise), sized like a phone photo."""
    small = Image.effect_noise((width // 8, height // 8), 60).convert("RGB")
    out = io.BytesIO()
    small.resize((width, height), Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


async def upload_outcome(files: list[tuple[str, bytes]]) -> str:
    uploads, refused = await check_uploads(files, UploadLimits.from_settings(Settings()))
    parts = [f"{len(uploads)} accepted"] if uploads else []
    if refused:
        parts.append(f"{len(refused)} refused: {refused[0]}")
    return "; ".join(parts)


async def upload_cases(smoke: bool) -> list[tuple[str, Measured]]:
    scale = 0.01 if smoke else 1.0
    day = silent_flac(86_400 * scale)
    liar = silent_flac(3600 * scale, claimed=1.0)
    # The 89 MP PNG, one under the 50 MP limit, and phone photos up to the request's 200 MP.
    wide, big, photo = (
        ((1200, 1200), (1000, 800), (800, 600)) if smoke else ((9459, 9459), (7300, 5480), (5472, 3648))
    )
    wide_png, big_png = solid_png(*wide), solid_png(*big)
    photos = [(f"photo-{n}.jpg", photo_jpeg(*photo)) for n in range(10)]

    def mp(size: tuple[int, int]) -> str:
        return f"{size[0] * size[1] / 1e6:.1f} MP"

    cases = [
        (f"{86_400 * scale / 3600:g} h FLAC ({len(day) // 1024} KB)", [("day.flac", day)]),
        (f"{3600 * scale / 60:g} min FLAC whose header says 1 s", [("liar.flac", liar)]),
        (f"{mp(wide)} PNG ({len(wide_png) // 1024} KB)", [("wide.png", wide_png)]),
        ("ten of those in one message", [(f"wide-{n}.png", wide_png) for n in range(10)]),
        (f"{mp(big)} PNG ({len(big_png) // 1024} KB)", [("big.png", big_png)]),
        (f"ten {mp(photo)} JPEG photos in one message", photos),
    ]
    measured = []
    for label, files in cases:
        measured.append((label, await measure(lambda files=files: upload_outcome(files))))  # type: ignore[misc]
    return measured


class Run:
    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.store = MemoryResourceStore()
        self.models = {m.id: m for m in local_models()}

    async def __call__(self, model_id: str, **files: tuple[bytes, str]) -> TaskOutput:
        model = self.models[model_id]
        stored = {
            key: await self.store.put(data, name=f"in-{key}", mime=mime, origin=Origin("upload"))
            for key, (data, mime) in files.items()
        }
        task = TASKS[model.task]
        planned = PlannedTask(0, task.name, (), {k: r.name for k, r in stored.items()})

        async def save(data: bytes, mime: str) -> Resource:
            return await self.store.put(data, name="out", mime=mime, origin=Origin("task"))

        io_ = TaskIO(read=self.store.read, save=save, usage=LLMUsage())
        return await self.backend.run(model, TaskInput(task, planned, {}, stored), io_)


async def _until_computing(worker: ProcessWorker) -> int:
    while True:
        pid = worker.pid
        if pid is not None and worker.busy and cpu_seconds(pid) > 1.0:
            return pid
        await asyncio.sleep(0.05)


async def local_cases(smoke: bool) -> tuple[list[tuple[str, Measured]], dict[str, Any]]:
    settings = Settings(max_media_seconds=20.0 if smoke else 600.0)
    backend = LocalBackend(settings, llm=None)  # no document questions here
    run = Run(backend)
    found: list[tuple[str, Measured]] = []
    data: dict[str, Any] = {}
    needed = ("local/whisper-tiny.en", "local/efficientnet-lite0", "local/yolov3-tiny")
    if not all(backend.available(run.models[m]) for m in needed):
        return found, {"skipped": "the local models are not installed"}
    tiny = solid_png(32, 32)
    try:
        # Worker start: the first job of each starts its process and loads its model.
        for model, name, inputs in (
            ("local/efficientnet-lite0", "efficientnet", {"image": (tiny, "image/png")}),
            ("local/yolov3-tiny", "opencv", {"image": (tiny, "image/png")}),
            ("local/whisper-tiny.en", "whisper", {"audio": (noise_wav(1), "audio/wav")}),
        ):
            started = time.perf_counter()
            await run(model, **inputs)
            worker = backend.worker(name)
            data[f"start_{name}"] = {
                "seconds": round(time.perf_counter() - started, 2),
                "rss_mb": round(rss_mb(worker.pid or 0), 1),
            }

        async def too_long() -> str:
            try:
                await run(
                    "local/whisper-tiny.en", audio=(silent_flac(settings.max_media_seconds * 2), "audio/flac")
                )
            except AgentError as err:
                return str(err)
            return "transcribed"

        minutes = settings.max_media_seconds * 2 / 60
        refused = await measure(too_long)
        refused.children_mb = await backend.worker("whisper").run(peak_rss_mb)  # its worker, model loaded
        found.append((f"{minutes:.3g} min audio already in the conversation, Whisper", refused))

        # A long transcription timed out (as the executor bounds a task).
        whisper = backend.worker("whisper")
        long_audio = noise_wav(min(settings.max_media_seconds - 5, 300))  # longer than the test needs
        job = asyncio.ensure_future(run("local/whisper-tiny.en", audio=(long_audio, "audio/wav")))
        pid = await _until_computing(whisper)
        # Meanwhile: a tiny PNG's classification and the loop's default executor.
        latencies = []
        for _ in range(5):
            started = time.perf_counter()
            await run("local/efficientnet-lite0", image=(tiny, "image/png"))
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.to_thread(sum, [1])
        data["to_thread_while_transcribing_ms"] = round((time.perf_counter() - started) * 1000, 1)
        data["classify_while_transcribing_s"] = sorted(round(x, 3) for x in latencies)
        still_running = not job.done()
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        gone = time.perf_counter() - started
        await asyncio.sleep(1.0)
        data["timeout"] = {
            "transcription_still_running_when_cancelled": still_running,
            "cpu_seconds_spent_before": round(cpu_before, 1),
            "seconds_until_worker_gone": round(gone, 3),
            "worker_alive_1s_later": alive(pid),
        }
        idle = []
        for _ in range(5):
            started = time.perf_counter()
            await run("local/efficientnet-lite0", image=(tiny, "image/png"))
            idle.append(time.perf_counter() - started)
        data["classify_idle_s"] = sorted(round(x, 3) for x in idle)

        # Shutdown while transcribing.
        job = asyncio.ensure_future(run("local/whisper-tiny.en", audio=(long_audio, "audio/wav")))
        pid = await _until_computing(backend.worker("whisper"))
        started = time.perf_counter()
        await backend.aclose()
        data["shutdown_seconds_while_transcribing"] = round(time.perf_counter() - started, 3)
        await asyncio.gather(job, return_exceptions=True)
        data["shutdown_worker_alive"] = alive(pid)
    finally:
        await backend.aclose()
    return found, data


async def outgoing_cases(smoke: bool) -> list[tuple[str, Measured]]:
    scale = 0.01 if smoke else 1.0
    limit, max_seconds = round(DISCORD_LIMIT * scale), Settings().max_media_seconds * scale
    hour = noise_wav(3600 * scale)
    nine = noise_wav(540 * scale, rate=44100, channels=2)
    small = noise_wav(0.4, rate=16000)

    def resource(name: str, data: bytes) -> Resource:
        return Resource(name=name, kind="audio", mime="audio/wav", sha256="0" * 64, size=len(data))

    async def fit(name: str, data: bytes) -> str:
        out = await fit_for_upload(resource(name, data), data, limit, max_seconds=max_seconds)
        if isinstance(out, str):
            return out
        return f"uploaded {out.filename}, {len(out.data) // 1024} KB"

    return [
        (
            f"{3600 * scale / 60:g} min of model-made WAV ({len(hour) // 1024} KB), {limit // 1024} KB limit",
            await measure(lambda: fit("out-1-0.wav", hour)),
        ),
        (
            f"{540 * scale / 60:g} min of 44.1 kHz stereo WAV ({len(nine) // 1024} KB), {limit // 1024} KB limit",
            await measure(lambda: fit("out-1-1.wav", nine)),
        ),
        (f"{len(small) // 1024} KB model-made WAV", await measure(lambda: fit("out-1-2.wav", small))),
    ]


def _row(label: str, m: Measured) -> list[Cell]:
    return [label, m.outcome[:140], round(m.seconds, 3), round(m.bot_mb, 1), round(m.children_mb, 1)]


async def run(smoke: bool) -> Result:
    uploads = await upload_cases(smoke)
    local, data = await local_cases(smoke)
    outgoing = await outgoing_cases(smoke)
    rows = [_row(label, m) for label, m in (*uploads, *local, *outgoing)]
    return Result(
        name=NAME,
        title="Hostile media: time to a clear answer and memory",
        smoke=smoke,
        headers=["Case", "What the user gets", "Seconds", "Bot process +MB", "Child processes, peak MB"],
        rows=rows,
        summary=f"{len(rows)} cases; local models: {data}",
        data={"rows": rows, "local": data},
    )


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
