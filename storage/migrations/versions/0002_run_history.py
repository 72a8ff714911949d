"""Every status change is kept, runs remember their process and whether an interruption was reported, and
the foreign keys that cascades follow get indexes (SQLite ``PRAGMA user_version`` 2).

Runs that predate it get their known transitions back-filled and count as reported: nobody is owed an
apology for an interruption from before the upgrade.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("reported", sa.Integer, nullable=False, server_default="0"))
    op.add_column("runs", sa.Column("session", sa.Text))
    op.execute("UPDATE runs SET reported = 1")
    op.create_table(
        "run_transitions",
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("at", sa.Double, nullable=False),
    )
    op.create_index("run_transitions_by_run", "run_transitions", ["run_id"])
    op.execute("INSERT INTO run_transitions (run_id, status, at) SELECT id, 'running', created_at FROM runs")
    op.execute(
        "INSERT INTO run_transitions (run_id, status, at) SELECT id, status, updated_at FROM runs"
        " WHERE status != 'running'"
    )
    unreported = sa.text("reported = 0")
    op.create_index(
        "runs_unreported", "runs", ["status"], sqlite_where=unreported, postgresql_where=unreported
    )
    op.create_index("messages_by_run", "messages", ["run_id"])
    op.create_index("runs_by_request", "runs", ["request_message_id"])
    op.create_index("resources_by_run", "resources", ["run_id"])
    op.create_index("resources_by_message", "resources", ["message_id"])
