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
    (0: none) and the roles that override them are ``bot.quotas``'; ``rest_per_second`` is this process's share
    of the bot's REST budget; without ``message_content`` the bot reads only messages that mention it."""

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
    rest_per_second: float = 40.0
    message_content: bool = True
    shard_count: int = 0
    cluster_index: int = 0
    cluster_count: int = 1

    @property
    def shard_ids(self) -> list[int]:
        """The shards this process runs: every ``cluster_count``-th from ``cluster_index``."""
        return list(range(self.cluster_index, self.shard_count, self.cluster_count))

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
            rest_per_second=settings.discord_rest_per_second / settings.discord_cluster_count,
            message_content=settings.discord_message_content,
            shard_count=settings.discord_shard_count,
            cluster_index=settings.discord_cluster_index,
            cluster_count=settings.discord_cluster_count,
        )
