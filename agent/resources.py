"""Resources: the files a conversation holds (uploads and task outputs) and how the agent reads and writes them.

The LLM sees each resource under a short name with its real extension (``img-1.png``, ``out-3-2.wav``);
the store maps names to content-addressed files. ``ResourceStore`` is what the executor writes through;
``storage`` implements it on SQLite, ``MemoryResourceStore`` keeps everything in memory (tests, one-shot use).
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from .tasks import Modality

__all__ = [
    "MemoryResourceStore",
    "Origin",
    "Resource",
    "ResourceStore",
    "extension_for",
    "kind_of_mime",
    "name_prefix",
]


@dataclass(frozen=True)
class Origin:
    """Where a resource came from: a user's upload, or the output of task ``task_id`` of run ``run_id``."""

    source: Literal["upload", "task"]
    run_id: str | None = None
    task_id: int | None = None


@dataclass(frozen=True)
class Resource:
    name: str
    kind: Modality
    mime: str
    sha256: str
    size: int
    path: Path | None = None
    id: str = ""
    origin: Origin = field(default_factory=lambda: Origin("upload"))


class ResourceStore(Protocol):
    """Read and write a conversation's files. Names are unique within a conversation.

    Failures raise ``ResourceStoreError``, which ends the run (see ``Executor``).
    """

    async def read(self, resource: Resource) -> bytes: ...

    async def put(self, data: bytes, *, name: str, mime: str, origin: Origin) -> Resource: ...


def kind_of_mime(mime: str) -> Modality:
    major = mime.split("/", 1)[0]
    if major in ("image", "audio", "video"):
        return major  # type: ignore[return-value]
    return "text"


def extension_for(mime: str) -> str:
    """File extension (with the dot) for a MIME type, preferring the common one."""
    preferred = {
        "image/jpeg": ".jpg",
        "image/png": ".png",
        "audio/mpeg": ".mp3",
        "audio/wav": ".wav",
        "audio/x-wav": ".wav",
        "audio/flac": ".flac",
        "audio/ogg": ".ogg",
        "video/mp4": ".mp4",
        "text/plain": ".txt",
    }
    return preferred.get(mime) or mimetypes.guess_extension(mime) or ".bin"


def name_prefix(kind: Modality) -> str:
    """Prefix of an uploaded resource's prompt name: ``img``, ``aud``, ``vid`` or ``txt``."""
    return {"image": "img", "audio": "aud", "video": "vid", "text": "txt"}[kind]


class MemoryResourceStore:
    """A ``ResourceStore`` that keeps bytes in memory. For tests and for the CLI's one-shot ``--out`` runs."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self.resources: dict[str, Resource] = {}

    async def read(self, resource: Resource) -> bytes:
        return self._data[resource.sha256]

    async def put(self, data: bytes, *, name: str, mime: str, origin: Origin) -> Resource:
        digest = hashlib.sha256(data).hexdigest()
        self._data[digest] = data
        res = Resource(name=name, kind=kind_of_mime(mime), mime=mime, sha256=digest, size=len(data), origin=origin)
        self.resources[name] = res
        return res
