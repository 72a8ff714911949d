"""Where a storage lives: the data directory, and optionally a PostgreSQL database and an S3 bucket.

Built by the application from its settings (``agent.settings``); the storage never reads the environment.
Without ``database_url`` the database is SQLite in ``data_dir``; without ``blob_url`` files are stored under
``data_dir/files``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .errors import StorageError

__all__ = ["DB_NAME", "S3Options", "StorageConfig", "shown_url"]

DB_NAME = "hugginggpt.db"
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


@dataclass(frozen=True)
class S3Options:
    """Explicit S3 settings. Empty fields are left to boto3, which reads its own environment variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3``, …), config files and instance roles."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path
    database_url: str | None = field(default=None, repr=False)
    blob_url: str | None = None
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.database_url and urlsplit(self.database_url).scheme not in _POSTGRES_SCHEMES:
            raise StorageError(
                f"DATABASE_URL must be a postgresql:// URL, not {shown_url(self.database_url)}"
            )
        if self.blob_url and (urlsplit(self.blob_url).scheme != "s3" or not urlsplit(self.blob_url).netloc):
            raise StorageError(f"BLOB_URL must look like s3://bucket/prefix, not {shown_url(self.blob_url)}")

    @property
    def engine(self) -> str:
        return "postgresql" if self.database_url else "sqlite"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / DB_NAME

    def describe(self) -> str:
        """Where the rows and the files are, without any credential: for ``status`` and logs."""
        database = shown_url(self.database_url) if self.database_url else f"sqlite {self.sqlite_path}"
        blobs = shown_url(self.blob_url) if self.blob_url else f"files in {self.data_dir / 'files'}"
        return f"{database}; {blobs}"

    def __repr__(self) -> str:
        return f"StorageConfig({self.describe()})"


def shown_url(url: str) -> str:
    """``url`` without user name, password or query (``postgresql://app:pw@db:5432/x`` -> ``postgresql://db:5432/x``)."""
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    sockets = parse_qs(parts.query).get("host")  # a Unix socket directory, as libpq allows
    return f"{shown} (socket {sockets[0]})" if sockets else shown
