from __future__ import annotations

import asyncio
import io
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.errors import ResourceError
from agent.settings import Settings
from agent.uploads import MAX_ATTACHMENTS, Upload, UploadLimits, check_uploads
from tests.fakes.media import flac_claiming, header_bomb, silent_flac

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffmpeg not installed")
MB = 1024 * 1024
LIMITS = UploadLimits(max_bytes=MB, max_seconds=10.0, image_max_side=512)


def _png(size: tuple[int, int] = (32, 24), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "blue").save(buf, "PNG")
    return buf.getvalue()


def _ffmpeg(*args: str) -> bytes:
    return subprocess.run(
        ["ffmpeg", "-loglevel", "error", *args, "pipe:1"], capture_output=True, check=True
    ).stdout


def _wav() -> bytes:
    return _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=0.3", "-f", "wav")


def header_seconds(data: bytes) -> float:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", "-i", "pipe:0"],
        input=data, capture_output=True, check=True,
    )  # fmt: skip
    return float(probe.stdout)


async def check_one(name: str, data: bytes, limits: UploadLimits = LIMITS) -> Upload:
    uploads, refused = await check_uploads([(name, data)], limits)
    if refused:
        raise refused[0]
    return uploads[0]


async def test_image_is_recognised_by_content_not_name() -> None:
    png = _png()
    up = await check_one("holiday.mp3", png)
    assert (up.kind, up.mime) == ("image", "image/png")
    assert up.data == png, "an image within the size models need is kept as it came"


async def test_audio_is_recognised() -> None:
    up = await check_one("voice", _wav())
    assert (up.kind, up.mime) == ("audio", "audio/wav")


def _mp4() -> bytes:
    return _ffmpeg(
        "-f", "lavfi", "-i", "testsrc=duration=0.5:size=64x48:rate=10", "-pix_fmt", "yuv420p",
        "-f", "mp4", "-movflags", "frag_keyframe+empty_moov",
    )  # fmt: skip


async def test_video_is_recognised() -> None:
    up = await check_one("clip.mp4", _mp4())
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
        await check_one(f"dir/{name}", data)
    assert str(info.value).startswith(f"{name}: ")
    assert reason in str(info.value)


async def test_decompression_bomb_is_refused() -> None:
    # A PNG whose header claims 20000x20000 pixels (400 MP): refused before anything is decoded.
    with pytest.raises(ResourceError, match="too large"):
        await check_one("bomb.png", header_bomb(20_000, 20_000))


async def test_an_image_over_the_pixel_limit_is_refused_from_its_header() -> None:
    # 8000x8000 = 64 MP: under Pillow's own limit (89 MP), over ours (50 MP).
    with pytest.raises(ResourceError) as info:
        await check_one("huge.png", header_bomb(8000, 8000))
    assert (
        str(info.value)
        == "huge.png: the image is too large: 8000×8000 pixels (64.0 MP); the limit is 50.0 MP"
    )


async def test_the_images_of_one_request_share_a_pixel_budget() -> None:
    limits = UploadLimits(MB, 10.0, 512, max_image_pixels=200_000, max_request_pixels=400_000)
    files = [(f"p{n}.png", _png((400, 400))) for n in range(3)] + [("voice.wav", _wav())]
    uploads, refused = await check_uploads(files, limits)
    assert [u.filename for u in uploads] == ["p0.png", "p1.png", "voice.wav"]
    assert [str(e) for e in refused] == [
        "p2.png: with it the images of this request hold 0.5 MP; one request can take at most 0.4 MP: "
        "send fewer or smaller images"
    ]


async def test_too_many_files_are_refused_before_any_is_read() -> None:
    with pytest.raises(ResourceError, match=f"at most {MAX_ATTACHMENTS}"):
        await check_uploads([("x.png", b"")] * (MAX_ATTACHMENTS + 1), LIMITS)


def _jpeg(size: tuple[int, int], orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, size[0] // 2, size[1]))  # left half blue
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "mime", "size"),
    [
        (_jpeg((3000, 1000)), "image/jpeg", (512, 171)),
        (_png((600, 1200)), "image/png", (256, 512)),
        (_png((600, 1200), mode="P"), "image/png", (256, 512)),
        (_png((1024, 1024), mode="RGBA"), "image/png", (512, 512)),
    ],
    ids=["JPEG", "PNG", "palette PNG", "RGBA PNG"],
)
async def test_a_large_image_is_stored_downscaled_in_its_own_format(
    data: bytes, mime: str, size: tuple[int, int]
) -> None:
    up = await check_one("photo", data)
    assert up.mime == mime
    with Image.open(io.BytesIO(up.data)) as image:
        assert image.size == size
        assert Image.MIME[image.format or ""] == mime


async def test_a_gif_or_bmp_that_needs_downscaling_becomes_png() -> None:
    for fmt in ("GIF", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (1000, 100), "green").save(buf, fmt)
        up = await check_one(f"x.{fmt.lower()}", buf.getvalue())
        assert up.mime == "image/png"
        assert Image.open(io.BytesIO(up.data)).size == (512, 51)


async def test_a_downscaled_photo_is_turned_upright_from_its_exif_orientation() -> None:
    # Orientation 6: the camera was turned; viewers rotate the 3000x1000 pixels 90° clockwise.
    up = await check_one("phone.jpg", _jpeg((3000, 1000), orientation=6))
    with Image.open(io.BytesIO(up.data)) as image:
        assert image.size == (171, 512)
        assert image.getexif().get(0x0112) in (None, 1)
        top, bottom = image.getpixel((85, 20)), image.getpixel((85, 490))
    assert top[2] > 150 and bottom[0] > 150, "the blue left half is now on top"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def test_a_large_image_is_decoded_outside_this_process() -> None:
    """A 36 MP PNG decodes to ~144 MB: in a worker process, not in the bot's (whose memory would keep the
    high-water mark)."""
    big = _png((6000, 6000))
    before = _rss_mb()
    peak = before
    task = asyncio.create_task(check_one("big.png", big, UploadLimits.from_settings(Settings())))
    while not task.done():
        peak = max(peak, _rss_mb())
        await asyncio.sleep(0.005)
    up = task.result()
    assert Image.open(io.BytesIO(up.data)).size == (2048, 2048)
    assert peak - before < 60, f"this process grew by {peak - before:.0f} MB"


async def test_audio_longer_than_the_limit_is_refused_with_its_length() -> None:
    with pytest.raises(ResourceError) as info:
        await check_one("talk.flac", flac_claiming(silent_flac(60), 60))
    assert str(info.value) == "talk.flac: 1 min of audio is over the 10 s limit"


async def test_audio_whose_header_lies_about_its_length_is_counted_and_refused() -> None:
    liar = flac_claiming(silent_flac(60), 1.0)
    assert header_seconds(liar) == 1.0
    with pytest.raises(ResourceError) as info:
        await check_one("liar.flac", liar)
    assert str(info.value) == "liar.flac: the audio is longer than the 10 s limit"


async def test_an_mp3_has_no_length_in_its_header_through_a_pipe_and_is_counted() -> None:
    mp3 = _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=30", "-b:a", "32k", "-f", "mp3")
    with pytest.raises(ResourceError, match="longer than the 10 s limit"):
        await check_one("long.mp3", mp3)
    assert (await check_one("long.mp3", mp3, UploadLimits(MB, 31.0, 512))).mime == "audio/mpeg"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=2048))
async def test_random_bytes_only_raise_resource_error(data: bytes) -> None:
    try:
        up = await check_one("x", data)
    except ResourceError:
        return
    assert up.kind in ("image", "audio", "video")
