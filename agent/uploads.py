"""Checking user files by their content (not their names) before they become conversation resources.

Images are decoded with Pillow under its pixel limit (a decompression bomb is an error, not a warning);
audio and video are probed with ffprobe (what pydub uses). Each failure names the file and the reason.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import ResourceError
from .tasks import Modality

__all__ = ["MAX_ATTACHMENTS", "MAX_IMAGE_PIXELS", "Upload", "check_upload", "check_upload_count"]

# Pillow's default limit (about 89 MP) as a hard error: larger images are refused, not decoded.
MAX_IMAGE_PIXELS = 89_478_485
# Files one request may carry (Discord's own limit per message): each is held in memory and listed to the LLM.
MAX_ATTACHMENTS = 10
_FFPROBE_SECONDS = 20.0

_IMAGE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
_AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg", "matroska,webm": "audio/webm",
               "mov,mp4,m4a,3gp,3g2,mj2": "audio/mp4"}
_VIDEO_MIME = {"mov,mp4,m4a,3gp,3g2,mj2": "video/mp4", "matroska,webm": "video/webm", "avi": "video/x-msvideo",
               "gif": "image/gif"}


@dataclass(frozen=True)
class Upload:
    """A user file that passed the checks: its content decodes as ``kind``, and ``mime`` says what it is."""

    filename: str
    data: bytes
    kind: Modality
    mime: str


def check_upload_count(count: int) -> None:
    """``ResourceError`` if one request carries more than ``MAX_ATTACHMENTS`` files."""
    if count > MAX_ATTACHMENTS:
        raise ResourceError(
            f"{count} files are attached; one request can take at most {MAX_ATTACHMENTS}: send fewer at a time"
        )


async def check_upload(filename: str, data: bytes, *, max_bytes: int) -> Upload:
    """Return the checked upload, or raise ``ResourceError`` naming the file and why it was refused."""
    shown = _display_name(filename)
    if not data:
        raise ResourceError(f"{shown}: the file is empty")
    if len(data) > max_bytes:
        raise ResourceError(f"{shown}: {_mib(len(data))} is over the {_mib(max_bytes)} limit")
    image = await asyncio.to_thread(_probe_image, shown, data)
    if image is not None:
        return Upload(filename, data, "image", image)
    media = await _probe_media(shown, data)
    if media is not None:
        kind, mime = media
        return Upload(filename, data, kind, mime)
    raise ResourceError(f"{shown}: not an image, audio or video file I can read")


def _probe_image(shown: str, data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ResourceError(f"{shown}: {img.width}×{img.height} pixels is too large")
                if fmt not in _IMAGE_MIME:
                    return None
                img.load()
                return _IMAGE_MIME[fmt]
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ResourceError(f"{shown}: the image is too large to decode safely") from err
    except UnidentifiedImageError:
        return None
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow recognised the format but the data is broken (truncated, bad chunks).
        raise ResourceError(f"{shown}: the image is corrupt ({_short(err)})") from err


async def _probe_media(shown: str, data: bytes) -> tuple[Modality, str] | None:
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        raise ResourceError(f"{shown}: cannot check audio/video here (ffprobe from ffmpeg is not installed)")
    proc = await asyncio.create_subprocess_exec(
        ffprobe, "-v", "error", "-show_entries", "format=format_name,duration:stream=codec_type",
        "-of", "json", "-i", "pipe:0",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(data), _FFPROBE_SECONDS)
    except TimeoutError as err:
        proc.kill()
        await proc.wait()
        raise ResourceError(f"{shown}: checking the file took too long") from err
    except (BrokenPipeError, ConnectionResetError):
        out = b""
    try:
        info = json.loads(out or b"{}")
    except json.JSONDecodeError:
        return None
    if proc.returncode != 0:
        return None
    streams = {s.get("codec_type") for s in info.get("streams", [])}
    fmt = str(info.get("format", {}).get("format_name", ""))
    if "video" in streams and fmt in _VIDEO_MIME and fmt != "gif":
        return "video", _VIDEO_MIME[fmt]
    if "audio" in streams and streams <= {"audio"}:
        mime = _AUDIO_MIME.get(fmt) or _AUDIO_MIME.get(fmt.split(",")[0])
        if mime:
            return "audio", mime
    if "audio" in streams and fmt in _AUDIO_MIME:
        return "audio", _AUDIO_MIME[fmt]
    return None


def _display_name(filename: str) -> str:
    name = filename.replace("\\", "/").rsplit("/", 1)[-1] or "file"
    return "".join(ch for ch in name if ch.isprintable())[:80]


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0][:120] if str(err) else type(err).__name__
