"""Adds and drops references to one content as fast as it can: the subject of the sweep race in
tests/test_storage_s3.py.

Usage: ``python blob_adder.py ROUNDS`` with the storage given by ``DATA_DIR``, ``DATABASE_URL``, ``BLOB_URL``
and ``S3_ENDPOINT`` in the environment. Two tasks each, ROUNDS times: open a conversation, add the shared
content, read it back, delete the conversation (which removes the content if no other row uses it). Prints
one JSON line: rounds done, read-backs that failed, adds that gave up.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from agent.resources import Origin
from storage import S3Options, Storage, StorageConfig, StorageError

SHARED = b"the content everyone adds" * 1000


async def main(rounds: int) -> None:
    config = StorageConfig(
        Path(os.environ["DATA_DIR"]),
        database_url=os.environ.get("DATABASE_URL") or None,
        blob_url=os.environ["BLOB_URL"],
        s3=S3Options(os.environ["S3_ENDPOINT"], "us-east-1", "test", "test"),
    )
    counts = {"rounds": 0, "lost": 0, "gave_up": 0}
    async with await Storage.open(config) as storage:

        async def adder(n: int) -> None:
            for r in range(rounds):
                conversation = await storage.create_conversation("race", external_id=f"{n}-{r}")
                try:
                    resource = await storage.add_resource(
                        conversation.id, SHARED, name="img-1.png", mime="image/png", origin=Origin("upload")
                    )
                except StorageError:
                    counts["gave_up"] += 1
                    continue
                try:
                    assert await storage.read_resource(resource) == SHARED
                except StorageError:
                    counts["lost"] += 1
                await storage.delete_conversation(conversation.id)
                counts["rounds"] += 1

        await asyncio.gather(adder(0), adder(1))
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
