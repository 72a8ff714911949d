"""Planning quality on TaskBench's Hugging Face tools data, scored with TaskBench's own metrics.

Each of the 44 gold requests goes through our real ``Planner`` (prompt, JSON mode, repair, validation, one
retry); its plan is mapped to TaskBench's tool names and scored (``bench.taskbench``). Files the request
names (``'example.jpg'``) are given to the planner as conversation resources, so plans can use them. Rows:
each LLM (an OpenAI-compatible server from ``OPENAI_BASE_URL``, the embedded LLM, and the "oracle", which
replays the gold plans through the planner to show the ceiling our task set allows) with the fixed
demonstrations and with retrieval-chosen ones. Plan validity (the reply parses and validates) is measured
on a fixed random sample of the 7,546 user requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.demos import DemoSelector, FixedDemos, load_demonstrations
from agent.errors import LLMError, PlanningError, PlanParseError
from agent.events import LLMUsage
from agent.llm import LLM, OpenAILLM
from agent.planner import DEMO_COUNT, Planner
from agent.request import Request
from agent.settings import Settings

from .common import REPO_ROOT, Result, Target, parse_args
from .controller import ScriptedController
from .embedded import EmbeddedModel, embedded_llm, embedded_models
from .taskbench import TaskBench, oracle_plan, request_resources, score, to_taskbench

__all__ = [
    "DEFAULT_TASKBENCH",
    "PUBLISHED",
    "bank_texts",
    "check_no_overlap",
    "main",
    "run",
    "taskbench_texts",
]

NAME = "planning"
ORACLE = "oracle (gold plans via fake LLM)"
DEFAULT_TASKBENCH = Path(os.environ.get("TASKBENCH_DIR") or REPO_ROOT.parent / "shared" / "taskbench")
"""TaskBench's data: ``TASKBENCH_DIR``, else ``shared/taskbench`` beside the checkout."""
VALIDITY_SEED = 7546
VALIDITY_FULL = 500
DEMO_CHOICES = ("both", "fixed", "retrieval", "mixed")
VALIDITY_EMBEDDED = 20
"""Validity sample for the embedded LLM: each plan takes tens of seconds on 2 cores (see BENCHMARKS.md), so
500 would take hours. The smaller sample is the head of the same seeded sample."""
_REASONS_KEPT = 5
GOLD_NOTE = "gold_sample_44: 28 single, 13 chain, 3 dag; a smoke-test set, not TaskBench's scores"

PUBLISHED: tuple[tuple[str, float, float, float, float], ...] = (
    ("gpt-4", 81.54, 54.70, 77.31, 60.86),
    ("gpt-3.5-turbo", 69.49, 33.36, 55.88, 36.32),
    ("codellama-13b", 53.16, 14.64, 32.06, 18.87),
    ("llama-2-7b-chat", 27.30, 0.74, 13.05, 2.79),
)
"""TaskBench leaderboard, HF tools: (LLM, n-F1, e-F1, t-F1, v-F1) in %, full set, Dec-2023 data."""


def bank_texts() -> list[str]:
    """Every text of the demonstration bank: the requests and the chat turns before them."""
    demos = load_demonstrations()
    return [d.request.text for d in demos] + [t.text for d in demos for t in d.request.history]


def taskbench_texts(tb: TaskBench) -> list[str]:
    """What TaskBench could ask the planner: its 7,546 user requests and the gold records' instructions."""
    return [*tb.requests.values(), *(g.instruction for g in tb.gold)]


def check_no_overlap(bank: Sequence[str], benchmark_texts: Sequence[str]) -> None:
    """Demonstrations must not contain benchmark requests, or retrieval would just look the answers up."""

    def norm(text: str) -> str:  # the same request with other case or spacing is the same request
        return " ".join(text.casefold().split())

    shared = {norm(t) for t in bank} & {norm(t) for t in benchmark_texts}
    if shared:
        raise AssertionError(
            f"{len(shared)} benchmark request(s) are in the demonstration bank: {sorted(shared)[:3]}"
        )


@dataclass(frozen=True)
class Outcome:
    """One request's planning: TaskBench nodes if a valid plan came back, else why not."""

    nodes: list[dict[str, Any]] | None
    failure: str | None
    seconds: float
    calls: int
    reason: str = ""


async def _plan(planner: Planner, text: str, names: dict[str, str]) -> Outcome:
    resources = request_resources(text)
    request = Request(text=text, resources=resources, attachments=tuple(r.name for r in resources))
    usage = LLMUsage()
    started = time.perf_counter()
    try:
        plan = await planner.plan(request, usage)
    except PlanParseError as err:
        return Outcome(None, "parse", time.perf_counter() - started, usage.calls, str(err))
    except PlanningError as err:
        return Outcome(None, "validation", time.perf_counter() - started, usage.calls, str(err))
    except LLMError as err:
        return Outcome(None, "llm", time.perf_counter() - started, usage.calls, str(err))
    return Outcome(to_taskbench(plan, names), None, time.perf_counter() - started, usage.calls)


