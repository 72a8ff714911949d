"""Move a deployment's storage to another one (SQLite to PostgreSQL, local files to a bucket): every row and
every content, nothing lost.

Rows are copied table by table in key order, in batches, each batch inserted with ``ON CONFLICT DO NOTHING``,
so a move that was interrupted can simply be run again. The target must be empty or hold only what an
earlier move of the same source copied; the source must have no other live process (stop the bot first).
Running runs are copied as they are: the target's reaper marks them interrupted, to be reported.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import Connection, Table, bindparam, func, select, tuple_, update

from .errors import StorageError
from .storage import Storage
from .tables import (
    blobs,
    chat_settings,
    conversations,
    messages,
    processes,
    resources,
    run_transitions,
    runs,
    tasks,
)

__all__ = ["MoveReport", "migrate_storage"]

log = logging.getLogger(__name__)

_BATCH = 500
# Parents before children. messages and runs refer to each other: messages go in without their run, which
# is set once the runs are there.
_ORDER: tuple[Table, ...] = (
    blobs,
    conversations,
    messages,
    runs,
    run_transitions,
    tasks,
    resources,
    chat_settings,
)
_KEYS: dict[str, tuple[str, ...]] = {"run_transitions": ("run_id", "seq")}


@dataclass(frozen=True)
class MoveReport:
    """Rows per table found in the target after the move (all of the source's), and contents copied."""

    rows: dict[str, int] = field(default_factory=dict)
    contents_copied: int = 0
    same_blob_store: bool = False

    def summary(self) -> str:
        rows = ", ".join(f"{n} {table}" for table, n in self.rows.items())
        contents = (
            "contents left in place (same store)"
            if self.same_blob_store
            else (f"{self.contents_copied} contents copied")
        )
        return f"{rows}; {contents}"


async def migrate_storage(src: Storage, dst: Storage) -> MoveReport:
    """Copy everything ``src`` holds into ``dst`` and check that the target holds it all."""
    await src.reap()
    others = await src._db.read(lambda c: _other_processes(c, src._id))
    if others:
        raise StorageError(
            f"{others} other process(es) are using {src.describe()}; stop the bot and other commands first"
        )
    ours = set(await src._db.read(lambda c: _ids(c, conversations)))
    theirs = set(await dst._db.read(lambda c: _ids(c, conversations)))
    if not theirs <= ours:
        raise StorageError(f"{dst.describe()} already holds other conversations; move into an empty database")
    same = src._blobs.describe() == dst._blobs.describe()
    copied = 0
    for table in _ORDER:
        async for batch in _batches(src, table):
            if table is blobs and not same:
                for row in batch:
                    data = await src._blobs.get(
                        row["sha256"], row["size"], name=f"content {row['sha256'][:12]}"
                    )
                    await dst._blobs.put(row["sha256"], data, name=f"content {row['sha256'][:12]}")
                    copied += 1
            if table is messages:
                batch = [{**row, "run_id": None} for row in batch]
            statement = dst._db.insert(table).values(batch).on_conflict_do_nothing()
            await dst._db.execute(statement)
    async for batch in _batches(src, messages):
        links = [{"mid": row["id"], "rid": row["run_id"]} for row in batch if row["run_id"] is not None]
        if links:
            link = update(messages).where(messages.c.id == bindparam("mid")).values(run_id=bindparam("rid"))
            await dst._db.execute(link, links)
    report = MoveReport(contents_copied=copied, same_blob_store=same)
    for table in _ORDER:
        expected = await src._db.read(partial(_count, table=table))
        found = await dst._db.read(partial(_count, table=table))
        if found != expected:
            raise StorageError(
                f"the move is incomplete: {table.name} has {found} rows of {expected}; run it again"
            )
        report.rows[table.name] = found
    log.info("moved %s to %s: %s", src.describe(), dst.describe(), report.summary())
    return report


async def _batches(storage: Storage, table: Table) -> AsyncIterator[list[dict[str, Any]]]:
    """The table's rows as dicts, in key order, ``_BATCH`` at a time (keyset pagination)."""
    key = [table.c[name] for name in _KEYS.get(table.name, [c.name for c in table.primary_key])]
    last: tuple[Any, ...] | None = None
    while True:
        query = select(table).order_by(*key).limit(_BATCH)
        if last is not None:
            query = query.where(tuple_(*key) > tuple_(*last))
        rows = await storage._db.read(partial(_rows, query=query))
        if not rows:
            return
        yield rows
        last = tuple(rows[-1][col.name] for col in key)


def _rows(conn: Connection, query: Any) -> list[dict[str, Any]]:
    return [dict(row._mapping) for row in (conn.execute(query)).all()]


def _ids(conn: Connection, table: Table) -> list[str]:
    return list((conn.execute(select(table.c.id))).scalars())


def _count(conn: Connection, table: Table) -> int:
    return int((conn.execute(select(func.count()).select_from(table))).scalar_one())


def _other_processes(conn: Connection, me: str) -> int:
    query = select(func.count()).select_from(processes).where(processes.c.id != me)
    return int((conn.execute(query)).scalar_one())
