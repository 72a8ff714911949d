"""Who may use the bot where, and how much: allow-lists, the channels it answers in, a per-user rate limit,
one run at a time per thread."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import discord

__all__ = ["AccessPolicy", "RateLimiter", "ThreadQueue", "is_forum_post"]


@dataclass(frozen=True)
class AccessPolicy:
    """Allow-lists of guild, channel and role ids; an empty list allows everything."""

    guilds: frozenset[int] = frozenset()
    channels: frozenset[int] = frozenset()
    roles: frozenset[int] = frozenset()

    def allows(self, guild_id: int | None, channel_ids: Iterable[int], role_ids: Iterable[int]) -> bool:
        """True if a member with ``role_ids`` may use the bot in a channel known by ``channel_ids``.

        A thread passes its own id and its parent's, so a thread of an allowed channel is allowed.
        Direct messages (no guild) are never allowed: the bot works in threads.
        """
        if guild_id is None:
            return False
        if self.guilds and guild_id not in self.guilds:
            return False
        if self.channels and self.channels.isdisjoint(channel_ids):
            return False
        return not self.roles or not self.roles.isdisjoint(role_ids)


@dataclass
class RateLimiter:
    """At most ``per_minute`` runs per user in any 60 seconds; zero or less means no limit."""

    per_minute: int
    clock: Callable[[], float] = time.monotonic
    window: float = 60.0
    _starts: dict[int, deque[float]] = field(default_factory=dict)

    def acquire(self, user_id: int) -> float:
        """Count a run for ``user_id`` and return 0.0, or return the seconds until one is allowed (not counted)."""
        if self.per_minute <= 0:
            return 0.0
        now = self.clock()
        starts = self._starts.setdefault(user_id, deque())
        while starts and starts[0] <= now - self.window:
            starts.popleft()
        if len(starts) >= self.per_minute:
            return starts[0] + self.window - now
        starts.append(now)
        return 0.0


class ThreadQueue:
    """One run at a time per thread; later requests wait their turn, first come first served."""

    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}
        self._holders: dict[int, int] = {}  # thread id -> requests running or waiting

    def busy(self, thread_id: int) -> bool:
        return self._holders.get(thread_id, 0) > 0

    @asynccontextmanager
    async def turn(self, thread_id: int) -> AsyncIterator[None]:
        lock = self._locks.setdefault(thread_id, asyncio.Lock())
        self._holders[thread_id] = self._holders.get(thread_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._holders[thread_id] -= 1
            if not self._holders[thread_id]:
                del self._holders[thread_id]
                del self._locks[thread_id]


def is_forum_post(channel: object) -> bool:
    """Whether ``channel`` is a post of a forum channel: a thread its author opened, where the bot answers in
    place (it cannot open a thread inside a thread)."""
    return isinstance(channel, discord.Thread) and isinstance(channel.parent, discord.ForumChannel)
