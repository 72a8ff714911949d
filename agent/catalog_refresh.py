"""Rebuilding the model catalog from the Hugging Face Hub (``hugginggpt catalog refresh``).

Each pipeline task's most downloaded models are listed with their inference-provider status and a short
description built from the card's metadata; tasks whose listing fails keep their previous entries. The
helpers that describe a model are shared with ``scripts/build_catalog.py``, which derives the bundled catalog.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import ExpandModelProperty_T
from huggingface_hub.hf_api import ModelInfo as HubModel
from huggingface_hub.utils import build_hf_headers, get_session

from .catalog import BUNDLED_CATALOG, PIPELINE_TASKS, Catalog, ModelInfo
from .errors import AgentError, ConfigurationError
from .http import bound_client, public_url
from .tasks import TASKS
from .workers import ProcessWorker, WorkerCrashedError

__all__ = [
    "DESCRIPTION_CHARS",
    "HubRefresh",
    "catalog_tags",
    "clip_description",
    "metadata_description",
    "refresh_catalog",
    "refresh_from_hub",
    "summarize_refresh",
]

log = logging.getLogger(__name__)

DESCRIPTION_CHARS = 200
MAX_TAGS = 12
# Seconds to wait for the Hub's first answer: huggingface_hub sets no timeout and retries for ~25 s.
_PROBE_TIMEOUT = 15.0
REFRESH_SECONDS = 600.0
"""Most a whole ``catalog refresh`` may take (about 50 listing requests; a minute is usual)."""
_HUB_READ_TIMEOUT = 30.0
_HUB_MAX_BODY_BYTES = 32 << 20  # a listing page of 30 models with their card data is well under 1 MB


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
    data_dir: Path, token: str | None, *, seconds: float = REFRESH_SECONDS
) -> tuple[Catalog, Path, list[str]]:
    """Refresh every pipeline task from the Hub into ``{data_dir}/catalog.jsonl``.

    Returns the new catalog, where it was saved, and the tasks that kept their previous entries. The refresh
    runs in a child process, killed after ``seconds``: huggingface_hub's listing is blocking and its session
    has no deadline and no size cap, which the child gives it (``_refresh_in_worker``).
    """
    path = data_dir / BUNDLED_CATALOG
    worker = ProcessWorker("catalog-refresh")
    try:
        async with asyncio.timeout(seconds):
            result = await worker.run(_refresh_in_worker, data_dir, token)
    except TimeoutError as err:
        raise AgentError(
            f"the catalog refresh did not finish within {seconds:g} s; the catalog is unchanged"
        ) from err
    except WorkerCrashedError as err:
        raise AgentError(f"the catalog refresh failed ({err}); the catalog is unchanged") from err
    finally:
        await worker.aclose()
    return result.catalog, path, sorted(result.failed)


def _refresh_in_worker(data_dir: Path, token: str | None) -> HubRefresh:
    """In the refresh's own process: bound huggingface_hub's shared session (each response read up to
    ``_HUB_MAX_BODY_BYTES``, ``_HUB_READ_TIMEOUT`` per read, redirects within the Hub only), then refresh.
    The parent process's session is left alone: model downloads need large bodies and CDN redirects."""
    session = get_session()
    session.timeout = httpx2.Timeout(_HUB_READ_TIMEOUT)
    bound_client(session, max_body_bytes=_HUB_MAX_BODY_BYTES)
    result = refresh_from_hub(TASKS, token=token, previous=Catalog.for_data_dir(data_dir))
    result.catalog.save(data_dir / BUNDLED_CATALOG)
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
