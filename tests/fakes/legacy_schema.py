"""The schema of the releases before Alembic, copied verbatim from ``storage/schema.py`` as it was then
(``PRAGMA user_version`` 1 and 2): the migration tests build real old database files from it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["LEGACY", "make_legacy_database"]

_INITIAL = (
    """CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        external_id TEXT,
        owner TEXT,
        title TEXT,
        created_at REAL NOT NULL,
        UNIQUE (platform, external_id)
    )""",
    """CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        text TEXT NOT NULL,
        author TEXT,
        platform_message_id TEXT,
        created_at REAL NOT NULL,
        run_id TEXT REFERENCES runs (id) ON DELETE SET NULL
    )""",
    "CREATE INDEX messages_by_conversation ON messages (conversation_id)",
    """CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        request_message_id TEXT REFERENCES messages (id) ON DELETE SET NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'ok', 'partial', 'failed', 'interrupted')),
        plan TEXT,
        choices TEXT,
        answer TEXT,
        error TEXT,
        llm_calls INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        seconds REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX runs_by_conversation ON runs (conversation_id)",
    """CREATE TABLE tasks (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        task_id INTEGER NOT NULL,
        task TEXT NOT NULL,
        model TEXT,
        status TEXT NOT NULL,
        seconds REAL NOT NULL,
        output TEXT NOT NULL,
        error TEXT,
        PRIMARY KEY (run_id, task_id)
    )""",
    """CREATE TABLE resources (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        origin TEXT NOT NULL CHECK (origin IN ('upload', 'task')),
        run_id TEXT REFERENCES runs (id) ON DELETE SET NULL,
        task_id INTEGER,
        message_id TEXT REFERENCES messages (id) ON DELETE SET NULL,
        created_at REAL NOT NULL,
        UNIQUE (conversation_id, name)
    )""",
    "CREATE INDEX resources_by_sha256 ON resources (sha256)",
)

# Version 2: every status change is kept (not just the last), runs remember which process owns them and
# whether an interruption was reported, and the foreign keys that cascades follow get indexes.
# Runs that predate it get their known transitions back-filled and count as reported: nobody is owed an
# apology for an interruption from before the upgrade.
_RUN_HISTORY = (
    "ALTER TABLE runs ADD COLUMN reported INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE runs ADD COLUMN session TEXT",
    "UPDATE runs SET reported = 1",
    """CREATE TABLE run_transitions (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    "CREATE INDEX run_transitions_by_run ON run_transitions (run_id)",
    "INSERT INTO run_transitions (run_id, status, at) SELECT id, 'running', created_at FROM runs",
    """INSERT INTO run_transitions (run_id, status, at)
        SELECT id, status, updated_at FROM runs WHERE status != 'running'""",
    "CREATE INDEX runs_unreported ON runs (status) WHERE reported = 0",
    "CREATE INDEX messages_by_run ON messages (run_id)",
    "CREATE INDEX runs_by_request ON runs (request_message_id)",
    "CREATE INDEX resources_by_run ON resources (run_id)",
    "CREATE INDEX resources_by_message ON resources (message_id)",
)

LEGACY: tuple[tuple[str, ...], ...] = (_INITIAL, _RUN_HISTORY)


def make_legacy_database(path: Path, version: int) -> sqlite3.Connection:
    """A new SQLite file at schema ``version`` (1 or 2) as that release made it; the caller adds rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("BEGIN")
    for statements in LEGACY[:version]:
        for statement in statements:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {version}")
    db.execute("COMMIT")
    return db
