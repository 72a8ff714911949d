"""The controller LLM: one small protocol, and its implementation over any OpenAI-compatible server.

Servers differ in how they constrain output to JSON: OpenAI wants ``response_format`` of type ``json_schema``,
llama.cpp refuses that and takes ``{"type": "json_object", "schema": ...}``, others take neither. ``OpenAILLM``
finds the mode that works (on a 400 it falls back to the next one) and remembers it. Every call's tokens go
into the ``LLMUsage`` the caller passes, so a run's trace can report them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from itertools import pairwise
from typing import Any, Literal, Protocol, TypedDict, cast
from urllib.parse import urlsplit

import json_repair
import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat

from .errors import LLMError, LLMTimeoutError
from .events import LLMUsage
from .grammar import grammar_safe
from .prompts import clip
from .request import valid_text
from .settings import Settings
from .status import BackendStatus

__all__ = [
    "JSON_MODES",
    "LLM",
    "JsonMode",
    "OpenAILLM",
    "estimate_message_tokens",
    "estimate_tokens",
    "parse_json_reply",
]

log = logging.getLogger(__name__)

JsonMode = Literal["json_schema", "json_object_schema", "prompt"]
JSON_MODES: tuple[JsonMode, ...] = ("json_schema", "json_object_schema", "prompt")

_OPENAI_HOST = "api.openai.com"
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_FENCE_RE = re.compile(r"```[A-Za-z]*\s*(.*?)```", re.DOTALL)
_ERROR_DETAIL_CHARS = 200


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
    ) -> str:
        """The raw reply text, constrained to ``schema`` when the backend can; callers still parse leniently.

        ``exact_schema``, when given, makes a schema that says more than ``schema`` in keywords only a grammar
        compiler takes (``prefixItems``, ``$defs``, long patterns): backends that compile a grammar call it and
        use its schema instead; the others never call it (making one costs about a millisecond).
        """
        ...

    def stream(
        self, messages: list[dict[str, str]], *, usage: LLMUsage, max_tokens: int | None = None
    ) -> AsyncIterator[str]: ...

    async def status(self) -> BackendStatus:
        """Whether the LLM is reachable; never raises."""
        ...

    async def aclose(self) -> None:
        """Release the client or the model (at shutdown)."""
        ...


def estimate_tokens(text: str) -> int:
    """Rough token count (~4 characters a token), for budgets and for servers that report no usage."""
    return (len(text) + 3) // 4


def estimate_message_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Rough prompt size of a chat: the text plus a few tokens of framing per message."""
    return 3 + sum(4 + estimate_tokens(m.get("content", "")) for m in messages)


def parse_json_reply(text: str) -> Any:
    """The first JSON object or array in an LLM reply, repaired if need be; None if there is none.

    Tolerates what models wrap JSON in: reasoning blocks, code fences, prose before and after.
    """
    body = _THINK_RE.sub("", text)
    fenced = _FENCE_RE.search(body)
    if fenced:
        body = fenced.group(1)
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        return None
    body = body[min(starts) :]
    try:
        return json.JSONDecoder().raw_decode(body)[0]
    except (ValueError, RecursionError):
        pass
    try:
        value = json_repair.loads(body)
    except Exception:  # the repairer's failure modes are undocumented; unreadable is all we need to know
        return None
    # Several values in a row come back as a list of them: keep the first.
    if isinstance(value, list) and len(value) > 1 and isinstance(value[0], dict if body[0] == "{" else list):
        return value[0]
    return value


