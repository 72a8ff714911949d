"""Generated files made fit for a Discord upload: images as PNG/JPEG, audio as MP3, under the guild's limit.

Pillow and pydub (ffmpeg) block, so every conversion runs in a worker thread. A file that cannot be made to
fit is reported by name with the reason instead of being dropped silently.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import PurePath

from PIL import Image, UnidentifiedImageError
from pydub import AudioSegment
from pydub.exceptions import CouldntDecodeError

from agent.resources import Resource

from .text import human_size

__all__ = ["FILES_PER_MESSAGE", "OutgoingFile", "batches", "fit_for_upload"]

log = logging.getLogger(__name__)

FILES_PER_MESSAGE = 10
_AS_IS_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_AS_IS_AUDIO = frozenset({"audio/mpeg", "audio/ogg"})
_MP3_BITRATES = ("192k", "128k", "64k", "32k")
_SMALLEST_SIDE = 256


@dataclass(frozen=True)
class OutgoingFile:
    filename: str
    data: bytes


class _Unfit(Exception):
    """A file cannot be uploaded; the message says why (shown to the user after the file name)."""


async def fit_for_upload(resource: Resource, data: bytes, limit: int) -> OutgoingFile | str:
    """The file to upload for ``resource``, or a short "name: reason" line when it cannot be uploaded."""
    try:
        if resource.kind == "image":
            return await asyncio.to_thread(_fit_image, resource.name, resource.mime, data, limit)
        if resource.kind == "audio":
            return await asyncio.to_thread(_fit_audio, resource.name, resource.mime, data, limit)
        if len(data) > limit:
            raise _Unfit(f"{human_size(len(data))} is over this server's {human_size(limit)} upload limit")
        return OutgoingFile(resource.name, data)
    except _Unfit as err:
        return f"{resource.name}: {err}"


def _fit_image(name: str, mime: str, data: bytes, limit: int) -> OutgoingFile:
    if mime in _AS_IS_IMAGES and len(data) <= limit:
        return OutgoingFile(name, data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if mime not in _AS_IS_IMAGES:
                png = _encode(img, "PNG")
                if len(png) <= limit:
                    return OutgoingFile(_renamed(name, ".png"), png)
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        log.warning("cannot re-encode image %s: %s", name, err)
        raise _Unfit("the image could not be read to make it smaller") from err
    scale = 1.0
    while True:
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        jpeg = _encode(rgb.resize(size, Image.Resampling.LANCZOS) if scale < 1 else rgb, "JPEG", quality=85)
        if len(jpeg) <= limit:
            return OutgoingFile(_renamed(name, ".jpg"), jpeg)
        if max(size) <= _SMALLEST_SIDE:
            raise _Unfit(f"still {human_size(len(jpeg))} at {size[0]}×{size[1]}, over this server's {human_size(limit)} upload limit")
        scale *= 0.7


def _fit_audio(name: str, mime: str, data: bytes, limit: int) -> OutgoingFile:
    if mime in _AS_IS_AUDIO and len(data) <= limit:
        return OutgoingFile(name, data)
    try:
        sound = AudioSegment.from_file(io.BytesIO(data))
    except (CouldntDecodeError, OSError, IndexError) as err:
        log.warning("cannot decode audio %s: %s", name, err)
        raise _Unfit("the audio could not be decoded to re-encode it") from err
    mp3 = b""
    for bitrate in _MP3_BITRATES:
        out = io.BytesIO()
        sound.export(out, format="mp3", bitrate=bitrate)
        mp3 = out.getvalue()
        if len(mp3) <= limit:
            return OutgoingFile(_renamed(name, ".mp3"), mp3)
    raise _Unfit(f"still {human_size(len(mp3))} as a {_MP3_BITRATES[-1]}bit/s MP3, over this server's {human_size(limit)} upload limit")


def batches(files: list[OutgoingFile], limit: int) -> list[list[OutgoingFile]]:
    """Group files into messages: at most 10 each, and at most ``limit`` bytes together."""
    groups: list[list[OutgoingFile]] = []
    current: list[OutgoingFile] = []
    total = 0
    for f in files:
        if current and (len(current) == FILES_PER_MESSAGE or total + len(f.data) > limit):
            groups.append(current)
            current, total = [], 0
        current.append(f)
        total += len(f.data)
    if current:
        groups.append(current)
    return groups


def _encode(img: Image.Image, fmt: str, **options: int) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, optimize=True, **options)
    return out.getvalue()


def _renamed(name: str, suffix: str) -> str:
    return str(PurePath(name).with_suffix(suffix))

