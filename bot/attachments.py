"""Users' attachments: downloaded with a size cap and a timeout, then checked by content (``agent.uploads``).

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
from agent.uploads import Upload, check_upload

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
                    raise ResourceError(f"{name}: {human_size(response.content_length or 0)} is over the {human_size(max_bytes)} limit")
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
    files: Sequence[IncomingFile], downloader: Downloader, *, max_bytes: int
) -> tuple[list[Upload], list[str]]:
    """Download and check ``files`` concurrently: the usable uploads, in order, and one reason per refused file."""

    async def one(f: IncomingFile) -> Upload:
        name = display_name(f.filename)
        if f.size > max_bytes:
            raise ResourceError(f"{name}: {human_size(f.size)} is over the {human_size(max_bytes)} limit")
        data = await downloader.fetch(f.url, name=name, max_bytes=max_bytes)
        return await check_upload(f.filename, data, max_bytes=max_bytes)

    results = await asyncio.gather(*(one(f) for f in files), return_exceptions=True)
    uploads: list[Upload] = []
    problems: list[str] = []
    for f, result in zip(files, results, strict=True):
        if isinstance(result, Upload):
            uploads.append(result)
        elif isinstance(result, ResourceError):
            problems.append(str(result))
        elif isinstance(result, Exception):
            log.error("attachment %s failed", f.filename, exc_info=result)
            problems.append(f"{display_name(f.filename)}: could not be read")
        else:
            raise result
    return uploads, problems
