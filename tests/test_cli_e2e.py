"""End to end through the real command: ``hugginggpt ask --json`` in a subprocess, the real ``AsyncOpenAI`` and
``AsyncInferenceClient`` talking over 127.0.0.1 to the scripted LLM and the Hugging Face fake."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.catalog import Catalog
from tests.fakes.hf_server import Fault, png_bytes
from tests.fakes.hf_server import start_in_thread as start_hf
from tests.fakes.llm_server import start_in_thread as start_llm

CAPTION = "a red square on a grey background"
TASKS = ("image-to-text", "object-detection", "text-to-speech")


def _stage(body: dict[str, Any]) -> str:
    system = str(body["messages"][0]["content"])
    for marker, stage in (("planner", "plan"), ("model selector", "select")):
        if f"You are the {marker}" in system:
            return stage
    return "respond"


def _models(task: str) -> list[str]:
    return [m.id for m in Catalog.bundled().by_task(task)]


@pytest.fixture
def hf() -> Iterator[Any]:
    tasks = {model: task for task in TASKS for model in _models(task)}
    running = start_hf(tasks)
    # The captioner answers after a pause, so the detector (independent) must run while it waits.
    for model in _models("image-to-text"):
        running.server.script(model, Fault.slow(0.5))
    for model in _models("object-detection"):
        running.server.script(model, Fault.slow(0.5))
    yield running
    running.stop()


def _calls(hf: Any, model: str) -> list[Any]:
    return [r for r in hf.server.requests if r.model == model]


def _ask(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "ask", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=180,
    )


def _env(tmp_path: Path, llm_url: str, hf_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OPENAI_BASE_URL=llm_url, OPENAI_API_KEY="sk-test-e2e", LLM_MODEL="fake-model",
        HF_TOKEN="hf_test_e2e", HF_INFERENCE_BASE_URL=hf_url, HUGGINGGPT_DEMOS="fixed", HUGGINGGPT_DATA_DIR=str(tmp_path / "data"),
    )
    return env


DAG = {"tasks": [
    {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
    {"id": 1, "task": "object-detection", "dep": [], "args": {"image": "img-1.png"}},
    {"id": 2, "task": "text-to-speech", "dep": [0], "args": {"text": "<GENERATED>-0"}},
]}


def test_three_task_dag_runs_with_resource_flow_and_concurrency(tmp_path: Path, hf: Any) -> None:
    chosen = _models("image-to-text")[1]

    def script(body: dict[str, Any]) -> str:
        stage = _stage(body)
        if stage == "plan":
            return json.dumps(DAG)
        if stage == "select":
            return json.dumps({"choices": [
                {"task_id": 0, "id": chosen, "reason": "good captions"},
                {"task_id": 1, "id": "made-up/detector", "reason": "invented"},
            ]})
        return f"The picture shows {CAPTION}. I also boxed the objects and read the caption aloud."

    llm = start_llm(script)
    try:
        image = tmp_path / "photo.png"
        image.write_bytes(png_bytes())
        proc = _ask(["describe this picture, box the objects and read the description aloud",
                     "--attach", str(image), "--json"], _env(tmp_path, llm.base_url, hf.base_url), tmp_path)
    finally:
        llm.stop()
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert trace["status"] == "ok"
    assert [t["task"] for t in trace["plan"]] == list(TASKS)
    assert trace["plan"][2]["dep"] == [0]
    by_id = {t["id"]: t for t in trace["tasks"]}
    assert all(t["status"] == "ok" and t["error"] is None for t in by_id.values())
    assert by_id[0]["model"] == chosen
    # The invented id was rejected: the top-ranked detector ran instead.
    assert by_id[1]["model"] == _models("object-detection")[0]
    assert by_id[0]["output"]["text"] == CAPTION
    names = sorted(Path(f).name for f in trace["files"])
    assert names == ["out-1-1.png", "out-1-2.wav"]
    assert all(Path(f).is_file() and Path(f).stat().st_size > 0 for f in trace["files"])
    assert trace["llm"]["calls"] == 3 and trace["llm"]["prompt_tokens"] > 0
    assert CAPTION in trace["answer"]
    # Resource flow: the speech model was sent the caption; the vision models were sent the image bytes.
    (tts,) = _calls(hf, by_id[2]["model"])
    assert CAPTION in tts.body.decode()
    (caption_call,) = _calls(hf, chosen)
    (detect_call,) = _calls(hf, by_id[1]["model"])
    assert caption_call.body == detect_call.body == png_bytes()
    # Independent tasks overlapped; the dependent one started after its dependency ended.
    assert detect_call.start < caption_call.end and caption_call.start < detect_call.end
    assert tts.start >= caption_call.end


def test_second_process_continues_the_conversation(tmp_path: Path, hf: Any) -> None:
    planner_prompts: list[str] = []

    def script(body: dict[str, Any]) -> str:
        stage = _stage(body)
        if stage == "plan":
            prompt = json.dumps(body["messages"])
            planner_prompts.append(prompt)
            if len(planner_prompts) == 1:
                return json.dumps({"tasks": [DAG["tasks"][1]]})
            return json.dumps({"tasks": [{"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "out-1-1.png"}}]})
        if stage == "select":
            return json.dumps({"choices": []})
        return "Done."

    llm = start_llm(script)
    env = _env(tmp_path, llm.base_url, hf.base_url)
    try:
        image = tmp_path / "photo.png"
        image.write_bytes(png_bytes())
        first = _ask(["box the objects", "--attach", str(image), "--json"], env, tmp_path)
        assert first.returncode == 0, first.stderr
        conversation = json.loads(first.stdout)["conversation"]
        second = _ask(["now describe the image you just made", "--conversation", conversation, "--json"], env, tmp_path)
    finally:
        llm.stop()
    assert second.returncode == 0, second.stderr
    trace = json.loads(second.stdout)
    assert trace["conversation"] == conversation and trace["status"] == "ok"
    # The second planner saw the first turn: its request and the file it produced.
    assert "box the objects" in planner_prompts[1] and "out-1-1.png" in planner_prompts[1]
    (call,) = [r for r in hf.server.requests if r.model == trace["tasks"][0]["model"]]
    detected = [r for r in hf.server.requests if r.model == _models("object-detection")[0]]
    assert call.body != detected[0].body  # the annotated output went in, not the original upload


def test_llm_garbage_fails_clearly_and_is_recorded(tmp_path: Path) -> None:
    llm = start_llm(lambda body: "I would love to help! Here is my plan: first, look. Then, think.")
    try:
        proc = _ask(["describe img-9.png", "--json"], _env(tmp_path, llm.base_url, "http://127.0.0.1:9"), tmp_path)
    finally:
        llm.stop()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    trace = json.loads(proc.stdout)
    assert trace["status"] == "failed" and trace["tasks"] == []
    assert trace["answer"] and len(trace["answer"]) < 400
    assert trace["llm"]["calls"] == 2  # the plan and one re-prompt, then a clear failure
    db = sqlite3.connect(tmp_path / "data" / "hugginggpt.db")
    (status, error), = db.execute("SELECT status, error FROM runs WHERE id = ?", (trace["run_id"],))
    assert status == "failed" and error == trace["answer"]
    assert "sk-test-e2e" not in proc.stdout + proc.stderr


def test_dry_run_plans_without_running(tmp_path: Path, hf: Any) -> None:
    def script(body: dict[str, Any]) -> str:
        return json.dumps(DAG) if _stage(body) == "plan" else json.dumps({"choices": []})

    llm = start_llm(script)
    try:
        image = tmp_path / "photo.png"
        image.write_bytes(png_bytes())
        proc = _ask(["describe and read aloud", "--attach", str(image), "--json", "--dry-run"],
                    _env(tmp_path, llm.base_url, hf.base_url), tmp_path)
    finally:
        llm.stop()
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)
    assert [t["status"] for t in trace["tasks"]] == ["skipped"] * 3
    assert [t["model"] for t in trace["tasks"]] == [_models(task)[0] for task in TASKS]
    assert trace["files"] == [] and hf.server.requests == []
    assert "image-to-text" in trace["answer"]


HOSTILE = (
    "Done.\x1b]0;pwned-title\x07\x1b[2J\x1b[H"  # retitle the window, clear the screen
    "\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07"  # OSC 52: write the clipboard
    "\roverwritten\x9b31m red\u202eevil"  # carriage return, 8-bit CSI, a right-to-left override
)


def test_escape_sequences_in_model_text_are_shown_not_obeyed_by_the_terminal(tmp_path: Path) -> None:
    """Model output once reached the terminal raw: it could retitle it, clear it, write the clipboard."""

    def script(body: dict[str, Any]) -> str:
        return '{"tasks": []}' if _stage(body) == "plan" else HOSTILE

    llm = start_llm(script)
    try:
        proc = _ask(["hello"], _env(tmp_path, llm.base_url, "http://127.0.0.1:9"), tmp_path)
    finally:
        llm.stop()
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout + proc.stderr
    assert not any(c in printed for c in "\x1b\x07\r\x9b\u202e")
    assert "Done.^[]0;pwned-title^G^[[2J" in proc.stdout
    assert "^Moverwritten<U+009B>31m red<U+202E>evil" in proc.stdout
