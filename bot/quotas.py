"""Daily quotas: how many runs a user may start and how many LLM tokens their runs may use in a UTC day.

Usage is counted from the runs already stored (``Conversations.usage``), so it survives restarts and is shared
by every process on one database. Tokens are known when a run ends, so a run in progress counts as a run but
not yet as tokens. A role in ``DISCORD_ROLE_LIMITS`` replaces the per-user limits; a member with several such
roles gets the most generous of them. 0 means no limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from storage import Usage

from .config import DiscordConfig

__all__ = ["DAY_SECONDS", "DailyLimit", "QuotaPolicy", "day_start", "describe_usage", "refusal"]

DAY_SECONDS = 86400.0


@dataclass(frozen=True)
class DailyLimit:
    """Runs and LLM tokens a day; 0: no limit."""

    runs: int = 0
    tokens: int = 0

    def __bool__(self) -> bool:
        return bool(self.runs or self.tokens)


@dataclass(frozen=True)
class QuotaPolicy:
    user: DailyLimit = DailyLimit()
    roles: Mapping[int, DailyLimit] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: DiscordConfig) -> QuotaPolicy:
        return cls(
            DailyLimit(config.user_runs_per_day, config.user_tokens_per_day),
            {r.role_id: DailyLimit(r.runs, r.tokens) for r in config.role_limits},
        )

    def limit_for(self, role_ids: Iterable[int]) -> DailyLimit:
        """The user's limits, or the most generous of their roles' overrides."""
        overrides = [self.roles[r] for r in role_ids if r in self.roles]
        if not overrides:
            return self.user
        return DailyLimit(_most(o.runs for o in overrides), _most(o.tokens for o in overrides))


def _most(values: Iterable[int]) -> int:
    found = list(values)
    return 0 if 0 in found else max(found)


def day_start(now: float) -> float:
    """The start of ``now``'s UTC day; quotas reset a day later."""
    return math.floor(now / DAY_SECONDS) * DAY_SECONDS


def refusal(limit: DailyLimit, used: Usage, now: float) -> str | None:
    """What to tell a user whose limit ``used`` reaches: which limit, and when it resets; None if within."""
    if limit.runs and used.runs >= limit.runs:
        which = f"your {limit.runs} runs for today (the daily limit on runs)"
    elif limit.tokens and used.tokens >= limit.tokens:
        which = f"{used.tokens:,} of your {limit.tokens:,} LLM tokens for today (the daily limit on tokens)"
    else:
        return None
    return f"🚫 You have used {which}. It resets at 00:00 UTC, {_when(day_start(now) + DAY_SECONDS)}."


def describe_usage(used: Usage, limit: DailyLimit, now: float) -> str:
    """A user's use today against their limits, for ``/usage``."""

    def against(count: int, most: int) -> str:
        return f"{count:,} of {most:,}" if most else f"{count:,} (no limit)"

    resets = day_start(now) + DAY_SECONDS
    return (
        f"**Your use today** (UTC): {against(used.runs, limit.runs)} runs, "
        f"{against(used.tokens, limit.tokens)} LLM tokens, {used.model_seconds:.1f} s of model time. "
        f"Resets {_when(resets)}."
    )


def _when(at: float) -> str:
    """A Discord timestamp: each reader sees it in their own time zone, and how far away it is."""
    return f"<t:{int(at)}:t> (<t:{int(at)}:R>)"
