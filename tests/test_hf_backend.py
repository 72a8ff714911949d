"""The HF backend over the real AsyncInferenceClient, against a fake inference server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from PIL import Image

from agent.backends import Backend, Backends, BackendStatus, TaskInput, TaskIO
from agent.backends.hf import HFBackend, load_endpoints
from agent.catalog import ModelInfo
from agent.errors import (
    BackendUnavailableError,
    ConfigurationError,
    ModelError,
    ModelTimeoutError,
    RetryableModelError,
)
from agent.events import LLMUsage
from agent.plan import PlannedTask, TaskOutput
from agent.resources import MemoryResourceStore, Origin, Resource
from agent.settings import Settings
from agent.tasks import TASKS
from tests.fakes.hf_server import FakeHF, Fault, png_bytes, start_in_thread, wav_bytes

TOKEN = "hf_test_secret_token"
HF_TASKS = [name for name, t in TASKS.items() if not t.llm_handled]
MODELS = {f"org/{task}-model": task for task in HF_TASKS}


def model_for(task: str) -> str:
    return f"org/{task}-model"


@pytest.fixture
async def hf() -> AsyncIterator[FakeHF]:
    async with FakeHF(dict(MODELS)) as server:
        yield server


@pytest.fixture
async def backend(hf: FakeHF) -> AsyncIterator[HFBackend]:
    b = HFBackend(Settings(hf_token=TOKEN, hf_inference_base_url=hf.base_url, task_timeout=5))
    yield b
    await b.aclose()


class Files:
    """A store with one image and one audio upload, and a TaskIO that saves into it."""

    def __init__(self) -> None:
        self.store = MemoryResourceStore()
        self.saved: list[Resource] = []

    async def upload(self) -> tuple[Resource, Resource]:
        image = await self.store.put(png_bytes(), name="img-1.png", mime="image/png", origin=Origin("upload"))
        audio = await self.store.put(wav_bytes(), name="aud-1.wav", mime="audio/wav", origin=Origin("upload"))
        return image, audio

    def io(self) -> TaskIO:
        async def save(data: bytes, mime: str) -> Resource:
            res = await self.store.put(
                data, name=f"out-{len(self.saved) + 1}", mime=mime, origin=Origin("task")
            )
            self.saved.append(res)
            return res

        return TaskIO(read=self.store.read, save=save, usage=LLMUsage())


@pytest.fixture
async def files() -> Files:
    return Files()


async def run(
    backend: HFBackend, files: Files, task: str, model: str | None = None, **text: str
) -> TaskOutput:
    """Run ``task`` with the uploads as its media arguments and ``text`` (default "hello") as its text ones."""
    image, audio = await files.upload()
    kind = TASKS[task]
    texts = {a.key: text.get(a.key, "hello") for a in kind.args if a.modality == "text"}
    media = {a.key: image if a.modality == "image" else audio for a in kind.args if a.modality != "text"}
    inp = TaskInput(task=kind, planned=PlannedTask(1, task, (), {}), text=texts, files=media)
    return await backend.run(ModelInfo(model or model_for(task), task), inp, files.io())


def image_of(files: Files, resource: Resource) -> Image.Image:
    data = files.store._data[resource.sha256]
    return Image.open(io.BytesIO(data)).convert("RGB")


# Each task over the wire.


async def test_image_to_text_sends_the_image_bytes_with_the_token(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    out = await run(backend, files, "image-to-text")
    assert out.text == "a red square on a grey background"
    [req] = hf.requests
    assert req.path == "/models/org/image-to-text-model"
    assert req.body == png_bytes()
    assert req.content_type == "image/png"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"


async def test_object_detection_draws_the_boxes(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "object-detection")
    assert out.text == "square (0.98), frame (0.51)"
    assert [d["label"] for d in out.data] == ["square", "frame"]
    assert out.data[0]["box"] == {"xmin": 16, "ymin": 16, "xmax": 48, "ymax": 48}
    [drawn] = out.resources
    assert drawn.mime == "image/png"
    original = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    assert image_of(files, drawn).tobytes() != original.tobytes()
    assert hf.requests[0].body == png_bytes()


async def test_text_to_image_saves_the_png(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "text-to-image", text="a green square")
    [image] = out.resources
    assert image.kind == "image" and image.mime == "image/png"
    assert image_of(files, image).getpixel((32, 32)) == (30, 200, 30)
    req = hf.requests[0]
    assert req.json()["inputs"] == "a green square"
    assert req.headers["Accept"] == "image/png"


async def test_speech_recognition_sends_the_audio_bytes(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "automatic-speech-recognition")
    assert out.text == "hello world"
    assert hf.requests[0].body == wav_bytes()
    assert hf.requests[0].content_type == "audio/wav"


async def test_text_to_speech_saves_the_audio(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "text-to-speech", text="read me")
    [audio] = out.resources
    assert audio.kind == "audio" and audio.mime == "audio/wav"
    assert files.store._data[audio.sha256] == wav_bytes()
    assert hf.requests[0].json()["inputs"] == "read me"


@pytest.mark.parametrize(
    ("content", "mime"),
    [
        (b"fLaC\x00\x00\x00\x22" + b"\x00" * 40, "audio/flac"),
        (b"ID3\x04" + b"\x00" * 40, "audio/mpeg"),
        (b"OggS\x00\x02" + b"\x00" * 40, "audio/ogg"),
        (wav_bytes(), "audio/wav"),
    ],
    ids=["flac", "mp3", "ogg", "wav"],
)
async def test_speech_audio_type_is_told_by_content(
    hf: FakeHF, backend: HFBackend, files: Files, content: bytes, mime: str
) -> None:
    # The server's content type is deliberately wrong: the bytes decide.
    hf.script(model_for("text-to-speech"), Fault(body=content, content_type="application/octet-stream"))
    out = await run(backend, files, "text-to-speech")
    assert out.resources[0].mime == mime


async def test_visual_question_answering_sends_the_image_inline(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    out = await run(backend, files, "visual-question-answering", text="what colour is the square?")
    assert out.text == "red"
    assert out.data[0] == {"answer": "red", "score": 0.93}
    body = hf.requests[0].json()
    assert body["question"] == "what colour is the square?"
    assert base64.b64decode(body["image"]) == png_bytes()
    assert "http" not in hf.requests[0].body.decode()


async def test_text_classification_reads_the_nested_list(backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "text-classification", text="I love it")
    assert out.text == "POSITIVE (0.99), NEGATIVE (0.01)"
    assert out.data == [{"label": "POSITIVE", "score": 0.99}, {"label": "NEGATIVE", "score": 0.01}]


async def test_image_classification_reads_the_flat_list(backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "image-classification")
    assert out.text == "red square (0.92), flag (0.05)"


async def test_segmentation_overlays_the_masks(backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "image-segmentation")
    assert out.data == [{"label": "square", "score": 0.97}]
    [overlay] = out.resources
    inside_mask = image_of(files, overlay).getpixel((10, 10))
    assert inside_mask != (128, 128, 128)  # grey in the upload, tinted now


async def test_sentence_similarity_gives_the_score(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "sentence-similarity", text="a cat", text2="a kitten")
    assert out.text == "0.870" and out.data == 0.87
    assert hf.requests[0].json()["inputs"] == {"source_sentence": "a cat", "sentences": ["a kitten"]}


async def test_question_answering_needs_a_context(backend: HFBackend, files: Files) -> None:
    out = await run(backend, files, "question-answering", text="capital?", context="Paris is the capital")
    assert out.text == "Paris"


async def test_controlnet_sends_the_control_image_with_the_prompt(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    out = await run(backend, files, "canny-text-to-image", text="a castle")
    assert out.resources[0].kind == "image"
    body = hf.requests[0].json()
    assert base64.b64decode(body["inputs"]) == png_bytes()
    assert body["parameters"] == {"prompt": "a castle"}


@pytest.mark.parametrize("task", HF_TASKS)
async def test_every_task_gives_its_declared_output(backend: HFBackend, files: Files, task: str) -> None:
    out = await run(backend, files, task, context="some context")
    modality = TASKS[task].output
    if modality == "text":
        assert out.text
    else:
        assert [r.kind for r in out.resources][:1] == [modality]


async def test_tasks_of_the_llm_are_refused(backend: HFBackend, files: Files) -> None:
    with pytest.raises(ModelError, match="controller LLM"):
        await run(backend, files, "summarization", model="facebook/bart-large-cnn")


# Failures.


async def test_loading_model_is_retryable_with_retry_after(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    hf.script(model_for("image-to-text"), Fault.loading(retry_after=2))
    with pytest.raises(RetryableModelError, match="loading") as err:
        await run(backend, files, "image-to-text")
    assert err.value.retry_after == 2.0


async def test_loading_model_without_header_uses_estimated_time(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    hf.script(model_for("image-to-text"), Fault.loading(retry_after=None, estimated_time=12.5))
    with pytest.raises(RetryableModelError) as err:
        await run(backend, files, "image-to-text")
    assert err.value.retry_after == 12.5


async def test_rate_limit_is_retryable(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    hf.script(model_for("image-to-text"), Fault.rate_limited(retry_after=3))
    with pytest.raises(RetryableModelError, match="rate limited") as err:
        await run(backend, files, "image-to-text")
    assert err.value.retry_after == 3.0


async def test_client_errors_are_final_and_say_the_status(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    hf.script(model_for("image-to-text"), Fault.error(400, "Image too small"))
    with pytest.raises(ModelError, match=r"HTTP 400: Image too small") as err:
        await run(backend, files, "image-to-text")
    assert not isinstance(err.value, RetryableModelError)


async def test_unknown_model_is_404(backend: HFBackend, files: Files) -> None:
    with pytest.raises(ModelError, match="HTTP 404"):
        await run(backend, files, "image-to-text", model="nobody/nothing")


async def test_dropped_connection_is_retryable(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    hf.script(model_for("image-to-text"), Fault.dropped())
    with pytest.raises(RetryableModelError, match="connection"):
        await run(backend, files, "image-to-text")


async def test_refused_connection_is_retryable(files: Files) -> None:
    async with FakeHF({}) as gone:
        url = gone.base_url
    backend = HFBackend(Settings(hf_token=TOKEN, hf_inference_base_url=url))
    with pytest.raises(RetryableModelError, match="could not connect"):
        await run(backend, files, "image-to-text")
    await backend.aclose()


@pytest.mark.parametrize("fault", [Fault.malformed(), Fault.wrong_type()])
@pytest.mark.parametrize("task", ["image-to-text", "text-to-image", "text-to-speech", "depth-estimation"])
async def test_unreadable_answers(
    hf: FakeHF, backend: HFBackend, files: Files, fault: Fault, task: str
) -> None:
    hf.script(model_for(task), fault)
    with pytest.raises(ModelError, match=f"returned an unreadable response for task {task}") as err:
        await run(backend, files, task)
    assert not isinstance(err.value, RetryableModelError)


async def test_slow_model_times_out(hf: FakeHF, files: Files) -> None:
    backend = HFBackend(Settings(hf_token=TOKEN, hf_inference_base_url=hf.base_url, task_timeout=0.2))
    hf.script(model_for("image-to-text"), Fault.slow(3))
    with pytest.raises(ModelTimeoutError, match="did not answer in time"):
        await run(backend, files, "image-to-text")
    await backend.aclose()


async def test_the_token_never_reaches_an_error_message(hf: FakeHF, backend: HFBackend, files: Files) -> None:
    hf.script(model_for("image-to-text"), Fault.error(401, f"Invalid credentials: {TOKEN}"))
    with pytest.raises(ModelError) as err:
        await run(backend, files, "image-to-text")
    assert TOKEN not in str(err.value)
    assert "HF_TOKEN" in str(err.value)
    assert hf.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


# Configuration: endpoints file, availability, status, provider routing.


async def test_endpoints_file_routes_a_model_to_its_own_url(hf: FakeHF, files: Files, tmp_path: Path) -> None:
    async with FakeHF({"acme/captioner": "image-to-text"}) as endpoint:
        endpoints = tmp_path / "endpoints.json"
        endpoints.write_text(json.dumps({"acme/captioner": f"{endpoint.base_url}/endpoints/acme/captioner"}))
        backend = HFBackend(Settings(endpoints_file=str(endpoints)))  # no HF_TOKEN, default base URL
        assert backend.available(ModelInfo("acme/captioner", "image-to-text"))
        assert not backend.available(ModelInfo("Salesforce/blip", "image-to-text"))
        out = await run(backend, files, "image-to-text", model="acme/captioner")
        await backend.aclose()
    assert out.text == "a red square on a grey background"
    assert [r.path for r in endpoint.requests] == ["/endpoints/acme/captioner"]
    assert hf.requests == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no file"),
        ("{not json", "not valid JSON"),
        ('["x"]', "must hold an object"),
        ('{"a/b": "ftp://x"}', "http"),
    ],
    ids=["missing", "not-json", "not-object", "not-url"],
)
def test_bad_endpoints_files_are_configuration_errors(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "endpoints.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        load_endpoints(str(path))


class _Claims(Backend):
    """A backend that claims the ids with ``prefix`` and runs nothing."""

    def __init__(self, prefix: str) -> None:
        self.name = self.prefix = prefix
        self.enable_hint = f"the {prefix} models"

    def available(self, model: ModelInfo) -> bool:
        return True

    async def status(self) -> BackendStatus:
        return BackendStatus(self.name, True, "")

    async def run(self, model: ModelInfo, inp: TaskInput, io: TaskIO) -> TaskOutput:
        raise AssertionError("not run here")


def test_hub_ids_are_whatever_no_other_backend_claims() -> None:
    hf = HFBackend(Settings())
    backends = Backends([_Claims("local/"), hf, _Claims("llm/")])
    assert backends.for_model(ModelInfo("Salesforce/blip-image-captioning-large", "image-to-text")) is hf
    assert backends.for_model(ModelInfo("local/whisper-tiny", "automatic-speech-recognition")) is not hf
    assert backends.for_model(ModelInfo("llm/gpt", "summarization")) is not hf
    assert backends.explain("Salesforce/blip") == (
        "needs a Hugging Face endpoint: set HF_TOKEN or HUGGINGGPT_ENDPOINTS"
    )
    assert backends.explain("local/whisper-tiny") == "needs the local/ models"


def test_available_with_a_token_or_another_base_url() -> None:
    model = ModelInfo("Salesforce/blip", "image-to-text")
    assert not HFBackend(Settings()).available(model)
    assert HFBackend(Settings(hf_token=TOKEN)).available(model)
    assert HFBackend(Settings(hf_inference_base_url="http://127.0.0.1:9/tgi")).available(model)
    assert not HFBackend(Settings(hf_token=TOKEN)).available(
        ModelInfo("facebook/bart-large-cnn", "summarization")
    )


async def test_status_says_what_is_configured_without_the_token() -> None:
    off = await HFBackend(Settings()).status()
    assert not off.live and "HF_TOKEN" in off.detail
    on = await HFBackend(Settings(hf_token=TOKEN)).status()
    assert on.live and "token set" in on.detail and TOKEN not in on.detail


def test_unknown_provider_mode_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="HF_INFERENCE_PROVIDER"):
        HFBackend(Settings(hf_inference_provider="somewhere"))


async def test_auto_provider_lookup_runs_off_the_loop_once_per_model(
    hf: FakeHF, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Hub lookup is a blocking call to the same fake server: on the event loop it would deadlock.
    model = "org/auto-captioner"
    hf.tasks[model] = "image-to-text"
    hf.provider_mappings[model] = {
        "hf-inference": {"status": "live", "providerId": model, "task": "image-to-text"}
    }
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hf.base_url)
    settings = Settings(hf_token=TOKEN, hf_inference_base_url=hf.base_url, hf_inference_provider="auto")
    backend = HFBackend(settings)
    first = await run(backend, files, "image-to-text", model=model)
    second = await run(backend, files, "image-to-text", model=model)
    await backend.aclose()
    assert first.text == second.text == "a red square on a grey background"
    assert [r.path for r in hf.requests] == [f"/api/models/{model}", f"/models/{model}", f"/models/{model}"]


async def test_auto_provider_without_a_mapping_is_a_clear_error(
    hf: FakeHF, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hf.base_url)
    backend = HFBackend(Settings(hf_token=TOKEN, hf_inference_provider="auto"))
    with pytest.raises(ModelError, match="no Inference Provider serves model org/unmapped"):
        await run(backend, files, "image-to-text", model="org/unmapped")
    await backend.aclose()


async def test_offline_mode_names_the_variable(
    hf: FakeHF, backend: HFBackend, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    with pytest.raises(BackendUnavailableError, match="HF_HUB_OFFLINE"):
        await run(backend, files, "image-to-text")


def test_fake_server_runs_in_a_thread_for_subprocesses() -> None:
    import urllib.request

    running = start_in_thread({"org/cap": "image-to-text"})
    try:
        req = urllib.request.Request(f"{running.base_url}/models/org/cap", data=png_bytes(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read()) == [{"generated_text": "a red square on a grey background"}]
        assert running.server.requests[0].body == png_bytes()
        assert threading.current_thread() is threading.main_thread()
    finally:
        running.stop()


# Bounds: answer size, redirects, the provider lookup, and what a status or an error may show.

CAP_MB = 4
# What a client may be sent beyond what it reads: the socket buffers of both ends (a few MiB on loopback).
BUFFERS = 24 << 20


@pytest.fixture
async def capped(hf: FakeHF) -> AsyncIterator[HFBackend]:
    b = HFBackend(
        Settings(hf_token=TOKEN, hf_inference_base_url=hf.base_url, task_timeout=30, max_output_mb=CAP_MB)
    )
    yield b
    await b.aclose()


@pytest.mark.parametrize(
    "task",
    ["image-to-text", "text-to-image", "depth-estimation"],
    ids=["client JSON answer", "client image answer", "raw POST"],
)
@pytest.mark.parametrize(
    "fault",
    [Fault.huge_body(600 << 20), Fault.huge_body(None), Fault.huge_body(600 << 20, declare_length=True)],
    ids=["600 MiB streamed", "endless", "600 MiB declared"],
)
async def test_an_answer_over_the_cap_is_refused_after_reading_about_the_cap(
    hf: FakeHF, capped: HFBackend, files: Files, task: str, fault: Fault
) -> None:
    hf.script(model_for(task), fault)
    with pytest.raises(
        ModelError, match=rf"sent more than {CAP_MB} MiB for {task}.*HUGGINGGPT_MAX_OUTPUT_MB"
    ):
        await run(capped, files, task)
    assert hf.bytes_sent <= (CAP_MB << 20) + BUFFERS  # not the 600 MiB on offer
    if fault.declare_length:
        assert hf.bytes_sent <= BUFFERS  # refused on its Content-Length, before reading the body
    # The connection is usable again and a normal answer goes through.
    out = await run(capped, files, task)
    assert out.text or out.resources


async def test_an_answer_just_under_the_cap_is_read(hf: FakeHF, files: Files) -> None:
    backend = HFBackend(Settings(hf_token=TOKEN, hf_inference_base_url=hf.base_url, max_output_mb=1))
    body = json.dumps([{"generated_text": "x" * ((1 << 20) - 100)}]).encode()
    hf.script(model_for("image-to-text"), Fault(body=body))
    out = await run(backend, files, "image-to-text")
    await backend.aclose()
    assert out.text == "x" * ((1 << 20) - 100)


async def test_a_redirect_to_another_server_is_refused_and_that_server_gets_nothing(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    async with FakeHF(dict(MODELS)) as other:
        hf.script(
            model_for("image-to-text"),
            Fault.redirect(f"{other.base_url}/models/{model_for('image-to-text')}"),
        )
        with pytest.raises(ModelError) as caught:
            await run(backend, files, "image-to-text")
    assert "redirected the request to another server, which is never followed" in str(caught.value)
    assert other.base_url.rsplit(":", 1)[1] not in str(caught.value)
    assert other.requests == []  # neither the image nor the token went there


async def test_a_redirect_within_the_server_is_followed_up_to_three_times(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    model = model_for("image-to-text")
    here = Fault.redirect(f"{hf.base_url}/models/{model}", status=307)
    hf.script(model, here)
    assert (await run(backend, files, "image-to-text")).text == "a red square on a grey background"
    hf.script(model, *[here] * 5)
    with pytest.raises(ModelError, match="redirected the request more than 3 times"):
        await run(backend, files, "image-to-text")


async def test_the_provider_lookup_is_bounded_like_every_call(
    hf: FakeHF, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hf.base_url)
    settings = Settings(
        hf_token=TOKEN, hf_inference_base_url=hf.base_url, hf_inference_provider="auto", max_output_mb=CAP_MB
    )
    backend = HFBackend(settings)
    async with FakeHF({}) as other:
        hf.script_info(model_for("image-to-text"), Fault.huge_body(None, content_type="application/json"))
        hf.script_info(model_for("object-detection"), Fault.redirect(f"{other.base_url}/api/models/x"))
        with pytest.raises(ModelError, match=f"sent more than {CAP_MB} MiB"):
            await run(backend, files, "image-to-text")
        with pytest.raises(ModelError, match="redirected the request to another server"):
            await run(backend, files, "object-detection")
    await backend.aclose()
    assert hf.bytes_sent <= (CAP_MB << 20) + BUFFERS
    assert other.requests == []


async def test_credentials_in_the_base_url_are_not_shown(hf: FakeHF) -> None:
    url = hf.base_url.replace("http://", "http://proxyuser:proxy-pass-77@")
    status = await HFBackend(Settings(hf_inference_base_url=url)).status()
    assert status.live and hf.base_url in status.detail
    assert "proxy-pass-77" not in status.detail and "proxyuser" not in status.detail


async def test_a_piece_of_the_token_echoed_by_the_server_is_redacted(
    hf: FakeHF, backend: HFBackend, files: Files
) -> None:
    hf.script(model_for("image-to-text"), Fault.error(403, f"token {TOKEN[:12]}… lacks access"))
    with pytest.raises(ModelError) as caught:
        await run(backend, files, "image-to-text")
    assert str(caught.value) == (
        f"model {model_for('image-to-text')} refused the request (HTTP 403: token ***… lacks access): check HF_TOKEN"
    )


async def test_a_third_party_provider_is_called_without_a_blocking_lookup(
    hf: FakeHF, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub would fetch the provider mapping itself, with a blocking client on the event loop (which
    deadlocks against this same-loop server); the backend fetches it once, bounded, and hands it over."""
    model = "org/together-drawer"
    hf.tasks[model] = "text-to-image"
    hf.provider_mappings[model] = {
        "together": {"status": "live", "providerId": "tg/drawer", "task": "text-to-image"}
    }
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hf.base_url)
    monkeypatch.setattr(
        huggingface_hub.constants, "INFERENCE_PROXY_TEMPLATE", f"{hf.base_url}/providers/{{provider}}"
    )
    backend = HFBackend(Settings(hf_token=TOKEN, hf_inference_provider="auto", task_timeout=10))
    async with asyncio.timeout(20):
        out = await run(backend, files, "text-to-image", model=model)
        again = await run(backend, files, "text-to-image", model=model)
    await backend.aclose()
    assert out.resources and again.resources
    assert [r.path for r in hf.requests] == [
        f"/api/models/{model}",
        "/providers/together/v1/images/generations",
        "/providers/together/v1/images/generations",
    ]
    assert hf.requests[1].json()["model"] == "tg/drawer"
