"""Load: 200 conversations at once on one runtime, two turns each, against the loopback fakes with faults
injected at random (seeded) into the LLM's and the models' answers.

Every run must reach a terminal status, the database must pass ``PRAGMA integrity_check`` with counts that
add up (messages, runs, tasks, files), and nothing may be left behind once the runs are over (no task
still running, no per-run state alive, memory back to what it was).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.executor import _Run
from agent.request import Request
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import Fault
from tests.fakes.llm_server import Reply
from tests.fakes.reliability import Agent, agent_on, db_rows, image_upload, run_turn, stage

CONVERSATIONS = 200
TURNS = 2
SEED = 20240611
MODELS = hf_tasks("image-to-text", "visual-question-answering", "text-to-image")
TASKS = {
    "caption": {"task": "image-to-text", "args": {"image": "img-1.png"}},
    "vqa": {"task": "visual-question-answering", "args": {"image": "img-1.png", "text": "what colour is it?"}},
    "draw": {"task": "text-to-image", "args": {"text": "a red square"}},
    "summary": {"task": "summarization", "args": {"text": "<GENERATED>-0"}},
}


def _plan(rng: random.Random) -> str:
    shape = rng.choice(["chat", "one", "two", "chain", "three"])
    names = {"chat": [], "one": ["caption"], "two": ["caption", "vqa"], "chain": ["caption", "summary"],
             "three": ["caption", "draw", "summary"]}[shape]
    tasks = [{"id": n, "dep": [0] if name == "summary" else [], **TASKS[name]} for n, name in enumerate(names)]
    return json.dumps({"tasks": tasks})


class Faults:
    """The scripted LLM: a seeded random fault or a good answer for each request, per conversation."""

    def __init__(self) -> None:
        self.injected: Counter[str] = Counter()
        self.task_calls = 0

    def __call__(self, body: dict[str, Any]) -> str | Reply:
        text = json.dumps(body["messages"])
        which = stage(body)
        named = re.findall(r"conversation (\d+) turn (\d+)", text)  # none in an LLM task's request
        if not named:
            self.task_calls += 1
        rng = random.Random(f"{SEED}-{named[-1] if named else self.task_calls}-{len(text)}-{which}")
        roll = rng.random()
        if which == "plan":
            if roll < 0.06:
                return self._fault("plan: not JSON", "I think we should look at the picture first.")
            if roll < 0.10:
                return self._fault("plan: HTTP 500", Reply.error(500, "overloaded"))
            if roll < 0.13:
                return self._fault("plan: cycle", json.dumps({"tasks": [
                    {"id": 0, "task": "summarization", "dep": [1], "args": {"text": "a"}},
                    {"id": 1, "task": "summarization", "dep": [0], "args": {"text": "b"}}]}))
            return Reply(_plan(rng), delay=rng.choice([0, 0, 0.01]))
        if which == "select":
            if roll < 0.2:
                return self._fault("select: invented model", '{"choices": [{"task_id": 0, "id": "evil/x", "reason": "?"}]}')
            return '{"choices": []}'
        if which == "task":
            if roll < 0.1:
                return self._fault("LLM task: HTTP 429", Reply.error(429, "slow down", headers={"retry-after-ms": "5"}))
            return "A short summary."
        if roll < 0.06:
            return self._fault("answer: cut midway", Reply("It is a red square on a grey ground.", cut_after=3))
        if roll < 0.09:
            return self._fault("answer: HTTP 500", Reply.error(500, "overloaded", headers={"retry-after-ms": "5"}))
        return "It is a red square on a grey background."

    def _fault(self, kind: str, reply: str | Reply) -> str | Reply:
        self.injected[kind] += 1
        return reply


MODEL_FAULTS = [
    ("model: 503 Retry-After", Fault.loading(retry_after=1)),
    ("model: 429", Fault.rate_limited(retry_after=None)),
    ("model: dropped connection", Fault.dropped()),
    ("model: malformed JSON", Fault.malformed()),
    ("model: wrong content type", Fault.wrong_type()),
    ("model: HTTP 500", Fault.error(500, "boom")),
    ("model: slow", Fault.slow(0.02)),
]


def _script_models(agent: Agent, rng: random.Random) -> dict[str, list[str | None]]:
    """Queue a random mix of faults and good answers for every model; return what was queued, in order."""
    queued: dict[str, list[str | None]] = {}
    for model in MODELS:
        kinds: list[str | None] = []
        faults: list[Fault] = []
        for _ in range(200):
            if rng.random() < 0.3:
                kind, fault = rng.choice(MODEL_FAULTS)
                kinds.append(kind)
                faults.append(fault)
            else:
                kinds.append(None)
                faults.append(Fault())
        agent.hf.script(model, *faults)
        queued[model] = kinds
    return queued


def _our_tasks() -> int:
    """Tasks alive on the loop, but the fake servers' connection handlers."""
    return sum("aiohttp" not in t.get_coro().cr_code.co_filename for t in asyncio.all_tasks())  # type: ignore[union-attr]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 1024 / 1024