async def _plan_all(
    planner: Planner, texts: Sequence[str], names: dict[str, str], concurrency: int
) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> Outcome:
        async with gate:
            return await _plan(planner, text, names)

    return list(await asyncio.gather(*(one(t) for t in texts)))


@dataclass(frozen=True)
class Controller:
    """An LLM under test, how many requests it plans at once, and how many validity requests it takes."""

    label: str
    llm: LLM
    concurrency: int
    validity: int


@asynccontextmanager
async def _oracle(tb: TaskBench, validity: int) -> AsyncIterator[Controller]:
    from tests.fakes.llm_server import FakeLLMServer

    plans = {g.request: oracle_plan(g.nodes, tb.from_taskbench) for g in tb.gold}
    async with FakeLLMServer(ScriptedController(plans)) as server:
        settings = Settings(openai_base_url=server.base_url, llm_model="oracle")
        yield Controller(ORACLE, OpenAILLM(settings), 8, validity)


@asynccontextmanager
async def _server(settings: Settings, validity: int) -> AsyncIterator[Controller]:
    yield Controller(f"{settings.llm_model} (OpenAI-compatible)", OpenAILLM(settings), 4, validity)


@asynccontextmanager
async def _embedded(model: EmbeddedModel, validity: int) -> AsyncIterator[Controller]:
    async with embedded_llm(model) as llm:
        yield Controller(f"embedded {model.label}", llm, 1, validity)


def _summary_row(label: str, demos: str, scores: dict[str, Any], outcomes: Sequence[Outcome]) -> list[Any]:
    seconds = sum(o.seconds for o in outcomes) / max(1, len(outcomes))
    return [
        label,
        demos,
        scores["samples"],
        f"{scores['coverage']:.0%}",
        round(100 * scores["node_f1"], 1),
        round(100 * scores["edge_f1"], 1),
        round(100 * scores["argname_f1"], 1),
        round(100 * scores["value_f1"], 1),
        round(seconds, 2),
    ]


async def _evaluate(
    controller: Controller,
    demos: dict[str, DemoSelector],
    tb: TaskBench,
    records: int,
    validity_texts: Sequence[str],
    validity_demos: str,
) -> tuple[list[list[Any]], dict[str, Any]]:
    gold = tb.gold[:records]
    rows = []
    data: dict[str, Any] = {}
    for demos_label, selector in demos.items():
        planner = Planner(controller.llm, selector, max_tasks=12)
        await selector.select(gold[0].request, DEMO_COUNT)  # loads the sentence encoder outside the timing
        started = time.perf_counter()
        outcomes = await _plan_all(
            planner, [g.request for g in gold], tb.to_taskbench, controller.concurrency
        )
        scores = score(((g.nodes, o.nodes) for g, o in zip(gold, outcomes, strict=True)), tb.output_types)
        result = scores.to_json()
        result["seconds_total"] = round(time.perf_counter() - started, 2)
        print(
            f"{controller.label}, {demos_label}: {len(gold)} records in {result['seconds_total']:.0f} s",
            file=sys.stderr,
        )
        result["seconds_per_request"] = round(sum(o.seconds for o in outcomes) / max(1, len(outcomes)), 3)
        result["failures"] = _failures(outcomes)
        by_type = {}
        for kind in sorted({g.type for g in gold}):
            subset = [(g.nodes, o.nodes) for g, o in zip(gold, outcomes, strict=True) if g.type == kind]
            by_type[kind] = {
                k: v for k, v in score(subset, tb.output_types).to_json().items() if k != "counts"
            }
        result["by_type"] = by_type
        row = _summary_row(controller.label, demos_label, result, outcomes)
        if demos_label == validity_demos and controller.validity:
            started = time.perf_counter()
            texts = validity_texts[: controller.validity]
            checked = await _plan_all(planner, texts, tb.to_taskbench, controller.concurrency)
            valid = [o for o in checked if o.nodes is not None]
            result["validity"] = {
                "requests": len(checked),
                "valid": len(valid),
                "rate": round(len(valid) / len(checked), 4),
                "non_empty": sum(1 for o in valid if o.nodes),
                "failures": _failures(checked),
                "seconds_total": round(time.perf_counter() - started, 2),
            }
            row.append(f"{len(valid) / len(checked):.0%} of {len(checked)}")
        else:
            row.append(None)
        rows.append(row)
        data[demos_label] = result
    return rows, data


