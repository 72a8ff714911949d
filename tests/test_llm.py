"""The controller LLM client, as it runs in production: real openai.AsyncOpenAI over HTTP to a scripted server."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.backends import TaskInput, TaskIO
from agent.backends.llm_tasks import LLMTaskBackend, llm_models, task_instructions
from agent.catalog import ModelInfo
from agent.errors import LLMError, LLMTimeoutError, ModelError, ModelTimeoutError
from agent.events import LLMUsage
from agent.llm import MAX_RETRY_WAIT, OpenAILLM, estimate_message_tokens, estimate_tokens
from agent.plan import PlannedTask
from agent.resources import Resource
from agent.settings import Settings
from agent.tasks import LLM_TASKS, TASKS
from tests.fakes.llm_server import FakeLLMServer, Reply, completion_tokens, prompt_tokens, start_in_thread

KEY = "sk-test-very-secret-key"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
SCHEMA = {"type": "object", "properties": {"tasks": {"type": "array"}}, "required": ["tasks"]}
EXACT = {**SCHEMA, "properties": {"tasks": {"type": "array", "prefixItems": [{"const": 1}], "items": False}}}


def make_llm(base_url: str, *, timeout: float = 10.0, max_retries: int = 0, **kw: object) -> OpenAILLM:
    settings = Settings(
        openai_base_url=base_url, openai_api_key=KEY, llm_model="test-model", llm_timeout=timeout
    )
    return OpenAILLM(settings, max_retries=max_retries, **kw)  # type: ignore[arg-type]


async def test_complete_returns_text_and_counts_the_servers_usage() -> None:
    async with FakeLLMServer(["Hello there!"]) as server:
        usage = LLMUsage()
        text = await make_llm(server.base_url).complete(MESSAGES, usage=usage, max_tokens=50)
    assert text == "Hello there!"
    assert usage.to_json() == {
        "calls": 1,
        "prompt_tokens": prompt_tokens(MESSAGES),
        "completion_tokens": completion_tokens("Hello there!"),
    }
    sent = server.requests[0]
    assert sent["model"] == "test-model"
    assert sent["messages"] == MESSAGES
    assert sent["max_tokens"] == 50
    assert "response_format" not in sent


async def test_usage_is_estimated_when_the_server_reports_none() -> None:
    async with FakeLLMServer([Reply(text="x" * 40, send_usage=False)]) as server:
        usage = LLMUsage()
        await make_llm(server.base_url).complete(MESSAGES, usage=usage)
    assert usage.to_json() == {
        "calls": 1,
        "prompt_tokens": estimate_message_tokens(MESSAGES),
        "completion_tokens": 10,
    }


async def test_json_schema_mode_is_used_when_the_server_accepts_it() -> None:
    async with FakeLLMServer(['{"tasks": []}', '{"tasks": []}']) as server:
        llm = make_llm(server.base_url)
        assert await llm.complete_json(MESSAGES, schema=SCHEMA, usage=LLMUsage()) == '{"tasks": []}'
        await llm.complete_json(MESSAGES, schema=SCHEMA, usage=LLMUsage())
    formats = [r["response_format"] for r in server.requests]
    assert formats[0] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": False},
    }
    assert formats[1] == formats[0]
    assert llm.json_mode == "json_schema"


@pytest.mark.parametrize("status", [400, 422, 500])
async def test_json_falls_back_to_llama_cpp_schema_mode_and_remembers_it(status: int) -> None:
    """llama.cpp compiles the schema into a grammar, so it gets the exact schema; OpenAI's mode does not.

    Servers refuse a format with 400, 422 or (llama-cpp-python's server) 500 naming ``response_format``.
    """
    async with FakeLLMServer(
        ['{"tasks": []}', '{"tasks": [1]}'], reject_formats={"json_schema"}, reject_status=status
    ) as server:
        llm = make_llm(server.base_url)
        usage = LLMUsage()
        reply = await llm.complete_json(MESSAGES, schema=SCHEMA, exact_schema=lambda: EXACT, usage=usage)
        assert reply == '{"tasks": []}'
        assert await llm.complete_json(MESSAGES, schema=SCHEMA, usage=usage) == '{"tasks": [1]}'
    types = [r["response_format"]["type"] for r in server.requests]
    assert types == ["json_schema", "json_object", "json_object"]  # the refused mode is not tried again
    assert server.requests[0]["response_format"]["json_schema"]["schema"] == SCHEMA
    assert server.requests[1]["response_format"]["schema"] == EXACT
    assert server.requests[2]["response_format"]["schema"] == SCHEMA
    assert llm.json_mode == "json_object_schema"
    assert usage.calls == 2  # refused attempts are not counted as calls


async def test_json_falls_back_to_a_prompted_schema_when_no_mode_is_accepted() -> None:
    async with FakeLLMServer(['{"tasks": []}'], reject_formats={"json_schema", "json_object"}) as server:
        llm = make_llm(server.base_url)
        await llm.complete_json(MESSAGES, schema=SCHEMA, exact_schema=lambda: EXACT, usage=LLMUsage())
    last = server.requests[-1]
    assert len(server.requests) == 3
    assert "response_format" not in last
    assert last["messages"][0]["content"].startswith("You are terse.")
    assert json.dumps(SCHEMA, separators=(",", ":")) in last["messages"][0]["content"]
    assert "prefixItems" not in last["messages"][0]["content"]  # a prompt gets the short schema
    assert llm.json_mode == "prompt"


async def test_a_server_error_during_json_mode_discovery_is_an_error_not_a_refusal() -> None:
    async with FakeLLMServer([Reply.error(500, "CUDA out of memory")]) as server:
        llm = make_llm(server.base_url)
        with pytest.raises(LLMError, match="HTTP 500: CUDA out of memory"):
            await llm.complete_json(MESSAGES, schema=SCHEMA, usage=LLMUsage())
    assert [r["response_format"]["type"] for r in server.requests] == ["json_schema"]
    assert llm.json_mode is None


async def test_forced_json_mode_skips_discovery() -> None:
    async with FakeLLMServer(["{}"]) as server:
        llm = make_llm(server.base_url, json_mode="json_object_schema")
        await llm.complete_json(MESSAGES, schema=SCHEMA, usage=LLMUsage())
    assert [r["response_format"]["type"] for r in server.requests] == ["json_object"]


def test_openai_itself_gets_json_schema_without_discovery() -> None:
    llm = OpenAILLM(Settings(openai_api_key=KEY))
    assert llm.json_mode == "json_schema"
    assert llm.host == "api.openai.com"
    assert make_llm("http://127.0.0.1:9/v1").json_mode is None


async def test_credentials_in_the_base_url_never_reach_a_message() -> None:
    async with FakeLLMServer([]) as server:
        url = server.base_url.replace("http://", "http://admin:hunter2@")
    with pytest.raises(LLMError) as caught:
        await make_llm(url).complete(MESSAGES, usage=LLMUsage())
    assert "hunter2" not in str(caught.value) and "127.0.0.1:" in str(caught.value)


async def test_a_server_error_in_json_mode_is_not_mistaken_for_a_refused_mode() -> None:
    async with FakeLLMServer([Reply.error(500, "model crashed")]) as server:
        with pytest.raises(LLMError, match="HTTP 500: model crashed"):
            await make_llm(server.base_url).complete_json(MESSAGES, schema=SCHEMA, usage=LLMUsage())
    assert len(server.requests) == 1


async def test_a_400_on_the_last_mode_is_an_llm_error() -> None:
    async with FakeLLMServer([Reply.error(400, "context too long")]) as server:
        llm = make_llm(server.base_url, json_mode="prompt")
        with pytest.raises(LLMError, match="HTTP 400: context too long"):
            await llm.complete_json(MESSAGES, schema=SCHEMA, usage=LLMUsage())


async def test_rate_limit_with_retry_after_is_retried() -> None:
    async with FakeLLMServer([Reply.error(429, headers={"Retry-After": "0"}), "ok"]) as server:
        usage = LLMUsage()
        assert await make_llm(server.base_url, max_retries=2).complete(MESSAGES, usage=usage) == "ok"
    assert len(server.requests) == 2
    assert usage.calls == 1


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply.error(401, f"bad key {KEY}"), "refused the API key (HTTP 401); check OPENAI_API_KEY"),
        (Reply.error(404, "no such model"), "check LLM_MODEL (test-model)"),
        (Reply.error(429, "slow down"), "rate limiting"),
        (Reply.error(503, f"overloaded, key={KEY}"), "HTTP 503: overloaded, key=***"),
        (Reply.error(500, "x" * 5000), "HTTP 500: xxx"),
        (Reply.invalid_json(), "could not be read"),
    ],
)
async def test_errors_are_short_and_never_show_the_key(reply: Reply, expected: str) -> None:
    async with FakeLLMServer([reply]) as server:
        with pytest.raises(LLMError) as caught:
            await make_llm(server.base_url).complete(MESSAGES, usage=LLMUsage())
    message = str(caught.value)
    assert expected in message
    assert KEY not in message
    assert server.base_url.split("//")[1].split("/")[0] in message
    assert len(message) < 300


async def test_unreachable_server() -> None:
    async with FakeLLMServer([]) as server:
        url = server.base_url
    with pytest.raises(LLMError, match=r"cannot reach the LLM server at 127\.0\.0\.1"):
        await make_llm(url).complete(MESSAGES, usage=LLMUsage())


async def test_timeout_is_an_llm_timeout_error() -> None:
    async with FakeLLMServer([Reply(text="late", delay=30)]) as server:
        with pytest.raises(LLMTimeoutError, match=r"timed out after 0\.3s") as caught:
            await make_llm(server.base_url, timeout=0.3).complete(MESSAGES, usage=LLMUsage())
    assert isinstance(caught.value, TimeoutError)


async def test_stream_yields_chunks_and_counts_reported_usage() -> None:
    text = "The quick brown fox jumps over the lazy dog."
    async with FakeLLMServer([text]) as server:
        usage = LLMUsage()
        chunks = [c async for c in make_llm(server.base_url).stream(MESSAGES, usage=usage, max_tokens=99)]
    assert len(chunks) > 1
    assert "".join(chunks) == text
    assert server.requests[0]["stream"] is True
    assert server.requests[0]["stream_options"] == {"include_usage": True}
    assert usage.to_json() == {
        "calls": 1,
        "prompt_tokens": prompt_tokens(MESSAGES),
        "completion_tokens": completion_tokens(text),
    }


async def test_stream_usage_is_estimated_when_the_server_sends_none() -> None:
    text = "a" * 80
    async with FakeLLMServer([Reply(text=text, send_usage=False)]) as server:
        usage = LLMUsage()
        assert "".join([c async for c in make_llm(server.base_url).stream(MESSAGES, usage=usage)]) == text
    assert usage.to_json() == {
        "calls": 1,
        "prompt_tokens": estimate_message_tokens(MESSAGES),
        "completion_tokens": estimate_tokens(text),
    }


async def test_stream_cut_midway_raises_after_the_partial_text() -> None:
    async with FakeLLMServer([Reply(text="one two three four five", cut_after=2)]) as server:
        usage = LLMUsage()
        got: list[str] = []
        with pytest.raises(LLMError, match="midway"):
            async for chunk in make_llm(server.base_url).stream(MESSAGES, usage=usage):
                got.append(chunk)
    assert "".join(got) == "one two "
    assert usage.calls == 1


async def test_stream_that_ends_without_finishing_raises() -> None:
    async with FakeLLMServer([Reply(text="half an ans", finish_reason=None)]) as server:
        with pytest.raises(LLMError, match="stopped midway"):
            async for _ in make_llm(server.base_url).stream(MESSAGES, usage=LLMUsage()):
                pass


async def test_stream_error_before_any_text() -> None:
    async with FakeLLMServer([Reply.error(502, "bad gateway")]) as server:
        usage = LLMUsage()
        with pytest.raises(LLMError, match="HTTP 502"):
            async for _ in make_llm(server.base_url).stream(MESSAGES, usage=usage):
                pass
    assert usage.calls == 0


async def test_status_reports_reachability_without_raising() -> None:
    async with FakeLLMServer([]) as server:
        status = await make_llm(server.base_url).status()
        url = server.base_url
    assert status.live and "test-model" in status.detail
    down = await make_llm(url).status()
    assert not down.live and "cannot reach" in down.detail


def test_threaded_server_serves_a_blocking_caller() -> None:
    server = start_in_thread(["from a thread"])
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.stop()
    assert reply.choices[0].message.content == "from a thread"
    assert server.requests[0]["messages"][0]["content"] == "hi"


@given(st.text(max_size=500))
def test_estimate_tokens_is_about_four_characters(text: str) -> None:
    assert estimate_tokens(text) * 4 >= len(text) > (estimate_tokens(text) - 1) * 4


# --- the LLM as a backend for text tasks -------------------------------------------------------------------


async def _no_read(resource: Resource) -> bytes:
    raise AssertionError("text tasks read no files")


async def _no_save(data: bytes, mime: str) -> Resource:
    raise AssertionError("text tasks save no files")


def task_input(task: str, text: str) -> TaskInput:
    return TaskInput(TASKS[task], PlannedTask(0, task, (), {"text": text}), text={"text": text})


def test_llm_models_give_one_catalog_entry_per_llm_task() -> None:
    models = llm_models("gpt-x")
    assert {m.task for m in models} == set(LLM_TASKS)
    assert {m.id for m in models} == {"llm/gpt-x"}
    assert set(task_instructions()) == set(LLM_TASKS)


async def test_llm_backend_runs_a_text_task_with_its_instruction() -> None:
    async with FakeLLMServer(["  A short summary.\n"]) as server:
        backend = LLMTaskBackend(make_llm(server.base_url))
        model = llm_models("test-model")[0]
        assert backend.handles(model) and backend.available(model)
        assert not backend.handles(ModelInfo("facebook/bart-large-cnn", "summarization"))
        io = TaskIO(read=_no_read, save=_no_save, usage=LLMUsage())
        # The entry's own task does not matter: all LLM entries share one id, the input says what to do.
        out = await backend.run(model, task_input("summarization", "A long text."), io)
    assert out.text == "A short summary."
    assert io.usage.calls == 1
    assert server.requests[0]["messages"] == [
        {"role": "system", "content": task_instructions()["summarization"]},
        {"role": "user", "content": "A long text."},
    ]


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (Reply(text="late", delay=30), ModelTimeoutError, "timed out"),
        (Reply.error(500, "boom"), ModelError, "HTTP 500"),
        (Reply(text=" "), ModelError, "returned no text for translation"),
    ],
)
async def test_llm_backend_failures_are_model_errors(
    reply: Reply, error: type[Exception], message: str
) -> None:
    async with FakeLLMServer([reply]) as server:
        backend = LLMTaskBackend(make_llm(server.base_url, timeout=0.3))
        io = TaskIO(read=_no_read, save=_no_save, usage=LLMUsage())
        with pytest.raises(error, match=message):
            await backend.run(llm_models("m")[0], task_input("translation", "Translate: hi"), io)


async def test_llm_backend_status_is_the_llms() -> None:
    async with FakeLLMServer([]) as server:
        status = await LLMTaskBackend(make_llm(server.base_url)).status()
    assert status.name == "llm" and status.live


# --- bounds: time per attempt, retries, answer size, body size, redirects ---------------------------------------
# Each test has a harness limit (asyncio.timeout) so that a missing bound fails the test instead of hanging it.

HARNESS = 20.0


def bounded_llm(base_url: str, *, chars: int = 16_000, timeout: float = 10.0, **kw: Any) -> OpenAILLM:
    settings = Settings(
        openai_base_url=base_url,
        openai_api_key=KEY,
        llm_model="test-model",
        llm_timeout=timeout,
        llm_max_answer_chars=chars,
    )
    return OpenAILLM(settings, **kw)


async def _drain(llm: OpenAILLM, usage: LLMUsage | None = None) -> str:
    return "".join([c async for c in llm.stream(MESSAGES, usage=usage or LLMUsage())])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_trickled_answer_is_cut_at_llm_timeout(stream: bool) -> None:
    """16 bytes every 50 ms: each read is quick, so only a deadline on the whole attempt stops it."""
    async with FakeLLMServer([Reply(text="word " * 200, trickle=0.05)]) as server:
        llm = bounded_llm(server.base_url, timeout=0.5, max_retries=0)
        async with asyncio.timeout(HARNESS):
            with pytest.raises(LLMTimeoutError, match=r"timed out after 0\.5s"):
                await (_drain(llm) if stream else llm.complete(MESSAGES, usage=LLMUsage()))
        await llm.aclose()


async def test_sse_keepalives_hold_a_stream_no_longer_than_llm_timeout() -> None:
    async with FakeLLMServer([Reply(keepalive=0.05)]) as server:
        llm = bounded_llm(server.base_url, timeout=0.5, max_retries=0)
        usage = LLMUsage()
        async with asyncio.timeout(HARNESS):
            with pytest.raises(LLMTimeoutError, match=r"timed out after 0\.5s"):
                await _drain(llm, usage)
        await llm.aclose()
    assert len(server.requests) == 1  # a stream that has begun is not asked for again
    assert usage.calls == 1


async def test_each_attempt_has_its_own_deadline_and_the_attempts_are_counted() -> None:
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    async with FakeLLMServer(lambda body: Reply(text="late", trickle=0.05)) as server:
        llm = bounded_llm(server.base_url, timeout=0.3, max_retries=2, sleep=record)
        async with asyncio.timeout(HARNESS):
            with pytest.raises(LLMTimeoutError):
                await llm.complete(MESSAGES, usage=LLMUsage())
        await llm.aclose()
    assert len(server.requests) == 3 and waits == [0.5, 1.0]


@pytest.mark.parametrize(
    ("header", "waits"),
    [({"Retry-After": "3600"}, [30.0, 30.0]), ({"Retry-After": "2"}, [2.0, 2.0]), ({}, [0.5, 1.0])],
    ids=["huge Retry-After is capped", "Retry-After honoured", "back-off without one"],
)
async def test_retries_honour_retry_after_up_to_the_cap(header: dict[str, str], waits: list[float]) -> None:
    recorded: list[float] = []

    async def record(seconds: float) -> None:
        recorded.append(seconds)

    async with FakeLLMServer(lambda body: Reply.error(503, "busy", headers=header)) as server:
        llm = bounded_llm(server.base_url, max_retries=2, sleep=record)
        with pytest.raises(LLMError, match="HTTP 503"):
            await llm.complete(MESSAGES, usage=LLMUsage())
        await llm.aclose()
    assert len(server.requests) == 3
    assert [round(w) for w in recorded] == [round(w) for w in waits]
    assert max(recorded) <= MAX_RETRY_WAIT


async def test_an_endless_stream_is_cut_at_the_answer_cap_with_a_note(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeLLMServer([Reply(endless=True)]) as server:
        llm = bounded_llm(server.base_url, chars=2000)
        usage = LLMUsage()
        async with asyncio.timeout(HARNESS):
            answer = await _drain(llm, usage)
        await llm.aclose()
    body, _, note = answer.rpartition("\n\n")
    assert len(body) == 2000 and body.startswith("endless endless")
    assert note == "[answer cut here: it reached the limit of 2,000 characters]"
    assert "reached LLM_MAX_ANSWER_CHARS (2000)" in caplog.text
    assert usage.calls == 1 and usage.completion_tokens == 500  # estimated: the stream never reported any
    # The client stopped reading: the server got to write what the socket buffers hold, not more.
    assert server.bytes_sent < 16 << 20


async def test_a_long_plain_answer_is_cut_with_a_note() -> None:
    async with FakeLLMServer(["x" * 5000]) as server:
        llm = bounded_llm(server.base_url, chars=1000)
        answer = await llm.complete(MESSAGES, usage=LLMUsage())
        await llm.aclose()
    assert answer == "x" * 1000 + "\n\n[answer cut here: it reached the limit of 1,000 characters]"


async def test_an_endless_plain_body_is_refused_at_the_byte_cap() -> None:
    async with FakeLLMServer([Reply(endless=True)]) as server:
        llm = bounded_llm(server.base_url, chars=1000, max_retries=2)
        assert llm.max_body_bytes == 1 << 20  # the 1 MiB floor (256 bytes a character would be 250 KiB)
        async with asyncio.timeout(HARNESS):
            with pytest.raises(LLMError, match=r"sent a reply over the 1,048,576-byte limit; it was refused"):
                await llm.complete_json(MESSAGES, schema=SCHEMA, usage=LLMUsage())
        await llm.aclose()
    assert len(server.requests) == 1  # a refusal is not retried
    assert server.bytes_sent < 16 << 20


async def test_a_compressed_body_is_refused_unread() -> None:
    """5 MB of answer in 5 KB of gzip: counting the bytes on the wire would let it through, so it is refused."""
    completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 5_000_000}}]}
    bomb = gzip.compress(json.dumps(completion).encode())
    assert len(bomb) < 10_000
    async with FakeLLMServer([Reply(body=bomb, headers={"Content-Encoding": "gzip"})]) as server:
        llm = bounded_llm(server.base_url, chars=1000, max_retries=2)
        with pytest.raises(LLMError, match="could not be read"):
            await llm.complete(MESSAGES, usage=LLMUsage())
        await llm.aclose()
    assert len(server.requests) == 1
    assert server.headers[0]["Accept-Encoding"] == "identity"


async def test_a_redirect_to_another_server_is_refused_and_that_server_gets_nothing() -> None:
    async with FakeLLMServer(["from the other host"]) as other:
        target = f"{other.base_url.replace('127.0.0.1', 'admin:pw-in-target@127.0.0.1')}/chat/completions"
        async with FakeLLMServer([Reply.redirect(target)]) as server:
            llm = bounded_llm(server.base_url, max_retries=2)
            with pytest.raises(LLMError) as caught:
                await llm.complete(MESSAGES, usage=LLMUsage())
            await llm.aclose()
    message = str(caught.value)
    assert "redirected the request to another server, which is never followed" in message
    other_port = other.base_url.rsplit(":", 1)[1].split("/")[0]
    assert other_port not in message and "pw-in-target" not in message
    assert other.requests == [] and len(server.requests) == 1


async def test_a_redirect_within_the_server_is_followed_a_bounded_number_of_times() -> None:
    replies: list[str | Reply] = []
    async with FakeLLMServer(lambda body: replies.pop(0)) as server:
        here = f"{server.base_url}/chat/completions"
        replies += [Reply.redirect(here), "followed"]
        llm = bounded_llm(server.base_url)
        assert await llm.complete(MESSAGES, usage=LLMUsage()) == "followed"
        replies += [Reply.redirect(here)] * 10
        with pytest.raises(LLMError, match="redirected the request more than 3 times"):
            await llm.complete(MESSAGES, usage=LLMUsage())
        await llm.aclose()
    assert len(server.requests) == 2 + 4  # followed once; then the first request and 3 redirects
