"""Time to plan with the default embedded LLM, in a fresh process (cold) and in a running one (warm).

A user's ``hugginggpt ask`` is a new process: it imports the app, loads the weights and reads the planner's
prompt before anything happens. Each measurement here is such a process (``python -m bench.plan_latency
--child``), keyless like ``offline.py``'s, which starts the app's own ``Runtime`` (capability-aware planner,
the configured demonstrations) and plans short everyday requests of the offline set:

- **cold, first run**: a new data directory, so no saved prompt-prefix state: the LLM reads the whole prompt;
- **cold, saved state**: the same data directory again, where the first run saved the LLM's state after the
  fixed prompt prefix (``agent/prefix_state.py``), so the LLM reads only what follows it;
- **warm**: later plans of the same process, which llama.cpp's own prefix reuse and RAM cache serve.

Reported per phase: seconds from spawning the process to the plan (what the user waits), seconds of the
``plan`` call alone, prompt tokens llama.cpp really evaluated (what the saved state saves), and model load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import Result, parse_args, timing_target
from .offline import Model, OfflineSet, attachment_resources, child_env, pick_model

__all__ = ["COLD_ID", "WARM_IDS", "main", "run_child"]

NAME = "plan_latency"
COLD_ID = "aloud-1"
"""The one-sentence request every fresh process plans first (one text-to-speech task)."""
WARM_IDS = ("classify-aloud-1", "count-1", "memo-summary-1")
"""Planned next in the saved-state processes: a photo (2 tasks), a photo (1 task), a memo (2 tasks)."""
DEFAULT_REPEAT = 3
DEFAULT_TIMEOUT = 900.0
_STDERR_KEPT = 2000
_PHASES = ("cold, first run", "cold, saved state", "warm")


async def _child(ids: Sequence[str]) -> dict[str, Any]:
    """In the fresh process: start the runtime as ``ask`` does, then plan ``ids`` in order."""
    from agent.errors import AgentError
    from agent.events import LLMUsage
    from agent.request import Request
    from agent.settings import Settings
    from app.runtime import Runtime

    by_id = {r.id: r for r in OfflineSet.load().requests}
    started = time.perf_counter()
    plans = []
    async with await Runtime.start(Settings.load()) as rt:
        runtime_s = time.perf_counter() - started
        for request_id in ids:
            offline = by_id[request_id]
            resources = attachment_resources(offline.attach)
            request = Request(offline.text, resources=resources, attachments=tuple(r.name for r in resources))
            usage = LLMUsage()
            began = time.perf_counter()
            error = None
            tasks: list[str] = []
            try:
                tasks = [t.task for t in (await rt.agent.planner.plan(request, usage)).tasks]
            except AgentError as err:
                error = str(err)
            plans.append(
                {
                    "id": request_id,
                    "seconds": round(time.perf_counter() - began, 3),
                    "done_at": time.time(),
                    "prompt_tokens": usage.prompt_tokens,
                    "prompt_tokens_evaluated": getattr(rt.llm, "last_prompt_evaluated", None),
                    "calls": usage.calls,
                    "tasks": tasks,
                    "error": error,
                }
            )
        return {
            "runtime_start_s": round(runtime_s, 3),
            "load_s": round(getattr(rt.llm, "load_seconds", 0.0), 3),
            "llm": rt.llm.model,
            "plans": plans,
        }


def run_child(ids: Sequence[str]) -> int:
    """``--child``: print one JSON object (the plans' figures) on stdout."""
    print(json.dumps(asyncio.run(_child(ids))))
    return 0


def _spawn(model: Model, data_dir: Path, ids: Sequence[str], timeout: float) -> dict[str, Any]:
    """One fresh process planning ``ids`` over ``data_dir``; its figures, or why it gave none."""
    command = [sys.executable, "-m", f"bench.{NAME}", "--child", ",".join(ids)]
    spawned = time.time()
    try:
        done = subprocess.run(
            command,
            cwd=data_dir,  # not the repository: its .env may hold keys
            env=child_env(model, data_dir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    try:
        figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"exit {done.returncode}, no figures", "stderr": done.stderr[-_STDERR_KEPT:]}
    for plan in figures["plans"]:
        plan["since_spawn"] = round(plan.pop("done_at") - spawned, 3)
    figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return figures


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _phase_row(phase: str, plans: Sequence[dict[str, Any]], loads: Sequence[float]) -> list[Any]:
    return [
        phase,
        len(plans),
        _median([p["since_spawn"] for p in plans]) if phase != "warm" else None,
        _median([p["seconds"] for p in plans]),
        _median([p["prompt_tokens_evaluated"] for p in plans]),
        _median([p["prompt_tokens"] for p in plans]),
        _median(loads) if phase != "warm" else None,
        f"{sum(p['error'] is None for p in plans)}/{len(plans)}",
    ]


async def run(smoke: bool, ns: argparse.Namespace) -> Result:
    model = pick_model(ns.model if ns.model or not smoke else "SmolLM2")
    repeat = ns.repeat or (1 if smoke else DEFAULT_REPEAT)
    warm = WARM_IDS[: ns.warm if ns.warm is not None else (1 if smoke else len(WARM_IDS))]
    timeout = ns.timeout or DEFAULT_TIMEOUT
    processes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-latency-") as scratch:
        for n in range(repeat):
            data_dir = Path(scratch) / f"data-{n}"
            data_dir.mkdir()
            for phase, ids in (("cold, first run", [COLD_ID]), ("cold, saved state", [COLD_ID, *warm])):
                figures = await asyncio.to_thread(_spawn, model, data_dir, ids, timeout)
                figures["phase"] = phase
                processes.append(figures)
                first = (figures.get("plans") or [{}])[0]
                print(
                    f"[{n + 1}/{repeat}] {phase}: "
                    + (
                        figures.get("error")
                        or f"plan {first['seconds']:.1f} s, {first['since_spawn']:.1f} s from spawn"
                    )
                    + f", load {os.getloadavg()[0]:.2f}",
                    file=sys.stderr,
                )
    failed = [p for p in processes if "error" in p]
    by_phase: dict[str, list[dict[str, Any]]] = {phase: [] for phase in _PHASES}
    loads: dict[str, list[float]] = {phase: [] for phase in _PHASES}
    for p in processes:
        if "error" in p:
            continue
        by_phase[p["phase"]].append(p["plans"][0])
        loads[p["phase"]].append(p["load_s"])
        by_phase["warm"] += p["plans"][1:]
    rows = [_phase_row(phase, by_phase[phase], loads[phase]) for phase in _PHASES if by_phase[phase]]
    row = {r[0]: r for r in rows}
    cold = row.get("cold, saved state", [None] * 3)[2]
    warm_s = row.get("warm", [None] * 4)[3]
    targets = [
        timing_target("fresh-process plan, one-sentence request", "≤ 20 s", cold, 20, "saved state"),
        timing_target("warm plan", "≤ 6 s", warm_s, 6),
    ]
    first = row.get("cold, first run", [None] * 3)[2]
    summary = (
        f"plan latency, {model.label}: fresh process {first} s on a first run, {cold} s with the saved "
        f"prefix state; warm plan {warm_s} s (medians, from spawn for the fresh processes)"
    )
    notes = [
        f"LLM: {model.label} ({model.gguf.name}), keyless, the app's Runtime (capability-aware planner, "
        f"HUGGINGGPT_DEMOS={os.environ.get('HUGGINGGPT_DEMOS', 'retrieval (default)')}). {repeat} new data "
        "dir(s); in each, a process planning the cold request, then one planning it again and then "
        f"{len(warm)} warm request(s). Cold request: {COLD_ID}; warm: {', '.join(warm) or 'none'} (offline set).",
        "from spawn: seconds from starting the process (imports, runtime, model load, sentence encoder) to the "
        "plan; plan call: the planner's call alone (model load included the first time); evaluated: prompt "
        "tokens llama.cpp read (the rest came from the saved state or the cache); prompt: the whole prompt.",
        *([f"{len(failed)} process(es) gave no figures: {failed[0]['error']}"] if failed else []),
    ]
    return Result(
        name=NAME,
        title="Time to plan, fresh process and warm (embedded LLM)",
        smoke=smoke,
        headers=[
            "phase",
            "plans",
            "from spawn (s)",
            "plan call (s)",
            "evaluated tokens",
            "prompt tokens",
            "model load (s)",
            "valid",
        ],
        rows=rows or [["(no process gave figures)", 0, None, None, None, None, None, "0/0"]],
        summary=summary,
        data={"model": model.label, "gguf": model.gguf.name, "processes": processes},
        notes=notes,
        targets=targets,
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="embedded LLM: a GGUF path or part of an installed model's label (SmolLM2, Qwen); "
        "default: LOCAL_LLM_GGUF, else the packaged Qwen, else SmolLM2 (what the runtime picks offline)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"fresh data dirs, each a first run and a saved-state run (default {DEFAULT_REPEAT})",
    )
    parser.add_argument(
        "--warm",
        type=int,
        choices=range(len(WARM_IDS) + 1),
        help="warm requests per saved-state process (default all)",
    )
    parser.add_argument("--timeout", type=float, help=f"seconds per process (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--child", metavar="IDS", help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(NAME, __doc__, argv, _add_options)
    if args.extra.child:
        return run_child(args.extra.child.split(","))
    asyncio.run(run(args.smoke, args.extra)).emit(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
