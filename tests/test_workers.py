"""ProcessWorker: jobs run in a child process that a timeout or a cancellation really stops."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import ResourceError
from agent.workers import ProcessWorker, WorkerCrashedError, run_program
from tests.fakes.procs import children, cpu_seconds, rss_mb


def _square(x: int) -> int:
    return x * x


def _pid() -> int:
    return os.getpid()


def _spin(seconds: float) -> float:
    """Burn CPU (not sleep), as a model decode does."""
    end = time.monotonic() + seconds
    n = 0.0
    while time.monotonic() < end:
        n += 1.0
    return n


def _loaded(module: str) -> bool:
    return module in sys.modules


def _refuse() -> None:
    raise ResourceError("the audio file holds no sound")


def _die() -> None:
    os._exit(3)


def _unpicklable() -> object:
    return lambda: None


async def test_a_job_runs_in_a_child_process_that_stays_for_the_next_job() -> None:
    worker = ProcessWorker("test")
    try:
        assert await worker.run(_square, 7) == 49
        first = await worker.run(_pid)
        assert first != os.getpid()
        assert await worker.run(_pid) == first
    finally:
        await worker.aclose()


async def test_an_error_raised_by_the_job_is_raised_to_the_caller() -> None:
    worker = ProcessWorker("test")
    try:
        with pytest.raises(ResourceError, match="holds no sound"):
            await worker.run(_refuse)
        with pytest.raises(RuntimeError, match="pickle"):
            await worker.run(_unpicklable)
        assert await worker.run(_square, 3) == 9
    finally:
        await worker.aclose()


async def test_a_timeout_kills_the_child_so_its_cpu_work_stops() -> None:
    worker = ProcessWorker("test")
    try:
        pid = await worker.run(_pid)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await worker.run(_spin, 60.0)
        # The child is gone at once: no process burns the 60 s of CPU the job asked for.
        assert cpu_seconds(pid) is None
        assert not worker.alive
        # The next job gets a fresh child.
        assert await worker.run(_pid) != pid
    finally:
        await worker.aclose()


async def test_a_cancelled_caller_kills_the_child() -> None:
    worker = ProcessWorker("test")
    try:
        pid = await worker.run(_pid)
        job = asyncio.create_task(worker.run(_spin, 60.0))
        await asyncio.sleep(0.3)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert cpu_seconds(pid) is None
    finally:
        await worker.aclose()


async def test_a_child_that_dies_is_reported_and_replaced() -> None:
    worker = ProcessWorker("test")
    try:
        with pytest.raises(WorkerCrashedError, match="exit code 3"):
            await worker.run(_die)
        assert await worker.run(_square, 4) == 16
    finally:
        await worker.aclose()


async def test_jobs_queue_one_at_a_time_and_the_queue_is_visible() -> None:
    worker = ProcessWorker("test")
    try:
        await worker.run(_pid)  # started
        jobs = [asyncio.create_task(worker.run(_spin, 0.3)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert worker.busy
        assert worker.waiting == 2
        await asyncio.gather(*jobs)
        assert worker.waiting == 0
        assert not worker.busy
    finally:
        await worker.aclose()


async def test_a_closed_worker_refuses_jobs_and_leaves_no_child() -> None:
    worker = ProcessWorker("test")
    pid = await worker.run(_pid)
    await worker.aclose()
    assert cpu_seconds(pid) is None
    with pytest.raises(WorkerCrashedError, match="closed"):
        await worker.run(_square, 2)


def test_the_child_does_not_run_the_parents_main_module_again(tmp_path: Path) -> None:
    """``hugginggpt`` is a script importing the whole application: a child that ran it again (as
    multiprocessing's spawn does) would pay 1-2 s and ~65 MB per worker for modules no job uses."""
    script = tmp_path / "main.py"
    script.write_text(
        "import asyncio\n"
        "import app.cli\n"
        "from agent.workers import ProcessWorker\n"
        "from tests.test_workers import _loaded\n"
        "async def run():\n"
        "    worker = ProcessWorker('test')\n"
        "    print(await worker.run(_loaded, 'app.cli'))\n"
        "    await worker.aclose()\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(run())\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


async def test_a_job_defined_in_main_is_refused_with_the_reason() -> None:
    def local() -> None:
        return None

    local.__module__ = "__main__"
    worker = ProcessWorker("test")
    try:
        with pytest.raises(TypeError, match="__main__"):
            await worker.run(local)
    finally:
        await worker.aclose()


async def test_closing_a_busy_worker_fails_its_job_and_the_queued_ones_and_leaves_no_child() -> None:
    worker = ProcessWorker("test")
    pid = await worker.run(_pid)
    running = asyncio.create_task(worker.run(_spin, 60.0))
    queued = asyncio.create_task(worker.run(_square, 5))
    await asyncio.sleep(0.3)
    await worker.aclose()
    with pytest.raises(WorkerCrashedError, match="closed"):
        await running
    with pytest.raises(WorkerCrashedError, match="closed"):
        await queued
    assert cpu_seconds(pid) is None
    assert not worker.alive


# Programs (ffmpeg, espeak-ng, tesseract) with a deadline.


async def test_a_program_gets_a_large_input_streamed_not_copied() -> None:
    data = b"x" * (64 << 20)
    before = rss_mb()
    peak = before
    job = asyncio.create_task(run_program(["wc", "-c"], data, seconds=60))
    while not job.done():
        peak = max(peak, rss_mb())
        await asyncio.sleep(0.002)
    done = job.result()
    assert (done.returncode, done.stdout.strip()) == (0, b"67108864")
    assert peak - before < 16, f"this process grew by {peak - before:.0f} MB while the program read 64 MB"


async def test_a_program_that_stops_reading_early_is_not_an_error() -> None:
    done = await run_program(["head", "-c", "4"], b"abcdefgh" * (1 << 20), seconds=60)
    assert (done.returncode, done.stdout) == (0, b"abcd")


async def test_a_program_past_its_deadline_or_cancelled_is_killed() -> None:
    before = set(children())
    with pytest.raises(TimeoutError):
        await run_program(["sleep", "30"], b"", seconds=0.2)
    assert set(children()) <= before
    job = asyncio.create_task(run_program(["sleep", "30"], b"", seconds=60))
    await asyncio.sleep(0.2)
    assert set(children()) - before, "the program runs"
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert set(children()) <= before
