"""Users' attachments: downloaded with a size cap and a timeout, then checked together by content
(``agent.uploads.check_uploads``: each file, and the request's total of image pixels).

The cap is checked three times: against the size Discord reports (nothing is downloaded for a file that is
too large), against ``Content-Length``, and while streaming (a server may lie or omit it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from agent.errors import ResourceError
from agent.text import display_name
from agent.uploads import Upload, UploadLimits, check_upload_count, check_uploads

from .text import human_size

__all__ = ["Downloader", "IncomingFile", "read_attachments"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class IncomingFile:
    """What the bot knows of an attachment before downloading it (a ``discord.Attachment`` fits)."""

    filename: str
    url: str
    size: int


class Downloader:
    """Fetches attachment bytes over HTTP with one ``aiohttp`` session, opened on first use."""

    def __init__(self, *, timeout: aiohttp.ClientTimeout | None = None) -> None:
        self.timeout = timeout or aiohttp.ClientTimeout(total=120, sock_connect=10, sock_read=30)
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: str, *, name: str, max_bytes: int) -> bytes:
        """The body at ``url``, or ``ResourceError`` naming the file when it is too large or unreachable."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise ResourceError(f"{name}: could not download it (HTTP {response.status})")
                if (response.content_length or 0) > max_bytes:
                    raise ResourceError(
                        f"{name}: {human_size(response.content_length or 0)} is over the {human_size(max_bytes)} limit"
                    )
                body = bytearray()
                async for chunk in response.content.iter_chunked(_CHUNK):
                    body += chunk
                    if len(body) > max_bytes:
                        raise ResourceError(f"{name}: more than the {human_size(max_bytes)} limit")
                return bytes(body)
        except TimeoutError as err:
            raise ResourceError(f"{name}: the download timed out") from err
        except aiohttp.ClientError as err:
            log.warning("download of %s failed: %s", name, err)
            raise ResourceError(f"{name}: could not download it") from err

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def read_attachments(
    files: Sequence[IncomingFile], downloader: Downloader, limits: UploadLimits
) -> tuple[list[Upload], list[str]]:
    """Download ``files`` concurrently, then check them together: the usable uploads, in order, and one
    reason per refused file (those not downloaded first). ``ResourceError`` if a request cannot take so many."""
    check_upload_count(len(files))

    async def one(f: IncomingFile) -> bytes:
        name = display_name(f.filename)
        if f.size > limits.max_bytes:
            raise ResourceError(
                f"{name}: {human_size(f.size)} is over the {human_size(limits.max_bytes)} limit"
            )
        return await downloader.fetch(f.url, name=name, max_bytes=limits.max_bytes)

    results = await asyncio.gather(*(one(f) for f in files), return_exceptions=True)
    fetched: list[tuple[str, bytes]] = []
    problems: list[str] = []
    for f, result in zip(files, results, strict=True):
        if isinstance(result, bytes):
            fetched.append((f.filename, result))
        elif isinstance(result, ResourceError):
            problems.append(str(result))
        elif isinstance(result, Exception):
            log.error("attachment %s failed", f.filename, exc_info=result)
            problems.append(f"{display_name(f.filename)}: could not be read")
        else:
            raise result
    uploads, refused = await check_uploads(fetched, limits)
    return uploads, problems + [str(err) for err in refused]

