"""llama.cpp's state after a fixed prompt prefix, on disk, so that a new process need not read it again.

The planner's prompt starts with the same ~900-2,400 tokens every time (the system message, and fixed
demonstrations when they are); Qwen2.5-Coder-1.5B reads them at 35-100 tokens/s on 2 cores, so a fresh
``hugginggpt ask`` would spend most of its time reading what the last one already read. ``save_prefix_state`` stores
the KV cache of sequence 0 for exactly those tokens (``llama_state_seq_get_data``: KV data only, about 28 KB a
token for Qwen, no logits); ``load_prefix_state`` puts it back in a fresh process and makes the ``Llama`` object
believe it evaluated those tokens (``input_ids``/``n_tokens``), so ``Llama.generate`` (and therefore
``create_chat_completion``) skips the common prefix and evaluates only the rest of the prompt. It never trusts
the file: a file made for another model, another llama-cpp-python, another prefix, or one damaged on disk is
ignored (False), never handed to llama.cpp.

``Llama.save_state``/``load_state`` are not used: a ``LlamaState`` holds the whole context's state plus a copy
of the logits (n_batch x vocabulary floats: 311 MB for Qwen), and ``load_state`` leaves ``_requires_eval``
set the same way anyway.

File layout: MAGIC, u32 header length, JSON header, n_tokens int32 token ids, then llama.cpp's sequence state.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import Llama, llama_chat_format

__all__ = [
    "FORMAT",
    "SavedPrefix",
    "chat_tokens",
    "file_sha256",
    "load_prefix_state",
    "model_digest",
    "prefix_state_path",
    "prune_states",
    "save_prefix_state",
    "shared_prefix",
]

MAGIC = b"LLPREFIX"
FORMAT = 1
_SEQ = 0  # llama-cpp-python puts every token of its batches in sequence 0
_HEADER_MAX = 64 * 1024
_CHUNK = 8 << 20


@dataclass(frozen=True)
class SavedPrefix:
    path: Path
    n_tokens: int
    file_bytes: int
    eval_seconds: float
    save_seconds: float


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file. For a model, prefer a digest you already have (a pinned one, or a sidecar)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_digest(model: Path, memo_dir: Path) -> str:
    """The sha256 of a GGUF file: from the ``<file>.sha256`` sidecar of an assembled packaged model, else
    computed once and remembered in ``memo_dir`` by path, size and modification time (hashing a gigabyte
    takes seconds; a changed file gets a new digest). Blocking."""
    sidecar = model.with_name(model.name + ".sha256")
    if sidecar.is_file():
        return sidecar.read_text(encoding="ascii").strip()
    stat = model.stat()
    memo = memo_dir / "model-digests.json"
    key = f"{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known: dict[str, str] = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(model)
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, sort_keys=True), encoding="utf-8")
        tmp.replace(memo)
    return known[key]


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


def _key(model_sha256: str, tokens: Sequence[int]) -> dict[str, Any]:
    """What the state depends on. The token ids stand for the prefix text as this tokenizer reads it."""
    return {
        "format": FORMAT,
        "model_sha256": model_sha256,
        "llama_cpp_python": llama_cpp.__version__,
        "n_tokens": len(tokens),
        "tokens_sha256": hashlib.sha256(_tokens_bytes(tokens)).hexdigest(),
    }


def prefix_state_path(directory: Path, model_sha256: str, tokens: Sequence[int]) -> Path:
    """One file per (model, llama-cpp-python, prefix): a changed prompt or model gets a new name."""
    key = hashlib.sha256(json.dumps(_key(model_sha256, tokens), sort_keys=True).encode()).hexdigest()
    return directory / f"prefix-{key[:24]}.llstate"


def prune_states(directory: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` most recently used state files (a load touches its file); the removed.

    Each prompt prefix (another set of runnable task types, fewer demonstrations for a long request) has a
    file of its own, tens of megabytes for a 1.5B model; without a bound they would pile up."""
    files = sorted(directory.glob("prefix-*.llstate"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    removed = []
    for old in files[keep:]:
        old.unlink(missing_ok=True)
        removed.append(old)
    return removed


def chat_tokens(
    llama: Llama, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """The tokens ``create_chat_completion`` evaluates for ``messages`` with the GGUF's own chat template
    (llama-cpp-python's ``chat_template.default`` handler: render with Jinja, tokenize with special tokens)."""
    if llama.chat_format != "chat_template.default" or llama.chat_handler is not None:
        raise ValueError(f"only the GGUF's own chat template is handled, not {llama.chat_format!r}")
    eos, bos = llama.token_eos(), llama.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"],
        eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
        add_generation_prompt=add_generation_prompt,
    )
    result = formatter(messages=messages)  # type: ignore[arg-type]
    return llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def shared_prefix(
    llama: Llama, messages_a: list[dict[str, str]], messages_b: list[dict[str, str]]
) -> list[int]:
    """The longest common token prefix of two prompts that differ only in their variable part.

    Robust to any chat template (the text of "only the system message" rendered alone may end differently,
    e.g. with a generation prompt). Should a later prompt tokenize differently at the seam, ``generate``
    reuses only what matches and evaluates the rest: this choice affects speed, never the result.
    """
    a, b = chat_tokens(llama, messages_a), chat_tokens(llama, messages_b)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def save_prefix_state(
    llama: Llama, tokens: Sequence[int], path: str | os.PathLike[str], *, model_sha256: str | None = None
) -> SavedPrefix:
    """Evaluate ``tokens`` (unless the context already starts with them) and write the KV state after them.

    Leaves the context holding exactly ``tokens``, ready for a prompt that starts with them. Written to a
    temporary file and renamed, so a reader never sees half a file. Run it on the thread that owns ``llama``.
    """
    tokens = [int(t) for t in tokens]
    if not tokens or len(tokens) >= llama.n_ctx():
        raise ValueError(f"a prefix of {len(tokens)} tokens does not fit a context of {llama.n_ctx()}")
    model_sha256 = model_sha256 or file_sha256(llama.model_path)
    started = time.perf_counter()
    if llama.n_tokens >= len(tokens) and llama._input_ids[: len(tokens)].tolist() == tokens:
        llama._ctx.kv_cache_seq_rm(-1, len(tokens), -1)  # keep only the prefix
        llama.n_tokens = len(tokens)
        llama._requires_eval = True
    else:
        llama.reset()
        llama.eval(tokens)
        llama._requires_eval = True  # the logits are the prefix's last; generate must decode before sampling
    evaluated = time.perf_counter()

    size = llama_cpp.llama_state_seq_get_size(llama.ctx, _SEQ)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(llama.ctx, buffer, size, _SEQ)
    if not 0 < written <= size:
        raise RuntimeError(f"llama.cpp could not copy the sequence state ({written} of {size} bytes)")
    state = memoryview(buffer)[:written]
    header = _key(model_sha256, tokens) | {
        "state_bytes": written,
        "state_sha256": hashlib.sha256(state).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True).encode()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(MAGIC + struct.pack("<I", len(head)) + head)
            f.write(_tokens_bytes(tokens))
            f.write(state)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    done = time.perf_counter()
    return SavedPrefix(target, len(tokens), target.stat().st_size, evaluated - started, done - evaluated)


def load_prefix_state(
    llama: Llama,
    path: str | os.PathLike[str],
    expected_tokens: Sequence[int],
    *,
    model_sha256: str | None = None,
    verify: bool = True,
) -> bool:
    """Restore the state saved after ``expected_tokens``; True if the context now holds them.

    False, with the context left empty, when the file is missing, unreadable, made for another model,
    llama-cpp-python version or prefix, truncated or damaged (``verify`` hashes the state first), or when
    llama.cpp refuses it (e.g. another KV type or a context too small). Nothing reaches llama.cpp unchecked.
    """
    expected = [int(t) for t in expected_tokens]
    try:
        with open(path, "rb") as f:
            blob = bytearray(f.read())
    except OSError:
        return False
    model_sha256 = model_sha256 or file_sha256(llama.model_path)
    header = _read_header(blob)
    if header is None:
        return False
    start, meta = header
    want = _key(model_sha256, expected)
    if any(meta.get(k) != v for k, v in want.items()) or not 0 < len(expected) < llama.n_ctx():
        return False
    tokens_end = start + 4 * len(expected)
    state_bytes = meta.get("state_bytes")
    if not isinstance(state_bytes, int) or len(blob) != tokens_end + state_bytes or state_bytes <= 0:
        return False
    if bytes(blob[start:tokens_end]) != _tokens_bytes(expected):
        return False
    state = (ctypes.c_uint8 * state_bytes).from_buffer(blob, tokens_end)
    if verify and hashlib.sha256(state).hexdigest() != meta.get("state_sha256"):
        return False

    llama.reset()
    llama._ctx.kv_cache_clear()
    if llama_cpp.llama_state_seq_set_data(llama.ctx, state, state_bytes, _SEQ) == 0:
        llama._ctx.kv_cache_clear()
        return False
    llama.input_ids[: len(expected)] = expected
    llama.n_tokens = len(expected)
    llama._requires_eval = True  # no logits were restored: generate evaluates at least one token
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by prune_states
    return True


def _read_header(blob: bytearray) -> tuple[int, dict[str, Any]] | None:
    fixed = len(MAGIC) + 4
    if len(blob) < fixed or bytes(blob[: len(MAGIC)]) != MAGIC:
        return None
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    if length > _HEADER_MAX or len(blob) < fixed + length:
        return None
    try:
        meta = json.loads(bytes(blob[fixed : fixed + length]))
    except (UnicodeDecodeError, ValueError):
        return None
    return (fixed + length, meta) if isinstance(meta, dict) else None
