"""A fake Hugging Face Hub model-listing API on 127.0.0.1, so tests drive the real (sync) ``HfApi.list_models``.

    hub = FakeHub([HubModel("org/a", "text-classification", downloads=10, providers={"hf-inference": "live"})])
    base_url = hub.start_in_thread()
    try:
        monkeypatch.setenv("HF_ENDPOINT", base_url)   # or HfApi(endpoint=base_url)
        ...
        assert hub.listings("text-classification")[0].query["sort"] == ["downloads"]
    finally:
        hub.stop()

``GET /api/models`` honours what ``HfApi.list_models`` sends: ``pipeline_tag``, ``filter`` (repeated; matched
against tags, the pipeline tag and the library), ``author``, ``search``, ``inference=warm``,
``inference_provider`` (``all``, one provider, or several comma-separated or repeated), ``sort`` (descending, as
the Hub's default ``direction=-1``), ``limit`` (page size; a ``Link: <...cursor=N>; rel="next"`` header when
more remain), and ``expand`` (repeated; only those properties plus ``_id`` and ``id`` are returned, as on the
Hub; without it, the Hub's default short form). ``inferenceProviderMapping`` is a list of
``{"provider", "providerId", "status", "task"}`` and ``inference`` is ``"warm"`` for served models (absent
otherwise), as the Hub returns them when listing. Every request is recorded in ``requests``; ``fail(tag,
status)`` makes listings of that pipeline tag answer an HTTP error; ``require_token`` answers 401 to requests
without that bearer token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeHub", "HubModel", "RecordedRequest"]


@dataclass
class HubModel:
    """One model on the fake Hub. ``providers`` maps a provider name to its status (``live``, ``staging``...)."""

    id: str
    pipeline_tag: str
    downloads: int = 0
    likes: int = 0
    tags: list[str] = field(default_factory=list)
    providers: dict[str, str] = field(default_factory=dict)
    card_data: dict[str, Any] = field(default_factory=dict)
    library_name: str = "transformers"
    created_at: str = "2024-01-01T00:00:00.000Z"

    @property
    def served(self) -> bool:
        return "live" in self.providers.values()

    def hub_tags(self) -> list[str]:
        """Tags as the Hub computes them: the card's, the library, the task, languages, datasets, license."""
        card = self.card_data
        languages = card.get("language") or []
        datasets = card.get("datasets") or []
        return [
            self.library_name,
            "safetensors",
            *(card.get("tags") or []),
            *self.tags,
            self.pipeline_tag,
            *([languages] if isinstance(languages, str) else languages),
            *(f"dataset:{d}" for d in datasets),
            *([f"license:{card['license']}"] if card.get("license") else []),
            "endpoints_compatible",
            "region:us",
        ]

    def properties(self) -> dict[str, Any]:
        """Every property the Hub can return for a listed model, keyed as in its JSON."""
        props: dict[str, Any] = {
            "_id": f"fake{abs(hash(self.id)) % 10**12:012d}",
            "id": self.id,
            "modelId": self.id,
            "author": self.id.split("/")[0] if "/" in self.id else None,
            "downloads": self.downloads,
            "likes": self.likes,
            "tags": self.hub_tags(),
            "pipeline_tag": self.pipeline_tag,
            "library_name": self.library_name,
            "createdAt": self.created_at,
            "lastModified": self.created_at,
            "trendingScore": 0,
            "private": False,
            "gated": False,
            "cardData": self.card_data,
            "inferenceProviderMapping": [
                {"provider": name, "providerId": self.id, "status": status, "task": self.pipeline_tag}
                for name, status in self.providers.items()
            ],
        }
        if self.served:
            props["inference"] = "warm"
        return props


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


# What the Hub returns per model when ``expand`` is not given.
_DEFAULT_FIELDS = ("_id", "id", "likes", "trendingScore", "private", "downloads", "tags", "pipeline_tag",
                   "library_name", "createdAt", "modelId")
_SORT_KEYS = {
    "downloads": "downloads",
    "likes": "likes",
    "trendingScore": "trendingScore",
    "createdAt": "createdAt",
    "lastModified": "lastModified",
}


