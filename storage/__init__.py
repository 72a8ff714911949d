"""Conversations that survive restarts: the only place SQL and file contents live.

``Storage`` keeps conversations, messages, resources (contents stored once, by SHA-256) and runs with every
status change, in SQLite (default) or PostgreSQL (``DATABASE_URL``), with contents on local disk (default)
or in an S3-compatible bucket (``BLOB_URL``). Callers see only the records and errors below.
"""

from .config import S3Options, StorageConfig, shown_url
from .errors import ConflictError, NotFoundError, StorageError, TurnBusyError
from .move import MoveReport, migrate_storage
from .records import (
    ChatSettings,
    Conversation,
    Message,
    NewUpload,
    Role,
    Run,
    RunEnd,
    RunStatus,
    TaskRecord,
    Turn,
    Usage,
)
from .storage import ConversationResources, Storage

__all__ = [
    "ChatSettings",
    "ConflictError",
    "Conversation",
    "ConversationResources",
    "Message",
    "MoveReport",
    "NewUpload",
    "NotFoundError",
    "Role",
    "Run",
    "RunEnd",
    "RunStatus",
    "S3Options",
    "Storage",
    "StorageConfig",
    "StorageError",
    "TaskRecord",
    "Turn",
    "TurnBusyError",
    "Usage",
    "migrate_storage",
    "shown_url",
]
