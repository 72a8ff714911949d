"""Slash commands: ``/ask``, ``/models``, ``/status``, ``/reset``, ``/help``; the message command "Ask
HuggingGPT", which takes a message's text and files as the request.

They are registered with Discord only by ``hugginggpt bot --sync-commands`` (syncing on every start would hit
Discord's rate limits for no reason). Every command but ``/help`` follows the allow-lists: one
``interaction_check`` for the whole cog, whose refusal the tree's error handler answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from agent.tasks import TASKS
from agent.text import clip

from .attachments import IncomingFile
from .limits import is_forum_post
from .text import MESSAGE_LIMIT, request_text

if TYPE_CHECKING:
    from .app import HuggingGPTBot

__all__ = ["ASK_MENU", "HELP_TEXT", "HELP_TEXT_MENTIONS_ONLY", "SlashCommands"]

ASK_MENU = "Ask HuggingGPT"

_MODELS_SHOWN = 10
_ECHO_LIMIT = 1500

HELP_TEXT = """\
**HuggingGPT** plans your request with a language model, runs Hugging Face models for each step, and answers.
- Mention me in a channel with a request (and images, audio or video attached): I open a thread and work there.
- In that thread, just keep talking: I remember the conversation and the files in it.
- `/ask prompt [attachment]` does the same as a mention; in a forum post I answer in the post.
- Right-click a message → Apps → **Ask HuggingGPT**: that message (its text and files) is the request.
- `/models task` lists the models I would pick from for a task. `/status` shows what I can reach.
- `/reset` in a thread forgets its conversation (the person who started it, or an administrator).
- ⏹️ Cancel on my status message stops a request; 🔁 Retry on an answer runs it again (who asked, or an admin).
- `/usage` shows what you used today; `/config` (Manage Server) sets the model and limits per server or channel."""

HELP_TEXT_MENTIONS_ONLY = HELP_TEXT.replace(
    "- In that thread, just keep talking: I remember the conversation and the files in it.",
    "- In that thread, mention me (or reply to me with the mention on) to continue: I remember the conversation"
    " and its files, but I do not read messages that do not mention me.",
)


class SlashCommands(commands.Cog):
    def __init__(self, bot: HuggingGPTBot) -> None:
        self.bot = bot
        # discord.py takes no context menu from a cog's decorators: it is added to the tree with the cog.
        self.ask_menu = app_commands.ContextMenu(name=ASK_MENU, callback=self._ask_about_message)
        self.ask_menu.guild_only = True
        self.ask_menu.add_check(self._allowed)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.ask_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.ask_menu.name, type=self.ask_menu.type)

    async def _allowed(self, interaction: discord.Interaction) -> bool:
        return self.bot.allowed(interaction.guild, interaction.channel, interaction.user)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """The allow-lists, for every command but ``/help`` (a refusal becomes a ``CheckFailure``)."""
        if interaction.command is not None and interaction.command.name == "help":
            return True
        return self.bot.allowed(interaction.guild, interaction.channel, interaction.user)

    @app_commands.command(name="ask", description="Ask HuggingGPT; it answers in a thread.")
    @app_commands.describe(prompt="What you would like done", attachment="An image, audio or video file")
    @app_commands.guild_only()
    async def ask(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 4000],
        attachment: discord.Attachment | None = None,
    ) -> None:
        files = [IncomingFile(attachment.filename, attachment.url, attachment.size)] if attachment else []
        await self._ask(
            interaction, prompt, files, "Use /ask in a text channel, a forum post or one of my threads."
        )

    async def _ask_about_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """The message command "Ask HuggingGPT": that message's text and files are the request."""
        me = self.bot.user
        text = request_text(message.content, me.id) if me else message.content.strip()
        files = [IncomingFile(a.filename, a.url, a.size) for a in message.attachments]
        if not text and not files:
            await interaction.response.send_message(
                "That message has no text or files to ask about.", ephemeral=True
            )
            return
        shown = clip(text, _ECHO_LIMIT) if text else "(no text)"
        if files:
            shown += f" [{len(files)} file{'s' if len(files) > 1 else ''}]"
        await self._ask(
            interaction,
            text,
            files,
            "Use Ask HuggingGPT in a text channel, a forum post or one of my threads.",
            echo=f"**{interaction.user.display_name}** asked about {message.jump_url}: {shown}",
        )

    async def _ask(
        self,
        interaction: discord.Interaction,
        text: str,
        files: list[IncomingFile],
        elsewhere: str,
        *,
        echo: str | None = None,
    ) -> None:
        """/ask and "Ask HuggingGPT": echo the request, then the same path as a mention."""
        bot = self.bot
        channel = interaction.channel
        conversation = await bot.conversation_of(channel) if isinstance(channel, discord.Thread) else None
        place = isinstance(channel, discord.TextChannel) or is_forum_post(channel)
        if conversation is None and not place:
            await interaction.response.send_message(elsewhere, ephemeral=True)
            return
        wait = bot.rate_limiter.acquire(interaction.user.id)
        refused = f"⏳ Slow down: try again in {wait:.0f} s." if wait else await bot.quota_refusal(interaction.user)
        if refused:
            await interaction.response.send_message(refused, ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        anchor = await interaction.followup.send(echo or _echo(interaction.user, text), wait=True)
        assert isinstance(channel, discord.Thread | discord.TextChannel)
        target = await bot.start_or_continue(channel, anchor, text, interaction.user.id, conversation)
        if target is None:
            return
        thread, conversation_id = target
        await bot.serve(thread, conversation_id, text, files, author_id=interaction.user.id, message_id=None)

    @app_commands.command(
        name="models", description="The models HuggingGPT picks from for a task, best first."
    )
    @app_commands.describe(task="A task type, e.g. image-classification")
    @app_commands.guild_only()
    async def models(self, interaction: discord.Interaction, task: str) -> None:
        spec = TASKS.get(task)
        if spec is None:
            await interaction.response.send_message(
                f"I don't know the task `{task[:100]}`; start typing to pick one from the list.",
                ephemeral=True,
            )
            return
        runtime = self.bot.runtime
        available = runtime.backends.available
        ranked = runtime.catalog.candidates(task, available)
        lines = [f"**{task}**: {spec.description}."]
        for n, model in enumerate(ranked[:_MODELS_SHOWN], 1):
            mark = "✅" if available(model) else "⛔"
            lines.append(f"{n}. {mark} `{model.id}` · {_count(model.downloads)} downloads")
        if not ranked:
            lines.append("No model in my catalog does this task.")
        else:
            lines.append(f"✅ can run here · ⛔ not available here · {len(ranked)} in the catalog")
        await interaction.response.send_message("\n".join(lines)[:MESSAGE_LIMIT], ephemeral=True)

    @models.autocomplete("task")
    async def _task_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        needle = current.lower().strip()
        return [app_commands.Choice(name=t, value=t) for t in sorted(TASKS) if needle in t][:25]

    @app_commands.command(
        name="status", description="Whether the LLM, the model endpoints and the database are reachable."
    )
    @app_commands.guild_only()
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        statuses = await self.bot.runtime.status()
        lines = dict.fromkeys(f"{'✅' if s.live else '❌'} **{s.name}**: {s.detail}" for s in statuses)
        await interaction.followup.send("\n".join(lines)[:MESSAGE_LIMIT], ephemeral=True)

    @app_commands.command(name="reset", description="Forget this thread's conversation and start afresh.")
    @app_commands.guild_only()
    async def reset(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        channel = interaction.channel
        conversation = await bot.conversation_of(channel) if isinstance(channel, discord.Thread) else None
        if channel is None or conversation is None:
            await interaction.response.send_message(
                "Use /reset in one of my conversation threads.", ephemeral=True
            )
            return
        user = interaction.user
        admin = isinstance(user, discord.Member) and user.guild_permissions.administrator
        if conversation.owner != str(user.id) and not admin:
            await interaction.response.send_message(
                "Only the person who started this conversation or an administrator can reset it.",
                ephemeral=True,
            )
            return
        if bot.queue.busy(channel.id):
            await interaction.response.send_message(
                "A request is still running here; reset once it has finished.", ephemeral=True
            )
            return
        await bot.conversations.reset(conversation)
        await interaction.response.send_message(
            "🧹 I forgot this conversation; from here on we start afresh."
        )

    @app_commands.command(name="help", description="How to use HuggingGPT.")
    async def help(self, interaction: discord.Interaction) -> None:
        text = HELP_TEXT if self.bot.config.message_content else HELP_TEXT_MENTIONS_ONLY
        await interaction.response.send_message(text, ephemeral=True)


def _echo(user: discord.abc.User, prompt: str) -> str:
    return f"**{user.display_name}** asked: {clip(prompt, _ECHO_LIMIT)}"


def _count(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
