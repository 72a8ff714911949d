"""Bad input from users, through the real command (``app.cli.main``) and ``Conversations.ask``: files that
are too large, endless, corrupt, bombs, of types the bot does not handle, empty, too many, too long (audio,
also when its header lies); a 50,000-character prompt; text that is not UTF-8; a huge photo, which models
get downscaled. Each is refused with a message naming the file and the reason, or handled; nothing
half-stored remains. Per-file checks are unit-tested in test_uploads.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from agent.catalog import Catalog
from agent.errors import ResourceError
from agent.uploads import MAX_ATTACHMENTS
from app.cli import main
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import Fault, png_bytes
from tests.fakes.hf_server import start_in_thread as start_hf
from tests.fakes.llm_server import start_in_thread as start_llm
from tests.fakes.media import flac_claiming, header_bomb, silent_flac
from tests.fakes.reliability import agent_on, db_rows, image_upload, plan_json, stage, stage_script

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffmpeg not installed")

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` configures the root logger for a process; put the test runner's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _fixed_demonstrations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's fixed demonstrations: no sentence encoder to load."""
    monkeypatch.setenv("HUGGINGGPT_DEMOS", "fixed")


# Between Pillow's limit and twice it, Pillow only warns: this one must still be refused.
WARNING_ZONE_SIDE = int((1.5 * (Image.MAX_IMAGE_PIXELS or 0)) ** 0.5)

BAD_FILES: dict[str, tuple[str, bytes, str]] = {
    "oversized": ("huge.png", png_bytes() + b"\0" * (2 * MB), "is over the 1.0 MiB limit"),
    "zero bytes": ("empty.wav", b"", "the file is empty"),
    "corrupt image": ("cut.png", png_bytes()[:60], "the image is corrupt"),
    "corrupt audio": (
        "noise.mp3",
        b"ID3\x03\0\0\0\0\0\0" + bytes(range(256)) * 20,
        "not an image, audio or video",
    ),
    "bomb past twice the pixel limit": ("bomb.png", header_bomb(20_000, 20_000), "too large"),
    "bomb in Pillow's warning zone": (
        "warn.png",
        header_bomb(WARNING_ZONE_SIDE, WARNING_ZONE_SIDE),
        "too large",
    ),
    "89-megapixel PNG": (
        "wide.png",
        header_bomb(9459, 9459),
        "too large: 9459×9459 pixels (89.5 MP); the limit is 50.0 MP",
    ),
    "unsupported type (PDF)": (
        "doc.pdf",
        b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
        "not an image, audio or video",
    ),
    "non-UTF-8 text file": (
        "notes.txt",
        "café crème brûlée\n".encode("latin-1"),
        "not an image, audio or video",
    ),
}


def _no_store(data_dir: Path) -> None:
    """Nothing was stored: the command refused before opening the data directory."""
    assert not (data_dir / "hugginggpt.db").exists()