def _failures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Failures by kind, and the first few reasons, to see which rule the plans broke."""
    counts: dict[str, Any] = {}
    reasons: list[str] = []
    for o in outcomes:
        if o.failure is not None:
            counts[o.failure] = counts.get(o.failure, 0) + 1
            if len(reasons) < _REASONS_KEPT:
                reasons.append(o.reason[:300])
    if reasons:
        counts["reasons"] = reasons
    return counts


def _demo_selectors(kinds: Sequence[str]) -> dict[str, DemoSelector]:
    selectors: dict[str, DemoSelector] = {}
    if "fixed" in kinds:
        selectors["fixed"] = FixedDemos()
    if "retrieval" in kinds or "mixed" in kinds:
        from agent.demos import EmbeddingDemoSelector
        from app.runtime import MIXED_HEAD

        if "retrieval" in kinds:
            selectors["retrieval"] = EmbeddingDemoSelector()
        if "mixed" in kinds:
            selectors["mixed"] = EmbeddingDemoSelector(head=MIXED_HEAD)
    return selectors


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--taskbench-dir",
        type=Path,
        default=DEFAULT_TASKBENCH,
        help="TaskBench notes and data (default: %(default)s)",
    )
    parser.add_argument(
        "--llm",
        action="append",
        choices=("oracle", "openai", "embedded"),
        help="controllers to run (repeatable); default: oracle, openai when OPENAI_BASE_URL is set, embedded",
    )
    parser.add_argument(
        "--validity",
        type=int,
        choices=range(VALIDITY_FULL + 1),
        metavar=f"0..{VALIDITY_FULL}",
        help=f"validity requests per LLM (default {VALIDITY_FULL}, embedded {VALIDITY_EMBEDDED})",
    )
    parser.add_argument("--records", type=int, help="gold records to plan (default all 44)")
    parser.add_argument(
        "--demos",
        choices=DEMO_CHOICES,
        default="both",
        help="demonstrations to plan with: the fixed set, retrieval-chosen ones, or both (default)",
    )
    parser.add_argument(
        "--model", help="embedded LLMs whose label contains this text only (e.g. SmolLM2, Qwen)"
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the other LLMs' rows of the existing result (a long run can be done one LLM at a time)",
    )


def _retrieval_available() -> bool:
    try:
        import agent.demos  # noqa: F401
    except ImportError:
        return False
    return True


async def run(
    smoke: bool,
    taskbench_dir: Path = DEFAULT_TASKBENCH,
    llms: Sequence[str] | None = None,
    validity: int | None = None,
    records: int | None = None,
    demos_kind: str = "both",
    model: str | None = None,
) -> Result:
    tb = TaskBench.load(taskbench_dir)
    check_no_overlap(bank_texts(), taskbench_texts(tb))
    # Smoke runs use only the fakes: no developer settings may leak in.
    settings = Settings() if smoke else Settings.load(dotenv=REPO_ROOT / ".env")
    if llms is None:
        llms = (
            ["oracle"] if smoke else ["oracle", *(["openai"] if settings.openai_base_url else []), "embedded"]
        )
    records = records if records is not None else (6 if smoke else len(tb.gold))
    ids = list(tb.requests)
    sample = [tb.requests[i] for i in random.Random(VALIDITY_SEED).sample(ids, VALIDITY_FULL)]
    kinds = ["fixed", "retrieval"] if demos_kind == "both" else [demos_kind]
    # Smoke runs skip retrieval: loading the sentence encoder alone takes longer than the rest.
    if smoke or not _retrieval_available():
        if kinds in (["retrieval"], ["mixed"]):
            raise SystemExit(
                f"--demos {kinds[0]}: the sentence encoder is not installed (or this is a smoke run)"
            )
        kinds = ["fixed"]
    demos = _demo_selectors(kinds)
    validity_demos = kinds[-1]  # retrieval when both run: what the planner uses by default
    rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    notes: list[str] = []
    controllers: list[AbstractAsyncContextManager[Controller]] = []
    for name in llms:
        if name == "oracle":
            # The oracle only knows the gold plans; in smoke mode it still takes the validity sample, so
            # that code path runs.
            controllers.append(_oracle(tb, (5 if validity is None else validity) if smoke else 0))
        elif name == "openai":
            controllers.append(_server(settings, validity if validity is not None else VALIDITY_FULL))
        else:
            found = [m for m in embedded_models() if model is None or model.lower() in m.label.lower()]
            if not found:
                notes.append(
                    "embedded LLM not run: llama-cpp-python or the GGUF weights"
                    + (f" matching {model!r}" if model else "")
                    + " are not installed"
                )
            controllers += [
                _embedded(m, validity if validity is not None else VALIDITY_EMBEDDED) for m in found
            ]
    for opened in controllers:
        async with opened as controller:
            got_rows, got = await _evaluate(controller, demos, tb, records, sample, validity_demos)
        rows += got_rows
        data[controller.label] = got
        notes += [
            f"{controller.label}, {demos_label} demonstrations: {got[demos_label]['seconds_total']:.0f} s for "
            f"{records} records"
            + (
                f", {got[demos_label]['validity']['seconds_total']:.0f} s for {got[demos_label]['validity']['requests']} "
                "validity requests"
                if "validity" in got[demos_label]
                else ""
            )
            for demos_label in got
        ]
    return _result(smoke, rows, data, notes, records)


def _result(
    smoke: bool, rows: list[list[Any]], data: dict[str, Any], notes: list[str], records: int
) -> Result:
    parts = [f"{r[0]} ({r[1]} demos): n-F1 {r[4]}, e-F1 {r[5]}, v-F1 {r[7]}" for r in rows]
    embedded = [r for r in rows if str(r[0]).startswith("embedded ")]
    target = Target(
        f"embedded-LLM node F1 on {records} TaskBench records",
        "measured (no threshold)",
        "; ".join(f"{str(r[0]).removeprefix('embedded ')} ({r[1]}): {r[4]}" for r in embedded) or "–",
        True if embedded else None,
    )
    rows = list(rows)
    for llm_name, n_f1, e_f1, t_f1, v_f1 in PUBLISHED:
        rows.append(
            [f"{llm_name} (published)", "TaskBench's", 7546, None, n_f1, e_f1, t_f1, v_f1, None, None]
        )
    summary = "planning on " + f"{records} TaskBench records: " + "; ".join(parts)
    notes = [
        *notes,
        f"{records} gold records ({GOLD_NOTE}); requests are TaskBench's user_request texts. Every task "
        "type is plannable (as with Hugging Face configured); demonstrations from the whole bank.",
        "Missing or failed plans are scored as empty plans (upstream drops them); coverage is the share of "
        "requests that got a valid plan.",
        f"Validity: share of a fixed random sample (seed {VALIDITY_SEED}) of the user requests whose plan "
        "parses and validates (one retry allowed), with the demonstrations of its row (retrieval when the LLM "
        "ran with both).",
        "Published rows: TaskBench leaderboard (full 7,546-sample set, Dec-2023 data): context only, not "
        "comparable with the gold sample above.",
    ]
    return Result(
        name=NAME,
        title="Planning quality on TaskBench (Hugging Face tools)",
        smoke=smoke,
        headers=[
            "LLM",
            "demos",
            "records",
            "coverage",
            "n-F1",
            "e-F1",
            "t-F1",
            "v-F1",
            "s/request",
            "validity",
        ],
        rows=rows,
        summary=summary,
        data={"controllers": data, "records": records},
        notes=notes,
        targets=[target],
    )


def merge(previous: dict[str, Any], new: Result) -> Result:
    """``new`` plus the rows, figures and notes (per LLM and demonstration set) only ``previous`` (an
    emitted result) measured: a run with one set of demonstrations keeps the other set's row."""
    if previous.get("mode") != ("smoke" if new.smoke else "full"):
        raise SystemExit("--add: the existing result is from a different mode (smoke or full)")
    if previous["data"]["records"] != new.data["records"]:
        raise SystemExit(
            f"--add: the existing result planned {previous['data']['records']} records, not {new.data['records']}"
        )
    fresh = {(label, demos) for label, got in new.data["controllers"].items() for demos in got}
    controllers: dict[str, dict[str, Any]] = {}
    for label, got in previous["data"]["controllers"].items():
        for demos, figures in got.items():
            if (label, demos) not in fresh:
                controllers.setdefault(label, {})[demos] = figures
    kept = {(label, demos) for label, got in controllers.items() for demos in got}
    for label, got in new.data["controllers"].items():
        controllers.setdefault(label, {}).update(got)

    def measured(pairs: set[tuple[str, str]], note: str) -> bool:
        return any(note.startswith(f"{label}, {demos} demonstrations") for label, demos in pairs)

    rows = [r for r in previous["rows"] if (r[0], r[1]) in kept] + [
        r for r in new.rows if (r[0], r[1]) in fresh
    ]
    order = list(dict.fromkeys(r[0] for r in [*previous["rows"], *new.rows]))
    rows.sort(key=lambda r: (order.index(r[0]), r[1]))
    notes = [n for n in previous["notes"] if measured(kept, n)] + [n for n in new.notes if measured(fresh, n)]
    return _result(new.smoke, rows, controllers, notes, new.data["records"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(NAME, __doc__, argv, _add_options)
    ns = args.extra
    result = asyncio.run(
        run(
            args.smoke,
            ns.taskbench_dir,
            ns.llm,
            ns.validity,
            ns.records,
            demos_kind=ns.demos,
            model=ns.model,
        )
    )
    previous = args.out / f"{NAME}.json"
    if ns.add and previous.is_file():
        result = merge(json.loads(previous.read_text(encoding="utf-8")), result)
    result.emit(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
