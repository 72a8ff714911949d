"""Logging set-up that keeps secrets out of every log line, and the redaction it uses (also for the error text
of servers, which may quote a token back, whole or in part)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ECHO_CHARS", "RedactSecrets", "Redactor", "configure_logging", "redact"]

ECHO_CHARS = 10
"""Shortest piece of a secret that is redacted on its own (a server quoting the first characters of a token).

Ten characters of a secret are far too many to occur by chance in ordinary text, and longer than most
ordinary words: a piece is only ever matched where the text holds those very characters of the secret
(``tests/test_redaction.py`` checks both with hypothesis). Shorter secrets are redacted whole only.
"""
_MIN_SECRET_CHARS = 4


class Redactor:
    """Replaces every secret, and every run of at least ``ECHO_CHARS`` characters of one, with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        kept = tuple(dict.fromkeys(s for s in secrets if len(s) >= _MIN_SECRET_CHARS))
        self.secrets = kept
        self._short = tuple(sorted((s for s in kept if len(s) < ECHO_CHARS), key=len, reverse=True))
        # Every ECHO_CHARS-long piece of every secret long enough to have one.
        self._pieces = frozenset(s[i : i + ECHO_CHARS] for s in kept for i in range(len(s) - ECHO_CHARS + 1))

    def __call__(self, text: str) -> str:
        # Pieces of long secrets first: a short secret replaced inside a long one would split its pieces.
        text = self._without_pieces(text)
        for secret in self._short:
            text = text.replace(secret, "***")
        return text

    def _without_pieces(self, text: str) -> str:
        if not self._pieces or len(text) < ECHO_CHARS:
            return text
        # Mark every character covered by a piece of a secret, then replace each covered run once.
        covered = bytearray(len(text))
        for i in range(len(text) - ECHO_CHARS + 1):
            if text[i : i + ECHO_CHARS] in self._pieces:
                covered[i : i + ECHO_CHARS] = b"\x01" * ECHO_CHARS
        out: list[str] = []
        end = 0
        while (start := covered.find(1, end)) >= 0:
            out.append(text[end:start])
            out.append("***")
            end = covered.find(0, start)
            if end < 0:
                return "".join(out)
        out.append(text[end:])
        return "".join(out)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and every piece of one at least ``ECHO_CHARS`` long, shown as ``***``."""
    return Redactor(secrets)(text)


class RedactSecrets(logging.Filter):
    """Redact secrets (``Redactor``) in the formatted message and traceback of every record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.redact = Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.redact.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        cleaned = self.redact(message)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        record.msg, record.args = cleaned, None
        return True


def configure_logging(
    level: str, secrets: Iterable[str], *, log_file: Path | None = None, console_level: str | None = None
) -> None:
    """Log at ``level`` to stderr, every line scrubbed of ``secrets``.

    With ``log_file``, the log goes to that file and stderr shows only ``console_level`` and above (default:
    errors), so that an interactive terminal is not interleaved with library chatter.
    """
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact = RedactSecrets(secrets)
    console = logging.StreamHandler()
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        console.setLevel((console_level or "ERROR").upper())
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redact)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Client libraries log request URLs and headers at DEBUG; keep them at WARNING unless asked.
    for noisy in (
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "openai",
        "huggingface_hub",
        "discord",
        "aiosqlite",
        "urllib3",
        "alembic",
        "botocore",
        "boto3",
        "s3transfer",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
