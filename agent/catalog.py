"""The model catalog: which models can do each task, ranked by downloads.

The bundled catalog (``agent/data/catalog.jsonl``) is derived from the HuggingGPT paper's model list
(microsoft/JARVIS ``p0_models.jsonl``, MIT, Copyright (c) Microsoft Corporation; see
``agent/data/CATALOG_LICENSE.txt``) by ``scripts/build_catalog.py``. ``hugginggpt catalog refresh`` rebuilds
it from the Hub into ``{data_dir}/catalog.jsonl``, which then wins over the bundled one (``catalog_refresh``:
only that module talks to the Hub, so the index loads without huggingface_hub).
Local backends and the LLM add their own entries (ids ``local/...`` and ``llm/...``) at start-up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .tasks import CONTROLNET_CONDITIONS, TASKS

__all__ = ["BUNDLED_CATALOG", "PIPELINE_TASKS", "Catalog", "ModelInfo"]

log = logging.getLogger(__name__)

BUNDLED_CATALOG = "catalog.jsonl"


def _is_pipeline_task(name: str) -> bool:
    base = name.removesuffix("-control").removesuffix("-text-to-image")
    return base == name or base not in CONTROLNET_CONDITIONS


# Tasks that are Hugging Face pipeline tags (the paper's 24); the ControlNet tasks have none on the Hub.
PIPELINE_TASKS: tuple[str, ...] = tuple(name for name in TASKS if _is_pipeline_task(name))


@dataclass(frozen=True)
class ModelInfo:
    id: str
    task: str
    downloads: int = 0
    likes: int = 0
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    # From the Hub refresh: "warm" (served by at least one inference provider), "cold" (the Hub listed no
    # provider); empty when unknown (the bundled catalog predates Inference Providers).
    inference: str = ""
    # Inference providers serving the model live ("hf-inference", "fal-ai", ...), from the Hub refresh.
    providers: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        d["providers"] = list(self.providers)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(
            id=str(d["id"]),
            task=str(d["task"]),
            downloads=int(d.get("downloads") or 0),
            likes=int(d.get("likes") or 0),
            description=str(d.get("description") or ""),
            tags=tuple(str(t) for t in d.get("tags") or ()),
            inference=str(d.get("inference") or ""),
            providers=tuple(str(p) for p in d.get("providers") or ()),
        )


class Catalog:
    """An immutable set of models, indexed by task and by id.

    An entry is a (task, model) pair: one model may serve several tasks (the controller LLM does).
    """

    def __init__(self, models: Iterable[ModelInfo]) -> None:
        self._entries: dict[tuple[str, str], ModelInfo] = {}
        for m in models:
            self._entries[(m.task, m.id)] = m
        self._by_id: dict[str, ModelInfo] = {}
        self._by_task: dict[str, list[ModelInfo]] = {}
        for m in self._entries.values():
            self._by_id.setdefault(m.id, m)
            self._by_task.setdefault(m.task, []).append(m)
        for ranked in self._by_task.values():
            ranked.sort(key=lambda m: (-m.downloads, m.id))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self._entries.values())

    def get(self, model_id: str) -> ModelInfo | None:
        return self._by_id.get(model_id)

    def tasks(self) -> list[str]:
        return sorted(self._by_task)

    def by_task(self, task: str) -> list[ModelInfo]:
        """Models of ``task``, most downloaded first."""
        return list(self._by_task.get(task, ()))

    def candidates(self, task: str, available: Callable[[ModelInfo], bool]) -> list[ModelInfo]:
        """Models of ``task``: those that can run here first, each group most downloaded first."""
        ranked = self.by_task(task)
        return [m for m in ranked if available(m)] + [m for m in ranked if not available(m)]

    def with_models(self, extra: Iterable[ModelInfo]) -> Catalog:
        return Catalog([*self._entries.values(), *extra])

    @classmethod
    def load(cls, path: Path) -> Catalog:
        with path.open(encoding="utf-8") as f:
            return cls(ModelInfo.from_json(json.loads(line)) for line in f if line.strip())

    def save(self, path: Path) -> None:
        """Write as JSON lines sorted by task then rank, atomically (temp file + rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for task in self.tasks():
                for m in self.by_task(task):
                    f.write(json.dumps(m.to_json(), ensure_ascii=False) + "\n")
        tmp.replace(path)

    @classmethod
    def bundled(cls) -> Catalog:
        return _bundled()

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> Catalog:
        """The catalog refreshed into ``data_dir`` if there is a readable one, else the bundled one."""
        path = data_dir / BUNDLED_CATALOG
        if not path.is_file():
            return _bundled()
        try:
            return cls.load(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("cannot read the refreshed catalog %s (%s); using the bundled one", path, err)
            return _bundled()


@cache
def _bundled() -> Catalog:
    path = resources.files("agent") / "data" / BUNDLED_CATALOG
    with resources.as_file(path) as p:
        return Catalog.load(p)
