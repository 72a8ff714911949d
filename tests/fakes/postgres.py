"""A throwaway PostgreSQL cluster for the tests: Debian's ``postgresql`` binaries, one cluster per test session
on a Unix socket in a temp dir (no TCP port), a fresh database per test copied from a migrated template.

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

__all__ = ["PostgresCluster", "postgres_bin"]

TEMPLATE = "hgpt_template"
_SUPERUSER = "postgres"


def postgres_bin() -> Path | None:
    """The newest installed server's binaries (Debian keeps them off PATH), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresCluster:
    bin: Path
    root: Path
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def start(cls) -> PostgresCluster:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError(
                "PostgreSQL is not installed (scripts/system-deps.sh installs Debian's postgresql)"
            )
        root = Path(tempfile.mkdtemp(prefix="hgpt-pg-"))
        cluster = cls(bin_dir, root)
        if os.geteuid() == 0:
            os.chmod(root, 0o755)
            shutil.chown(root, _SUPERUSER, _SUPERUSER)
        cluster._run(
            "initdb", "-D", str(root / "data"), "-A", "trust", "--no-sync", "-U", _SUPERUSER, "-E", "UTF8"
        )
        options = (
            f"-k {root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=300"
        )
        cluster._run(
            "pg_ctl", "-D", str(root / "data"), "-o", options, "-l", str(root / "log"), "-w", "start"
        )
        cluster._make_template()
        return cluster

    def url(self, database: str) -> str:
        return f"postgresql://{_SUPERUSER}@/{database}?host={self.root}"

    def new_database(self) -> str:
        """A fresh database at the newest schema revision; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE}')
        return self.url(name)

    def empty_database(self) -> str:
        """A fresh database with no tables at all (for tests of the migrations themselves)."""
        name = f"e{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop(self, url: str) -> None:
        name = url.split("/")[3].split("?")[0]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def _make_template(self) -> None:
        from storage import StorageConfig, schema
        from storage.database import Database

        self._admin(f"CREATE DATABASE {TEMPLATE}")

        async def migrate() -> None:
            db = Database(StorageConfig(self.root, database_url=self.url(TEMPLATE)), busy_timeout=5.0)
            try:
                await schema.upgrade(db)
            finally:
                await db.close()

        asyncio.run(migrate())

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.encode())

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", _SUPERUSER, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
