"""ProcessWorker: jobs run in a child process that a timeout or a cancellation really stops."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from agent.errors import ResourceError
from agent.workers import ProcessWorker, WorkerCrashedError


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


def _refuse() -> None:
    raise ResourceError("the audio file holds no sound")


def _die() -> None:
    os._exit(3)


def _unpicklable() -> object:
    return lambda: None


def _cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds of a live process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    if fields[0] == "Z":  # a zombie uses no CPU
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


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
        assert _cpu_seconds(pid) is None
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
        assert _cpu_seconds(pid) is None
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
    assert _cpu_seconds(pid) is None
    with pytest.raises(WorkerCrashedError, match="closed"):
        await worker.run(_square, 2)