class FakeHub:
    """The fake Hub's state (models, recorded requests, injected failures) and its server."""

    def __init__(self, models: Iterable[HubModel] = ()) -> None:
        self.models = list(models)
        self.requests: list[RecordedRequest] = []
        self.failures: dict[str, int] = {}
        # When set, requests without "Authorization: Bearer <token>" get HTTP 401, as with a revoked token.
        self.require_token: str | None = None
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None

    def fail(self, pipeline_tag: str, status: int = 500) -> None:
        """Answer HTTP ``status`` to every listing of ``pipeline_tag``."""
        self.failures[pipeline_tag] = status

    def listings(self, pipeline_tag: str) -> list[RecordedRequest]:
        """The recorded listing requests for ``pipeline_tag``, in order."""
        return [r for r in self.requests if r.query.get("pipeline_tag") == [pipeline_tag]]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models", self._list_models)
        return app

    async def _list_models(self, request: web.Request) -> web.Response:
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            query.setdefault(key.removesuffix("[]"), []).append(value)
        self.requests.append(RecordedRequest(request.path, query, dict(request.headers)))
        if self.require_token is not None and request.headers.get("Authorization") != f"Bearer {self.require_token}":
            return web.json_response({"error": "Invalid credentials in Authorization header"}, status=401)
        tag = (query.get("pipeline_tag") or [""])[0]
        if tag in self.failures:
            status = self.failures[tag]
            return web.json_response({"error": f"fake Hub: listing {tag} fails"}, status=status)
        try:
            limit = min(int((query.get("limit") or ["1000"])[0]), 1000)
            cursor = int((query.get("cursor") or ["0"])[0])
        except ValueError:
            return web.json_response({"error": "limit and cursor must be integers"}, status=400)
        matching = [m for m in self.models if _matches(m, query)]
        sort = (query.get("sort") or [""])[0]
        if sort in _SORT_KEYS:
            ascending = (query.get("direction") or ["-1"])[0] == "1"
            matching.sort(key=lambda m: m.properties()[_SORT_KEYS[sort]], reverse=not ascending)
        page = matching[cursor : cursor + limit]
        expand = query.get("expand")
        fields = ("_id", "id", *expand) if expand else _DEFAULT_FIELDS
        body = [{k: v for k, v in m.properties().items() if k in fields} for m in page]
        headers = {}
        if cursor + limit < len(matching):
            next_url = request.url.update_query({"cursor": str(cursor + limit)})
            headers["Link"] = f'<{next_url}>; rel="next"'
        return web.json_response(body, headers=headers)

    def start_in_thread(self) -> str:
        """Serve from a daemon thread with its own loop (``HfApi`` is sync); returns the base URL."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        done: asyncio.Future[None] = loop.create_future()

        async def main() -> None:
            runner = web.AppRunner(self.app(), shutdown_timeout=0.5, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            ready.set()
            try:
                await done
            finally:
                await runner.cleanup()

        self._loop, self._done = loop, done
        self._thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
        self._thread.start()
        if not ready.wait(timeout=10):
            raise RuntimeError("the fake Hub did not start")
        return self.base_url

    def stop(self) -> None:
        if self._loop is None or self._thread is None or self._done is None:
            return
        done = self._done

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        self._loop.call_soon_threadsafe(finish)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = self._done = None


def _matches(model: HubModel, query: dict[str, list[str]]) -> bool:
    props = model.properties()
    if "pipeline_tag" in query and model.pipeline_tag not in query["pipeline_tag"]:
        return False
    if any(f not in props["tags"] for f in query.get("filter", ())):
        return False
    if "author" in query and props["author"] not in query["author"]:
        return False
    if "search" in query and not all(s.lower() in model.id.lower() for s in query["search"]):
        return False
    if query.get("inference") == ["warm"] and not model.served:
        return False
    wanted = {p for value in query.get("inference_provider", ()) for p in value.split(",") if p}
    live = {name for name, status in model.providers.items() if status == "live"}
    return not wanted or (bool(live) if "all" in wanted else bool(live & wanted))
