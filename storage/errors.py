"""Storage errors. Each message is safe to show a user; the database's own wording goes to the log."""

from __future__ import annotations

from agent.errors import ResourceStoreError

__all__ = ["ConflictError", "NotFoundError", "StorageError"]


class StorageError(ResourceStoreError):
    """The database or the file store could not do what was asked (busy, disk full, damaged file)."""


class ConflictError(StorageError, ValueError):
    """A record with the same unique key exists: a file name in a conversation, or a platform's channel id."""


class NotFoundError(StorageError, LookupError):
    """The conversation or run a write refers to does not exist (for instance it was deleted by /reset)."""
