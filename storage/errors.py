"""Storage errors. Each message is safe to show a user; the database's own wording goes to the log."""

from __future__ import annotations

from agent.errors import ResourceStoreError

__all__ = ["ConflictError", "NotFoundError", "StorageError", "TurnBusyError"]


class StorageError(ResourceStoreError):
    """The database or the blob store could not do what was asked (busy, disk full, damaged file)."""


class ConflictError(StorageError, ValueError):
    """A record with the same unique key exists: a file name in a conversation, or a platform's channel id."""


class NotFoundError(StorageError, LookupError):
    """The conversation or run a write refers to does not exist (for instance it was deleted by /reset)."""


class TurnBusyError(StorageError):
    """Another run of the conversation is still ``running``; nothing was written. Wait for it, then retry.

    ``run_id`` is the run in the way: when its process dies, a reaper marks it ``interrupted``.
    """

    def __init__(self, conversation_id: str, run_id: str) -> None:
        super().__init__("this conversation is still working on an earlier request; try again when it ends")
        self.conversation_id = conversation_id
        self.run_id = run_id
