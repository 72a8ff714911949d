"""``/config`` (Manage Server) and ``/usage``: settings per guild or channel, and who used how much today.

``/config`` keeps its settings in the database, for the whole guild or one channel; a channel's settings win
over its guild's, a thread uses its parent channel's, and what neither sets comes from the deployment's
environment. Discord hides ``/config`` from members without Manage Server (``default_permissions``), and the
command checks the permission itself too, since a server's admins can change who sees a command.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from agent.tasks import TASKS
from storage import ChatSettings, Usage

from .quotas import DAY_SECONDS, day_start, describe_usage
from .text import MESSAGE_LIMIT

if TYPE_CHECKING:
    from .app import HuggingGPTBot

__all__ = ["AdminCommands", "describe_settings"]

INHERIT = "inherit"
_TOP_USERS = 10
_ConfigChannel = discord.TextChannel | discord.ForumChannel


def describe_settings(settings: ChatSettings) -> list[str]:
    """One line per setting; unset ones say they inherit."""

    def shown(value: object) -> str:
        if value is None:
            return f"*{INHERIT}*"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, tuple):
            return ", ".join(f"`{v}`" for v in value) or "none"
        return f"`{value}`"

    return [
        f"controller model: {shown(settings.llm_model)}",
        f"model selection: {shown(settings.model_selection)}",
        f"maximum tasks: {shown(settings.max_tasks)}",
        f"task types allowed: {shown(settings.task_types)}",
        f"follow-ups need a mention: {shown(settings.mention_required)}",
    ]


class AdminCommands(commands.Cog):
    config = app_commands.Group(
        name="config",
        description="Settings of HuggingGPT for this server or one channel (Manage Server).",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(self, bot: HuggingGPTBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """The allow-lists (a refusal becomes a ``CheckFailure``)."""
        return self.bot.allowed(interaction.guild, interaction.channel, interaction.user)

    async def _admin(self, interaction: discord.Interaction) -> bool:
        if interaction.permissions.manage_guild:
            return True
        await interaction.response.send_message(
            "Only members with Manage Server can use /config.", ephemeral=True
        )
        return False

    @config.command(name="show", description="What is set for this server, or for one channel.")
    @app_commands.describe(channel="A channel; leave empty for the whole server")
    async def show(self, interaction: discord.Interaction, channel: _ConfigChannel | None = None) -> None:
        if not await self._admin(interaction):
            return
        assert interaction.guild is not None
        conversations = self.bot.conversations
        guild = await conversations.chat_settings(str(interaction.guild.id))
        lines = ["**This server**", *(f"- {line}" for line in describe_settings(guild))]
        if channel is not None:
            own = await conversations.chat_settings(str(interaction.guild.id), str(channel.id))
            lines += [
                f"**{channel.mention}** (over the server's)",
                *(f"- {x}" for x in describe_settings(own)),
            ]
            lines += [
                "**In effect there**",
                *(f"- {x}" for x in describe_settings(self.bot.effective(own.over(guild)))),
            ]
        else:
            lines += ["**In effect**", *(f"- {x}" for x in describe_settings(self.bot.effective(guild)))]
        await interaction.response.send_message("\n".join(lines)[:MESSAGE_LIMIT], ephemeral=True)

    @config.command(name="set", description="Change settings for this server, or for one channel.")
    @app_commands.describe(
        channel="A channel; leave empty for the whole server",
        model="The controller LLM (from the list the bot's operator approved), or 'inherit'",
        selection="How models are chosen: llm (the paper's way) or downloads (no LLM call)",
        max_tasks="The most tasks a plan may have; 0 inherits",
        task_types="Task types allowed, separated by commas; 'all' inherits",
        mention_required="Whether follow-ups in threads must mention the bot",
    )
    async def set_(
        self,
        interaction: discord.Interaction,
        channel: _ConfigChannel | None = None,
        model: str | None = None,
        selection: Literal["llm", "downloads", "inherit"] | None = None,
        max_tasks: app_commands.Range[int, 0, 100] | None = None,
        task_types: str | None = None,
        mention_required: Literal["yes", "no", "inherit"] | None = None,
    ) -> None:
        if not await self._admin(interaction):
            return
        assert interaction.guild is not None
        bot = self.bot
        changes: dict[str, object] = {}
        if model is not None:
            if model != INHERIT and model not in bot.allowed_models:
                approved = (
                    ", ".join(f"`{m}`" for m in bot.allowed_models) or "none (LLM_MODELS_ALLOWED is empty)"
                )
                await interaction.response.send_message(
                    f"`{model[:100]}` is not an approved controller model. Approved: {approved}.",
                    ephemeral=True,
                )
                return
            changes["llm_model"] = None if model == INHERIT else model
        if selection is not None:
            changes["model_selection"] = None if selection == INHERIT else selection
        if max_tasks is not None:
            if max_tasks > bot.max_tasks:
                await interaction.response.send_message(
                    f"At most {bot.max_tasks} tasks (HUGGINGGPT_MAX_TASKS).", ephemeral=True
                )
                return
            changes["max_tasks"] = max_tasks or None
        if task_types is not None:
            names = tuple(dict.fromkeys(t.strip() for t in task_types.split(",") if t.strip()))
            unknown = [n for n in names if n not in TASKS]
            if unknown and names != ("all",):
                await interaction.response.send_message(
                    f"Unknown task types: {', '.join(f'`{n[:60]}`' for n in unknown[:5])}. "
                    "`/models` lists them as you type.",
                    ephemeral=True,
                )
                return
            changes["task_types"] = None if names in ((), ("all",)) else names
        if mention_required is not None:
            changes["mention_required"] = None if mention_required == INHERIT else mention_required == "yes"
        guild_id, channel_id = str(interaction.guild.id), str(channel.id) if channel else None
        current = await bot.conversations.chat_settings(guild_id, channel_id)
        updated = replace(current, **changes)  # type: ignore[arg-type]
        await bot.conversations.set_chat_settings(guild_id, channel_id, updated, by=str(interaction.user.id))
        where = channel.mention if channel else "this server"
        lines = [f"⚙️ Settings for {where}:", *(f"- {x}" for x in describe_settings(updated))]
        await interaction.response.send_message("\n".join(lines)[:MESSAGE_LIMIT], ephemeral=True)

    @set_.autocomplete("model")
    async def _models(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [*self.bot.allowed_models, INHERIT]
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]

    @config.command(name="reset", description="Forget the settings of this server, or of one channel.")
    @app_commands.describe(channel="A channel; leave empty for the whole server")
    async def reset(self, interaction: discord.Interaction, channel: _ConfigChannel | None = None) -> None:
        if not await self._admin(interaction):
            return
        assert interaction.guild is not None
        channel_id = str(channel.id) if channel else None
        await self.bot.conversations.set_chat_settings(
            str(interaction.guild.id), channel_id, ChatSettings(), by=str(interaction.user.id)
        )
        where = channel.mention if channel else "this server"
        await interaction.response.send_message(f"⚙️ {where} now inherits every setting.", ephemeral=True)

    @app_commands.command(
        name="usage", description="What you used today; with guild, the server's top users."
    )
    @app_commands.describe(guild="Show the server's totals and top users (Manage Server)")
    @app_commands.guild_only()
    async def usage(self, interaction: discord.Interaction, guild: bool = False) -> None:
        assert interaction.guild is not None
        user = interaction.user
        now = time.time()
        since = day_start(now)
        conversations = self.bot.conversations
        if guild and not interaction.permissions.manage_guild:
            await interaction.response.send_message(
                "Only members with Manage Server can see the server's usage.", ephemeral=True
            )
            return
        mine = await conversations.usage(since, user=str(user.id), limit=1)
        used = mine[0] if mine else Usage(str(user.id), 0, 0, 0.0)
        roles = [r.id for r in user.roles] if isinstance(user, discord.Member) else []
        lines = [describe_usage(used, self.bot.quotas.limit_for(roles), now)]
        if guild:
            guild_id = str(interaction.guild.id)
            total = await conversations.usage_total(since, guild_id=guild_id)
            top = await conversations.usage(since, guild_id=guild_id, limit=_TOP_USERS)
            lines.append(
                f"**This server today**: {total.runs:,} runs, {total.tokens:,} LLM tokens, "
                f"{total.model_seconds:.1f} s of model time."
            )
            lines += [
                f"{n}. <@{u.user}>: {u.runs:,} runs, {u.tokens:,} tokens, {u.model_seconds:.1f} s"
                for n, u in enumerate(top, 1)
            ]
            lines.append(f"The day ends at 00:00 UTC, <t:{int(since + DAY_SECONDS)}:R>.")
        await interaction.response.send_message("\n".join(lines)[:MESSAGE_LIMIT], ephemeral=True)
