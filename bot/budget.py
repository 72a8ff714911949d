"""This process's share of Discord's global REST limit, and the pace of progress messages under it.

Discord allows one bot token 50 REST requests a second, shared by every process of the bot. Most of what the
bot sends happens once per request (a thread, the first status, the answer), but progress grows with the
runs going on: one status edit a second and one typing call every 8 s per run, so about 40 runs alone would
reach the limit. Two things keep all processes together under ``DISCORD_REST_PER_SECOND``:

- every REST request of this process waits its turn in a sliding one-second window holding at most this
  process's share, ``DISCORD_REST_PER_SECOND / DISCORD_CLUSTER_COUNT`` (interaction responses go through
  discord.py's webhook adapter, not its HTTP client: Discord does not count them against the global limit);
- progress backs off: the status-edit and typing intervals of every run stretch by one factor, so that the
  progress of all runs together takes at most ``PROGRESS_SHARE`` of that share and leaves the rest to answers
  and threads. Below that (17 runs on one process at the default pace and budget) nothing changes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["PROGRESS_SHARE", "RestBudget"]

T = TypeVar("T")

PROGRESS_SHARE = 0.5
"""The part of the process's requests per second that status edits and typing may take together."""
_WINDOW = 1.0


class RestBudget:
    """At most ``per_second`` REST requests in any one-second window, and the progress pace under it."""

    def __init__(self, per_second: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0:
            raise ValueError("the REST budget must be more than 0 requests a second")
        self.per_second = per_second
        self.clock = clock
        self.runs = 0
        self._limit = max(1, math.floor(per_second))
        self._sent: deque[float] = deque()
        self._turn = asyncio.Lock()  # first come, first served

    async def acquire(self) -> None:
        """Wait until one more request fits in the last second, and count it."""
        async with self._turn:
            while True:
                now = self.clock()
                while self._sent and self._sent[0] <= now - _WINDOW:
                    self._sent.popleft()
                if len(self._sent) < self._limit:
                    self._sent.append(now)
                    return
                await asyncio.sleep(self._sent[0] + _WINDOW - now)

    def limit(self, request: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """``request`` (discord.py's ``HTTPClient.request``) made to wait for its turn first."""

        async def limited(*args: Any, **kwargs: Any) -> T:
            await self.acquire()
            return await request(*args, **kwargs)

        return limited

    @contextmanager
    def run(self) -> Iterator[None]:
        """Count a run as going on (its progress shares the budget) while the block runs."""
        self.runs += 1
        try:
            yield
        finally:
            self.runs -= 1

    def stretch(self, requests_per_run: float) -> float:
        """The factor every run's progress intervals are multiplied by: 1 while the runs' progress, at
        ``requests_per_run`` each a second, fits in ``PROGRESS_SHARE`` of the budget; more beyond."""
        return max(1.0, self.runs * requests_per_run / (self.per_second * PROGRESS_SHARE))
