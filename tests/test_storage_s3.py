"""File contents in an S3-compatible bucket (``BLOB_URL=s3://…``), against moto's S3 server on 127.0.0.1 with
the real boto3 client, on both database engines: round trips, dedupe, create-if-absent puts of the same
content at once, missing and damaged objects, and the sweep race: a sweep never removes a content that
another process is adding a reference to.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from moto.server import ThreadedMotoServer

from agent.resources import Origin
from storage import S3Options, Storage, StorageConfig, StorageError, migrate_storage
from storage.s3 import S3BlobStore

ROOT = Path(__file__).resolve().parent.parent
ADDER = ROOT / "tests" / "fakes" / "blob_adder.py"
BUCKET = "hgpt-test"
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 API server on 127.0.0.1, with one bucket, for the whole session."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client(endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


def client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest.fixture
def s3_config(storage_config: StorageConfig, s3_endpoint: str) -> StorageConfig:
    """The test's storage with its contents under a prefix of their own in the bucket."""
    options = S3Options(s3_endpoint, "us-east-1", "test", "test")
    return replace(storage_config, blob_url=f"s3://{BUCKET}/t{os.getpid()}-{next(_prefixes)}", s3=options)


def objects(config: StorageConfig) -> list[str]:
    assert config.blob_url is not None and config.s3.endpoint_url is not None
    prefix = config.blob_url.split("/", 3)[3]
    listed = client(config.s3.endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", []))


async def test_contents_live_in_the_bucket_once_each(s3_config: StorageConfig) -> None:
    async with await Storage.open(s3_config) as store:
        assert store.describe().endswith(
            f"s3://{BUCKET}/{s3_config.blob_url.split('/', 3)[3]} at 127.0.0.1:"  # type: ignore[union-attr]
            f"{s3_config.s3.endpoint_url.rsplit(':', 1)[1]}"
        )  # type: ignore[union-attr]
        a = await store.create_conversation("cli")
        b = await store.create_conversation("cli")
        one = await store.add_resource(
            a.id, b"a cat", name="img-1.png", mime="image/png", origin=Origin("upload")
        )
        again = await store.add_resource(
            b.id, b"a cat", name="img-1.png", mime="image/png", origin=Origin("upload")
        )
        other = await store.add_resource(
            a.id, b"a dog", name="img-2.png", mime="image/png", origin=Origin("upload")
        )
        assert one.path is None and one.sha256 == again.sha256 == hashlib.sha256(b"a cat").hexdigest()
        assert objects(s3_config) == sorted([one.sha256, other.sha256])  # the same bytes, one object
        assert [await store.read_resource(r) for r in (one, again, other)] == [b"a cat", b"a cat", b"a dog"]
        assert not (s3_config.data_dir / "files").exists()  # nothing on local disk

        await store.delete_conversation(a.id)
        assert objects(s3_config) == [one.sha256]  # b still uses the cat
        await store.delete_conversation(b.id)
        assert objects(s3_config) == []


async def test_missing_and_damaged_objects_are_reported(s3_config: StorageConfig) -> None:
    async with await Storage.open(s3_config) as store:
        conv = await store.create_conversation("cli")
        res = await store.add_resource(
            conv.id, b"original", name="a.txt", mime="text/plain", origin=Origin("upload")
        )
        blobs = S3BlobStore.from_url(s3_config.blob_url or "", s3_config.s3)
        key = blobs.key(res.sha256)
        s3 = client(s3_config.s3.endpoint_url or "")
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"tampered")
        with pytest.raises(StorageError, match="damaged"):
            await store.read_resource(res)
        s3.delete_object(Bucket=BUCKET, Key=key)
        with pytest.raises(StorageError, match="missing"):
            await store.read_resource(res)
        await blobs.close()


async def test_the_same_content_put_at_once_is_stored_once(s3_config: StorageConfig) -> None:
    """Create-if-absent (``If-None-Match: *``): every put but one finds the object there; all succeed."""
    blobs = S3BlobStore.from_url(s3_config.blob_url or "", s3_config.s3)
    data = b"same bytes" * 10_000
    digest = hashlib.sha256(data).hexdigest()
    await asyncio.gather(*(blobs.put(digest, data, name="x") for _ in range(10)))
    assert objects(s3_config) == [digest]
    assert await blobs.get(digest, len(data), name="x") == data
    async with await Storage.open(s3_config) as one, await Storage.open(s3_config) as two:
        conversations = [await one.create_conversation("cli") for _ in range(10)]
        added = await asyncio.gather(
            *(
                (one, two)[n % 2].add_resource(
                    c.id, data, name="img-1.png", mime="image/png", origin=Origin("upload")
                )
                for n, c in enumerate(conversations)
            )
        )
        assert {r.sha256 for r in added} == {digest}
        assert [await two.read_resource(r) for r in added] == [data] * 10
    await blobs.close()