class OpenAILLM:
    """``LLM`` over ``openai.AsyncOpenAI``; ``json_mode`` forces a JSON mode instead of finding one."""

    def __init__(
        self,
        settings: Settings,
        client: openai.AsyncOpenAI | None = None,
        *,
        json_mode: JsonMode | None = None,
        max_retries: int = 2,
    ) -> None:
        self.model = settings.llm_model
        self.context_tokens = settings.llm_context_tokens
        self._timeout = settings.llm_timeout
        self._secrets = settings.secrets
        self._owns_client = client is None
        self._client = client or openai.AsyncOpenAI(
            base_url=settings.openai_base_url or None,
            # Local servers need no key, but the client insists on one.
            api_key=settings.openai_api_key or "no-key",
            timeout=settings.llm_timeout,
            max_retries=max_retries,
        )
        url = urlsplit(str(self._client.base_url))
        # Host and port only: a URL's user:password part must never reach a message.
        self.host = f"{url.hostname}:{url.port}" if url.port else str(url.hostname)
        self._is_openai = url.hostname == _OPENAI_HOST
        # None until a JSON call succeeds: then the mode that worked.
        self.json_mode: JsonMode | None = json_mode or ("json_schema" if self._is_openai else None)

    async def complete(
        self, messages: list[dict[str, str]], *, usage: LLMUsage, max_tokens: int | None = None
    ) -> str:
        try:
            return await self._create(messages, usage=usage, max_tokens=max_tokens)
        except (openai.OpenAIError, ValueError) as err:
            raise self._error(err) from err

    async def complete_json(
        self,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any],
        usage: LLMUsage,
        max_tokens: int | None = None,
        exact_schema: Callable[[], dict[str, Any]] | None = None,
    ) -> str:
        modes = (self.json_mode,) if self.json_mode else JSON_MODES

        def schema_for(mode: JsonMode) -> dict[str, Any]:
            # Only llama.cpp's json_object mode compiles a grammar; OpenAI's structured outputs take a
            # subset of JSON schema, and a schema spelled out in the prompt must stay short.
            return exact_schema() if exact_schema and mode == "json_object_schema" else schema

        try:
            for mode, fallback in pairwise(modes):
                try:
                    return await self._create_json(
                        messages, mode, schema_for(mode), usage=usage, max_tokens=max_tokens
                    )
                except openai.APIStatusError as err:
                    if not _refused_format(err):
                        raise
                    log.info("LLM server at %s refused JSON mode %s; trying %s", self.host, mode, fallback)
            return await self._create_json(
                messages, modes[-1], schema_for(modes[-1]), usage=usage, max_tokens=max_tokens
            )
        except (openai.OpenAIError, ValueError) as err:
            raise self._error(err) from err

    async def stream(
        self, messages: list[dict[str, str]], *, usage: LLMUsage, max_tokens: int | None = None
    ) -> AsyncIterator[str]:
        parts: list[str] = []
        reported: tuple[int, int] | None = None
        finished = False
        opened = False
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                messages=_wire(messages),
                stream=True,
                stream_options={"include_usage": True},
                **self._limit(max_tokens),
            )
            opened = True
            async with response:
                async for chunk in response:
                    if chunk.usage is not None:
                        reported = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    for choice in chunk.choices:
                        finished = finished or choice.finish_reason is not None
                        if choice.delta.content:
                            text = valid_text(choice.delta.content)
                            parts.append(text)
                            yield text
        except (openai.OpenAIError, ValueError) as err:
            raise self._error(err, midway=opened) from err
        finally:
            if opened:
                usage.add(*(reported or (estimate_message_tokens(messages), estimate_tokens("".join(parts)))))
        if not finished:
            raise LLMError(f"the answer from the LLM server at {self.host} stopped midway; try again")

    async def status(self) -> BackendStatus:
        try:
            await self._client.with_options(max_retries=0, timeout=min(10.0, self._timeout)).models.list()
        except openai.APIStatusError as err:
            if err.status_code in (401, 403):
                return BackendStatus("llm", False, str(self._error(err)))
            # Reachable; some servers just do not list models.
            return BackendStatus("llm", True, f"{self.model} at {self.host}")
        except Exception as err:  # status() reports, never raises
            return BackendStatus("llm", False, str(self._error(err)))
        return BackendStatus("llm", True, f"{self.model} at {self.host}")

    async def aclose(self) -> None:
        """Close the HTTP client, if this object made it (an injected client belongs to the caller)."""
        if self._owns_client:
            await self._client.close()

    async def _create(
        self,
        messages: list[dict[str, str]],
        *,
        usage: LLMUsage,
        max_tokens: int | None,
        response_format: dict[str, Any] | None = None,
    ) -> str:
        completion = await self._client.chat.completions.create(
            model=self.model,
            messages=_wire(messages),
            response_format=cast("ResponseFormat", response_format) if response_format else openai.omit,
            **self._limit(max_tokens),
        )
        if not completion.choices:
            raise LLMError(f"the LLM server at {self.host} sent a reply with no answer in it; try again")
        text = valid_text(completion.choices[0].message.content or "")
        if completion.usage is not None:
            usage.add(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        else:
            usage.add(estimate_message_tokens(messages), estimate_tokens(text))
        return text

    async def _create_json(
        self,
        messages: list[dict[str, str]],
        mode: JsonMode,
        schema: dict[str, Any],
        *,
        usage: LLMUsage,
        max_tokens: int | None,
    ) -> str:
        text = await self._create(
            _with_schema_hint(messages, schema) if mode == "prompt" else messages,
            usage=usage,
            max_tokens=max_tokens,
            response_format=_response_format(mode, schema),
        )
        self.json_mode = mode
        return text

    def _limit(self, max_tokens: int | None) -> _Limit:
        if max_tokens is None:
            return {}
        # OpenAI's newer models only take max_completion_tokens; other servers know max_tokens.
        return {"max_completion_tokens": max_tokens} if self._is_openai else {"max_tokens": max_tokens}

    def _error(self, err: Exception, *, midway: bool = False) -> LLMError:
        """A short user-facing error for ``err``; never the API key, never the raw reply."""
        if isinstance(err, LLMError):
            return err
        where = f"the LLM server at {self.host}"
        if isinstance(err, openai.APITimeoutError):
            return LLMTimeoutError(f"{where} timed out after {self._timeout:g}s")
        if isinstance(err, openai.APIConnectionError):
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
        return LLMError(f"{where} sent a reply that could not be read; check that it is OpenAI-compatible")

    def _detail(self, err: openai.APIStatusError) -> str:
        body = err.body
        message = body.get("message") if isinstance(body, dict) else None
        text = str(message if message is not None else err.message)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return clip(text, _ERROR_DETAIL_CHARS)


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


def _wire(messages: list[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    return cast("list[ChatCompletionMessageParam]", messages)


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
