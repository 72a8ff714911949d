"""Work that a timeout must really stop: CPU-bound code in a child process that can be killed.

A thread cannot be stopped once it runs native code (a Whisper decode, a torch forward pass, a quadratic
JSON repair): when its caller times out, the thread keeps a core busy and its memory held, each retry starts
another copy, and shutdown waits for all of them. A ``ProcessWorker`` runs one job at a time in a child
process of its own and keeps what the jobs load (a model, in a module-level cache of the child) between jobs.
When a job times out or its caller is cancelled, the child is killed at once (SIGKILL: CPU and memory come
back immediately) and the next job starts a fresh child.

Jobs are top-level functions and picklable arguments (the ``spawn`` start method: no inherited threads or
locks, which ``fork`` of a process running torch or asyncio would copy in an unknown state). The parent
talks to the child through a pipe from a thread of the worker's own, never the loop's default executor,
so a busy worker cannot starve other users of ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

__all__ = ["ProcessWorker", "WorkerCrashedError", "loop_worker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CONTEXT = multiprocessing.get_context("spawn")
_JOIN_SECONDS = 5.0


class WorkerCrashedError(RuntimeError):
    """The child process died during the job (killed by the system, out of memory, a native crash)."""


@dataclass(frozen=True)
class _Failure:
    """An exception raised by a job, as the child sends it back (the exception itself if it pickles)."""

    error: BaseException | None
    text: str


def _child(conn: Connection) -> None:
    """The child's loop: receive a job, run it, send back ("ok", result) or ("error", _Failure)."""
    # Ctrl-C in a terminal goes to the whole process group: the parent decides when a job stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except BaseException as err:  # sent to the parent, which raises it there
            reply = ("error", _Failure(err, f"{type(err).__name__}: {err}"))
        try:
            conn.send(reply)
        except (TypeError, AttributeError, ValueError) as err:  # the result or the error does not pickle
            conn.send(("error", _Failure(None, f"{type(err).__name__}: {err}")))
        except (EOFError, OSError):
            return


class ProcessWorker:
    """One child process running jobs one at a time; killed on timeout or cancellation, restarted on need.

    ``name`` appears in the process title and in messages. ``waiting`` is how many callers are queued behind
    the running job (for "queued behind N" progress).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting = 0
        self._lock = asyncio.Lock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"worker-{name}")
        self._closed = False

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child. Bound it with the caller's ``asyncio.timeout``: a cancellation (a
        timeout is one) while the job runs kills the child, so the work stops with it.

        An exception raised by ``fn`` is raised here (the same exception if it pickles, else a
        ``RuntimeError`` with its text); ``WorkerCrashedError`` if the child died.
        """
        if self._closed:
            raise WorkerCrashedError(f"the {self.name} worker is closed")
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        try:
            return await self._run_locked(fn, args)
        finally:
            self._lock.release()

    async def _run_locked(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(self._io, self._ensure_started)
        job = loop.run_in_executor(self._io, _exchange, conn, fn, args)
        try:
            status, value = await asyncio.shield(job)
        except asyncio.CancelledError:
            await self._kill(job, "was cancelled or timed out")
            raise
        except (EOFError, OSError) as err:
            detail = await loop.run_in_executor(self._io, self._exit_detail)
            await self._kill(job, "lost its child process")
            raise WorkerCrashedError(f"the {self.name} worker process died ({detail})") from err
        if status == "ok":
            return value
        failure: _Failure = value
        if failure.error is not None:
            raise failure.error
        raise RuntimeError(failure.text)

    def _ensure_started(self) -> Connection:
        """On the worker's thread: the pipe to a live child, starting one if there is none."""
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self._reap()
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(target=_child, args=(child,), name=f"hugginggpt-{self.name}", daemon=True)
        started = time.monotonic()
        process.start()
        child.close()
        self._process, self._conn = process, parent
        log.debug(
            "started the %s worker (pid %s) in %.2f s", self.name, process.pid, time.monotonic() - started
        )
        return parent

    async def _kill(self, job: asyncio.Future[Any], why: str) -> None:
        """Kill the child now; wait (briefly, without blocking the loop) for its thread to notice."""
        process = self._process
        if process is not None and process.is_alive():
            log.info("killing the %s worker (pid %s): the job %s", self.name, process.pid, why)
            process.kill()
        await asyncio.wait([job], timeout=_JOIN_SECONDS)
        await asyncio.get_running_loop().run_in_executor(self._io, self._reap)

    def _reap(self) -> None:
        """On the worker's thread: forget a dead or killed child, closing its pipe."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(_JOIN_SECONDS)

    def _exit_detail(self) -> str:
        """On the worker's thread: how the child ended (it has closed its end of the pipe)."""
        if self._process is not None:
            self._process.join(_JOIN_SECONDS)
        code = self._process.exitcode if self._process is not None else None
        if code is None:
            return "no exit code"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    async def aclose(self) -> None:
        """Kill the child (a running job fails) and stop the worker's thread."""
        self._closed = True
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
        await asyncio.get_running_loop().run_in_executor(self._io, self._reap)
        self._io.shutdown(wait=False)


def _exchange(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    """On the worker's thread: send one job and wait for its reply (EOFError if the child dies)."""
    conn.send((fn, args))
    reply: tuple[str, Any] = conn.recv()
    return reply


_loop_workers: dict[tuple[asyncio.AbstractEventLoop, str], ProcessWorker] = {}


async def loop_worker(name: str) -> ProcessWorker:
    """The running loop's worker called ``name``, started on first use and kept (starting a child costs a
    fraction of a second); the workers of loops that have closed are stopped here."""
    for key in [key for key in _loop_workers if key[0].is_closed()]:
        await _loop_workers.pop(key).aclose()
    key = (asyncio.get_running_loop(), name)
    worker = _loop_workers.get(key)
    if worker is None:
        worker = _loop_workers[key] = ProcessWorker(name)
    return worker
