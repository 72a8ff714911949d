"""HTTP pieces every client of the agent shares: a cap on each response body, redirects followed within one
server only, ``Retry-After``, and what a URL may show.

The LLM client (openai) and the model client (huggingface_hub) are both httpx2 clients underneath.
``bound_client`` makes one of them safe against the server it talks to, whatever code sends the request:

- every response body is counted as it is read and refused past ``max_body_bytes``
  (``ResponseTooLargeError``), and refused at once if its ``Content-Length`` says so; bodies are asked for
  uncompressed and a compressed one is refused (a 1 MB gzip body can inflate to gigabytes past any count of
  the bytes on the wire);
- a redirect is followed only to the same origin (scheme, host and port), at most ``MAX_REDIRECTS`` times:
  a redirect elsewhere would send the prompt and the user's files to a host nobody configured, and use its
  answer (``RedirectRefusedError``, whose message names neither the target nor its credentials).

It works through httpx's event hooks, so the client keeps its own transport (connection pool, proxies from
the environment). Time is not bounded here: callers wrap each attempt in ``asyncio.timeout``.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx2

__all__ = [
    "MAX_REDIRECTS",
    "RedirectRefusedError",
    "ResponseTooLargeError",
    "bound_client",
    "public_url",
    "retry_after_seconds",
    "url_secrets",
]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_DEFAULT_PORTS = {"http": 80, "https": 443}

C = TypeVar("C", httpx2.Client, httpx2.AsyncClient)


class ResponseTooLargeError(httpx2.TransportError):
    """A response body went past its cap (``limit``, in bytes); reading stopped there."""

    def __init__(self, message: str, *, limit: int, request: httpx2.Request | None = None) -> None:
        super().__init__(message, request=request)
        self.limit = limit


class RedirectRefusedError(httpx2.TransportError):
    """A server redirected a request to another origin; it was not followed."""


def public_url(url: str) -> str:
    """``url`` without its ``user:password@`` part: what a status line, a message or a log may show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials written into ``url`` (the password, or a user name given alone, which is then a
    token), as written and percent-decoded: values the logs must redact."""
    if not url or "@" not in urlsplit(url).netloc:
        return ()
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    user, has_password, password = userinfo.partition(":")
    secret = password if has_password else user
    return tuple(dict.fromkeys(s for s in (secret, unquote(secret)) if s))


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a server asks for: ``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    header = headers.get("Retry-After")
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def bound_client(client: C, *, max_body_bytes: int) -> C:
    """Make ``client`` refuse bodies over ``max_body_bytes``, compressed bodies and redirects to another
    origin, and follow at most ``MAX_REDIRECTS`` redirects within its own. Returns ``client``."""
    client.follow_redirects = True
    client.max_redirects = MAX_REDIRECTS
    client.headers["Accept-Encoding"] = "identity"
    hooks: dict[str, list[Callable[..., Any]]] = dict(client.event_hooks)
    if isinstance(client, httpx2.AsyncClient):

        async def check_async(response: httpx2.Response) -> None:
            _check(response, max_body_bytes)
            response.stream = _CappedAsyncStream(response.stream, max_body_bytes, response.request)

        # First, so that hooks already there (huggingface_hub reads error bodies in one) read a capped body.
        hooks["response"] = [check_async, *hooks["response"]]
    else:

        def check(response: httpx2.Response) -> None:
            _check(response, max_body_bytes)
            response.stream = _CappedStream(response.stream, max_body_bytes, response.request)

        hooks["response"] = [check, *hooks["response"]]
    client.event_hooks = hooks
    return client


def _origin(url: httpx2.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _check(response: httpx2.Response, max_body_bytes: int) -> None:
    """Refuse a response before its body is read: a redirect elsewhere, a compressed or a declared-too-large
    body."""
    request = response.request
    if response.has_redirect_location:
        try:
            target = request.url.join(response.headers["Location"])
        except httpx2.InvalidURL:
            target = None
        if target is None or _origin(target) != _origin(request.url):
            log.info(
                "refused a redirect from %s to another server (%s)",
                request.url.host,
                target.host if target is not None else "an unreadable address",
            )
            raise RedirectRefusedError(
                f"the server at {request.url.host} redirected the request to another server", request=request
            )
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise httpx2.DecodingError(
            f"the server sent a compressed body ({encoding[:20]}) although it was asked not to",
            request=request,
        )
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise _too_large(max_body_bytes, request)


def _too_large(limit: int, request: httpx2.Request) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"the server at {request.url.host} sent a response over the {limit:,}-byte limit",
        limit=limit,
        request=request,
    )


class _CappedAsyncStream(httpx2.AsyncByteStream):
    def __init__(
        self, stream: httpx2.AsyncByteStream | httpx2.SyncByteStream, limit: int, request: httpx2.Request
    ):
        assert isinstance(stream, httpx2.AsyncByteStream)
        self._stream, self._limit, self._request = stream, limit, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._stream:
            seen += len(chunk)
            if seen > self._limit:
                raise _too_large(self._limit, self._request)
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class _CappedStream(httpx2.SyncByteStream):
    def __init__(
        self, stream: httpx2.AsyncByteStream | httpx2.SyncByteStream, limit: int, request: httpx2.Request
    ):
        assert isinstance(stream, httpx2.SyncByteStream)
        self._stream, self._limit, self._request = stream, limit, request

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._stream:
            seen += len(chunk)
            if seen > self._limit:
                raise _too_large(self._limit, self._request)
            yield chunk

    def close(self) -> None:
        self._stream.close()
