"""Faults of the models, at the level of a whole run: the real ``AsyncInferenceClient`` against the Hugging
Face fake over 127.0.0.1, inside ``Conversations.ask``.

Each fault is retried within bounds (transient ones only, honouring a capped ``Retry-After``), then the next
candidate model is tried, then the task is reported failed with the models it tried; the rest of the plan
goes on. Single-call cases (status mapping, each answer shape) are in test_hf_backend.py and the scheduler's
rules in test_executor.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from agent.catalog import Catalog
from agent.executor import MAX_RETRY_AFTER
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import FakeHF, Fault
from tests.fakes.net import unused_port
from tests.fakes.reliability import Agent, agent_on, db_rows, image_upload, plan_json, stage, stage_script

CAPTIONERS = [m.id for m in Catalog.bundled().by_task("image-to-text")]
MODELS = hf_tasks("image-to-text", "visual-question-answering")
PLAN = plan_json(
    {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
    {"id": 1, "task": "visual-question-answering", "dep": [], "args": {"image": "img-1.png", "text": "what colour?"}},
    {"id": 2, "task": "summarization", "dep": [0], "args": {"text": "<GENERATED>-0"}},
)
RETRIES = 2  # HUGGINGGPT_TASK_RETRIES's default
TOP_K = 5


def record_sleeps(agent: Agent) -> list[float]:
    """Replace the executor's back-off sleep with one that only records how long it was asked to wait."""
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    agent.rt.agent.executor.sleep = sleep
    return sleeps


def calls(agent: Agent, model: str) -> int:
    return sum(r.model == model for r in agent.hf.requests)


FAULTS = {
    "503 with Retry-After": (Fault.loading(retry_after=7), RETRIES + 1, [7.0, 7.0]),
    "429 with a huge Retry-After": (Fault.rate_limited(retry_after=3600), RETRIES + 1, [MAX_RETRY_AFTER] * 2),
    "429 without Retry-After": (Fault.rate_limited(retry_after=None), RETRIES + 1, [1.0, 2.0]),
    "timeout": (Fault.slow(5), RETRIES + 1, [1.0, 2.0]),
    "connection dropped": (Fault.dropped(), RETRIES + 1, [1.0, 2.0]),
    "HTTP 500": (Fault.error(500, "internal error"), 1, []),
    "malformed JSON": (Fault.malformed(), 1, []),
    "wrong content type": (Fault.wrong_type(), 1, []),
}


@pytest.mark.parametrize(("fault", "attempts", "waits"), FAULTS.values(), ids=FAULTS.keys())
async def test_a_faulty_model_is_retried_within_bounds_then_replaced(
    fault: Fault, attempts: int, waits: list[float], tmp_path: Path
) -> None:
    script = stage_script([PLAN], ["It is a red square."])
    async with agent_on(script, MODELS, tmp_path / "data", HUGGINGGPT_TASK_TIMEOUT="0.5") as agent:
        agent.hf.script(CAPTIONERS[0], *[fault] * 10)
        sleeps = record_sleeps(agent)
        turn = await agent.turn("describe it, its colour, and sum it up", [await image_upload()], limit=30)
    result = turn.result
    assert result.status == "ok", result.error
    by_id = {t.id: t for t in result.tasks}
    assert calls(agent, CAPTIONERS[0]) == attempts  # transient faults retried, final ones not
    assert sleeps == waits  # Retry-After honoured up to MAX_RETRY_AFTER, else exponential back-off
    assert by_id[0].model == CAPTIONERS[1] and by_id[0].output.text  # then the next candidate
    assert by_id[1].status == by_id[2].status == "ok"


async def test_connection_refused_is_retried_then_replaced(tmp_path: Path) -> None:
    port = unused_port()
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({CAPTIONERS[0]: f"http://127.0.0.1:{port}/"}))
    script = stage_script([PLAN], ["It is a red square."])
    async with agent_on(script, MODELS, tmp_path / "data", HUGGINGGPT_ENDPOINTS=str(endpoints)) as agent:
        sleeps = record_sleeps(agent)
        turn = await agent.turn("describe it", [await image_upload()])
    assert turn.result.status == "ok"
    assert sleeps == [1.0, 2.0]  # three refused connections
    assert {t.id: t.model for t in turn.result.tasks}[0] == CAPTIONERS[1]


