"""The model catalog: the bundled data, ranking, the data-dir override, and the refresh from a fake Hub."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import _http

from agent.catalog import PIPELINE_TASKS, Catalog, ModelInfo
from agent.catalog_refresh import refresh_catalog, refresh_from_hub, summarize_refresh
from agent.errors import AgentError, ConfigurationError
from agent.settings import Settings
from agent.tasks import TASKS
from tests.fakes.hub_server import FakeHub, HubModel
from tests.fakes.net import unused_port

REPO = Path(__file__).resolve().parent.parent
P0_MODELS = REPO.parent / "shared" / "hugginggpt" / "p0_models.jsonl"


# --- the bundled catalog -------------------------------------------------------------------------------------


def test_bundled_catalog_has_the_papers_24_tasks() -> None:
    catalog = Catalog.bundled()
    assert len(PIPELINE_TASKS) == 24
    assert not {t for t in PIPELINE_TASKS if t.endswith("-control")}
    controlnet = {t for t in TASKS if t.endswith("-control") or t.endswith("-text-to-image")}
    assert set(TASKS) - set(PIPELINE_TASKS) == controlnet and len(controlnet) == 12
    assert catalog.tasks() == sorted(PIPELINE_TASKS)
    counts = Counter(m.task for m in catalog)
    assert len(catalog) == 673
    assert counts["document-question-answering"] == 22
    assert counts["visual-question-answering"] == 13
    assert counts["text-to-video"] == 8
    assert sum(1 for n in counts.values() if n == 30) == 21


def test_bundled_entries_are_short_and_clean() -> None:
    for m in Catalog.bundled():
        assert 0 < len(m.description) <= 200, m.id
        assert "](" not in m.description and "http" not in m.description and "<" not in m.description, m.id
        assert len(m.tags) <= 12 and len(set(m.tags)) == len(m.tags), m.id
        assert m.task not in m.tags and not any(t.startswith("region:") for t in m.tags), m.id
        assert m.inference == "" and m.providers == ()


def test_bundled_catalog_ranks_by_downloads() -> None:
    catalog = Catalog.bundled()
    for task in catalog.tasks():
        downloads = [m.downloads for m in catalog.by_task(task)]
        assert downloads == sorted(downloads, reverse=True), task
    top = catalog.by_task("text-classification")[0]
    assert top.id == "distilbert-base-uncased-finetuned-sst-2-english"
    assert "sentiment" in top.description.lower() or "sst" in " ".join(top.tags)


def test_candidates_put_available_models_first_each_ranked_by_downloads() -> None:
    catalog = Catalog(
        [
            ModelInfo("a", "summarization", downloads=30),
            ModelInfo("b", "summarization", downloads=20, inference="warm"),
            ModelInfo("c", "summarization", downloads=10, inference="warm"),
            ModelInfo("d", "summarization", downloads=40),
        ]
    )
    ranked = catalog.candidates("summarization", lambda m: m.inference == "warm")
    assert [m.id for m in ranked] == ["b", "c", "d", "a"]
    assert catalog.candidates("depth-estimation", lambda m: True) == []


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    catalog = Catalog(
        [
            ModelInfo("org/x", "text-to-image", 5, 2, "draws", ("diffusers", "en"), "warm", ("fal-ai", "hf-inference")),
            ModelInfo("org/y", "text-to-image", 9, 1, "", (), "cold", ()),
            ModelInfo("org/z", "canny-control", 1),
        ]
    )
    path = tmp_path / "nested" / "catalog.jsonl"
    catalog.save(path)
    loaded = Catalog.load(path)
    assert set(loaded) == set(catalog) and len(loaded) == 3
    assert [m.id for m in loaded.by_task("text-to-image")] == ["org/y", "org/x"]
    assert not list(path.parent.glob("*.tmp"))
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first["task"] == "canny-control"  # sorted by task, then rank: a stable, diffable file


def test_for_data_dir_prefers_a_refreshed_catalog(tmp_path: Path) -> None:
    assert Catalog.for_data_dir(tmp_path) is Catalog.bundled()
    Catalog([ModelInfo("org/fresh", "summarization", 1)]).save(tmp_path / "catalog.jsonl")
    refreshed = Catalog.for_data_dir(tmp_path)
    assert [m.id for m in refreshed] == ["org/fresh"]


def test_for_data_dir_falls_back_to_the_bundled_catalog_on_a_corrupt_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "catalog.jsonl").write_text('{"id": "broken"\n', encoding="utf-8")
    assert Catalog.for_data_dir(tmp_path) is Catalog.bundled()
    assert "cannot read the refreshed catalog" in caplog.text


# --- scripts/build_catalog.py --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_catalog", REPO / "scripts" / "build_catalog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_card_prose_is_stripped_to_its_first_sentences(build_script: ModuleType) -> None:
    card = (
        "\n<!-- generated -->\n# Fancy model\n\n![logo](https://x/logo.png)\n\n"
        "**Disclaimer:** the team did not write a card.\n\n"
        "Fancy is a [BERT](https://arxiv.org/abs/1810.04805) model fine-tuned on <b>SST-2</b> for sentiment, "
        "see `pipeline()`. It was trained by Jane et al. and released in 2020. "
        + "It achieves the following results:\n- Loss: 0.1\n\n```python\nprint('x')\n```\n"
    )
    text = build_script.prose_description(card)
    assert text == (
        "Fancy is a BERT model fine-tuned on SST-2 for sentiment, see pipeline(). "
        "It was trained by Jane et al. and released in 2020."
    )
    assert build_script.prose_description("Entry not found") == ""
    long = build_script.prose_description("word " * 100 + "end.")
    assert len(long) <= 200 and long.endswith("…")
    fairseq = "[FastSpeech 2](https://a) text-to-speech model from fairseq S^2 (paper/code):\n- English\n- Female voice"
    assert build_script.prose_description(fairseq) == (
        "FastSpeech 2 text-to-speech model from fairseq S^2 (paper/code): English; Female voice."
    )


def test_rows_with_repr_metadata_and_string_counts_are_read(build_script: ModuleType) -> None:
    row = {
        "id": "org/m",
        "task": "translation",
        "downloads": "1,234",
        "likes": "7",
        "meta": "{'language': ['en', 'fr'], 'license': 'mit', 'tags': ['translation', 'marian']}",
        "description": "\n\n### org/m\n\n* source languages: en\n",
    }
    info = build_script.model_info(row)
    assert (info.downloads, info.likes) == (1234, 7)
    assert info.tags == ("marian", "en", "fr", "license:mit")
    assert info.description == "translation model (languages: en, fr; tags: marian)"
    assert build_script.card_meta("__import__('os').system('true')") == {}
    assert build_script.card_meta(None) == {}


@pytest.mark.skipif(not P0_MODELS.is_file(), reason="the paper's p0_models.jsonl is not next to this checkout")
def test_bundled_catalog_is_what_the_script_builds(build_script: ModuleType, tmp_path: Path) -> None:
    build_script.main([str(P0_MODELS), "--out", str(tmp_path)])
    bundled = REPO / "agent" / "data"
    assert (tmp_path / "catalog.jsonl").read_bytes() == (bundled / "catalog.jsonl").read_bytes()
    assert (tmp_path / "CATALOG_LICENSE.txt").read_text() == (bundled / "CATALOG_LICENSE.txt").read_text()
    assert "Copyright (c) Microsoft Corporation" in (bundled / "CATALOG_LICENSE.txt").read_text()


# --- the refresh from the Hub --------------------------------------------------------------------------------


def _hub_models() -> list[HubModel]:
    live = {"hf-inference": "live"}
    return [
        HubModel("org/tc-popular", "text-classification", downloads=900, likes=9,
                 card_data={"language": "en", "datasets": ["sst2"], "license": "mit", "tags": ["sentiment"]}),
        HubModel("org/tc-served-big", "text-classification", downloads=500, likes=5, providers=live),
        HubModel("org/tc-served-small", "text-classification", downloads=50, providers={"together": "live"}),
        HubModel("org/tc-staging", "text-classification", downloads=300, providers={"hf-inference": "staging"}),
        HubModel("org/tc-rare", "text-classification", downloads=1),
        HubModel("org/ner-a", "token-classification", downloads=70, providers=live),
        HubModel("org/ner-b", "token-classification", downloads=80),
        HubModel("org/draw", "text-to-image", downloads=1000, likes=99, library_name="diffusers",
                 providers={"fal-ai": "live", "hf-inference": "live"}),
    ]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub(_hub_models())
    fake.start_in_thread()
    yield fake
    fake.stop()


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries HTTP 5xx five times over ~25 s; the retries still happen, without the waits."""
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