async def test_a_sweep_never_removes_a_content_another_process_is_adding(s3_config: StorageConfig) -> None:
    """Another process adds and drops references to one content in a loop (and its deletes remove the
    content whenever nobody uses it) while this one sweeps every unreferenced content, with no grace
    period, as fast as it can. Every reference added must read back, and at the end every row has its
    object."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATA_DIR": str(s3_config.data_dir),
        "DATABASE_URL": s3_config.database_url or "",
        "BLOB_URL": s3_config.blob_url or "",
        "S3_ENDPOINT": s3_config.s3.endpoint_url or "",
    }
    async with await Storage.open(s3_config) as sweeper:
        adder = await asyncio.create_subprocess_exec(
            sys.executable, str(ADDER), "60", stdout=asyncio.subprocess.PIPE, env=env
        )
        sweeps = removed = 0
        while adder.returncode is None:
            removed += await sweeper.sweep_orphan_files(older_than=0.0)
            sweeps += 1
            try:
                await asyncio.wait_for(adder.wait(), 0.01)
            except TimeoutError:
                pass
        assert adder.stdout is not None
        counts = json.loads((await adder.stdout.read()).decode().splitlines()[-1])
        assert adder.returncode == 0
        assert counts["lost"] == 0 and counts["rounds"] + counts["gave_up"] == 120
        assert counts["rounds"] >= 100  # giving up takes three sweeps in a row between two steps
        assert sweeps > 10 and removed > 0  # the sweeps did run, and did find the content unused at times
        conv = await sweeper.create_conversation("cli")
        kept = await sweeper.add_resource(
            conv.id, b"x" * 10, name="a.txt", mime="text/plain", origin=Origin("upload")
        )
        assert await sweeper.sweep_orphan_files(older_than=0.0) == 0  # referenced: never
        assert await sweeper.read_resource(kept) == b"x" * 10


async def test_an_adder_waits_for_a_sweep_holding_the_row_and_stores_the_content_again(
    tmp_path: Path, database_url: str, s3_endpoint: str
) -> None:
    """The interleaving the lock is for, made to happen: a sweep (here another connection doing its steps)
    holds the blob row while it deletes the object; the adder's refresh of that row waits, then the adder
    puts the object again. Without the row lock, the row would point at a deleted object."""
    config = StorageConfig(
        tmp_path / "data",
        database_url=database_url,
        blob_url=f"s3://{BUCKET}/lock-{os.getpid()}-{next(_prefixes)}",
        s3=S3Options(s3_endpoint, "us-east-1", "test", "test"),
    )
    data = b"contested"
    digest = hashlib.sha256(data).hexdigest()
    async with await Storage.open(config) as store:
        conv = await store.create_conversation("cli")
        first = await store.add_resource(
            conv.id, data, name="a.txt", mime="text/plain", origin=Origin("upload")
        )
        await store.delete_conversation(conv.id)
        conv = await store.create_conversation("cli")
        await store.add_resource(conv.id, data, name="a.txt", mime="text/plain", origin=Origin("upload"))
        await store.delete_conversation(conv.id)  # the object and its row went with their last user
        await store._put_blob(data, "a.txt")  # a process killed before its row: an orphan, row and object
        assert objects(config) == [digest]
        sweep = psycopg.connect(database_url)
        sweep.execute(b"SELECT * FROM blobs WHERE sha256 = %s FOR UPDATE", (digest,))
        conv = await store.create_conversation("cli")
        adding = asyncio.create_task(
            store.add_resource(conv.id, data, name="b.txt", mime="text/plain", origin=Origin("upload"))
        )
        await asyncio.sleep(0.5)
        assert not adding.done()  # waiting for the sweep's lock
        client(s3_endpoint).delete_object(
            Bucket=BUCKET, Key=S3BlobStore.from_url(config.blob_url or "", config.s3).key(digest)
        )
        sweep.execute(b"DELETE FROM blobs WHERE sha256 = %s", (digest,))
        sweep.commit()
        sweep.close()
        added = await adding
        assert added.sha256 == first.sha256 and objects(config) == [digest]
        assert await store.read_resource(added) == data


async def test_local_files_move_into_a_bucket(tmp_path: Path, s3_config: StorageConfig) -> None:
    local = StorageConfig(tmp_path / "local")
    async with await Storage.open(local) as src, await Storage.open(s3_config) as dst:
        conv = await src.create_conversation("cli", conversation_id="c1")
        made = [
            await src.add_resource(
                conv.id, f"file {n}".encode(), name=f"img-{n}.png", mime="image/png", origin=Origin("upload")
            )
            for n in range(3)
        ]
        report = await migrate_storage(src, dst)
        assert report.contents_copied == 3 and not report.same_blob_store
        moved = await dst.resources("c1")
        assert [await dst.read_resource(r) for r in moved] == [f"file {n}".encode() for n in range(3)]
        assert objects(s3_config) == sorted(r.sha256 for r in made)


def test_without_boto3_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if the s3 extra were not installed
    with pytest.raises(StorageError, match=r"boto3 is not installed: pip install -e '\.\[s3\]'"):
        S3BlobStore.from_url("s3://bucket/prefix", S3Options())
