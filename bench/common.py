"""What every benchmark script shares: paths, the command line, the machine description, tables, JSON results.

Each script prints a Markdown table and a one-line summary and writes ``<out>/<name>.json`` holding the same
table, so ``python -m bench`` can rebuild BENCHMARKS.md from the JSON files alone.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "BenchArgs",
    "Result",
    "Target",
    "command_line",
    "llama_cpp_info",
    "machine_info",
    "markdown_table",
    "parse_args",
    "percentile",
    "timing_target",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

Cell = str | int | float | None
_command: list[str] = []  # the command lines parse_args read, latest last


@dataclass(frozen=True)
class BenchArgs:
    smoke: bool
    out: Path
    extra: argparse.Namespace


def parse_args(
    name: str,
    doc: str | None,
    argv: Sequence[str] | None,
    add: Callable[[argparse.ArgumentParser], None] | None = None,
) -> BenchArgs:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=(doc or "").split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, a few seconds: proves the script runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON result")
    if add is not None:
        add(parser)
    ns = parser.parse_args(argv)
    _command.append(shlex.join(["python", "-m", f"bench.{name}", *(sys.argv[1:] if argv is None else argv)]))
    return BenchArgs(smoke=ns.smoke, out=ns.out, extra=ns)


def run_main(
    name: str, doc: str | None, run: Callable[[bool], Coroutine[Any, Any, Result]], argv: Sequence[str] | None
) -> int:
    """The whole ``main`` of a script whose only option is ``--smoke``: run it, print and save the result."""
    args = parse_args(name, doc, argv)
    asyncio.run(run(args.smoke)).emit(args.out)
    return 0


def llama_cpp_info() -> dict[str, str] | None:
    """llama-cpp-python's version and llama.cpp's system info (the instruction sets it was built to use),
    which decide its speed as much as the CPU does; None when it is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    return {
        "version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text(encoding="ascii").strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, date, how busy the machine was and how llama.cpp was built: numbers mean little
    without the machine they came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        # The machine may be shared: a busy one slows every figure, so say how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "loadavg": _loadavg(),
        "llama_cpp": llama_cpp_info(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def timing_target(name: str, goal: str, seconds: float | None, limit: float, detail: str = "") -> Target:
    """A time target, judged only when the machine was quiet: with more runnable work than cores (beyond
    the benchmark's own), a figure says how busy the machine was more than how fast we are."""
    load = os.getloadavg()[0]
    busy = load > (os.cpu_count() or 1) + 1
    value = f"{seconds} s{f' ({detail})' if detail else ''}"
    if busy:
        value += f", load average {load:.1f}: not judged"
    return Target(name, goal, value, None if seconds is None or busy else seconds <= limit)


def command_line() -> str:
    """How the latest result was made, to run it again: ``python -m bench.<name>`` and its arguments."""
    return _command[-1] if _command else ""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _cell(value: Cell) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """A figure we promised, with the value reached; ``met`` is None when it could not be measured here."""

    name: str
    goal: str
    value: str
    met: bool | None


@dataclass
class Result:
    """One script's outcome: the table (for people and BENCHMARKS.md) and the raw figures (for tests)."""

    name: str
    title: str
    smoke: bool
    headers: list[str]
    rows: list[list[Cell]]
    summary: str
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def table(self) -> str:
        return markdown_table(self.headers, self.rows)

    def emit(self, out: Path) -> Path:
        """Print the table and the summary, and write the JSON result; returns its path."""
        print(f"## {self.title}{' (smoke)' if self.smoke else ''}\n")
        print(self.table())
        for note in self.notes:
            print(f"\n- {note}")
        print(f"\n{self.summary}")
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        payload = {
            "name": self.name,
            "title": self.title,
            "mode": "smoke" if self.smoke else "full",
            "command": command_line(),
            "machine": machine_info(),
            "headers": self.headers,
            "rows": self.rows,
            "summary": self.summary,
            "notes": self.notes,
            "targets": [asdict(t) for t in self.targets],
            "data": self.data,
        }
        path.write_text(json.dumps(_plain(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path


def _plain(value: Any) -> Any:
    """``value`` as strict JSON: NaN (no measurement) becomes null, paths become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
