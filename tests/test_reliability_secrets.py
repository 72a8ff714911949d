"""Secrets never leave where they belong: a whole terminal session at DEBUG level (``-v``), with known fake
token values and servers that echo them back in their errors, then every byte the session left is searched:
standard output and error, the database (with its WAL), stored and exported files, the messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.catalog import Catalog
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import Fault, RunningHF, png_bytes
from tests.fakes.hf_server import start_in_thread as start_hf
from tests.fakes.llm_server import Reply, ThreadedServer
from tests.fakes.llm_server import start_in_thread as start_llm
from tests.fakes.reliability import plan_json, stage

ROOT = Path(__file__).resolve().parent.parent

OPENAI_KEY = "sk-FAKE-secret-123"
HF_TOKEN = "hf_FAKEsecret456"
DISCORD_TOKEN = "MTFAKE.discord-secret.789"
SECRETS = (OPENAI_KEY, HF_TOKEN, DISCORD_TOKEN)
# Distinctive cores as well, so that a half-masked value counts as a leak too.
NEEDLES = (*SECRETS, "FAKE-secret", "FAKEsecret", "discord-secret")

CAPTIONERS = [m.id for m in Catalog.bundled().by_task("image-to-text")][:5]
DESCRIBE = plan_json(
    {"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
    {"id": 1, "task": "text-to-image", "dep": [], "args": {"text": "a cat"}},
)
AGAIN = plan_json({"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}})


def script(body: dict[str, Any]) -> str | Reply:
    """By request: a good run, a run whose models echo the HF token, a run whose LLM echoes its key."""
    request = body["messages"][-1]["content"].rsplit("Request:", 1)[-1]
    which = stage(body)
    if "hello again" in request or "one more" in request:
        # An LLM proxy that puts the caller's Authorization header into its error message.
        return Reply.error(500, f"invalid request from Authorization: Bearer {OPENAI_KEY}")
    if which == "plan":
        return DESCRIBE if "describe this photo" in request else AGAIN
    return f"Here you go. (request was {len(request)} characters)"


@pytest.fixture
def servers() -> Iterator[tuple[ThreadedServer, RunningHF]]:
    llm = start_llm(script)
    hf = start_hf(hf_tasks("image-to-text", "text-to-image"))
    # The first caption works; later, every captioner answers with an error that quotes the token.
    echo = Fault.error(500, f"token {HF_TOKEN} has no access to this model")
    hf.server.script(CAPTIONERS[0], Fault(), *[echo] * 5)
    for model in CAPTIONERS[1:]:
        hf.server.script(model, *[echo] * 5)
    yield llm, hf
    llm.stop()
    hf.stop()


def run_cli(args: list[str], env: dict[str, str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "-v", *args], env=env, cwd=cwd, input=stdin, capture_output=True,
        text=True, timeout=120,
    )


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [n for n in NEEDLES if n.encode() in data]


def test_a_whole_session_never_shows_a_secret(servers: tuple[ThreadedServer, RunningHF], tmp_path: Path) -> None:
    llm, hf = servers
    data_dir = tmp_path / "data"
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": OPENAI_KEY,
        "LLM_MODEL": "fake-model", "HF_TOKEN": HF_TOKEN, "HF_INFERENCE_BASE_URL": hf.base_url,
        "DISCORD_TOKEN": DISCORD_TOKEN, "HUGGINGGPT_DATA_DIR": str(data_dir),
        "HUGGINGGPT_MODEL_SELECTION": "downloads", "HUGGINGGPT_DEMOS": "fixed",
    }
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes())
    session = "\n".join([
        f"/attach {photo}",
        "describe this photo and draw a cat",  # runs fine
        "now describe it again",  # every model fails, quoting the HF token
        "hello again",  # the LLM fails, quoting the API key (a traceback is logged at DEBUG)
        "/quit",
    ]) + "\n"
    chat = run_cli(["chat", "--conversation", "sess1"], env, tmp_path, session)
    ask = run_cli(["ask", "one more", "--conversation", "sess1", "--json"], env, tmp_path)

    assert chat.returncode == 0, chat.stderr[-3000:]
    assert ask.returncode == 1
    # The session really went through the echoing paths, and the secrets were really in use.
    assert "file: " in chat.stdout and "out-1-1.png" in chat.stdout
    assert "HTTP 500: token *** has no access to this model" in chat.stderr  # a task's failure, as shown
    assert "Bearer ***" in chat.stdout  # the LLM's failure, as the answer
    assert "Traceback" in chat.stderr  # -v logs the LLM failure with its cause ...
    trace = json.loads(ask.stdout)
    assert trace["status"] == "failed" and "Authorization: Bearer ***" in trace["answer"]
    assert all(r.headers["Authorization"] == f"Bearer {HF_TOKEN}" for r in hf.server.requests)
    # ... and no secret is anywhere.
    for name, text in [("chat stdout", chat.stdout), ("chat stderr", chat.stderr),
                       ("ask stdout", ask.stdout), ("ask stderr", ask.stderr)]:
        assert leaks(text) == [], f"{name} leaks {leaks(text)}"
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "hugginggpt.db" for p in files) and any(p.suffix == ".png" for p in files)
    for path in files:  # the database, its WAL, stored files, exported outputs, session locks
        assert leaks(path.read_bytes()) == [], f"{path} leaks"
    # The LLM never received another service's token (its own key goes in its Authorization header).
    assert leaks(json.dumps(llm.requests)) == []


PROXY_PASSWORD = "proxy-Pa55-word-XYZ"
ENDPOINT_PASSWORD = "endpoint-Pa55-QRS"


def test_credentials_in_urls_and_pieces_of_tokens_are_never_shown(tmp_path: Path) -> None:
    """``user:password@`` in ``HF_INFERENCE_BASE_URL`` and in ``HUGGINGGPT_ENDPOINTS``, and a model server
    quoting the first 12 characters of the token: ``status``, ``ask --json`` (its ``backends``) and the log at
    DEBUG show none of them (fixed: the base URL was shown whole in ``/status``, ``hugginggpt status`` and
    every trace, and only whole secrets were redacted)."""
    llm = start_llm(lambda body: AGAIN if stage(body) == "plan" else "Here you go.")
    hf = start_hf(hf_tasks("image-to-text"))
    try:
        for model in CAPTIONERS:
            hf.server.script(model, Fault.error(403, f"token {HF_TOKEN[:12]} lacks access"))
        base = hf.base_url.replace("http://", f"http://proxyuser:{PROXY_PASSWORD}@")
        endpoints = tmp_path / "endpoints.json"
        endpoints.write_text(
            json.dumps({"acme/x": base.replace(PROXY_PASSWORD, ENDPOINT_PASSWORD) + "/endpoints/x"})
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": OPENAI_KEY,
            "LLM_MODEL": "fake-model",
            "HF_TOKEN": HF_TOKEN,
            "HF_INFERENCE_BASE_URL": base,
            "HUGGINGGPT_ENDPOINTS": str(endpoints),
            "HUGGINGGPT_DATA_DIR": str(tmp_path / "data"),
            "HUGGINGGPT_MODEL_SELECTION": "downloads",
            "HUGGINGGPT_DEMOS": "fixed",
        }
        photo = tmp_path / "photo.png"
        photo.write_bytes(png_bytes())
        status = run_cli(["status"], env, tmp_path)
        ask = run_cli(["ask", "describe it", "--attach", str(photo), "--json"], env, tmp_path)
    finally:
        llm.stop()
        hf.stop()
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"Hugging Face inference at {hf.base_url} (token set)" in status.stdout
    trace = json.loads(ask.stdout)
    assert trace["backends"]["hf"]["detail"].startswith(f"Hugging Face inference at {hf.base_url} ")
    [task] = trace["tasks"]
    assert task["status"] == "failed" and "HTTP 403: token *** lacks access" in task["error"]
    needles = (PROXY_PASSWORD, ENDPOINT_PASSWORD, HF_TOKEN[:10], HF_TOKEN[2:12])
    for name, text in [("status", status.stdout + status.stderr), ("ask", ask.stdout + ask.stderr)]:
        assert [n for n in needles if n in text] == [], name
