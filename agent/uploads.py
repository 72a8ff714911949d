"""Checking user files by their content (not their names) before they become conversation resources.

Every size a user controls is bounded before the work it causes: the number of files, each file's bytes,
an image's pixels (from its header: per image, and for all the images of a request together), the length of
audio and video (the header's, and the stream itself counted when the header is silent or says less).
Images are then decoded once, in a worker process of the request's own: the decoded pixels never live in the
bot's process, their memory goes back when the check ends, and no request waits behind another's images (the
worker costs 0.1-0.4 s to start). They are downscaled there to ``image_max_side``, and that is what is stored:
no model decodes a huge original again. Each refusal names the file and the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from . import images
from .errors import ResourceError
from .images import Shrunk, TooLargeError, megapixels
from .settings import Settings
from .tasks import Modality
from .text import display_name
from .workers import ProcessWorker, WorkerCrashedError, run_program

__all__ = [
    "MAX_ATTACHMENTS",
    "MAX_REQUEST_PIXELS",
    "Upload",
    "UploadLimits",
    "check_upload_count",
    "check_uploads",
    "duration_text",
    "media_seconds",
]

# Files one request may carry (Discord's own limit per message): each is held in memory and listed to the LLM.
MAX_ATTACHMENTS = 10
# All the images of one request together: ten 20 MP photos. Their decoding takes a core for seconds.
MAX_REQUEST_PIXELS = 200_000_000
# Each of ffprobe and ffmpeg, on one file (they take milliseconds on a 25 MB file).
_FFPROBE_SECONDS = 20.0
_IMAGE_SECONDS = 30.0

_AUDIO_MIME = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "matroska,webm": "audio/webm",
    "mov,mp4,m4a,3gp,3g2,mj2": "audio/mp4",
}
_VIDEO_MIME = {
    "mov,mp4,m4a,3gp,3g2,mj2": "video/mp4",
    "matroska,webm": "video/webm",
    "avi": "video/x-msvideo",
    "gif": "image/gif",
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadLimits:
    """The bounds one request's files are checked against (the slice of ``Settings`` this module needs)."""

    max_bytes: int
    max_seconds: float
    image_max_side: int
    max_image_pixels: int = images.MAX_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(settings.max_attachment_bytes, settings.max_media_seconds, settings.image_max_side)


@dataclass(frozen=True)
class Upload:
    """A user file that passed the checks: its content decodes as ``kind``, and ``mime`` says what it is.
    An image's ``data`` is what models get: downscaled if the original was larger than they need."""

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


async def check_uploads(
    files: Sequence[tuple[str, bytes]], limits: UploadLimits
) -> tuple[list[Upload], list[ResourceError]]:
    """Check the ``(filename, data)`` files of one request: those that passed, in order, and one error per
    refused file, naming it. Raises ``ResourceError`` (before reading anything) for too many files.

    Images count against the request's pixel budget in order: the first that would exceed it is refused.
    """
    check_upload_count(len(files))
    uploads: list[Upload] = []
    refused: list[ResourceError] = []
    worker: ProcessWorker | None = None
    budget = limits.max_request_pixels
    try:
        for filename, data in files:
            shown = display_name(filename)
            try:
                _check_size(shown, data, limits.max_bytes)
                if images.is_image(data):
                    worker = worker or ProcessWorker("images")
                    shrunk = await _shrink(shown, data, limits, budget, worker)
                    if shrunk is not None:
                        budget -= shrunk.pixels
                        uploads.append(Upload(filename, shrunk.data, "image", shrunk.mime))
                        continue
                kind, mime = await _probe_media(shown, data, limits.max_seconds)
                uploads.append(Upload(filename, data, kind, mime))
            except ResourceError as err:
                refused.append(err)
    finally:
        if worker is not None:
            await worker.aclose()
    return uploads, refused


def duration_text(seconds: float) -> str:
    """``2 h 05 min``, ``9 min 59 s``, ``12 s``: a length a user reads at a glance."""
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s" if secs else f"{minutes} min"
    return f"{secs} s"


def _check_size(shown: str, data: bytes, max_bytes: int) -> None:
    if not data:
        raise ResourceError(f"{shown}: the file is empty")
    if len(data) > max_bytes:
        raise ResourceError(f"{shown}: {_mib(len(data))} is over the {_mib(max_bytes)} limit")


async def _shrink(
    shown: str, data: bytes, limits: UploadLimits, budget: int, worker: ProcessWorker
) -> Shrunk | None:
    """The image decoded and downscaled in ``worker`` (None: not an image after all), or ``ResourceError``."""
    try:
        async with asyncio.timeout(_IMAGE_SECONDS):
            return await worker.run(
                _shrink_in_worker, data, limits.image_max_side, min(limits.max_image_pixels, budget)
            )
    except TooLargeError as err:
        if err.size is not None and err.size[0] * err.size[1] <= limits.max_image_pixels:
            total = limits.max_request_pixels - budget + err.size[0] * err.size[1]
            raise ResourceError(
                f"{shown}: with it the images of this request hold {megapixels(total)}; one request can take "
                f"at most {megapixels(limits.max_request_pixels)}: send fewer or smaller images"
            ) from err
        raise ResourceError(f"{shown}: {err}") from err
    except ResourceError as err:
        raise ResourceError(f"{shown}: {err}") from err
    except TimeoutError as err:
        raise ResourceError(f"{shown}: checking the image took too long") from err
    except WorkerCrashedError as err:
        log.warning("checking image %s: %s", shown, err)
        raise ResourceError(f"{shown}: the image could not be decoded (its decoder failed)") from err


