"""Loopback helpers shared by the tests."""

from __future__ import annotations

import socket

__all__ = ["unused_port"]


def unused_port() -> int:
    """A 127.0.0.1 port nobody listens on right now (for a server a test starts, or to be refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
