"""The first release's schema (SQLite ``PRAGMA user_version`` 1).

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "conversations",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("platform", sa.Text, nullable=False),
        sa.Column("external_id", sa.Text),
        sa.Column("owner", sa.Text),
        sa.Column("title", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("platform", "external_id"),
    )
    # messages and runs refer to each other: SQLite accepts a reference to a table created later, PostgreSQL
    # gets that key once both tables exist.
    run_ref = [sa.ForeignKey("runs.id", ondelete="SET NULL")] if sqlite else []
    op.create_table(
        "messages",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "conversation_id", sa.Text, sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("role", sa.Text, sa.CheckConstraint("role IN ('user', 'assistant')"), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("author", sa.Text),
        sa.Column("platform_message_id", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("run_id", sa.Text, *run_ref),
    )
    op.create_index("messages_by_conversation", "messages", ["conversation_id"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "conversation_id", sa.Text, sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("request_message_id", sa.Text, sa.ForeignKey("messages.id", ondelete="SET NULL")),
        sa.Column(
            "status",
            sa.Text,
            sa.CheckConstraint("status IN ('running', 'ok', 'partial', 'failed', 'interrupted')"),
            nullable=False,
        ),
        sa.Column("plan", sa.Text),
        sa.Column("choices", sa.Text),
        sa.Column("answer", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("llm_calls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("seconds", sa.Double),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    if not sqlite:
        op.create_foreign_key(None, "messages", "runs", ["run_id"], ["id"], ondelete="SET NULL")
    op.create_index("runs_by_conversation", "runs", ["conversation_id"])
    op.create_table(
        "tasks",
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("task_id", sa.Integer, primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("seconds", sa.Double, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "resources",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "conversation_id", sa.Text, sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("mime", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("origin", sa.Text, sa.CheckConstraint("origin IN ('upload', 'task')"), nullable=False),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="SET NULL")),
        sa.Column("task_id", sa.Integer),
        sa.Column("message_id", sa.Text, sa.ForeignKey("messages.id", ondelete="SET NULL")),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("conversation_id", "name"),
    )
    op.create_index("resources_by_sha256", "resources", ["sha256"])
