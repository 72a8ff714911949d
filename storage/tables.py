"""The tables as the queries see them, at the newest schema revision (``migrations/`` builds them).

Ordering never relies on SQLite's ``rowid``: messages, runs and resources carry ``seq``, their position in
the conversation, and run transitions their position in the run; each is numbered inside the transaction
that inserts it, under the lock of its parent row.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)

__all__ = [
    "blobs",
    "chat_settings",
    "conversations",
    "maintenance",
    "messages",
    "metadata",
    "processes",
    "resources",
    "run_transitions",
    "runs",
    "tasks",
]

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("platform", Text, nullable=False),
    Column("external_id", Text),
    Column("owner", Text),
    Column("title", Text),
    Column("created_at", Double, nullable=False),
    # The Discord guild of a thread (None elsewhere, and for conversations from before revision 0004).
    Column("guild_id", Text),
    UniqueConstraint("platform", "external_id"),
    Index("conversations_by_guild", "guild_id"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Text, primary_key=True),
    Column("conversation_id", Text, ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("role", Text, CheckConstraint("role IN ('user', 'assistant')"), nullable=False),
    Column("text", Text, nullable=False),
    Column("author", Text),
    Column("platform_message_id", Text),
    Column("created_at", Double, nullable=False),
    Column("run_id", Text, ForeignKey("runs.id", ondelete="SET NULL", use_alter=True)),
    Index("messages_in_order", "conversation_id", "seq", unique=True),
    Index("messages_by_run", "run_id"),
    Index("messages_by_author", "author", "created_at"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("conversation_id", Text, ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("request_message_id", Text, ForeignKey("messages.id", ondelete="SET NULL")),
    Column(
        "status",
        Text,
        CheckConstraint("status IN ('running', 'ok', 'partial', 'failed', 'interrupted', 'cancelled')"),
        nullable=False,
    ),
    Column("plan", Text),
    Column("choices", Text),
    Column("answer", Text),
    Column("error", Text),
    Column("llm_calls", Integer, nullable=False, server_default="0"),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("seconds", Double),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("reported", Integer, nullable=False, server_default="0"),
    # The ``processes`` row of the process that runs it (no foreign key: the row goes when the process ends).
    Column("session", Text),
    Index("runs_in_order", "conversation_id", "seq", unique=True),
    Index("runs_by_request", "request_message_id"),
    Index("runs_by_time", "created_at"),
    # The database, not only each process's queue, allows one running run per conversation.
    Index(
        "runs_one_running",
        "conversation_id",
        unique=True,
        sqlite_where=text("status = 'running'"),
        postgresql_where=text("status = 'running'"),
    ),
    Index(
        "runs_unreported",
        "status",
        sqlite_where=text("reported = 0"),
        postgresql_where=text("reported = 0"),
    ),
)

run_transitions = Table(
    "run_transitions",
    metadata,
    Column("run_id", Text, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("at", Double, nullable=False),
    Index("run_transitions_in_order", "run_id", "seq", unique=True),
)

tasks = Table(
    "tasks",
    metadata,
    Column("run_id", Text, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("task_id", Integer, primary_key=True),
    Column("task", Text, nullable=False),
    Column("model", Text),
    Column("status", Text, nullable=False),
    Column("seconds", Double, nullable=False),
    Column("output", Text, nullable=False),
    Column("error", Text),
)

# One row per stored content. A resource row needs its blob row (foreign key), and a sweep deletes a blob
# only while holding that row's lock: see ``Storage`` for how adding and sweeping never cross.
blobs = Table(
    "blobs",
    metadata,
    Column("sha256", Text, primary_key=True),
    Column("size", Integer, nullable=False),
    Column("touched_at", Double, nullable=False),
    # Made anew whenever the row is: an adder checks it to know the row it refreshed is still the same one.
    Column("generation", Text, nullable=False),
)

resources = Table(
    "resources",
    metadata,
    Column("id", Text, primary_key=True),
    Column("conversation_id", Text, ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("mime", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", Text, ForeignKey("blobs.sha256"), nullable=False),
    Column("origin", Text, CheckConstraint("origin IN ('upload', 'task')"), nullable=False),
    Column("run_id", Text, ForeignKey("runs.id", ondelete="SET NULL")),
    Column("task_id", Integer),
    Column("message_id", Text, ForeignKey("messages.id", ondelete="SET NULL")),
    Column("created_at", Double, nullable=False),
    UniqueConstraint("conversation_id", "name"),
    Index("resources_in_order", "conversation_id", "seq", unique=True),
    Index("resources_by_sha256", "sha256"),
    Index("resources_by_run", "run_id"),
    Index("resources_by_message", "message_id"),
)

# One row per open ``Storage``: who it is (host, pid, the process's start time) and when it last said so.
processes = Table(
    "processes",
    metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("machine", Text),
    Column("pid", Integer, nullable=False),
    Column("started", Text),
    Column("heartbeat_at", Double, nullable=False),
    Column("created_at", Double, nullable=False),
)

# Jobs that one process in the whole deployment does now and then (the orphan sweep): when each last ran.
maintenance = Table(
    "maintenance",
    metadata,
    Column("name", Text, primary_key=True),
    Column("at", Double, nullable=False),
)

# What ``/config`` set for a whole guild (``channel_id`` '') or one channel; a NULL field inherits.
chat_settings = Table(
    "chat_settings",
    metadata,
    Column("guild_id", Text, primary_key=True),
    Column("channel_id", Text, primary_key=True),
    Column("llm_model", Text),
    Column("model_selection", Text),
    Column("max_tasks", Integer),
    Column("task_types", Text),
    Column("mention_required", Integer),
    Column("updated_by", Text),
    Column("updated_at", Double, nullable=False),
)
