from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.errors import ResourceError
from agent.uploads import check_upload

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffmpeg not installed")
MB = 1024 * 1024


def _png(size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, "PNG")
    return buf.getvalue()


def _wav() -> bytes:
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=0.3",
                           "-f", "wav", "pipe:1"], capture_output=True, check=True).stdout


async def test_image_is_recognised_by_content_not_name() -> None:
    up = await check_upload("holiday.mp3", _png(), max_bytes=MB)
    assert (up.kind, up.mime) == ("image", "image/png")


async def test_audio_is_recognised() -> None:
    up = await check_upload("voice", _wav(), max_bytes=MB)
    assert (up.kind, up.mime) == ("audio", "audio/wav")


def _mp4() -> bytes:
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=duration=0.5:size=64x48:rate=10",
                           "-pix_fmt", "yuv420p", "-f", "mp4", "-movflags", "frag_keyframe+empty_moov", "pipe:1"],
                          capture_output=True, check=True).stdout


async def test_video_is_recognised() -> None:
    mp4 = _mp4()
    up = await check_upload("clip.mp4", mp4, max_bytes=MB)
    assert up.kind == "video"


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.png", b"", "empty"),
        ("notes.txt", b"just some text\n", "not an image, audio or video"),
        ("cut.png", _png()[:50], "corrupt"),
        ("big.png", b"\0" * (MB + 1), "over the"),
    ],
)
async def test_refusals_name_the_file_and_reason(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(ResourceError) as info:
        await check_upload(f"dir/{name}", data, max_bytes=MB)
    assert str(info.value).startswith(f"{name}: ")
    assert reason in str(info.value)


async def test_decompression_bomb_is_refused() -> None:
    # A PNG whose header claims 20000x20000 pixels (400 MP): refused before anything is decoded.
    png = bytearray(_png())
    ihdr = png[12:29]
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    with pytest.raises(ResourceError, match="too large"):
        await check_upload("bomb.png", bytes(png), max_bytes=10 * MB)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=2048))
async def test_random_bytes_only_raise_resource_error(data: bytes) -> None:
    try:
        up = await check_upload("x", data, max_bytes=MB)
    except ResourceError:
        return
    assert up.kind in ("image", "audio", "video")
