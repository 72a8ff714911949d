"""Cancelled runs, per-guild and per-channel settings, and the guild a conversation belongs to (for usage).

A run a user stops is ``cancelled``, not ``interrupted``: nobody is owed an apology for it. ``chat_settings``
holds what ``/config`` set for a whole guild (``channel_id`` empty) or one channel; a NULL field inherits.
``conversations.guild_id`` lets usage be counted per guild; conversations from before it have none.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_STATUSES = "status IN ('running', 'ok', 'partial', 'failed', 'interrupted', 'cancelled')"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column("conversations", sa.Column("guild_id", sa.Text))
    op.create_index("conversations_by_guild", "conversations", ["guild_id"])
    op.create_index("messages_by_author", "messages", ["author", "created_at"])
    op.create_index("runs_by_time", "runs", ["created_at"])
    if sqlite:
        # The table is rebuilt with the new CHECK; its partial indexes are not copied, so they are remade.
        op.drop_index("runs_one_running", "runs")
        op.drop_index("runs_unreported", "runs")
        with op.batch_alter_table("runs", recreate="always") as batch:
            batch.drop_constraint("runs_check", type_="check")  # named by 0003's rebuild
            batch.create_check_constraint("runs_check", _STATUSES)
        running = sa.text("status = 'running'")
        op.create_index("runs_one_running", "runs", ["conversation_id"], unique=True, sqlite_where=running)
        op.create_index("runs_unreported", "runs", ["status"], sqlite_where=sa.text("reported = 0"))
    else:
        op.drop_constraint("runs_status_check", "runs", type_="check")
        op.create_check_constraint("runs_status_check", "runs", _STATUSES)
    op.create_table(
        "chat_settings",
        sa.Column("guild_id", sa.Text, primary_key=True),
        sa.Column("channel_id", sa.Text, primary_key=True),  # '' for the whole guild
        sa.Column("llm_model", sa.Text),
        sa.Column("model_selection", sa.Text),
        sa.Column("max_tasks", sa.Integer),
        sa.Column("task_types", sa.Text),  # a JSON list
        sa.Column("mention_required", sa.Integer),
        sa.Column("updated_by", sa.Text),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
