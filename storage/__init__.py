"""Conversations that survive restarts: the only place SQL lives.

``Storage`` keeps conversations, messages, resources (files stored once per content under the data
directory) and runs with every status change, in SQLite. Callers see only the records and errors below,
so another backend could stand behind the same API.
"""

from .errors import ConflictError, NotFoundError, StorageError
from .records import Conversation, Message, Role, Run, RunStatus, TaskRecord
from .sqlite import ConversationResources, Storage

__all__ = [
    "ConflictError",
    "Conversation",
    "ConversationResources",
    "Message",
    "NotFoundError",
    "Role",
    "Run",
    "RunStatus",
    "Storage",
    "StorageError",
    "TaskRecord",
]
