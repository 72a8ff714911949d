"""Several processes on one database: explicit order columns instead of SQLite's ``rowid``, one running run
per conversation, heartbeat rows for liveness, and a blob table that arbitrates orphan sweeps.

Existing rows are numbered in their ``rowid`` order (PostgreSQL support starts at this revision, so its
tables are empty here). A conversation that somehow holds several running runs keeps only its newest one
running; the others are interrupted, to be reported. Every stored content referenced by a resource gets its
blob row, and resources now refer to it.

Revision ID: 0003
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ORDERED = {"messages": "conversation_id", "runs": "conversation_id", "resources": "conversation_id"}
# SQLite rebuilds these tables; an unnamed CHECK would not survive the copy, so it is restated.
_CHECKS = {
    "messages": "role IN ('user', 'assistant')",
    "runs": "status IN ('running', 'ok', 'partial', 'failed', 'interrupted')",
    "resources": "origin IN ('upload', 'task')",
}
_REPLACED_INDEXES = {
    "messages": "messages_by_conversation",
    "runs": "runs_by_conversation",
    "run_transitions": "run_transitions_by_run",
}


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.Text, primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("touched_at", sa.Double, nullable=False),
        sa.Column("generation", sa.Text, nullable=False),
    )
    op.create_table(
        "processes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("machine", sa.Text),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started", sa.Text),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "maintenance",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("at", sa.Double, nullable=False),
    )
    op.execute(
        "INSERT INTO blobs (sha256, size, touched_at, generation)"
        " SELECT sha256, max(size), max(created_at), 'adopted' FROM resources GROUP BY sha256"
    )
    for table in (*_ORDERED, "run_transitions"):
        op.add_column(table, sa.Column("seq", sa.Integer))
    if sqlite:
        for table, parent in {**_ORDERED, "run_transitions": "run_id"}.items():
            op.execute(
                f"UPDATE {table} SET seq = numbered.n FROM (SELECT rowid AS r, row_number() OVER"
                f" (PARTITION BY {parent} ORDER BY rowid) AS n FROM {table}) AS numbered"
                f" WHERE {table}.rowid = numbered.r"
            )
        now = time.time()
        older = (
            "status = 'running' AND EXISTS (SELECT 1 FROM runs AS later WHERE later.conversation_id ="
            " runs.conversation_id AND later.status = 'running' AND later.seq > runs.seq)"
        )
        op.execute(
            "INSERT INTO run_transitions (run_id, seq, status, at) SELECT id, (SELECT coalesce(max(t.seq), 0)"
            f" + 1 FROM run_transitions AS t WHERE t.run_id = runs.id), 'interrupted', {now!r}"
            f" FROM runs WHERE {older}"
        )
        op.execute(
            "UPDATE runs SET status = 'interrupted', error = 'the program stopped before this request"
            f" finished', reported = 0, updated_at = {now!r} WHERE {older}"
        )
    op.drop_index("runs_unreported", "runs")  # partial: rebuilt below, not by the batch copy
    for table in (*_ORDERED, "run_transitions"):
        if table in _REPLACED_INDEXES:
            op.drop_index(_REPLACED_INDEXES[table], table)
        checks = (
            [sa.CheckConstraint(_CHECKS[table], name=f"{table}_check")] if sqlite and table in _CHECKS else []
        )
        with op.batch_alter_table(table, table_args=tuple(checks)) as batch:
            batch.alter_column("seq", existing_type=sa.Integer, nullable=False)
            if table == "resources":
                batch.create_foreign_key("resources_sha256_fkey", "blobs", ["sha256"], ["sha256"])
    for table, parent in {**_ORDERED, "run_transitions": "run_id"}.items():
        op.create_index(f"{table}_in_order", table, [parent, "seq"], unique=True)
    running = sa.text("status = 'running'")
    op.create_index(
        "runs_one_running",
        "runs",
        ["conversation_id"],
        unique=True,
        sqlite_where=running,
        postgresql_where=running,
    )
    unreported = sa.text("reported = 0")
    op.create_index(
        "runs_unreported", "runs", ["status"], sqlite_where=unreported, postgresql_where=unreported
    )
