"""Alembic's entry point, run only by ``storage.migrate`` on a connection it has already locked.

The revisions in ``versions/`` go forward only (there is no downgrade), in order ``0001``, ``0002``, …; a new
one is a new file whose ``down_revision`` is the last. They run inside the caller's transaction, so a
database is always at one revision or the next, never in between (SQLite and PostgreSQL both have
transactional DDL). SQLite changes that need a table rebuilt use ``op.batch_alter_table``.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=True, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