def test_refresh_reads_hf_endpoint_at_call_time_and_ranks_each_task(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url + "/")
    result = refresh_from_hub(
        ["text-classification", "token-classification", "text-to-image"],
        token="hf_test",
        limit_per_task=3,
        previous=Catalog([]),
    )
    assert result.failed == {}
    assert result.endpoint == hub.base_url
    catalog = result.catalog
    # Served models first (both of them), topped up with the most downloaded other one; ranked by downloads.
    assert [m.id for m in catalog.by_task("text-classification")] == [
        "org/tc-popular", "org/tc-served-big", "org/tc-served-small",
    ]
    assert [m.id for m in catalog.by_task("token-classification")] == ["org/ner-b", "org/ner-a"]
    assert [m.id for m in catalog.by_task("text-to-image")] == ["org/draw"]

    listings = hub.listings("text-classification")
    assert [r.query.get("inference_provider") for r in listings] == [["all"], None]
    for request in listings:
        assert request.query["sort"] == ["downloads"] and request.query["limit"] == ["3"]
        assert {"inference", "inferenceProviderMapping", "downloads", "likes", "cardData"} <= set(
            request.query["expand"]
        )
        assert request.headers["Authorization"] == "Bearer hf_test"
    # text-to-image filled its limit? No: one served model, so it asked for the others too, and got none new.
    assert len(hub.listings("text-to-image")) == 2


