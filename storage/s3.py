"""Contents in an S3-compatible bucket (AWS S3, R2, Ceph, SeaweedFS, Garage): ``BLOB_URL=s3://bucket/prefix``.

boto3 is blocking, so every call runs in a thread (``asyncio.to_thread``); botocore's timeouts and retries
bound each one. A put is conditional (``If-None-Match: *``): it creates the object or finds it there, never
overwrites, and carries the content's SHA-256 so the server refuses a body damaged on the way.
boto3 is the optional extra ``s3`` (``pip install -e '.[s3]'``), imported only when a bucket is configured.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .blobs import StoredBlob, is_digest
from .config import S3Options
from .errors import StorageError

__all__ = ["S3BlobStore"]

log = logging.getLogger(__name__)

_PUT_ATTEMPTS = 4
_LISTING_PAGE = 1000


@dataclass
class S3BlobStore:
    bucket: str
    prefix: str
    client: Any

    @classmethod
    def from_url(cls, url: str, options: S3Options) -> S3BlobStore:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as err:
            raise StorageError(
                "BLOB_URL is an s3:// URL but boto3 is not installed: pip install -e '.[s3]'"
            ) from err
        parts = urlsplit(url)
        config = Config(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # Path-style addressing works with every S3-compatible server, virtual hosts only with some.
            s3={"addressing_style": "path"} if options.endpoint_url else None,
        )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=options.endpoint_url or None,
            region_name=options.region or None,
            aws_access_key_id=options.access_key_id or None,
            aws_secret_access_key=options.secret_access_key or None,
            config=config,
        )
        return cls(parts.netloc, parts.path.strip("/"), client)

    def describe(self) -> str:
        where = self.client.meta.endpoint_url
        return f"s3://{self.bucket}/{self.prefix} at {urlsplit(where).netloc or where}"

    def path(self, digest: str) -> Path | None:
        return None

    def key(self, digest: str) -> str:
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return f"{self.prefix}/{digest[:2]}/{digest}" if self.prefix else f"{digest[:2]}/{digest}"

    async def put(self, digest: str, data: bytes, *, name: str) -> None:
        try:
            await asyncio.to_thread(self._put, digest, data)
        except _client_errors() as err:
            log.error("could not store %s in %s: %s", name, self.describe(), err)
            raise StorageError(f"could not store {name} in the bucket ({_code(err)})") from err

    async def get(self, digest: str, size: int, *, name: str) -> bytes:
        try:
            data = await asyncio.to_thread(self._get, digest, size)
        except _client_errors() as err:
            if _code(err) in ("NoSuchKey", "404"):
                raise StorageError(f"the file {name} is missing from storage") from err
            log.error("could not read %s from %s: %s", name, self.describe(), err)
            raise StorageError(f"could not read the file {name} from the bucket ({_code(err)})") from err
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise StorageError(f"the file {name} is damaged in storage")
        return data

    async def delete(self, digest: str) -> None:
        try:
            await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=self.key(digest))
        except _client_errors() as err:
            raise StorageError(f"could not delete a file from the bucket ({_code(err)})") from err

    async def listing(self) -> AsyncIterator[list[StoredBlob]]:
        pages = self._pages()
        try:
            while (page := await asyncio.to_thread(next, pages, None)) is not None:
                if page:
                    yield page
        except _client_errors() as err:
            raise StorageError(f"could not list the bucket ({_code(err)})") from err

    async def remove_leftovers(self, older_than: float, now: float) -> int:
        return 0  # a put is all or nothing: an interrupted one leaves no object behind

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)

    def _put(self, digest: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        checksum = base64.b64encode(bytes.fromhex(digest)).decode()
        for attempt in range(1, _PUT_ATTEMPTS + 1):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.key(digest),
                    Body=data,
                    IfNoneMatch="*",
                    ChecksumSHA256=checksum,
                )
                return
            except ClientError as err:
                code = _code(err)
                if code in ("PreconditionFailed", "412"):
                    return  # stored already: same key, same bytes
                # Another put of the same key is in flight: it stores the same bytes; wait and look again.
                if code not in ("ConditionalRequestConflict", "409") or attempt == _PUT_ATTEMPTS:
                    raise
                time.sleep(0.1 * attempt)  # in a worker thread

    def _get(self, digest: str, size: int) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(digest))["Body"]
        try:
            data: bytes = body.read(size + 1)  # one byte more than expected is enough to call it damaged
        finally:
            body.close()
        return data

    def _pages(self) -> Iterator[list[StoredBlob]]:
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": _LISTING_PAGE}
        ):
            found = []
            for item in page.get("Contents", []):
                digest = item["Key"].rsplit("/", 1)[-1]
                if is_digest(digest) and item["Key"] == self.key(digest):
                    found.append((digest, int(item["Size"]), item["LastModified"].timestamp()))
            yield found


def _client_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _code(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(
            response.get("Error", {}).get("Code")
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        )
    return type(err).__name__
