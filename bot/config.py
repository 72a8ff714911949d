"""The Discord front end's own configuration: only the bot sees the Discord token and its allow-lists."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.settings import RoleLimit, Settings
from agent.uploads import UploadLimits

__all__ = ["DiscordConfig"]


@dataclass(frozen=True)
class DiscordConfig:
    """``api_base``/``gateway_url`` point the bot at a Discord-compatible server (empty: Discord itself);
    empty allow-lists allow everywhere; ``user_runs_per_minute`` of 0 or less means no limit; the daily limits
(0: none) and the roles that override them are ``bot.quotas``'."""

    token: str = field(default="", repr=False)
    api_base: str = ""
    gateway_url: str = ""
    allowed_guilds: frozenset[int] = frozenset()
    allowed_channels: frozenset[int] = frozenset()
    allowed_roles: frozenset[int] = frozenset()
    user_runs_per_minute: int = 4
    uploads: UploadLimits = field(default_factory=lambda: UploadLimits(25 * 1024 * 1024, 600.0, 2048))
    user_runs_per_day: int = 0
    user_tokens_per_day: int = 0
    role_limits: tuple[RoleLimit, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> DiscordConfig:
        return cls(
            token=settings.discord_token,
            api_base=settings.discord_api_base,
            gateway_url=settings.discord_gateway_url,
            allowed_guilds=settings.discord_allowed_guilds,
            allowed_channels=settings.discord_allowed_channels,
            allowed_roles=settings.discord_allowed_roles,
            user_runs_per_minute=settings.discord_user_runs_per_minute,
            uploads=UploadLimits.from_settings(settings),
            user_runs_per_day=settings.discord_user_runs_per_day,
            user_tokens_per_day=settings.discord_user_tokens_per_day,
            role_limits=settings.discord_role_limits,
        )
