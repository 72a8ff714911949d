"""The model catalog: which models can do each task, ranked by downloads.

The bundled catalog (``agent/data/catalog.jsonl``) is derived from the HuggingGPT paper's model list
(microsoft/JARVIS ``p0_models.jsonl``, MIT, Copyright (c) Microsoft Corporation; see
``agent/data/CATALOG_LICENSE.txt``) by ``scripts/build_catalog.py``. ``hugginggpt catalog refresh`` rebuilds
it from the Hub into ``{data_dir}/catalog.jsonl``, which then wins over the bundled one.
Local backends and the LLM add their own entries (ids ``local/...`` and ``llm/...``) at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import ExpandModelProperty_T
from huggingface_hub.hf_api import ModelInfo as HubModel
from huggingface_hub.utils import build_hf_headers, get_session

from .errors import AgentError, ConfigurationError
from .http import bound_client, public_url
from .settings import Settings
from .tasks import CONTROLNET_CONDITIONS, TASKS
from .workers import ProcessWorker, WorkerCrashedError

__all__ = [
    "BUNDLED_CATALOG",
    "DESCRIPTION_CHARS",
    "PIPELINE_TASKS",
    "Catalog",
    "HubRefresh",
    "ModelInfo",
    "catalog_tags",
    "clip_description",
    "metadata_description",
    "refresh_catalog",
    "refresh_from_hub",
    "summarize_refresh",
]

log = logging.getLogger(__name__)

BUNDLED_CATALOG = "catalog.jsonl"
DESCRIPTION_CHARS = 200
MAX_TAGS = 12
# Seconds to wait for the Hub's first answer: huggingface_hub sets no timeout and retries for ~25 s.
_PROBE_TIMEOUT = 15.0
REFRESH_SECONDS = 600.0
"""Most a whole ``catalog refresh`` may take (about 50 listing requests; a minute is usual)."""
_HUB_READ_TIMEOUT = 30.0
_HUB_MAX_BODY_BYTES = 32 << 20  # a listing page of 30 models with their card data is well under 1 MB


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


# Hub tags that say nothing about what a model does (weight formats, Hub bookkeeping).
_NOISE_TAGS = frozenset(
    {
        "autotrain_compatible",
        "coreml",
        "custom_code",
        "endpoints_compatible",
        "eval-results",
        "generated_from_trainer",
        "gguf",
        "has_space",
        "jax",
        "model-index",
        "onnx",
        "openvino",
        "pytorch",
        "safetensors",
        "tensorboard",
        "text-generation-inference",
        "tf",
        "tflite",
    }
)
_NOISE_PREFIXES = ("arxiv:", "base_model:", "deploy:", "doi:", "endpoints_", "region:", "template:")


def _strings(value: Any) -> list[str]:
    """A metadata value (a string, a list, or junk) as a list of non-empty strings."""
    items = value if isinstance(value, list | tuple) else [value]
    return [str(v).strip() for v in items if isinstance(v, str | int | float) and str(v).strip()]


def _informative(tag: str, task: str) -> bool:
    return tag != task and tag.lower() not in _NOISE_TAGS and not tag.lower().startswith(_NOISE_PREFIXES)


def catalog_tags(card: Mapping[str, Any], hub_tags: Iterable[str] = (), *, task: str = "") -> tuple[str, ...]:
    """Tags worth showing the LLM, in the Hub's style: the card's own tags, languages, ``dataset:...``,
    ``license:...``, then the Hub's informative tags (libraries, ...); deduplicated, at most ``MAX_TAGS``."""
    tags = [
        *_strings(card.get("tags")),
        *_strings(card.get("language")),
        *(f"dataset:{d}" for d in _strings(card.get("datasets"))),
        *(f"license:{lic}" for lic in _strings(card.get("license"))),
        *_strings(list(hub_tags)),
    ]
    kept = [t for t in dict.fromkeys(tags) if _informative(t, task)]
    return tuple(kept[:MAX_TAGS])


def clip_description(text: str, limit: int = DESCRIPTION_CHARS) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, marked with an ellipsis if cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + "…"


