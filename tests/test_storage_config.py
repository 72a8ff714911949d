"""Where the storage lives, as the settings say, and what may be shown of it: the database URL's password and
the AWS secret are secrets (kept out of logs and ``repr``), and every place a URL is shown drops its user
information; an unreachable database is reported with its place but no credential."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.settings import Settings
from app.runtime import storage_config
from storage import Storage, StorageConfig, StorageError, shown_url

URL = "postgresql://bot:s3cret-pw@db.internal:5432/hgpt?sslmode=require"


def test_database_and_bucket_settings_become_a_storage_config() -> None:
    settings = Settings.from_mapping(
        {
            "HUGGINGGPT_DATA_DIR": "/srv/data",
            "DATABASE_URL": URL,
            "BLOB_URL": "s3://bucket/prefix",
            "AWS_ENDPOINT_URL_S3": "http://10.0.0.9:8333",
            "AWS_REGION": "eu-west-1",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
        }
    )
    config = storage_config(settings)
    assert (config.data_dir, config.database_url, config.blob_url) == (
        Path("/srv/data"),
        URL,
        "s3://bucket/prefix",
    )
    assert (config.s3.endpoint_url, config.s3.region, config.s3.access_key_id) == (
        "http://10.0.0.9:8333",
        "eu-west-1",
        "AKIAEXAMPLE",
    )
    assert config.engine == "postgresql" and storage_config(Settings()).engine == "sqlite"
    for shown in (repr(settings), repr(config), config.describe()):
        assert "s3cret-pw" not in shown and "aws-secret-value" not in shown and "bot:" not in shown
    assert config.describe() == "postgresql://db.internal:5432/hgpt; s3://bucket/prefix"
    assert {"s3cret-pw", "aws-secret-value"} <= set(settings.secrets)


def test_a_password_given_as_a_parameter_is_a_secret_too() -> None:
    settings = Settings.from_mapping(
        {"DATABASE_URL": "postgresql://bot@/hgpt?host=/run/postgresql&password=p%40ss-2"}
    )
    assert "p@ss-2" in settings.secrets
    assert shown_url(settings.database_url) == "postgresql:///hgpt (socket /run/postgresql)"


def test_wrong_urls_are_refused_with_the_setting_named() -> None:
    with pytest.raises(StorageError, match="DATABASE_URL must be a postgresql:// URL, not mysql://db/x"):
        StorageConfig(Path("data"), database_url="mysql://root:pw@db/x")
    with pytest.raises(StorageError, match="BLOB_URL must look like s3://bucket/prefix"):
        StorageConfig(Path("data"), blob_url="/mnt/files")


async def test_an_unreachable_database_is_named_without_its_password(tmp_path: Path) -> None:
    nobody = tmp_path / "no-server"  # a socket directory where no PostgreSQL listens
    nobody.mkdir()
    url = f"postgresql://bot:s3cret-pw@/hgpt?host={nobody}"
    with pytest.raises(StorageError) as failed:
        await Storage.open(StorageConfig(tmp_path / "data", database_url=url), busy_timeout=0.1)
    assert (
        str(failed.value) == f"cannot reach the database (postgresql /hgpt (socket {nobody})); is it running?"
    )
