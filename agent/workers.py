"""Work that a timeout must really stop: CPU-bound code in a child process that can be killed.

A thread cannot be stopped once it runs native code (a Whisper decode, a torch forward pass, a quadratic
JSON repair): when its caller times out, the thread keeps a core busy and its memory held, each retry starts
another copy, and shutdown waits for all of them. A ``ProcessWorker`` runs one job at a time in a child
process of its own and keeps what the jobs load (a model, in a module-level cache of the child) between jobs.
When a job times out or its caller is cancelled, the child is killed at once (SIGKILL: CPU and memory come
back immediately) and the next job starts a fresh child.

Jobs are top-level functions and picklable arguments. The child is a fresh interpreter (no inherited threads
or locks, which ``fork`` of a process running torch or asyncio would copy in an unknown state) started with
``subprocess``, not ``multiprocessing``'s spawn: spawn runs the parent's main module again in every child
(for ``hugginggpt`` that is the whole application: 1-2 s and ~65 MB more per child, measured), while this
child imports only this module, then what its jobs need. The parent talks to the child through a socket
pair from a thread of the worker's own, never the loop's default executor, so a busy worker cannot starve
other users of ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ProcessWorker", "ProgramResult", "WorkerCrashedError", "loop_worker", "run_program"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_JOIN_SECONDS = 5.0
# A program's input goes down its pipe in pieces this large: written whole, what the pipe does not take at once
# would be copied into asyncio's buffer (a 109 MB WAV added 110 MB to the bot while ffmpeg read it).
_PIPE_CHUNK = 256 * 1024
# The directory holding the ``agent`` package: the child must import this module before it learns sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
_BOOT = "import sys; from agent.workers import _child; _child(int(sys.argv[1]))"


class WorkerCrashedError(RuntimeError):
    """The child process died during the job (killed by the system, out of memory, a native crash)."""


@dataclass(frozen=True)
class _Failure:
    """An exception raised by a job, as the child sends it back (the exception itself if it pickles)."""

    error: BaseException | None
    text: str


def _child(fd: int) -> None:
    """The child's loop: take the parent's sys.path (so jobs import as they do there), then receive a job,
    run it, send back ("ok", result) or ("error", _Failure)."""
    # Ctrl-C in a terminal goes to the whole process group: the parent decides when a job stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        sys.path[:] = conn.recv()
    except (EOFError, OSError):
        return
    while True:
        try:
            job = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args = pickle.loads(job)
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
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"worker-{name}")
        self._closed = False

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def pid(self) -> int | None:
        """The child's process id, while there is a child."""
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child. Bound it with the caller's ``asyncio.timeout``: a cancellation (a
        timeout is one) while the job runs kills the child, so the work stops with it.

        An exception raised by ``fn`` is raised here (the same exception if it pickles, else a
        ``RuntimeError`` with its text); ``WorkerCrashedError`` if the child died.
        """
        if self._closed:
            raise WorkerCrashedError(f"the {self.name} worker is closed")
        if getattr(fn, "__module__", None) == "__main__":
            raise TypeError(f"{fn.__name__} is defined in __main__, which the worker does not import")
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        try:
            if self._closed:  # closed while this job waited its turn
                raise WorkerCrashedError(f"the {self.name} worker is closed")
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
            if self._closed:
                raise WorkerCrashedError(f"the {self.name} worker was closed (shutting down)") from err
            raise WorkerCrashedError(f"the {self.name} worker process died ({detail})") from err
        if status == "ok":
            return value
        failure: _Failure = value
        if failure.error is not None:
            raise failure.error
        raise RuntimeError(failure.text)

    def _ensure_started(self) -> Connection:
        """On the worker's thread: the pipe to a live child, starting one if there is none."""
        if self._process is not None and self._process.poll() is None and self._conn is not None:
            return self._conn
        self._reap()
        parent, child = multiprocessing.Pipe()
        python_path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(child.fileno()), f"hugginggpt-{self.name}"],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": python_path},
            )
        finally:
            child.close()
        parent.send([p or os.getcwd() for p in sys.path])
        self._process, self._conn = process, parent
        log.debug(
            "started the %s worker (pid %s) in %.2f s", self.name, process.pid, time.monotonic() - started
        )
        return parent

    async def _kill(self, job: asyncio.Future[Any], why: str) -> None:
        """Kill the child now; wait (briefly, without blocking the loop) for its thread to notice."""
        process = self._process
        if process is not None and process.poll() is None:
            log.info("killing the %s worker (pid %s): the job %s", self.name, process.pid, why)
            process.kill()
        await asyncio.wait([job], timeout=_JOIN_SECONDS)
        if job.done() and not job.cancelled():
            job.exception()  # the EOFError of the killed child: expected, so asyncio need not log it
        await asyncio.get_running_loop().run_in_executor(self._io, self._reap)

    def _reap(self) -> None:
        """On the worker's thread: forget a dead or killed child, closing its pipe."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(_JOIN_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("the %s worker (pid %s) did not exit after SIGKILL", self.name, process.pid)

    def _exit_detail(self) -> str:
        """On the worker's thread: how the child ended (it has closed its end of the pipe)."""
        code = None
        if self._process is not None:
            try:
                code = self._process.wait(_JOIN_SECONDS)
            except subprocess.TimeoutExpired:
                code = None
        if code is None:
            return "no exit code"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    async def aclose(self) -> None:
        """Kill the child (a running job fails, queued jobs are refused) and stop the worker's thread once
        they have left."""
        self._closed = True
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._io, self._reap)
        self._io.shutdown(wait=False)


def _exchange(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    """On the worker's thread: send one job and wait for its reply (EOFError if the child dies)."""
    conn.send((fn, args))
    reply: tuple[str, Any] = conn.recv()
    return reply


@dataclass(frozen=True)
class ProgramResult:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run_program(args: Sequence[str], stdin: bytes, *, seconds: float) -> ProgramResult:
    """Run a program (ffmpeg, espeak-ng, tesseract) fed ``stdin``, streamed in pieces while its output is read.
    ``TimeoutError`` after ``seconds``; the program is killed then, and when the caller is cancelled."""
    process = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(seconds):
            out, err, _ = await asyncio.gather(
                process.stdout.read(), process.stderr.read(), _feed(process.stdin, stdin)
            )
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return ProgramResult(code, out, err)


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    view = memoryview(data)
    try:
        for start in range(0, len(view), _PIPE_CHUNK):
            pipe.write(view[start : start + _PIPE_CHUNK])
            await pipe.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program stopped reading: it had what it needed (ffprobe, ffmpeg -t)
    finally:
        pipe.close()


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