def _shrink_in_worker(data: bytes, max_side: int, max_pixels: int) -> Shrunk | None:
    """In the worker process. Pillow's bomb warning (for the sizes ``shrink`` refuses anyway) is silenced:
    ``catch_warnings`` is safe here because the worker runs one job at a time on its only thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return images.shrink(data, max_side, max_pixels)


async def _probe_media(shown: str, data: bytes, max_seconds: float) -> tuple[Modality, str]:
    """Audio or video, by ffprobe, and no longer than ``max_seconds``; else ``ResourceError``.

    The length is the header's when it says too long; otherwise the stream itself is counted (copied, not
    decoded, and only up to just past the limit): MP3 and Ogg through a pipe have no length in their header,
    and a header may lie (a FLAC claiming a second that holds a day).
    """
    try:
        ffprobe = shutil.which("ffprobe")
        if ffprobe is None:
            raise ResourceError("cannot check audio/video here (ffmpeg is not installed)")
        entries = "format=format_name,duration:stream=codec_type"
        ok, out = await _run(
            [ffprobe, "-v", "error", "-show_entries", entries, "-of", "json", "-i", "pipe:0"], data
        )
        found = _media_kind(out) if ok else None
        if found is None:
            raise ResourceError("not an image, audio or video file I can read")
        kind, mime, said = found
        limit = duration_text(max_seconds)
        if said is not None and said > max_seconds:
            raise ResourceError(f"{duration_text(said)} of {kind} is over the {limit} limit")
        if await media_seconds(data, kind, max_seconds) > max_seconds:
            raise ResourceError(f"the {kind} is longer than the {limit} limit")
        return kind, mime
    except ResourceError as err:
        raise ResourceError(f"{shown}: {err}") from err


async def media_seconds(data: bytes, kind: Modality, max_seconds: float) -> float:
    """How long the first ``kind`` stream of ``data`` really is, counted by ffmpeg from its packets (copied,
    not decoded: milliseconds for 25 MB), whatever the header says; counting stops just past
    ``max_seconds``. ``ResourceError`` if the stream cannot be read."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ResourceError("cannot check audio/video here (ffmpeg is not installed)")
    count = ["-map", "0:a:0" if kind == "audio" else "0:v:0", "-c", "copy", "-t", f"{max_seconds + 1:g}"]
    ok, out = await _run(
        [ffmpeg, "-v", "error", "-nostats", "-i", "pipe:0", *count, "-f", "null", "-progress", "pipe:1", "-"],
        data,
    )
    counted = _progress_seconds(out)
    if not ok or counted is None:
        raise ResourceError(f"the {kind} cannot be read to its end (corrupt or cut short)")
    return counted


async def _run(args: list[str], data: bytes) -> tuple[bool, bytes]:
    """A program fed ``data``: (exited 0, its standard output)."""
    try:
        done = await run_program(args, data, seconds=_FFPROBE_SECONDS)
    except TimeoutError as err:
        raise ResourceError("checking the file took too long") from err
    return done.returncode == 0, done.stdout


def _progress_seconds(out: bytes) -> float | None:
    """The last ``out_time_us`` of ffmpeg's ``-progress`` report, in seconds."""
    times = [line for line in out.decode("ascii", "replace").splitlines() if line.startswith("out_time_us=")]
    try:
        return int(times[-1].partition("=")[2]) / 1e6 if times else None
    except ValueError:
        return None


def _media_kind(out: bytes) -> tuple[Modality, str, float | None] | None:
    try:
        info = json.loads(out or b"{}")
    except json.JSONDecodeError:
        return None
    streams = {s.get("codec_type") for s in info.get("streams", [])}
    fmt = str(info.get("format", {}).get("format_name", ""))
    try:
        seconds: float | None = float(info.get("format", {}).get("duration"))
    except (TypeError, ValueError):
        seconds = None  # not in the header: the decoders' own limit applies
    if "video" in streams and fmt in _VIDEO_MIME and fmt != "gif":
        return "video", _VIDEO_MIME[fmt], seconds
    if "audio" in streams and streams <= {"audio"}:
        mime = _AUDIO_MIME.get(fmt) or _AUDIO_MIME.get(fmt.split(",")[0])
        if mime:
            return "audio", mime, seconds
    if "audio" in streams and fmt in _AUDIO_MIME:
        return "audio", _AUDIO_MIME[fmt], seconds
    return None


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"