def test_refresh_records_inference_status_tags_and_descriptions(hub: FakeHub) -> None:
    previous = Catalog([ModelInfo("org/tc-served-big", "text-classification", description="Card prose.")])
    catalog = refresh_from_hub(
        ["text-classification", "text-to-image"],
        token=None,
        limit_per_task=10,
        api=HfApi(endpoint=hub.base_url),
        previous=previous,
    ).catalog
    draw = catalog.get("org/draw")
    assert draw is not None
    assert (draw.inference, draw.providers, draw.downloads, draw.likes) == (
        "warm", ("fal-ai", "hf-inference"), 1000, 99,
    )
    staging = catalog.get("org/tc-staging")
    assert staging is not None and (staging.inference, staging.providers) == ("cold", ())
    popular = catalog.get("org/tc-popular")
    assert popular is not None and popular.inference == "cold"
    assert popular.tags == ("sentiment", "en", "dataset:sst2", "license:mit", "transformers")
    assert popular.description == "text-classification model trained on sst2 (languages: en; tags: sentiment, transformers)"
    served = catalog.get("org/tc-served-big")
    assert served is not None and served.description == "Card prose."  # the previous card prose is kept
    assert len(catalog.by_task("text-classification")) == 5


def test_a_failing_task_keeps_its_previous_entries_and_is_reported(
    hub: FakeHub, no_backoff_sleep: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
    hub.fail("token-classification", 500)
    old_ner = ModelInfo("old/ner", "token-classification", downloads=5, description="kept")
    old_tc = ModelInfo("old/tc", "text-classification", downloads=5)
    controlnet = ModelInfo("lllyasviel/sd-controlnet-canny", "canny-text-to-image", downloads=3)
    previous = Catalog([old_ner, old_tc, controlnet])

    result = refresh_from_hub(
        ["text-classification", "token-classification", "canny-text-to-image", "depth-estimation"],
        token=None,
        previous=previous,
    )
    assert set(result.failed) == {"token-classification", "depth-estimation"}
    assert "500" in result.failed["token-classification"]
    assert result.failed["depth-estimation"] == "the Hub listed no models"
    catalog = result.catalog
    assert catalog.by_task("token-classification") == [old_ner]
    assert catalog.by_task("canny-text-to-image") == [controlnet]  # no pipeline tag: kept, never listed
    assert catalog.get("old/tc") is None and len(catalog.by_task("text-classification")) == 5
    assert len(hub.listings("token-classification")) == 6  # huggingface_hub's five retries, then the error
    assert hub.listings("canny-text-to-image") == []


def test_every_listing_failing_is_an_error(hub: FakeHub) -> None:
    hub.fail("text-classification", 404)
    with pytest.raises(AgentError, match=f"could not list any task on the Hugging Face Hub at {hub.base_url}: .*404"):
        refresh_from_hub(["text-classification"], token=None, api=HfApi(endpoint=hub.base_url))


def test_an_unreachable_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{unused_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(AgentError, match=f"could not reach the Hugging Face Hub at {endpoint}: "):
        refresh_from_hub(PIPELINE_TASKS, token=None)


def test_a_refused_token_is_a_configuration_error(hub: FakeHub) -> None:
    hub.require_token = "hf_good"
    with pytest.raises(ConfigurationError, match="HF_TOKEN"):
        refresh_from_hub(["text-classification"], token="hf_bad", api=HfApi(endpoint=hub.base_url))


async def test_refresh_catalog_saves_into_the_data_dir_without_blocking_the_loop(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
    settings = Settings(data_dir=tmp_path / "data", hf_token="hf_test")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    catalog, path, failed = await refresh_catalog(settings.data_dir, settings.hf_token or None)
    ticking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticking
    assert ticks > 1
    assert path == tmp_path / "data" / "catalog.jsonl" and path.is_file()
    refreshed = {"text-classification", "token-classification", "text-to-image"}
    assert failed == sorted(set(PIPELINE_TASKS) - refreshed)
    assert set(Catalog.load(path)) == set(catalog)
    assert Catalog.for_data_dir(settings.data_dir).get("org/draw") is not None
    # Tasks the Hub did not list keep the bundled entries.
    assert catalog.by_task("depth-estimation") == Catalog.bundled().by_task("depth-estimation")
    assert catalog.get("distilbert-base-uncased-finetuned-sst-2-english") is None

    summary = summarize_refresh(catalog, path, failed)
    assert f"Saved {len(catalog)} models for 24 tasks to {path} (4 served by an inference provider)." in summary
    assert "depth-estimation" in summary
