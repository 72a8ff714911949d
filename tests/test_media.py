"""Files the models made, made fit for a Discord upload (``bot.media``): kept as they are when they fit;
otherwise re-encoded once, within bounds, or refused with the reason."""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from agent.resources import Resource
from bot.media import OutgoingFile, fit_for_upload
from tests.fakes.hf_server import png_bytes, wav_bytes
from tests.fakes.media import header_bomb, silent_flac

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

MINUTES_10 = 600.0


def resource(name: str, mime: str, data: bytes) -> Resource:
    kind = mime.split("/")[0]
    return Resource(name=name, kind=kind, mime=mime, sha256="0" * 64, size=len(data))  # type: ignore[arg-type]


def noise(side: int, fmt: str) -> bytes:
    rng = random.Random(side)
    img = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def probe(data: bytes) -> dict[str, str]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,bit_rate", "-of", "default=nw=1",
         "-i", "pipe:0"],
        input=data, capture_output=True, check=True, text=False,
    ).stdout.decode()  # fmt: skip
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.fixture
def ffmpeg_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A log of every ffmpeg run: a wrapper first on PATH that notes its arguments, then runs the real one."""
    real = shutil.which("ffmpeg")
    log = tmp_path / "ffmpeg.log"
    wrapper = tmp_path / "bin" / "ffmpeg"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    return log


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


async def test_images_are_kept_converted_or_downscaled_to_fit() -> None:
    small = await fit_for_upload(
        resource("out-1-0.png", "image/png", png_bytes()), png_bytes(), 1_000_000, max_seconds=MINUTES_10
    )
    assert small == OutgoingFile("out-1-0.png", png_bytes())

    bmp = noise(64, "BMP")
    converted = await fit_for_upload(
        resource("out-1-1.bmp", "image/bmp", bmp), bmp, 1_000_000, max_seconds=MINUTES_10
    )
    assert isinstance(converted, OutgoingFile) and converted.filename == "out-1-1.png"

    big = noise(400, "PNG")
    fitted = await fit_for_upload(
        resource("out-2-0.png", "image/png", big), big, 60_000, max_seconds=MINUTES_10
    )
    assert (
        isinstance(fitted, OutgoingFile) and fitted.filename == "out-2-0.jpg" and len(fitted.data) <= 60_000
    )
    with Image.open(io.BytesIO(fitted.data)) as img:
        assert img.format == "JPEG" and img.width < 400

    unfit = await fit_for_upload(
        resource("out-3-0.png", "image/png", big), big, 1_000, max_seconds=MINUTES_10
    )
    assert isinstance(unfit, str) and unfit.startswith("out-3-0.png: still ") and "upload limit" in unfit

    broken = await fit_for_upload(
        resource("out-4-0.png", "image/png", b"not a png"), b"not a png", 5, max_seconds=MINUTES_10
    )
    assert broken == "out-4-0.png: the image could not be read to make it smaller"


async def test_an_image_over_the_pixel_limit_is_not_decoded_to_fit_it() -> None:
    # A model's "image" whose header claims 20000x20000 pixels: refused from the header, never decoded.
    png = header_bomb(20_000, 20_000)
    refused = await fit_for_upload(resource("out-1-0.png", "image/png", png), png, 10, max_seconds=MINUTES_10)
    assert refused == "out-1-0.png: the image could not be read to make it smaller"


async def test_audio_that_fits_is_uploaded_as_the_model_made_it(ffmpeg_runs: Path) -> None:
    wav = wav_bytes(seconds=2.0)
    kept = await fit_for_upload(
        resource("out-1-0.wav", "audio/wav", wav), wav, 1_000_000, max_seconds=MINUTES_10
    )
    assert kept == OutgoingFile("out-1-0.wav", wav)
    assert logged(ffmpeg_runs) == [], "nothing was decoded or encoded"


async def test_audio_too_large_is_measured_once_and_encoded_once_at_the_bitrate_that_fits(
    ffmpeg_runs: Path,
) -> None:
    wav = wav_bytes(seconds=20.0)  # 8 kHz, 16 bits: 320 KB
    fitted = await fit_for_upload(
        resource("out-1-0.wav", "audio/wav", wav), wav, 100_000, max_seconds=MINUTES_10
    )
    assert isinstance(fitted, OutgoingFile) and fitted.filename == "out-1-0.mp3"
    assert len(fitted.data) <= 100_000
    # 100 KB for 20 s leaves 38 kbit/s: the MP3 rate just under it.
    assert probe(fitted.data) == {"codec_name": "mp3", "bit_rate": "32000"}
    runs = logged(ffmpeg_runs)
    assert len(runs) == 2 and "-c copy" in runs[0] and "libmp3lame" in runs[1]


async def test_audio_longer_than_the_limit_is_refused_without_encoding_it(ffmpeg_runs: Path) -> None:
    hour = silent_flac(3600)  # 700 KB of silence (made by ffmpeg, logged too)
    made = len(logged(ffmpeg_runs))
    refused = await fit_for_upload(
        resource("out-1-0.flac", "audio/flac", hour), hour, 100_000, max_seconds=MINUTES_10
    )
    assert (
        refused
        == "out-1-0.flac: over this server's 98 KiB upload limit, and longer than the 10 min I re-encode"
    )
    assert len(logged(ffmpeg_runs)) == made + 1, "only counted (up to just past 10 min), not encoded"


async def test_audio_that_would_need_too_low_a_bitrate_is_refused_with_the_reason() -> None:
    wav = wav_bytes(seconds=20.0)
    refused = await fit_for_upload(
        resource("out-1-0.wav", "audio/wav", wav), wav, 50_000, max_seconds=MINUTES_10
    )
    assert refused == (
        "out-1-0.wav: 20 s of audio would need 19 kbit/s to fit this server's 49 KiB upload limit; "
        "32 kbit/s is the least I send"
    )


async def test_audio_that_cannot_be_read_or_another_kind_of_file_is_refused_by_name() -> None:
    garbage = await fit_for_upload(
        resource("out-2-0.wav", "audio/wav", b"RIFFxxxx"), b"RIFFxxxx", 5, max_seconds=MINUTES_10
    )
    assert garbage == "out-2-0.wav: the audio could not be decoded to re-encode it"
    video = await fit_for_upload(
        resource("out-3-0.mp4", "video/mp4", b"v" * 50), b"v" * 50, 10, max_seconds=MINUTES_10
    )
    assert video == "out-3-0.mp4: 50 bytes is over this server's 10 bytes upload limit"
