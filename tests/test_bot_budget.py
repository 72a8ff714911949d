"""The REST budget: 50 runs at once from the ``hugginggpt bot`` process against the fake Discord stay under
``DISCORD_REST_PER_SECOND``; status edits and typing slow down as runs pile up; the content-less mode.

The budget's own arithmetic (the sliding window, the stretch) is checked on a fake clock.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bot.budget import PROGRESS_SHARE, RestBudget
from bot.commands import HELP_TEXT, HELP_TEXT_MENTIONS_ONLY
from tests.fakes import discord_server, hf_server, llm_server
from tests.fakes.agent_fakes import agent_settings, hf_tasks, plan, planning_script
from tests.fakes.discord_server import BOT_ID, RecordedRequest
from tests.fakes.hf_server import Fault
from tests.fakes.llm_server import Reply

BUDGET = 10
RUNS = 50
ANSWER = "Done, here is what I found."


def _busiest(requests: list[RecordedRequest], window: float) -> int:
    """The most requests that arrived within any ``window`` seconds."""
    times = sorted(r.at for r in requests)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_fifty_concurrent_runs_keep_the_bot_under_its_rest_budget(tmp_path: Path) -> None:
    script = planning_script([Reply(text=plan(("text-to-speech", {"text": "hello"})), delay=1.0)], [ANSWER])
    llm = llm_server.start_in_thread(script)
    hf = hf_server.start_in_thread(hf_tasks("text-to-speech"))
    for model in hf_tasks("text-to-speech"):
        hf.server.script(model, *[Fault.slow(2.0)] * RUNS)
    server = discord_server.start_in_thread()
    fake = server.fake
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_", "HUGGINGGPT_", "DISCORD_"))
    }
    env |= agent_settings(llm.base_url, hf.base_url, tmp_path / "data")
    env |= {
        "DISCORD_TOKEN": "test-token",
        "DISCORD_API_BASE": server.api_base,
        "DISCORD_GATEWAY_URL": server.gateway_url,
        "DISCORD_USER_RUNS_PER_MINUTE": "0",
        "DISCORD_REST_PER_SECOND": str(BUDGET),
    }
    log = (tmp_path / "bot.log").open("w+")
    bot = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "bot"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        server.wait_for(lambda f: f.identified, timeout=60)
        first = len(fake.requests)
        for n in range(RUNS):
            server.call(fake.user_message, f"<@{BOT_ID}> request {n}")

        def answered(f: discord_server.FakeDiscord) -> int:
            return sum(
                1
                for r in f.requests_to("POST", r"/messages$", status=200)
                if (r.json or {}).get("content") == ANSWER
            )

        server.wait_for(lambda f: answered(f) == RUNS, timeout=240)
        bot.terminate()
        assert bot.wait(timeout=30) == 0
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait()
        server.stop()
        hf.stop()
        llm.stop()
        log.seek(0)
        output = log.read()
        log.close()
    assert "Traceback" not in output, output
    rest = [r for r in fake.requests[first:] if r.path.startswith("/api/")]
    busiest, busiest_5s = _busiest(rest, 1.0), _busiest(rest, 5.0)
    seconds = rest[-1].at - rest[0].at
    counts = Counter(int(r.at - rest[0].at) for r in rest)
    edits = len([r for r in rest if r.method == "PATCH"])
    typing = len([r for r in rest if r.path.endswith("/typing")])
    print(
        f"\n{RUNS} runs: {len(rest)} REST requests in {seconds:.1f} s ({len(rest) / RUNS:.1f} a run, "
        f"{len(rest) / seconds:.1f}/s on average; at most {busiest} in any second, {busiest_5s} in any 5 s; "
        f"budget {BUDGET}/s); {edits} status edits, {typing} typing calls; per second: "
        f"{[counts[n] for n in range(int(seconds) + 1)]}"
    )
    # The bot admits at most BUDGET requests in any second as it sends them (see the per-second counts
    # printed above); the fake timestamps them when its loop gets to them, and on a loaded machine either
    # process can stall for a moment and let a few go together, so a one-second window at the fake can catch
    # up to half a second's more. Without the budget, the 50 mentions alone bring 150 requests at once.
    # n requests span n - 1 intervals: at exactly the budget, 150 requests take 14.9 s, not 15.
    assert (len(rest) - 1) / seconds <= BUDGET
    assert busiest_5s <= 5 * BUDGET + BUDGET // 2
    assert busiest <= 2 * BUDGET
    assert answered(fake) == RUNS and len(fake.requests_to("POST", "/threads$")) == RUNS
    assert all(r.status < 400 for r in rest), "nothing was refused: the bot never met Discord's own limits"


async def test_the_window_admits_the_budget_per_second_in_order() -> None:
    now = [100.0]
    budget = RestBudget(3, clock=lambda: now[0])
    for _ in range(3):
        await budget.acquire()
    waiting = asyncio.create_task(budget.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a fourth request in the same second waits"
    now[0] += 1.0
    await asyncio.wait_for(waiting, 2)


def test_progress_stretches_only_past_its_share() -> None:
    budget = RestBudget(40)
    per_run = 1 / 1.0 + 1 / 8.0  # an edit a second, a typing call every 8 s
    fits = int(40 * PROGRESS_SHARE / per_run)
    with budget.run():
        assert budget.stretch(per_run) == 1.0
    for _ in range(fits):
        budget.runs += 1
    assert budget.stretch(per_run) == 1.0, f"{fits} runs keep the one-process pace"
    budget.runs = 50
    assert budget.stretch(per_run) == pytest.approx(50 * per_run / 20)


def test_help_says_when_only_mentions_are_read() -> None:
    assert "just keep talking" in HELP_TEXT
    assert "mention me" in HELP_TEXT_MENTIONS_ONLY and "just keep talking" not in HELP_TEXT_MENTIONS_ONLY
