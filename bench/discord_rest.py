"""Discord REST calls at 50 concurrent runs: per run and per second, under the bot's REST budget.

The ``hugginggpt bot`` process (production edit interval, the default ``DISCORD_REST_PER_SECOND`` unless
``--budget`` says otherwise) against ``tests/fakes/discord_server.py``; 50 mentions arrive at once, each
planning one text-to-speech task (the LLM takes 1 s to plan, the model 2 s). Counted at the fake: every REST
request from the first mention to the last answer, per run and per second, the busiest one-second window, and
how many were status edits and typing calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import Result, parse_args

__all__ = ["main", "measure"]

NAME = "discord_rest"
ANSWER = "Done, here is what I found."


def measure(runs: int, budget: float | None) -> dict[str, Any]:
    from tests.fakes import discord_server, hf_server, llm_server
    from tests.fakes.agent_fakes import agent_settings, hf_tasks, plan, planning_script
    from tests.fakes.hf_server import Fault
    from tests.fakes.llm_server import Reply

    llm = llm_server.start_in_thread(
        planning_script([Reply(text=plan(("text-to-speech", {"text": "hello"})), delay=1.0)], [ANSWER])
    )
    hf = hf_server.start_in_thread(hf_tasks("text-to-speech"))
    for model in hf_tasks("text-to-speech"):
        hf.server.script(model, *[Fault.slow(2.0)] * runs)
    server = discord_server.start_in_thread()
    fake = server.fake
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPENAI_", "HF_", "HUGGINGGPT_", "DISCORD_"))
        }
        env |= agent_settings(llm.base_url, hf.base_url, Path(tmp) / "data")
        env |= {
            "DISCORD_TOKEN": "test-token",
            "DISCORD_API_BASE": server.api_base,
            "DISCORD_GATEWAY_URL": server.gateway_url,
            "DISCORD_USER_RUNS_PER_MINUTE": "0",
        }
        if budget is not None:
            env["DISCORD_REST_PER_SECOND"] = str(budget)
        bot = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "bot"],
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server.wait_for(lambda f: f.identified, timeout=60)
            first = len(fake.requests)
            for n in range(runs):
                server.call(fake.user_message, f"<@{discord_server.BOT_ID}> request {n}")

            def answered(f: Any) -> int:
                return sum(
                    1
                    for r in f.requests_to("POST", r"/messages$", status=200)
                    if (r.json or {}).get("content") == ANSWER
                )

            server.wait_for(lambda f: answered(f) == runs, timeout=600)
        finally:
            bot.terminate()
            bot.wait(timeout=30)
            server.stop()
            hf.stop()
            llm.stop()
    rest = [r for r in fake.requests[first:] if r.path.startswith("/api/")]
    seconds = rest[-1].at - rest[0].at
    counts = Counter(int(r.at - rest[0].at) for r in rest)
    return {
        "runs": runs,
        "budget": budget,
        "requests": len(rest),
        "seconds": seconds,
        "per_run": len(rest) / runs,
        "per_second": len(rest) / seconds,
        "busiest_second": max(counts.values()),
        "per_second_series": [counts[n] for n in range(int(seconds) + 1)],
        "status_edits": sum(1 for r in rest if r.method == "PATCH"),
        "typing": sum(1 for r in rest if r.path.endswith("/typing")),
        "refused": sum(1 for r in rest if r.status >= 400),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(NAME, __doc__, argv)
    runs = 10 if args.smoke else 50
    rows: list[list[Any]] = []
    data = []
    # The default budget (40 a second) and a tight one; smoke: 10 runs under the tight one only.
    for budget in (10.0,) if args.smoke else (None, 10.0):
        m = measure(runs, budget)
        data.append(m)
        rows.append(
            [
                m["runs"],
                f"{budget or 40:g}/s" + (" (default)" if budget is None else ""),
                m["requests"],
                round(m["per_run"], 1),
                round(m["per_second"], 1),
                m["busiest_second"],
                m["status_edits"],
                m["typing"],
                round(m["seconds"], 1),
            ]
        )
    summary = "; ".join(
        f"{m['runs']} runs at {m['budget'] or 40:g}/s: {m['per_run']:.1f} REST calls a run, "
        f"{m['per_second']:.1f}/s, busiest second {m['busiest_second']}"
        for m in data
    )
    Result(
        NAME,
        "Discord REST calls at 50 concurrent runs",
        args.smoke,
        [
            "runs",
            "budget",
            "requests",
            "per run",
            "per second",
            "busiest second",
            "edits",
            "typing",
            "seconds",
        ],
        rows,
        summary,
        {"measurements": data},
        [
            "Counted at the fake Discord from the first mention to the last answer; the busiest second is a "
            "fixed one-second bucket from the first request (the fake timestamps arrivals, so a stall of either "
            "process can move a request into the next bucket).",
        ],
    ).emit(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
