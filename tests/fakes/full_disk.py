"""Fills the disk under a storage: the subject of tests/test_storage_disk.py.

Usage: ``python full_disk.py DATA_DIR`` where DATA_DIR's parent is a small filesystem of its own (the test
mounts a tmpfs). Writes a message, fills the rest of the disk with a file and restarts; frees the space,
restarts, fills it again and tries a message and a stored file; frees the space and restarts once more. Prints one JSON object: what the user was told each
time, and whether the storage worked again with everything committed before still there.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from agent.resources import Origin
from storage import Storage, StorageError


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass  # ENOSPC: now full
    finally:
        os.close(fd)


async def main(data_dir: Path) -> None:
    said: dict[str, object] = {}
    filler = data_dir.parent / "filler"
    async with await Storage.open(data_dir) as storage:
        conversation = await storage.create_conversation("cli")
        await storage.add_message(conversation.id, "user", "before the disk filled up")
    await asyncio.to_thread(fill, filler)
    try:  # SQLite cannot create its shared-memory index: "disk I/O error"
        async with await Storage.open(data_dir):
            said["restart"] = "opened"
    except StorageError as err:
        said["restart"] = str(err)
    filler.unlink()
    async with await Storage.open(data_dir) as storage:
        await asyncio.to_thread(fill, filler)
        try:  # SQLite cannot append to its log: "database or disk is full"
            await storage.add_message(conversation.id, "user", "x" * 100_000)
        except StorageError as err:
            said["message"] = str(err)
        try:
            await storage.add_resource(
                conversation.id,
                b"picture" * 50_000,
                name="img-1.png",
                mime="image/png",
                origin=Origin("upload"),
            )
        except StorageError as err:
            said["file"] = str(err)
    filler.unlink()
    async with await Storage.open(data_dir) as storage:
        await storage.add_message(conversation.id, "user", "after")
        said["kept"] = [m.text for m in await storage.messages(conversation.id)]
    print(json.dumps(said), flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
