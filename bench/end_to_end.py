"""End-to-end seconds of a 1-task and a 2-task request, each in a fresh ``hugginggpt ask --json`` process.

What a keyless user waits from Enter to the answer: process start, runtime, model load, plan, model
selection, the tasks (local models), the written answer. Each request runs in its own new data directory:
the first process there finds no saved prompt-prefix state (a first run), the next ones find the state the
first saved (``agent/prefix_state.py``), as every later ``ask`` on a user's machine does. The requests come
from the offline set (``bench/data/offline``): "read this aloud" (text-to-speech) and "what animal is this?
say it out loud" (image classification, then text-to-speech), run and judged as ``offline.py`` does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import Result, parse_args, timing_target
from .offline import OfflineSet, make_assets, pick_model, run_request

__all__ = ["REQUEST_IDS", "main"]

NAME = "end_to_end"
REQUEST_IDS = ("aloud-1", "classify-aloud-1")
"""A 1-task and a 2-task request of the offline set."""
SMOKE_IDS = ("aloud-3",)
DEFAULT_REPEAT = 3
DEFAULT_TIMEOUT = 900.0
_PHASES = ("first run", "saved state")


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def run(smoke: bool, ns: argparse.Namespace) -> Result:
    offline = OfflineSet.load()
    by_id = {r.id: r for r in offline.requests}
    ids = [i for i in (ns.ids or "").split(",") if i] or list(SMOKE_IDS if smoke else REQUEST_IDS)
    unknown = set(ids) - set(by_id)
    if unknown:
        raise SystemExit(f"--ids: no request {', '.join(sorted(unknown))}")
    model = pick_model(ns.model if ns.model or not smoke else "SmolLM2")
    repeat = ns.repeat or (1 if smoke else DEFAULT_REPEAT)
    timeout = ns.timeout or DEFAULT_TIMEOUT
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-end-to-end-") as scratch:
        assets = make_assets(offline, Path(scratch) / "assets")
        for request_id in ids:
            data_dir = Path(scratch) / "data" / request_id
            for n in range(1 + repeat):
                record = run_request(by_id[request_id], assets, model, data_dir, timeout)
                record["phase"] = _PHASES[0] if n == 0 else _PHASES[1]
                record["load_average"] = [round(x, 2) for x in os.getloadavg()]
                records.append(record)
                verdict = "ok" if record["correct"] else "; ".join(record["problems"])[:160]
                print(
                    f"{request_id}, {record['phase']}: {record['seconds']:.1f} s, {verdict}, "
                    f"load {record['load_average'][0]:.2f}",
                    file=sys.stderr,
                )
    rows: list[list[Any]] = []
    medians: dict[tuple[str, str], float | None] = {}
    for request_id in ids:
        gold = len(by_id[request_id].plan)
        for phase in _PHASES:
            runs = [r for r in records if r["id"] == request_id and r["phase"] == phase]
            seconds = _median([float(r["seconds"]) for r in runs])
            medians[request_id, phase] = seconds
            rows.append(
                [
                    request_id,
                    gold,
                    phase,
                    len(runs),
                    seconds,
                    _median([float(r["run_seconds"]) for r in runs if r.get("run_seconds") is not None]),
                    f"{sum(bool(r['correct']) for r in runs)}/{len(runs)}",
                    " + ".join(t["task"] for t in (runs[-1].get("plan") or [])) or "(none)",
                ]
            )
    two_task = [i for i in ids if len(by_id[i].plan) == 2]
    figure = medians.get((two_task[0], "saved state")) if two_task else None
    target = timing_target(
        "end to end, 2-task request, fresh process",
        "≤ 40 s",
        figure,
        40,
        f"{two_task[0]}, saved state" if two_task else "no 2-task request run",
    )
    summary = f"end to end, {model.label}, fresh processes (median s): " + "; ".join(
        f"{r[0]} ({r[1]} task{'s' if r[1] != 1 else ''}) {r[2]} {r[4]}" for r in rows
    )
    notes = [
        f"LLM: {model.label} ({model.gguf.name}); each run is a new `python -m app.cli ask --json` process with "
        "no OpenAI or Hugging Face setting; seconds: wall time of the process; in run: the agent's own run "
        f"(plan to answer). {repeat} saved-state run(s) after each first run, over the same data dir.",
        "correct: the offline set's automatic answer check (the answer taken from the model's result); "
        "planned: the tasks of the last run's plan.",
    ]
    return Result(
        name=NAME,
        title="End to end in a fresh process (embedded LLM, no keys)",
        smoke=smoke,
        headers=[
            "request",
            "gold tasks",
            "phase",
            "runs",
            "seconds (median)",
            "in run (s)",
            "correct",
            "planned",
        ],
        rows=rows,
        summary=summary,
        data={"model": model.label, "gguf": model.gguf.name, "runs": records},
        notes=notes,
        targets=[target],
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="embedded LLM: a GGUF path or part of an installed model's label (SmolLM2, Qwen); "
        "default: LOCAL_LLM_GGUF, else the packaged Qwen, else SmolLM2 (what the runtime picks offline)",
    )
    parser.add_argument(
        "--ids", help=f"comma-separated offline-set request ids (default {','.join(REQUEST_IDS)})"
    )
    parser.add_argument(
        "--repeat", type=int, help=f"saved-state runs after each first run (default {DEFAULT_REPEAT})"
    )
    parser.add_argument("--timeout", type=float, help=f"seconds per process (default {DEFAULT_TIMEOUT:g})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(NAME, __doc__, argv, _add_options)
    run(args.smoke, args.extra).emit(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
