"""Bring a database to the newest schema revision at start-up, under a lock, with Alembic.

The revisions are package data (``storage/migrations/versions``). Several processes starting together do not
race: on PostgreSQL the upgrade runs under a transaction-scoped advisory lock, on SQLite inside one
``BEGIN IMMEDIATE`` transaction (the write lock), so the second process finds the work done. Either way the
upgrade is one transaction: a failure leaves the database at the revision it had.

A SQLite file from before Alembic (``PRAGMA user_version`` 1 or 2, no ``alembic_version`` table) is adopted:
stamped at the matching revision and upgraded in place, never recreated. Afterwards ``user_version`` says
the newest revision's number too, so a release from before Alembic refuses the file instead of writing rows
it no longer understands.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect

from .database import Database
from .errors import StorageError

__all__ = ["HEAD", "LEGACY_REVISIONS", "upgrade"]

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parent / "migrations"
LEGACY_REVISIONS = {1: "0001", 2: "0002"}
"""SQLite ``user_version`` of the releases before Alembic, and the revision each matches."""


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(SCRIPTS))


HEAD: str = _scripts().get_current_head() or ""


async def upgrade(db: Database) -> tuple[str | None, str]:
    """Upgrade to the newest revision; return the revision found (None: a new database) and the one reached."""
    return await db.migrate(_upgrade)


def _upgrade(conn: Connection) -> tuple[str | None, str]:
    found = _current(conn)
    scripts = _scripts()
    head = scripts.get_current_head() or ""
    if found is not None and found not in {s.revision for s in scripts.walk_revisions()}:
        raise StorageError(
            f"the database is at schema revision {found}, newer than this program's {head}; upgrade the program"
        )
    if found != head:
        config = Config()
        config.set_main_option("script_location", str(SCRIPTS))
        config.attributes["connection"] = conn
        try:
            command.upgrade(config, "head")
        except CommandError as err:
            raise StorageError(f"the database could not be upgraded: {err}") from err
    if conn.dialect.name == "sqlite":
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise StorageError(
                f"the database upgrade left {len(broken)} rows pointing at nothing; nothing was changed"
            )
        conn.exec_driver_sql(f"PRAGMA user_version = {int(head)}")
    return found, head


def _current(conn: Connection) -> str | None:
    """The revision the database is at; a pre-Alembic SQLite file is stamped with its matching one."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or conn.dialect.name != "sqlite":
        return MigrationContext.configure(conn).get_current_revision()
    version = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
    if version == 0 and "conversations" not in tables:
        return None  # a new file
    if version not in LEGACY_REVISIONS:
        raise StorageError(
            f"the database is at schema version {version}, newer than this program knows; upgrade the program"
        )
    revision = LEGACY_REVISIONS[version]
    MigrationContext.configure(conn).stamp(_scripts(), revision)
    log.info("adopted a schema-version-%d database as revision %s", version, revision)
    return revision