@pytest.mark.parametrize(
    ("fault", "attempts"),
    [(Fault.error(500, "internal error"), 1), (Fault.loading(retry_after=0), RETRIES + 1)],
    ids=["final fault", "transient fault"],
)
async def test_when_every_model_fails_the_task_is_reported_and_the_plan_goes_on(
    fault: Fault, attempts: int, tmp_path: Path
) -> None:
    script = stage_script([PLAN], ["The colour is red; the caption failed."])
    async with agent_on(script, MODELS, tmp_path / "data") as agent:
        for model in CAPTIONERS:
            agent.hf.script(model, *[fault] * 10)
        record_sleeps(agent)
        turn = await agent.turn("describe it, its colour, and sum it up", [await image_upload()])
    result = turn.result
    assert result.status == "partial"
    by_id = {t.id: t for t in result.tasks}
    # Bounded: at most HUGGINGGPT_TOP_K models, each tried at most 1 + HUGGINGGPT_TASK_RETRIES times.
    tried = [m for m in CAPTIONERS if calls(agent, m)]
    assert tried == CAPTIONERS[:TOP_K]
    assert all(calls(agent, m) == attempts for m in tried)
    failed = by_id[0]
    assert failed.status == "failed" and f"models tried: {', '.join(tried)}" in failed.error
    assert by_id[1].status == "ok" and by_id[1].output.text == "red"  # the independent task still ran
    assert by_id[2].status == "skipped" and "task 0" in by_id[2].error  # its dependent did not
    # The answer is written from the results, failure included, and everything is recorded.
    respond = next(body for body in agent.llm.requests if stage(body) == "respond")
    assert "models tried" in respond["messages"][-1]["content"]
    rows = db_rows(agent.data_dir, "SELECT task_id, status, error FROM tasks WHERE run_id = ? ORDER BY task_id",
                   (result.run_id,))
    assert [(r[0], r[1]) for r in rows] == [(0, "failed"), (1, "ok"), (2, "skipped")]
    assert rows[0][2] == failed.error
    ((status,),) = db_rows(agent.data_dir, "SELECT status FROM runs WHERE id = ?", (result.run_id,))
    assert status == "partial"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize(
    "fault",
    [Fault.huge_body(600 << 20, content_type="application/json"), Fault.huge_body(None)],
    ids=["600 MiB answer", "endless answer"],
)
async def test_an_answer_over_the_output_cap_is_refused_after_reading_about_the_cap(
    fault: Fault, tmp_path: Path
) -> None:
    """Fixed: a 512 MB body added 1.67 GB of memory and the run succeeded; an endless one was read for ever.

    Measured by what the server managed to send, not by time: the cap plus what the sockets buffer.
    """
    cap_mb = 8
    script = stage_script([PLAN], ["It is a red square."])
    async with agent_on(script, MODELS, tmp_path / "data", HUGGINGGPT_MAX_OUTPUT_MB=str(cap_mb)) as agent:
        agent.hf.script(CAPTIONERS[0], fault)
        peak, baseline = 0, _rss_bytes()

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss_bytes())
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        turn = await agent.turn("describe it, its colour, and sum it up", [await image_upload()], limit=30)
        sampler.cancel()
    result = turn.result
    assert result.status == "ok", result.error
    by_id = {t.id: t for t in result.tasks}
    assert calls(agent, CAPTIONERS[0]) == 1  # refused, not asked again ...
    assert by_id[0].model == CAPTIONERS[1]  # ... and the next candidate answered
    assert agent.hf.bytes_sent <= (cap_mb + 24) << 20
    print(
        f"\n{agent.hf.bytes_sent / 2**20:.0f} MiB sent by the server (cap {cap_mb} MiB); "
        f"peak RSS +{max(0, peak - baseline) / 2**20:.0f} MiB during the run"
    )


async def test_a_redirect_of_a_model_to_another_host_is_refused_and_the_next_model_used(
    tmp_path: Path,
) -> None:
    """Fixed: the client followed it, sending the user's image and the token there and using its answer."""
    script = stage_script([PLAN], ["It is a red square."])
    async with FakeHF(dict(MODELS)) as other:
        async with agent_on(script, MODELS, tmp_path / "data") as agent:
            agent.hf.script(CAPTIONERS[0], Fault.redirect(f"{other.base_url}/models/{CAPTIONERS[0]}"))
            turn = await agent.turn(
                "describe it, its colour, and sum it up", [await image_upload()], limit=30
            )
    result = turn.result
    assert result.status == "ok", result.error
    assert {t.id: t.model for t in result.tasks}[0] == CAPTIONERS[1]
    assert other.requests == []
