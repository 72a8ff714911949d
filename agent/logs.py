"""Logging set-up that keeps secrets out of every log line."""

from __future__ import annotations

import logging
from collections.abc import Iterable

__all__ = ["RedactSecrets", "configure_logging"]


class RedactSecrets(logging.Filter):
    """Replace each secret value with ``***`` in the formatted message and its arguments."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        cleaned = self._clean(message)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        record.msg, record.args = cleaned, None
        return True

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Client libraries log request URLs and headers at DEBUG; keep them at WARNING unless asked.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "huggingface_hub", "discord", "aiosqlite", "urllib3",
                  "alembic", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