class _Tally(logging.Handler):
    """Counts log records by level and logger, keeping none (a kept record keeps its run's objects alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.errors: list[str] = []  # the whole text of the first few errors, to say what went wrong

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[(record.levelname, record.getMessage().split(":")[0][:40])] += 1
        if record.levelno >= logging.ERROR and len(self.errors) < 3:
            trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
            self.errors.append(f"{record.name}: {record.getMessage()}\n{trace}")


@contextmanager
def _tally_logs() -> Iterator[_Tally]:
    root = logging.getLogger()
    handlers, tally = root.handlers[:], _Tally()
    root.handlers[:] = [tally]
    try:
        yield tally
    finally:
        root.handlers[:] = handlers


async def test_two_hundred_conversations_with_random_faults(tmp_path: Path) -> None:
    with _tally_logs() as logs:
        await _load(tmp_path, logs)


async def _load(tmp_path: Path, logs: _Tally) -> None:
    faults = Faults()
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    async with agent_on(faults, MODELS, data_dir, HUGGINGGPT_MODEL_SELECTION="llm", LLM_TIMEOUT="10") as agent:
        rt = agent.rt
        queued = _script_models(agent, rng)
        slept: list[float] = []

        async def sleep(seconds: float) -> None:  # back-off is counted, not waited
            slept.append(seconds)

        rt.agent.executor.sleep = sleep
        upload = await image_upload()
        conversations = [(await rt.conversations.open("load")).id for _ in range(CONVERSATIONS)]
        baseline_tasks = _our_tasks()
        rss_before = _rss_mb()
        rss: list[float] = []

        async def sample() -> None:
            while True:
                rss.append(_rss_mb())
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())

        async def converse(number: int, conversation: str) -> list[tuple[str, str, str | None]]:
            shown = []
            for turn in range(1, TURNS + 1):
                done = await run_turn(rt, conversation, f"conversation {number} turn {turn}: describe it",
                                      [upload] if turn == 1 else [], limit=200)
                shown.append((done.result.run_id, done.result.status, done.result.error))
            return shown

        results = await asyncio.wait_for(
            asyncio.gather(*(converse(n, c) for n, c in enumerate(conversations))), 240
        )
        sampler.cancel()
        rss_peak = max(rss)
        shown = {run_id: (status, error) for per in results for run_id, status, error in per}
        statuses = Counter(status for status, _ in shown.values())

        # Nothing is left running or alive once every run has ended.
        await asyncio.sleep(0)
        assert _our_tasks() == baseline_tasks
        gc.collect()
        # (Requests without a run id are the planner's demonstrations, kept on purpose.)
        assert not [o for o in gc.get_objects() if type(o) is _Run or (type(o) is Request and o.run_id)]

    runs = CONVERSATIONS * TURNS
    assert sum(statuses.values()) == runs and set(statuses) <= {"ok", "partial", "failed"}
    assert statuses["ok"] > runs // 2  # the faults are the exception, not the rule
    # The database agrees with what the users were shown, and is sound.
    assert db_rows(data_dir, "PRAGMA integrity_check") == [("ok",)]
    assert db_rows(data_dir, "PRAGMA foreign_key_check") == []
    recorded = {run_id: (status, error) for run_id, status, error in db_rows(data_dir, "SELECT id, status, error FROM runs")}
    assert {r: v for r, v in recorded.items() if shown.get(r) != v} == {}, "runs recorded unlike they were shown"
    assert db_rows(data_dir, "SELECT count(*) FROM runs WHERE status = 'running'") == [(0,)]
    per_conversation = db_rows(data_dir, "SELECT conversation_id, role, count(*) FROM messages GROUP BY 1, 2")
    assert len(per_conversation) == 2 * CONVERSATIONS
    assert {n for _, _, n in per_conversation} == {TURNS}  # each turn: one user message, one answer
    assert db_rows(data_dir, "SELECT count(*) FROM runs r JOIN messages m ON m.id = r.request_message_id"
                   " AND m.role = 'user'") == [(runs,)]
    # A task row for every task of every run that got to execution, none left pending.
    planned = db_rows(data_dir, "SELECT id, plan FROM runs WHERE plan IS NOT NULL AND status != 'failed'")
    task_rows = dict(db_rows(data_dir, "SELECT run_id, count(*) FROM tasks GROUP BY run_id"))
    assert all(task_rows.get(run_id, 0) == len(json.loads(plan)) for run_id, plan in planned)
    # Every row has its file, whole. (A file without a row can remain if a task's timeout cancels it between
    # the file's write and its row: harmless, never shown; see RELIABILITY.md.)
    rows = {sha for (sha,) in db_rows(data_dir, "SELECT DISTINCT sha256 FROM resources")}
    files = {p.name: p for p in (data_dir / "files").rglob("*") if p.is_file()}
    assert rows <= set(files)
    assert all(hashlib.sha256(files[sha].read_bytes()).hexdigest() == sha for sha in rows)
    # Memory stayed bounded while 200 runs were in flight (measured: +30 MB alone, +150 MB in the full suite).
    assert rss_peak - rss_before < 2 * CONVERSATIONS

    served = Counter(k for model, kinds in queued.items()
                     for k in kinds[: sum(r.model == model for r in agent.hf.requests)] if k)
    injected = faults.injected + served
    assert sum(injected.values()) > CONVERSATIONS // 2
    # Every fault took a planned path: nothing crashed into the catch-all handlers.
    assert not [key for key in logs.counts if key[0] in ("ERROR", "CRITICAL")], "\n\n".join(logs.errors)
    print(f"\nload: {runs} runs in {CONVERSATIONS} concurrent conversations, statuses {dict(statuses)}, "
          f"{sum(injected.values())} faults injected {dict(sorted(injected.items()))}, "
          f"{len(agent.hf.requests)} model calls, {len(agent.llm.requests)} LLM calls, {len(slept)} back-offs, "
          f"RSS {rss_before:.0f} -> {rss_peak:.0f} MB")