@pytest.mark.parametrize(("name", "data", "reason"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_attachment_is_refused_by_name_and_reason(
    name: str,
    data: bytes,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HUGGINGGPT_MAX_ATTACHMENT_MB", "1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    path = tmp_path / name
    path.write_bytes(data)
    code = main(["ask", "what is in this file?", "--attach", str(path), "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(f"error: {name}: ") and reason in err, err
    assert "Traceback" not in err
    _no_store(tmp_path / "data")


AUDIO_TOO_LONG: dict[str, tuple[str, float, float, str]] = {
    # name, real length, what the header says (s), the reason
    "header says 24 hours": ("day.flac", 1.0, 86_400.0, "24 h 00 min of audio is over the 10 min limit"),
    "header says 1 s, holds 11 min": ("liar.flac", 660.0, 1.0, "the audio is longer than the 10 min limit"),
}


@pytest.mark.parametrize(
    ("name", "seconds", "claimed", "reason"), AUDIO_TOO_LONG.values(), ids=AUDIO_TOO_LONG.keys()
)
def test_audio_longer_than_the_limit_is_refused_whatever_its_header_says(
    name: str,
    seconds: float,
    claimed: float,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    path = tmp_path / name
    path.write_bytes(flac_claiming(silent_flac(seconds), claimed))
    assert main(["ask", "transcribe this", "--attach", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {name}: {reason}\n"
    _no_store(tmp_path / "data")


def test_more_attachments_than_a_request_takes_are_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    args = ["ask", "describe them all"]
    for n in range(25):
        args += ["--attach", str(tmp_path / f"missing-{n}.png")]  # not even read: the count comes first
    assert main(args) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"error: 25 files are attached; one request can take at most {MAX_ATTACHMENTS}: send fewer at a time\n"
    )
    _no_store(tmp_path / "data")


async def test_the_attachment_limit_holds_for_every_front_end(tmp_path: Path) -> None:
    uploads = [await image_upload(f"p{n}.png") for n in range(MAX_ATTACHMENTS + 1)]
    async with agent_on(stage_script(['{"tasks": []}']), {}, tmp_path / "data") as agent:
        with pytest.raises(ResourceError, match="at most 10"):
            await agent.turn("describe them all", uploads)
        # Refused before anything was recorded.
        for table in ("messages", "resources", "runs"):
            assert db_rows(agent.data_dir, f"SELECT count(*) FROM {table}") == [(0,)]
        assert agent.llm.requests == []
        ok = await agent.turn("describe them", uploads[:MAX_ATTACHMENTS])
        assert ok.result.status == "ok"
        assert len(db_rows(agent.data_dir, "SELECT id FROM resources")) == MAX_ATTACHMENTS
        assert len(db_rows(agent.data_dir, "SELECT DISTINCT sha256 FROM resources")) == 1


def _limit_memory() -> None:
    # 3 GiB of address space: plenty for the command, and a read of /dev/zero into memory fails fast.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_an_endless_file_is_refused_after_the_size_limit(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "HUGGINGGPT_MAX_ATTACHMENT_MB": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "ask", "what is this", "--attach", "/dev/zero"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: zero: ") and "over the 1.0 MiB limit" in proc.stderr, proc.stderr[
        -2000:
    ]
    _no_store(tmp_path / "data")


async def test_a_50000_character_prompt_fails_clearly_and_the_conversation_goes_on(tmp_path: Path) -> None:
    huge = ("Please describe this in great detail. " * 1400)[:50_000]
    script = stage_script(['{"tasks": []}'], ["Sure, what would you like?"])
    async with agent_on(script, {}, tmp_path / "data") as agent:
        turn = await agent.turn(huge, limit=30)
        assert turn.result.status == "failed"
        assert "too long for the LLM's context window" in turn.result.answer
        assert agent.llm.requests == []  # refused before any LLM call
        # The message is kept (the user wrote it), but it does not swamp the next turn's prompts.
        assert db_rows(agent.data_dir, "SELECT length(text) FROM messages WHERE role = 'user'") == [(50_000,)]
        again = await agent.turn("ok, just say hi")
    assert again.result.status == "ok"
    for body in agent.llm.requests:
        assert len(json.dumps(body["messages"])) < 40_000


def _caption_with_surrogate() -> Fault:
    # A JSON escape for half a surrogate pair: valid JSON, invalid Unicode once decoded.
    return Fault(body=b'[{"generated_text": "caf\\udce9 on a table"}]')


def test_text_that_is_not_utf8_is_stored_and_printed_with_replacement_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = plan_json({"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}})
    # The answer holds a lone surrogate too, as a JSON escape from the LLM server.
    llm = start_llm(stage_script([plan], ["It says caf\udce9."]))
    hf = start_hf(hf_tasks("image-to-text"))
    for model in Catalog.bundled().by_task("image-to-text"):
        hf.server.script(model.id, _caption_with_surrogate())
    monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("HF_INFERENCE_BASE_URL", hf.base_url)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HUGGINGGPT_MODEL_SELECTION", "downloads")
    monkeypatch.setenv("LLM_VISION", "off")  # no image probe before the plan
    image = tmp_path / os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8 either
    image.write_bytes(png_bytes())
    # What Python makes of a command line typed in Latin-1: undecodable bytes become lone surrogates.
    text = os.fsdecode("décris ce café".encode("latin-1"))
    try:
        code = main(["ask", text, "--attach", str(image), "--json"])
    finally:
        llm.stop()
        hf.stop()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    trace = json.loads(out)
    assert trace["status"] == "ok"
    assert trace["answer"] == "It says caf\ufffd."
    assert trace["tasks"][0]["output"]["text"] == "caf\ufffd on a table"
    data_dir = tmp_path / "data"
    texts = [t for (t,) in db_rows(data_dir, "SELECT text FROM messages ORDER BY rowid")]
    assert texts == ["d\ufffdcris ce caf\ufffd", "It says caf\ufffd."]
    # The LLM was sent valid text (it would refuse the rest).
    assert all("\\udc" not in json.dumps(body) for body in llm.requests)
    assert stage(llm.requests[0]) == "plan"


async def test_a_huge_photo_is_stored_downscaled_and_the_model_gets_that(tmp_path: Path) -> None:
    photo = Image.new("RGB", (6000, 4000), (90, 140, 200))
    photo.paste((230, 200, 40), (0, 0, 3000, 4000))
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    upload = await image_upload("holiday.jpg", jpeg.getvalue())
    plan = plan_json({"id": 0, "task": "image-to-text", "dep": [], "args": {"image": "img-1.jpg"}})
    async with agent_on(
        stage_script([plan], ["A photo."]),
        hf_tasks("image-to-text"),
        tmp_path / "data",
        HUGGINGGPT_MODEL_SELECTION="downloads",
    ) as agent:
        turn = await agent.turn("what is in this photo?", [upload])
        stored = await agent.rt.storage.read_resource(
            (await agent.rt.storage.resources(agent.conversation))[0]
        )
    assert turn.result.status == "ok", turn.result.error
    (sent,) = [r.body for r in agent.hf.requests]
    assert sent == stored == upload.data
    with Image.open(io.BytesIO(sent)) as image:
        assert (image.format, image.size) == ("JPEG", (2048, 1365))
