"""Whether a part of the deployment is live, as ``/status``, ``hugginggpt status`` and traces show it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BackendStatus"]


@dataclass(frozen=True)
class BackendStatus:
    """``detail`` is shown to users: it names hosts, never credentials."""

    name: str
    live: bool
    detail: str
