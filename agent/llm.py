"""The controller LLM: one small protocol, and its implementation over any OpenAI-compatible server.

Servers differ in how they constrain output to JSON: OpenAI wants ``response_format`` of type ``json_schema``,
llama.cpp refuses that and takes ``{"type": "json_object", "schema": ...}``, others take neither. ``OpenAILLM``
finds the mode that works (on a 400 it falls back to the next one) and remembers it. Every call's tokens go
into the ``LLMUsage`` the caller passes, so a run's trace can report them.

Bounds, whatever the server does: one attempt takes at most ``LLM_TIMEOUT`` from request to last byte,
streamed or not (an ``asyncio`` deadline, not the client's per-read timeout, which a server trickling bytes or
SSE keep-alives never trips); transient failures (timeouts, lost connections, HTTP 408/409/429/5xx) are tried
again by this class, not by the client, ``max_retries`` times with waits of at most ``MAX_RETRY_WAIT``
(``Retry-After`` honoured up to that), so a call takes at most ``(1 + max_retries) * LLM_TIMEOUT`` plus
``max_retries * MAX_RETRY_WAIT``. An answer is kept up to ``LLM_MAX_ANSWER_CHARS`` characters and then cut,
with a note at its end; a response body is read up to ``_BODY_BYTES_PER_CHAR`` bytes a character of that (SSE
framing is ~200 bytes a token), and redirects are followed within the server only (``agent.http``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from typing import Any, Literal, Protocol, TypedDict, TypeVar, cast
from urllib.parse import urlsplit

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat
from PIL import Image

from .errors import LLMError, LLMTimeoutError
from .events import LLMUsage
from .grammar import grammar_safe
from .http import (
    MAX_REDIRECTS,
    RedirectRefusedError,
    ResponseTooLargeError,
    bound_client,
    retry_after_seconds,
)
from .logs import redact
from .settings import Settings
from .status import BackendStatus
from .text import clip, valid_text
from .vision import IMAGE_PROMPT_TOKENS, PromptImage

__all__ = [
    "JSON_MODES",
    "LLM",
    "MAX_RETRY_WAIT",
    "AnswerCap",
    "JsonMode",
    "OpenAILLM",
    "estimate_message_tokens",
    "estimate_tokens",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

JsonMode = Literal["json_schema", "json_object_schema", "prompt"]
JSON_MODES: tuple[JsonMode, ...] = ("json_schema", "json_object_schema", "prompt")

MAX_RETRY_WAIT = 30.0
"""Longest wait, in seconds, before trying the LLM again, whatever its ``Retry-After`` asks for."""
_BACKOFF_SECONDS = 0.5
_BODY_BYTES_PER_CHAR = 256
_MIN_BODY_BYTES = 1 << 20
_RETRYABLE_STATUS = frozenset({408, 409, 429})
_OPENAI_HOST = "api.openai.com"
_ERROR_DETAIL_CHARS = 200
_PROBE_TOKENS = 5
_PROBE_SECONDS = 30.0  # the probe delays a run's first plan: a server that sits on it is taken as text-only
# Refusals by the transport bounds: asking again would be refused the same way.
_REFUSED = (ResponseTooLargeError, RedirectRefusedError, httpx2.TooManyRedirects, httpx2.DecodingError)
_FAILURES = (openai.OpenAIError, ValueError, TimeoutError, httpx2.HTTPError)


class LLM(Protocol):
    """What the stages need from the controller LLM. Errors are ``LLMError`` (``LLMTimeoutError`` on timeouts)."""

    model: str
    context_tokens: int

    async def complete(
        self, messages: list[dict[str, str]], *, usage: LLMUsage, max_tokens: int | None = None
    ) -> str: ...

    async def complete_json(
        self,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any],
        usage: LLMUsage,
        max_tokens: int | None = None,
        exact_schema: Callable[[], dict[str, Any]] | None = None,
        cacheable_prefix: int = 0,
        images: Sequence[PromptImage] = (),
    ) -> str:
        """The raw reply text, constrained to ``schema`` when the backend can; callers still parse leniently.

        ``exact_schema``, when given, makes a schema that says more than ``schema`` in keywords only a grammar
        compiler takes (``prefixItems``, ``$defs``, long patterns): backends that compile a grammar call it and
        use its schema instead; the others never call it (making one costs about a millisecond).
        ``cacheable_prefix`` says that the first N messages are the same for many calls (the planner's fixed
        prompt): a backend that can keep its state after them across restarts may do so.
        ``images`` go with the last message when the LLM sees images (``sees_images``); others ignore them.
        """
        ...

    def stream(
        self,
        messages: list[dict[str, str]],
        *,
        usage: LLMUsage,
        max_tokens: int | None = None,
        images: Sequence[PromptImage] = (),
    ) -> AsyncIterator[str]: ...

    async def sees_images(self, usage: LLMUsage) -> bool:
        """Whether images sent with a call reach the model (``LLM_VISION``; ``auto`` asks the server once,
        and that call counts in ``usage``). Never raises."""
        ...

    async def status(self) -> BackendStatus:
        """Whether the LLM is reachable; never raises."""
        ...

    async def aclose(self) -> None:
        """Release the client or the model (at shutdown)."""
        ...

    def activity(self) -> str | None:
        """What keeps a caller waiting right now, for progress displays ("loading the model ...", "queued
        behind 2 other requests"); None when a call would start at once."""
        ...


def estimate_tokens(text: str) -> int:
    """Rough token count (~4 characters a token), for budgets and for servers that report no usage."""
    return (len(text) + 3) // 4


def estimate_message_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Rough prompt size of a chat: the text plus a few tokens of framing per message."""
    return 3 + sum(4 + estimate_tokens(m.get("content", "")) for m in messages)


@dataclass
class AnswerCap:
    """Keeps an answer within ``limit`` characters: ``take`` returns the part of each piece that fits, and
    once a piece did not fit, ``cut`` is set and ``notice`` is the note to end the answer with."""

    limit: int
    kept: int = 0
    cut: bool = False

    def take(self, text: str) -> str:
        room = max(0, self.limit - self.kept)
        if len(text) > room:
            self.cut = True
            text = text[:room]
        self.kept += len(text)
        return text

    @property
    def notice(self) -> str:
        return f"\n\n[answer cut here: it reached the limit of {self.limit:,} characters]"


class OpenAILLM:
    """``LLM`` over ``openai.AsyncOpenAI``; ``json_mode`` forces a JSON mode instead of finding one.

    ``max_retries``: how many times a transient failure is tried again (see the module's bounds); ``sleep``
    waits between tries (tests record the waits instead).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        json_mode: JsonMode | None = None,
        max_retries: int = 2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.model = settings.llm_model
        self.context_tokens = settings.llm_context_tokens
        self.max_answer_chars = settings.llm_max_answer_chars
        self.max_body_bytes = max(_MIN_BODY_BYTES, _BODY_BYTES_PER_CHAR * settings.llm_max_answer_chars)
        self._timeout = settings.llm_timeout
        self._max_retries = max_retries
        self._sleep = sleep
        self._secrets = settings.secrets
        self._client = openai.AsyncOpenAI(
            base_url=settings.openai_base_url or None,
            # Local servers need no key, but the client insists on one.
            api_key=settings.openai_api_key or "no-key",
            timeout=settings.llm_timeout,
            max_retries=0,  # retried here, where each attempt has a deadline
            http_client=bound_client(openai.DefaultAsyncHttpxClient(), max_body_bytes=self.max_body_bytes),
        )
        url = urlsplit(str(self._client.base_url))
        # Host and port only: a URL's user:password part must never reach a message.
        self.host = f"{url.hostname}:{url.port}" if url.port else str(url.hostname)
        self._is_openai = url.hostname == _OPENAI_HOST
        # None until a JSON call succeeds: then the mode that worked.
        self.json_mode: JsonMode | None = json_mode or ("json_schema" if self._is_openai else None)
        # None until the probe answered (LLM_VISION=auto): then whether the server takes images.
        self.vision: bool | None = {"on": True, "off": False}.get(settings.llm_vision)
        self._probing = asyncio.Lock()

    async def complete(
        self, messages: list[dict[str, str]], *, usage: LLMUsage, max_tokens: int | None = None
    ) -> str:
        try:
            text = await self._create(messages, usage=usage, max_tokens=max_tokens)
        except _FAILURES as err:
            raise self._error(err) from err
        cap = AnswerCap(self.max_answer_chars)
        kept = cap.take(text)
        if not cap.cut:
            return kept
        self._log_cut()
        return kept + cap.notice

    async def complete_json(
        self,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any],
        usage: LLMUsage,
        max_tokens: int | None = None,
        exact_schema: Callable[[], dict[str, Any]] | None = None,
        cacheable_prefix: int = 0,
        images: Sequence[PromptImage] = (),
    ) -> str:
        modes = (self.json_mode,) if self.json_mode else JSON_MODES
        images = images if self.vision else ()

        def schema_for(mode: JsonMode) -> dict[str, Any]:
            # Only llama.cpp's json_object mode compiles a grammar; OpenAI's structured outputs take a
            # subset of JSON schema, and a schema spelled out in the prompt must stay short.
            return exact_schema() if exact_schema and mode == "json_object_schema" else schema

        try:
            for mode, fallback in pairwise(modes):
                try:
                    return await self._create_json(
                        messages, mode, schema_for(mode), usage=usage, max_tokens=max_tokens, images=images
                    )
                except openai.APIStatusError as err:
                    if not _refused_format(err):
                        raise
                    log.info("LLM server at %s refused JSON mode %s; trying %s", self.host, mode, fallback)
            return await self._create_json(
                messages, modes[-1], schema_for(modes[-1]), usage=usage, max_tokens=max_tokens, images=images
            )
        except _FAILURES as err:
            raise self._error(err) from err

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        usage: LLMUsage,
        max_tokens: int | None = None,
        images: Sequence[PromptImage] = (),
    ) -> AsyncIterator[str]:
        images = images if self.vision else ()
        parts: list[str] = []
        reported: tuple[int, int] | None = None
        cap = AnswerCap(self.max_answer_chars)
        finished = False
        opened = False
        deadline = 0.0

        async def open_stream(attempt_deadline: float) -> openai.AsyncStream[Any]:
            nonlocal deadline
            deadline = attempt_deadline
            return await self._client.chat.completions.create(
                model=self.model,
                messages=_wire(messages, images),
                stream=True,
                stream_options={"include_usage": True},
                **self._limit(max_tokens),
            )

        try:
            response = await self._attempts(open_stream)
            opened = True
            async with response:
                while not cap.cut:
                    # The attempt's deadline covers every read; the caller's time between chunks counts too.
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(response, None)
                    if chunk is None:
                        break
                    if chunk.usage is not None:
                        reported = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    for choice in chunk.choices:
                        finished = finished or choice.finish_reason is not None
                        text = cap.take(valid_text(choice.delta.content or ""))
                        if text:
                            parts.append(text)
                            yield text
        except _FAILURES as err:
            raise self._error(err, midway=opened) from err
        finally:
            if opened:
                estimated = estimate_message_tokens(messages) + IMAGE_PROMPT_TOKENS * len(images)
                usage.add(*(reported or (estimated, estimate_tokens("".join(parts)))))
        if cap.cut:
            self._log_cut()
            yield cap.notice
        elif not finished:
            raise LLMError(f"the answer from the LLM server at {self.host} stopped midway; try again")

    async def sees_images(self, usage: LLMUsage) -> bool:
        if self.vision is not None:
            return self.vision
        async with self._probing:  # one probe, whoever asks at the same time
            if self.vision is None:
                self.vision = await self._probe_vision(usage)
        return bool(self.vision)

    async def _probe_vision(self, usage: LLMUsage) -> bool | None:
        """One small call with an 8-pixel image: True if the server answers it, False if it refuses it
        (HTTP 4xx, or 500 as llama.cpp without a projector does) or sits on it, None (ask again later) if it
        is down or busy."""
        probe = PromptImage("probe.jpg", _probe_jpeg(), 8, 8)
        messages = [{"role": "user", "content": "What colour is this picture? One word."}]
        try:
            async with asyncio.timeout(min(_PROBE_SECONDS, self._timeout)):
                completion = await self._client.chat.completions.create(
                    model=self.model, messages=_wire(messages, (probe,)), **self._limit(_PROBE_TOKENS)
                )
        except openai.APIStatusError as err:
            if err.status_code in _RETRYABLE_STATUS or err.status_code > 500:
                log.info(
                    "LLM server at %s: the image probe failed (%s); images not sent",
                    self.host,
                    err.status_code,
                )
                return None
            log.info(
                "LLM server at %s does not take images (HTTP %s): LLM_VISION off", self.host, err.status_code
            )
            return False
        except TimeoutError:
            log.info(
                "LLM server at %s did not answer the image probe within %g s: LLM_VISION off",
                self.host,
                min(_PROBE_SECONDS, self._timeout),
            )
            return False
        except _FAILURES as err:
            log.info(
                "LLM server at %s: the image probe failed (%s); images not sent", self.host, self._error(err)
            )
            return None
        if completion.usage is not None:
            usage.add(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        else:
            usage.add(estimate_message_tokens(messages), _PROBE_TOKENS)
        log.info("LLM server at %s takes images: LLM_VISION on", self.host)
        return True

    async def status(self) -> BackendStatus:
        try:
            async with asyncio.timeout(min(10.0, self._timeout)):
                await self._client.with_options(timeout=min(10.0, self._timeout)).models.list()
        except openai.APIStatusError as err:
            if err.status_code in (401, 403):
                return BackendStatus("llm", False, str(self._error(err)))
            # Reachable; some servers just do not list models.
            return BackendStatus("llm", True, f"{self.model} at {self.host}")
        except Exception as err:  # status() reports, never raises
            return BackendStatus("llm", False, str(self._error(err)))
        return BackendStatus("llm", True, f"{self.model} at {self.host}")

    async def aclose(self) -> None:
        await self._client.close()

    def activity(self) -> str | None:
        """A server queues and batches calls itself: nothing here keeps a caller waiting."""
        return None

    async def _attempts(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """``attempt(deadline)`` under an ``LLM_TIMEOUT`` deadline, tried again on transient failures."""
        loop = asyncio.get_running_loop()
        tries = 0
        while True:
            tries += 1
            deadline = loop.time() + self._timeout
            try:
                async with asyncio.timeout_at(deadline):
                    return await attempt(deadline)
            except _FAILURES as err:
                wait = self._retry_wait(err, tries)
                if wait is None:
                    raise
                log.info("LLM server at %s: %s; trying again in %.1f s", self.host, self._error(err), wait)
            await self._sleep(wait)

    def _retry_wait(self, err: Exception, tries: int) -> float | None:
        """Seconds to wait before trying again after ``err`` (the ``tries``-th failure); None: give up."""
        if tries > self._max_retries or isinstance(_root(err), _REFUSED):
            return None
        backoff = _BACKOFF_SECONDS * 2 ** (tries - 1)
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if not (status in _RETRYABLE_STATUS or status >= 500) or _refused_format(err):
                return None
            wait = retry_after_seconds(err.response.headers)
            return min(MAX_RETRY_WAIT, backoff if wait is None else wait)
        if isinstance(err, TimeoutError | openai.APIConnectionError | httpx2.TransportError):
            return backoff
        return None

    async def _create(
        self,
        messages: list[dict[str, str]],
        *,
        usage: LLMUsage,
        max_tokens: int | None,
        response_format: dict[str, Any] | None = None,
        images: Sequence[PromptImage] = (),
    ) -> str:
        completion = await self._attempts(
            lambda _deadline: self._client.chat.completions.create(
                model=self.model,
                messages=_wire(messages, images),
                response_format=cast("ResponseFormat", response_format) if response_format else openai.omit,
                **self._limit(max_tokens),
            )
        )
        if not completion.choices:
            raise LLMError(f"the LLM server at {self.host} sent a reply with no answer in it; try again")
        text = valid_text(completion.choices[0].message.content or "")
        if completion.usage is not None:
            usage.add(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        else:
            usage.add(
                estimate_message_tokens(messages) + IMAGE_PROMPT_TOKENS * len(images), estimate_tokens(text)
            )
        return text

    async def _create_json(
        self,
        messages: list[dict[str, str]],
        mode: JsonMode,
        schema: dict[str, Any],
        *,
        usage: LLMUsage,
        max_tokens: int | None,
        images: Sequence[PromptImage] = (),
    ) -> str:
        text = await self._create(
            _with_schema_hint(messages, schema) if mode == "prompt" else messages,
            usage=usage,
            max_tokens=max_tokens,
            response_format=_response_format(mode, schema),
            images=images,
        )
        self.json_mode = mode
        return text

    def _limit(self, max_tokens: int | None) -> _Limit:
        if max_tokens is None:
            return {}
        # OpenAI's newer models only take max_completion_tokens; other servers know max_tokens.
        return {"max_completion_tokens": max_tokens} if self._is_openai else {"max_tokens": max_tokens}

    def _log_cut(self) -> None:
        log.warning(
            "the answer of the LLM server at %s reached LLM_MAX_ANSWER_CHARS (%d); it was cut there",
            self.host,
            self.max_answer_chars,
        )

    def _error(self, err: Exception, *, midway: bool = False) -> LLMError:
        """A short user-facing error for ``err``; never the API key, never the raw reply."""
        if isinstance(err, LLMError):
            return err
        where = f"the LLM server at {self.host}"
        root = _root(err)
        if isinstance(root, ResponseTooLargeError):
            return LLMError(f"{where} sent a reply over the {root.limit:,}-byte limit; it was refused")
        if isinstance(root, RedirectRefusedError):
            return LLMError(
                f"{where} redirected the request to another server, which is never followed; "
                "check OPENAI_BASE_URL"
            )
        if isinstance(root, httpx2.TooManyRedirects):
            return LLMError(
                f"{where} redirected the request more than {MAX_REDIRECTS} times; check OPENAI_BASE_URL"
            )
        unreadable = LLMError(
            f"{where} sent a reply that could not be read; check that it is OpenAI-compatible"
        )
        if isinstance(root, httpx2.DecodingError):
            return unreadable
        if isinstance(err, TimeoutError | openai.APITimeoutError) or isinstance(
            root, httpx2.TimeoutException
        ):
            return LLMTimeoutError(f"{where} timed out after {self._timeout:g}s")
        if isinstance(err, openai.APIConnectionError) or isinstance(root, httpx2.TransportError):
            if midway:
                return LLMError(f"{where} closed the connection midway through the answer; try again")
            return LLMError(f"cannot reach {where}; check OPENAI_BASE_URL and that the server is running")
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if status == 401:
                return LLMError(f"{where} refused the API key (HTTP 401); check OPENAI_API_KEY")
            if status == 404:
                return LLMError(
                    f"{where} answered HTTP 404; check LLM_MODEL ({self.model}) and OPENAI_BASE_URL"
                )
            if status == 429:
                return LLMError(f"{where} is rate limiting requests (HTTP 429); try again later")
            return LLMError(f"{where} answered HTTP {status}: {self._detail(err)}")
        return unreadable

    def _detail(self, err: openai.APIStatusError) -> str:
        body = err.body
        message = body.get("message") if isinstance(body, dict) else None
        text = str(message if message is not None else err.message)
        return clip(redact(text, self._secrets), _ERROR_DETAIL_CHARS)


def _root(err: BaseException) -> BaseException:
    """What went wrong under the client's wrapping (``APIConnectionError`` keeps the transport's error)."""
    return err.__cause__ if isinstance(err, openai.APIConnectionError) and err.__cause__ is not None else err


def _refused_format(err: openai.APIStatusError) -> bool:
    """Whether ``err`` is a server refusing a ``response_format`` (the next JSON mode may work).

    Servers say it differently: OpenAI-compatible ones with HTTP 400, FastAPI-based ones with 422, and
    llama-cpp-python's own server with HTTP 500 and a validation error naming ``response_format``.
    """
    if err.status_code in (400, 422):
        return True
    return err.status_code >= 500 and "response_format" in f"{err.message} {err.body}"


class _Limit(TypedDict, total=False):
    max_tokens: int
    max_completion_tokens: int


def _wire(
    messages: list[dict[str, str]], images: Sequence[PromptImage] = ()
) -> list[ChatCompletionMessageParam]:
    """The messages as the API takes them; ``images`` go into the last one as image parts, each after a
    text part with its name, so the LLM can tie what it sees to the file names in the prompt."""
    wired: list[dict[str, Any]] = list(messages)
    if images and wired:
        parts: list[dict[str, Any]] = [{"type": "text", "text": wired[-1]["content"]}]
        for image in images:
            parts.append({"type": "text", "text": f"Image {image.name}:"})
            parts.append({"type": "image_url", "image_url": {"url": image.data_url}})
        wired[-1] = {**wired[-1], "content": parts}
    return cast("list[ChatCompletionMessageParam]", wired)


@cache
def _probe_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (220, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def _response_format(mode: JsonMode, schema: dict[str, Any]) -> dict[str, Any] | None:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": False}}
    if mode == "json_object_schema":
        # A llama.cpp server compiles the schema into a grammar, within the same limits as the embedded LLM.
        return {"type": "json_object", "schema": grammar_safe(schema)}
    return None


def _with_schema_hint(messages: list[dict[str, str]], schema: dict[str, Any]) -> list[dict[str, str]]:
    """For servers with no JSON mode: spell the schema out in the system message."""
    hint = (
        "Answer with one JSON value only (no prose, no code fences) that follows this JSON schema: "
        + json.dumps(schema, separators=(",", ":"))
    )
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{hint}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": hint}, *messages]