def metadata_description(task: str, card: Mapping[str, Any], tags: Iterable[str] = ()) -> str:
    """A one-line description built from a model card's metadata, for models without usable card prose
    (the Hub listing carries no prose, and fetching every README would cost one request a model)."""
    parts = [f"{task} model"]
    if base := _strings(card.get("base_model")):
        parts.append(f"fine-tuned from {base[0]}")
    if datasets := _strings(card.get("datasets")):
        parts.append("trained on " + ", ".join(datasets[:3]))
    details = []
    if languages := list(dict.fromkeys(_strings(card.get("language")))):
        details.append("languages: " + ", ".join(languages[:6]))
    topics = [t for t in tags if ":" not in t and t not in languages]
    if topics:
        details.append("tags: " + ", ".join(topics[:6]))
    text = " ".join(parts)
    if details:
        text += " (" + "; ".join(details) + ")"
    return clip_description(text)


@dataclass(frozen=True)
class HubRefresh:
    """What a refresh produced: the new catalog and the tasks that kept their previous entries, with why."""

    catalog: Catalog
    failed: dict[str, str]
    endpoint: str


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` read now: huggingface_hub reads it once, at import."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or constants.ENDPOINT


def _probe(api: HfApi, token: str | None) -> None:
    """One quick request without retries, so an unreachable Hub fails in seconds, not minutes."""
    try:
        response = get_session().get(
            f"{api.endpoint}/api/models",
            params={"limit": 1},
            headers=build_hf_headers(token=token or api.token),
            timeout=_PROBE_TIMEOUT,
        )
    except (httpx2.RequestError, httpx2.InvalidURL, ConnectionError) as err:
        raise AgentError(
            f"could not reach the Hugging Face Hub at {public_url(api.endpoint)}: {err}"
        ) from err
    if response.status_code in (401, 403):
        raise ConfigurationError(
            f"the Hugging Face Hub at {public_url(api.endpoint)} refused the token (HTTP {response.status_code}): "
            "set a valid HF_TOKEN, or leave it empty"
        )


# What a listing returns per model (list_models' ``full`` would add files and config, unused here).
_EXPAND: list[ExpandModelProperty_T] = [
    "downloads",
    "likes",
    "tags",
    "cardData",
    "pipeline_tag",
    "inference",
    "inferenceProviderMapping",
]


def _list_task(api: HfApi, task: str, token: str | None, limit: int) -> list[HubModel]:
    """The ``limit`` most downloaded models of ``task`` served by an inference provider, topped up with the
    most downloaded others (which a self-hosted endpoint may serve)."""

    def listing(served_only: bool) -> list[HubModel]:
        return list(
            api.list_models(
                pipeline_tag=task,
                inference_provider="all" if served_only else None,
                sort="downloads",
                limit=limit,
                expand=_EXPAND,
                token=token,
            )
        )

    models = listing(served_only=True)
    if len(models) < limit:
        seen = {m.id for m in models}
        models += [m for m in listing(served_only=False) if m.id not in seen][: limit - len(models)]
    return models


def _from_hub(model: HubModel, task: str, previous: ModelInfo | None) -> ModelInfo:
    card = model.card_data.to_dict() if model.card_data is not None else {}
    live = {p.provider for p in model.inference_provider_mapping or () if p.status == "live"}
    providers = tuple(sorted(live))
    tags = catalog_tags(card, model.tags or (), task=task)
    # Card prose from the previous catalog beats a description made of metadata.
    prose = previous.description if previous is not None else ""
    return ModelInfo(
        id=model.id,
        task=task,
        downloads=int(model.downloads or 0),
        likes=int(model.likes or 0),
        description=prose or metadata_description(task, card, tags),
        tags=tags,
        inference="warm" if providers or model.inference == "warm" else "cold",
        providers=providers,
    )


def refresh_from_hub(
    tasks: Iterable[str],
    *,
    token: str | None,
    limit_per_task: int = 30,
    api: HfApi | None = None,
    previous: Catalog | None = None,
) -> HubRefresh:
    """List each pipeline task's models on the Hub (blocking: run it in a thread).

    Tasks that are not pipeline tags, and tasks whose listing fails or comes back empty, keep their entries
    of ``previous`` (default: the bundled catalog). Raises ``AgentError`` when the Hub cannot be reached or
    every listing fails.
    """
    api = api or HfApi(endpoint=hub_endpoint(), token=token)
    previous = previous if previous is not None else Catalog.bundled()
    wanted = [t for t in dict.fromkeys(tasks) if t in PIPELINE_TASKS]
    if wanted:
        _probe(api, token)
    fresh: list[ModelInfo] = []
    refreshed: set[str] = set()
    failed: dict[str, str] = {}
    unreachable = ""
    for task in wanted:
        if unreachable:
            failed[task] = unreachable
            continue
        try:
            listed = _list_task(api, task, token, limit_per_task)
        except httpx2.RequestError as err:
            unreachable = failed[task] = (
                f"could not reach the Hugging Face Hub at {public_url(api.endpoint)}: {err}"
            )
            continue
        except (HfHubHTTPError, ValueError, KeyError, TypeError) as err:
            failed[task] = f"listing failed: {err}".splitlines()[0]
            continue
        if not listed:
            failed[task] = "the Hub listed no models"
            continue
        refreshed.add(task)
        fresh += [_from_hub(m, task, previous.get(m.id)) for m in listed]
    for task, reason in failed.items():
        log.warning("catalog refresh: %s kept its previous entries (%s)", task, reason)
    if wanted and not refreshed:
        first = next(iter(failed.values()))
        raise AgentError(
            unreachable
            or f"could not list any task on the Hugging Face Hub at {public_url(api.endpoint)}: {first}"
        )
    kept = [m for m in previous if m.task not in refreshed]
    return HubRefresh(catalog=Catalog([*kept, *fresh]), failed=failed, endpoint=public_url(api.endpoint))


async def refresh_catalog(
    settings: Settings, *, seconds: float = REFRESH_SECONDS
) -> tuple[Catalog, Path, list[str]]:
    """Refresh every pipeline task from the Hub into ``{data_dir}/catalog.jsonl``.

    Returns the new catalog, where it was saved, and the tasks that kept their previous entries. The refresh
    runs in a child process, killed after ``seconds``: huggingface_hub's listing is blocking and its session
    has no deadline and no size cap, which the child gives it (``_refresh_in_worker``).
    """
    path = settings.data_dir / BUNDLED_CATALOG
    worker = ProcessWorker("catalog-refresh")
    try:
        async with asyncio.timeout(seconds):
            result = await worker.run(_refresh_in_worker, settings, path)
    except TimeoutError as err:
        raise AgentError(
            f"the catalog refresh did not finish within {seconds:g} s; the catalog is unchanged"
        ) from err
    except WorkerCrashedError as err:
        raise AgentError(f"the catalog refresh failed ({err}); the catalog is unchanged") from err
    finally:
        await worker.aclose()
    return result.catalog, path, sorted(result.failed)


def _refresh_in_worker(settings: Settings, path: Path) -> HubRefresh:
    """In the refresh's own process: bound huggingface_hub's shared session (each response read up to
    ``_HUB_MAX_BODY_BYTES``, ``_HUB_READ_TIMEOUT`` per read, redirects within the Hub only), then refresh.
    The parent process's session is left alone: model downloads need large bodies and CDN redirects."""
    session = get_session()
    session.timeout = httpx2.Timeout(_HUB_READ_TIMEOUT)
    bound_client(session, max_body_bytes=_HUB_MAX_BODY_BYTES)
    result = refresh_from_hub(
        TASKS, token=settings.hf_token or None, previous=Catalog.for_data_dir(settings.data_dir)
    )
    result.catalog.save(path)
    return result


def summarize_refresh(catalog: Catalog, path: Path, failed: Iterable[str]) -> str:
    """A few lines for the terminal after ``hugginggpt catalog refresh``."""
    warm = sum(1 for m in catalog if m.inference == "warm")
    lines = [
        f"Saved {len(catalog)} models for {len(catalog.tasks())} tasks to {path} "
        f"({warm} served by an inference provider)."
    ]
    if failed := sorted(failed):
        lines.append(f"Kept the previous entries of the tasks the Hub did not list: {', '.join(failed)}.")
    return "\n".join(lines)
