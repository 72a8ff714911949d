"""serve-models throughput: ASR and detection requests per second, and their p50/p99 latency, at 1, 4 and 16
concurrent clients.

``hugginggpt serve-models`` runs in a subprocess on 127.0.0.1, as in production (one request per model at a
time, ``SERVE_MODELS_QUEUE`` = the most clients, so nothing is turned away and the latency includes the wait
in the queue). Clients POST raw bodies as ``AsyncInferenceClient`` does: a 3-second espeak-ng sentence to
Whisper tiny.en, a 416×416 stop sign to YOLOv3-tiny. Each model is warmed up once (its first request loads
it) before timing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .common import REPO_ROOT, Result, percentile, run_main

__all__ = ["main", "run"]

NAME = "serve_models"
LEVELS = (1, 4, 16)
WHISPER = "local/whisper-tiny.en"
YOLO = "local/yolov3-tiny"
_START_SECONDS = 60.0


def _inputs(tmp: Path) -> dict[str, bytes]:
    from tests.test_local_backends import png, stop_sign

    speech = tmp / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog."
    subprocess.run(["espeak-ng", "-w", str(speech), text], check=True, timeout=30)
    return {WHISPER: speech.read_bytes(), YOLO: png(stop_sign())}


async def _start(tmp: Path, port: int) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.update(
        SERVE_MODELS_CONCURRENCY="1", SERVE_MODELS_QUEUE=str(max(LEVELS)), HUGGINGGPT_DATA_DIR=str(tmp)
    )
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "app.cli", "serve-models", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + _START_SECONDS
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as reply:
                    if reply.status == 200:
                        return process
            except aiohttp.ClientConnectionError:
                pass
            if process.returncode is not None or time.monotonic() > deadline:
                if process.returncode is None:
                    process.kill()
                raise RuntimeError("serve-models did not start")
            await asyncio.sleep(0.2)


async def _wave(url: str, body: bytes, clients: int, requests: int) -> dict[str, Any]:
    """``requests`` POSTs from ``clients`` concurrent clients: throughput, latency percentiles, refusals."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    todo = iter(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in todo:
            started = time.perf_counter()
            async with session.post(url, data=body) as reply:
                await reply.read()
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": requests,
        "per_second": requests / elapsed,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "ok": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


async def measure(smoke: bool) -> dict[str, Any]:
    from tests.fakes.net import unused_port

    # Smoke: one request per client, at the two smaller levels (16 transcriptions take half a minute).
    levels = LEVELS[:2] if smoke else LEVELS
    per_level = {c: (c if smoke else max(8, 4 * c)) for c in levels}
    with tempfile.TemporaryDirectory() as tmp:
        bodies = _inputs(Path(tmp))
        port = unused_port()
        process = await _start(Path(tmp), port)
        try:
            results: dict[str, Any] = {"cold_s": {}, "waves": {}}
            for model, body in bodies.items():
                url = f"http://127.0.0.1:{port}/models/{model}"
                cold = await _wave(url, body, 1, 1)
                results["cold_s"][model] = cold["p50_s"]
                results["waves"][model] = [await _wave(url, body, c, n) for c, n in per_level.items()]
        finally:
            process.terminate()
            await process.wait()
    return results


async def run(smoke: bool) -> Result:
    data = await measure(smoke)
    rows: list[list[Any]] = []
    for model, waves in data["waves"].items():
        for wave in waves:
            rows.append(
                [
                    model,
                    wave["clients"],
                    wave["requests"],
                    round(wave["per_second"], 2),
                    round(wave["p50_s"], 3),
                    round(wave["p99_s"], 3),
                    wave["ok"],
                ]
            )
    best = {m: max(w["per_second"] for w in waves) for m, waves in data["waves"].items()}
    summary = "serve-models: " + "; ".join(f"{m} up to {v:.1f} requests/s" for m, v in best.items())
    notes = [
        "first request of each model (loads it): "
        + ", ".join(f"{m} {s:.1f} s" for m, s in data["cold_s"].items()),
        "one request per model at a time (SERVE_MODELS_CONCURRENCY=1): latency at 16 clients is mostly the queue",
    ]
    return Result(
        NAME,
        "serve-models throughput",
        smoke,
        ["model", "clients", "requests", "requests/s", "p50 s", "p99 s", "HTTP 200"],
        rows,
        summary,
        data,
        notes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
