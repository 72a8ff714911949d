"""The model catalog: which models can do each task, ranked by downloads.

The bundled catalog (``agent/data/catalog.jsonl``) is derived from the HuggingGPT paper's model list
(microsoft/JARVIS ``p0_models.jsonl``, MIT, Copyright (c) Microsoft Corporation; see
``agent/data/CATALOG_LICENSE.txt``). ``hugginggpt catalog refresh`` rebuilds it from the Hub.
Local backends and the LLM add their own entries (ids ``local/...`` and ``llm/...``) at start-up.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_CATALOG", "Catalog", "ModelInfo"]

BUNDLED_CATALOG = "catalog.jsonl"


@dataclass(frozen=True)
class ModelInfo:
    id: str
    task: str
    downloads: int = 0
    likes: int = 0
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    # Inference-provider status from the Hub refresh ("warm", ...); empty when unknown.
    inference: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
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
        )


class Catalog:
    """An immutable set of models, indexed by id and by task."""

    def __init__(self, models: Iterable[ModelInfo]) -> None:
        self._by_id: dict[str, ModelInfo] = {}
        for m in models:
            self._by_id[m.id] = m
        self._by_task: dict[str, list[ModelInfo]] = {}
        for m in self._by_id.values():
            self._by_task.setdefault(m.task, []).append(m)
        for ranked in self._by_task.values():
            ranked.sort(key=lambda m: (-m.downloads, m.id))

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_id.values())

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
        return Catalog([*self._by_id.values(), *extra])

    @classmethod
    def load(cls, path: Path) -> Catalog:
        with path.open(encoding="utf-8") as f:
            return cls(ModelInfo.from_json(json.loads(line)) for line in f if line.strip())

    def save(self, path: Path) -> None:
        """Write as JSON lines, atomically (temp file + rename)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for task in self.tasks():
                for m in self.by_task(task):
                    f.write(json.dumps(m.to_json(), ensure_ascii=False) + "\n")
        tmp.replace(path)

    @classmethod
    def bundled(cls) -> Catalog:
        return _bundled()


@cache
def _bundled() -> Catalog:
    path = resources.files("agent") / "data" / BUNDLED_CATALOG
    with resources.as_file(path) as p:
        return Catalog.load(p)
