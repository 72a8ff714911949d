"""llama.cpp builds compared: prompt and generation tokens per second of each build on this CPU.

``--build LABEL=DIR`` measures the llama-cpp-python found in DIR (an unpacked wheel: ``unzip -d DIR x.whl``)
instead of the installed one; repeat it to compare builds. Each build runs in a child process of its own
(one ``llama_cpp`` per process), the builds take turns rep by rep so a change in the machine's load falls on
all of them alike, and the figure is the median of the reps. Without ``--build``: the installed build only.
The model is Qwen2.5-Coder-1.5B when installed (SmolLM2-135M in smoke mode or without it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, Result, parse_args

__all__ = ["main", "measure_here"]

NAME = "llama_build"

_CHILD = """
import asyncio, json, sys
from bench.llama_build import measure_here
print(json.dumps(asyncio.run(measure_here(sys.argv[1] == "smoke"))))
"""


async def measure_here(smoke: bool) -> dict[str, Any]:
    """In this process: the build's instruction sets and the speed of the largest installed model."""
    import llama_cpp

    from .embedded import embedded_llm, embedded_models

    models = embedded_models()
    model = models[0] if smoke else models[-1]
    async with embedded_llm(model) as llm:
        speed = await llm.measure_speed(
            prompt_tokens=64 if smoke else 600, generated_tokens=4 if smoke else 64
        )
    info = llama_cpp.llama_print_system_info().decode()
    return {
        "model": model.label,
        "system_info": info.strip(),
        "prompt_tokens_per_s": speed.prompt_tokens_per_s,
        "generation_tokens_per_s": speed.generation_tokens_per_s,
    }


def _measure(directory: str | None, smoke: bool) -> dict[str, Any]:
    env = dict(os.environ)
    paths = [p for p in (directory, str(REPO_ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, "smoke" if smoke else "full"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def _instruction_sets(info: str) -> str:
    found = [part.split("=")[0].strip() for part in info.split("|") if part.strip().endswith("= 1")]
    wanted = ("AVX2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_INT8")
    return ", ".join(name for name in wanted if name in found)


def run(builds: dict[str, str | None], smoke: bool, reps: int) -> Result:
    samples: dict[str, list[dict[str, Any]]] = {label: [] for label in builds}
    for _ in range(1 if smoke else reps):
        for label, directory in builds.items():
            samples[label].append(_measure(directory, smoke))
    measured = []
    for label, runs in samples.items():
        measured.append(
            {
                "build": label,
                "model": runs[0]["model"],
                "instruction_sets": _instruction_sets(runs[0]["system_info"]),
                "prompt_tokens_per_s": round(statistics.median(r["prompt_tokens_per_s"] for r in runs), 1),
                "generation_tokens_per_s": round(
                    statistics.median(r["generation_tokens_per_s"] for r in runs), 1
                ),
                "reps": len(runs),
            }
        )
    rows: list[list[Any]] = [
        [
            m["build"],
            m["instruction_sets"],
            m["model"],
            m["prompt_tokens_per_s"],
            m["generation_tokens_per_s"],
        ]
        for m in measured
    ]
    return Result(
        name=NAME,
        title="Embedded LLM builds",
        smoke=smoke,
        headers=["build", "instruction sets used", "model", "prompt tok/s", "generation tok/s"],
        rows=rows,
        summary="llama.cpp builds: "
        + "; ".join(
            f"{m['build']} reads {m['prompt_tokens_per_s']:.0f} tok/s, writes {m['generation_tokens_per_s']:.1f}"
            for m in measured
        ),
        data={"builds": measured, "threads": os.cpu_count()},
        notes=[
            "600 prompt tokens read and 64 written greedily (EmbeddedLLM.measure_speed), on all cores; the median "
            "of the reps, the builds taking turns. `make` builds the AVX-512 variant where the CPU has AVX-512 "
            "(scripts/llama-build.sh); `-march=native` (AMX on) segfaults on its first matrix product on these "
            "VMs with Debian 12's GCC, so no build turns AMX on.",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--build", action="append", default=[], metavar="LABEL=DIR")
        parser.add_argument("--reps", type=int, default=3)

    args = parse_args(NAME, __doc__, argv, add)
    builds: dict[str, str | None] = {}
    for spec in args.extra.build:
        label, _, directory = spec.partition("=")
        builds[label] = str(Path(directory).resolve())
    result = run(builds or {"installed": None}, args.smoke, args.extra.reps)
    result.emit(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
