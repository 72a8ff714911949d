"""Generated files made fit for a Discord upload, under the guild's limit.

A file that fits is uploaded as the model made it (a BMP becomes PNG: Discord does not show BMP). An image
that does not fit is opened with the project's safe opener (within its pixel limit; a large JPEG decoded at
reduced scale) and re-encoded as JPEG at shrinking sizes, in a worker thread. Audio that does not fit is
measured once (its streams counted by ffmpeg, up to ``max_seconds``), then encoded once as an MP3 at the
highest bitrate that fits, by ffmpeg as a subprocess that streams and is killed after a timeout. Audio longer
than ``max_seconds``, or that would need less than 32 kbit/s, is refused. Every refusal is a "name: reason"
line for the user instead of a silent drop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import PurePath

from PIL import Image

from agent.errors import ResourceError
from agent.images import open_image
from agent.resources import Resource
from agent.uploads import duration_text, media_seconds
from agent.workers import run_program

from .text import human_size

__all__ = ["FILES_PER_MESSAGE", "OutgoingFile", "batches", "fit_for_upload"]

log = logging.getLogger(__name__)

FILES_PER_MESSAGE = 10
_AS_IS_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# An image is shown at most this large: a larger one is brought down to it before any other attempt.
_LARGEST_SIDE = 4096
_SMALLEST_SIDE = 256
# LAME's MP3 bitrates (kbit/s), from the best worth sending to the least that still carries speech.
_MP3_KBPS = (192, 160, 128, 112, 96, 80, 64, 56, 48, 40, 32)
# Room for the MP3's own headers and frame padding.
_MP3_MARGIN = 0.95
_ENCODE_SECONDS = 120.0


@dataclass(frozen=True)
class OutgoingFile:
    filename: str
    data: bytes


class _Unfit(Exception):
    """A file cannot be uploaded; the message says why (shown to the user after the file name)."""


async def fit_for_upload(
    resource: Resource, data: bytes, limit: int, *, max_seconds: float
) -> OutgoingFile | str:
    """The file to upload for ``resource``, or a short "name: reason" line when it cannot be uploaded."""
    try:
        if len(data) <= limit and (resource.kind != "image" or resource.mime in _AS_IS_IMAGES):
            return OutgoingFile(resource.name, data)
        if resource.kind == "image":
            return await asyncio.to_thread(_fit_image, resource.name, resource.mime, data, limit)
        if resource.kind == "audio":
            return await _fit_audio(resource.name, data, limit, max_seconds)
        raise _Unfit(f"{human_size(len(data))} is over this server's {human_size(limit)} upload limit")
    except _Unfit as err:
        return f"{resource.name}: {err}"


def _fit_image(name: str, mime: str, data: bytes, limit: int) -> OutgoingFile:
    try:
        image = open_image(data, reduce_to=_LARGEST_SIDE // 2)
    except ResourceError as err:
        log.warning("cannot re-encode image %s: %s", name, err)
        raise _Unfit("the image could not be read to make it smaller") from err
    if max(image.size) > _LARGEST_SIDE:
        image.thumbnail((_LARGEST_SIDE, _LARGEST_SIDE), Image.Resampling.LANCZOS)
    if mime not in _AS_IS_IMAGES:
        png = _encode(image, "PNG")
        if len(png) <= limit:
            return OutgoingFile(_renamed(name, ".png"), png)
    rgb = image.convert("RGB")
    while True:
        jpeg = _encode(rgb, "JPEG", quality=85)
        if len(jpeg) <= limit:
            return OutgoingFile(_renamed(name, ".jpg"), jpeg)
        if max(rgb.size) <= _SMALLEST_SIDE:
            raise _Unfit(
                f"still {human_size(len(jpeg))} at {rgb.width}×{rgb.height}, over this server's "
                f"{human_size(limit)} upload limit"
            )
        # A JPEG's size goes roughly with its pixel count: aim just under the limit, at least 10% smaller.
        scale = max(0.5, min(0.9, 0.95 * (limit / len(jpeg)) ** 0.5))
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)


async def _fit_audio(name: str, data: bytes, limit: int, max_seconds: float) -> OutgoingFile:
    try:
        seconds = await media_seconds(data, "audio", max_seconds)
    except ResourceError as err:
        log.warning("cannot measure audio %s: %s", name, err)
        raise _Unfit("the audio could not be decoded to re-encode it") from err
    if seconds > max_seconds:
        raise _Unfit(
            f"over this server's {human_size(limit)} upload limit, and longer than the "
            f"{duration_text(max_seconds)} I re-encode"
        )
    kbps = int(limit * 8 * _MP3_MARGIN / max(seconds, 1.0) / 1000)
    bitrate = next((k for k in _MP3_KBPS if k <= kbps), None)
    if bitrate is None:
        raise _Unfit(
            f"{duration_text(seconds)} of audio would need {kbps} kbit/s to fit this server's "
            f"{human_size(limit)} upload limit; {_MP3_KBPS[-1]} kbit/s is the least I send"
        )
    mp3 = await _encode_mp3(name, data, bitrate, max_seconds)
    if len(mp3) > limit:
        raise _Unfit(
            f"still {human_size(len(mp3))} as a {bitrate} kbit/s MP3, over this server's {human_size(limit)} upload limit"
        )
    return OutgoingFile(_renamed(name, ".mp3"), mp3)


async def _encode_mp3(name: str, data: bytes, kbps: int, max_seconds: float) -> bytes:
    """``data`` as an MP3 at ``kbps``, by ffmpeg (streamed through pipes; killed on timeout or cancellation).
    ``-t`` stops it at ``max_seconds`` even if the file holds more than it was measured to."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise _Unfit("it is too large and ffmpeg, which would make it smaller, is not installed")
    args = [ffmpeg, "-v", "error", "-i", "pipe:0", "-map", "0:a:0", "-t", f"{max_seconds:g}"]
    args += ["-c:a", "libmp3lame", "-b:a", f"{kbps}k", "-f", "mp3", "pipe:1"]
    try:
        done = await run_program(args, data, seconds=_ENCODE_SECONDS)
    except TimeoutError as error:
        raise _Unfit(f"re-encoding it took more than {_ENCODE_SECONDS:g} s") from error
    if done.returncode != 0 or not done.stdout:
        log.warning(
            "ffmpeg could not encode %s: %s", name, done.stderr.decode("utf-8", "replace").strip()[-300:]
        )
        raise _Unfit("the audio could not be decoded to re-encode it")
    return done.stdout


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
