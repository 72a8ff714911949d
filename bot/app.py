"""The Discord bot: a thin adapter from Discord messages to the application's stored conversations.

The whole flow, in order:

- ``serve`` (the entry point, called by ``hugginggpt bot`` with the ``Runtime`` it built): point discord.py at
  the configured servers, build the bot around the runtime, run it until SIGTERM/SIGINT.
- ``setup_hook``: add the slash commands, and sync them with Discord only when asked (``--sync-commands``).
- ``on_ready``: report in their threads the runs a restart interrupted.
- ``on_message``: a mention in an allowed channel opens a public thread on that message and starts a
  conversation there (platform ``discord``, external id = thread id, owner = author id); a mention in a forum
  post starts the conversation in that post; in a thread that has a conversation, every message continues it
  without a mention. ``/ask`` and the message command "Ask HuggingGPT" take the same path
  (``start_or_continue``). Each request holds its thread's turn from the moment it arrives (so ``/reset`` cannot
  pull the conversation away under it), downloads its attachments when its turn starts (a queued request
  holds no files), runs in ``turn.run_in_thread``, and failures become a short message in the thread
  (details in the log). Each user is rate limited.
- ``close`` (SIGTERM/SIGINT): stop taking requests, cancel the runs (``Conversations`` records them as
  interrupted), then close the Discord client. The runtime belongs to the entry point, which closes it.

``AllowedMentions.none()`` is set on the client, so nothing the model writes can ping anyone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import Sequence
from typing import Any, Literal

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from agent.errors import AgentError, ConfigurationError
from agent.settings import Settings
from app.conversations import Conversation
from app.runtime import Runtime
from storage import ChatSettings

from .admin import AdminCommands
from .attachments import Downloader, IncomingFile, read_attachments
from .budget import RestBudget
from .commands import SlashCommands
from .config import DiscordConfig
from .controls import NOT_YOURS, CancelButton, RetryButton, controls
from .identify import FileIdentifyGate, IdentifyGate, PostgresIdentifyGate
from .limits import AccessPolicy, RateLimiter, ThreadQueue, is_forum_post
from .quotas import QuotaPolicy, day_start, refusal
from .text import request_text, thread_name
from .turn import ThreadRequest, post_message, run_in_thread

__all__ = ["PLATFORM", "HuggingGPTBot", "ShardedHuggingGPTBot", "serve", "use_discord_endpoints"]

log = logging.getLogger(__name__)

PLATFORM = "discord"
THREAD_ARCHIVE_MINUTES: Literal[1440] = 1440  # a day without messages hides the thread
_SHUTDOWN_SECONDS = 15.0

INTERRUPTED_NOTICE = (
    "⚠️ I was restarted while working on a request here, so it did not finish. "
    "Send it again if you still need it."
)
ERROR_NOTICE = "❌ Something went wrong on my side; the details are in the bot's log."


DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY = "wss://gateway.discord.gg/"


def use_discord_endpoints(api_base: str, gateway_url: str) -> None:
    """Point discord.py at a Discord-compatible server (a self-hosted Spacebar, or a test server).

    discord.py 2.7 builds every REST URL from the class attribute ``discord.http.Route.BASE`` (default
    ``https://discord.com/api/v10``). A non-sharded client never asks ``GET /gateway/bot`` (only
    ``AutoShardedClient`` calls ``HTTPClient.get_bot_gateway``, for the shard count):
    ``DiscordWebSocket.from_client`` connects to the class attribute ``DiscordWebSocket.DEFAULT_GATEWAY``
    (``wss://gateway.discord.gg/``), to which it also returns after an invalidated session, and resumes at
    the ``resume_gateway_url`` the server gives in READY. Both attributes are process-wide, so the entry point
    sets them once, before login. Empty values mean Discord's own. ``api_base`` without an ``/api/vN`` suffix
    gets ``/api/v10``.
    """
    base = api_base.rstrip("/") or DISCORD_API_BASE
    if not re.search(r"/api/v\d+$", base):
        base += "/api/v10"
    discord.http.Route.BASE = base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url or DISCORD_GATEWAY)


class _Tree(app_commands.CommandTree):
    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """A failed command gets a short answer; the traceback goes to the log only."""
        name = interaction.command.name if interaction.command else "?"
        if isinstance(error, app_commands.CheckFailure):
            text = "I'm not available here."
        else:
            log.error("/%s failed", name, exc_info=error)
            text = ERROR_NOTICE
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell the user that /%s failed", name)


class HuggingGPTBot(commands.Bot):
    """HuggingGPT on Discord, around a ``Runtime`` it is handed. ``downloader`` and ``edit_interval`` are for
    tests (a fake CDN, fast edits)."""

    def __init__(
        self,
        runtime: Runtime,
        config: DiscordConfig,
        *,
        sync_commands: bool = False,
        downloader: Downloader | None = None,
        edit_interval: float = 1.0,
        **client_options: Any,
    ) -> None:
        intents = discord.Intents.default()
        intents.message_content = config.message_content
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            tree_cls=_Tree,
            **client_options,
        )
        self.runtime = runtime
        self.conversations = runtime.conversations
        self.config = config
        self.sync_commands = sync_commands
        self.downloader = downloader or Downloader()
        self.edit_interval = edit_interval
        self.access = AccessPolicy(config.allowed_guilds, config.allowed_channels, config.allowed_roles)
        self.rate_limiter = RateLimiter(config.user_runs_per_minute)
        self.quotas = QuotaPolicy.from_config(config)
        self.allowed_models = runtime.settings.llm_models_allowed
        self.max_tasks = runtime.settings.max_tasks
        self.queue = ThreadQueue()
        # Every REST request of the client waits for its turn in this process's share of the budget.
        self.budget = RestBudget(config.rest_per_second)
        self.http.request = self.budget.limit(self.http.request)  # type: ignore[method-assign,assignment]
        self._runs: set[asyncio.Task[object]] = set()
        self._accepting = True
        self._reported_interrupted = False

    async def setup_hook(self) -> None:
        await self.add_cog(SlashCommands(self))
        await self.add_cog(AdminCommands(self))
        # Buttons sent before a restart carry their run id in their custom id and keep working.
        self.add_dynamic_items(CancelButton, RetryButton)
        if self.sync_commands:
            synced = await self.tree.sync()
            log.info("synced %d slash commands with Discord", len(synced))

    async def on_ready(self) -> None:
        me = self.user
        log.info("logged in as %s (%s) in %d guilds", me, me.id if me else "?", len(self.guilds))
        if not self._reported_interrupted:
            self._reported_interrupted = True
            await self._report_interrupted_runs()

    async def _report_interrupted_runs(self) -> None:
        for interrupted in await self.conversations.interrupted_to_report(PLATFORM):
            thread_id = interrupted.conversation.external_id
            if thread_id is None:
                continue
            try:
                channel = self.get_channel(int(thread_id)) or await self.fetch_channel(int(thread_id))
                if not self.owns(channel):
                    continue  # another cluster's server: that cluster reports it
                if isinstance(channel, discord.abc.Messageable):
                    await channel.send(INTERRUPTED_NOTICE)
            except (discord.NotFound, discord.Forbidden):
                log.info("thread %s of interrupted run %s is gone", thread_id, interrupted.run_id)
            except discord.HTTPException as err:
                log.warning(
                    "could not report interrupted run %s (HTTP %s); will retry at next start",
                    interrupted.run_id,
                    err.status,
                )
                continue
            await self.conversations.mark_reported(interrupted.run_id)

    # ------------------------------------------------------------------ messages

    async def on_message(self, message: discord.Message) -> None:
        me = self.user
        if not self._accepting or me is None or message.author.bot or message.guild is None:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # system messages: pins, joins, thread notices
        channel = message.channel
        mentioned = any(user.id == me.id for user in message.mentions)
        in_thread = isinstance(channel, discord.Thread)
        # Without the Message Content intent, only messages that mention the bot have their text.
        if not (mentioned or (in_thread and self.config.message_content)):
            return
        if not self.allowed(message.guild, channel, message.author):
            return
        conversation = await self.conversation_of(channel) if isinstance(channel, discord.Thread) else None
        if in_thread and conversation is None and not (mentioned and is_forum_post(channel)):
            if mentioned:
                await post_message(
                    channel,
                    "Mention me in a text channel to start a conversation in a new thread, "
                    "or in a forum post.",
                )
            return
        if not isinstance(channel, discord.Thread | discord.TextChannel):
            await post_message(channel, "I can only start conversations in text channels.")
            return
        if in_thread and not mentioned and (await self.chat_settings(channel)).mention_required:
            return
        if not await self._within_rate_limit(message.author, channel):
            return
        if not await self._within_quota(message.author, channel):
            return
        text = request_text(message.content, me.id)
        target = await self.start_or_continue(channel, message, text, message.author.id, conversation)
        if target is None:
            return
        thread, conversation_id = target
        files = [IncomingFile(a.filename, a.url, a.size) for a in message.attachments]
        await self.serve(
            thread, conversation_id, text, files, author_id=message.author.id, message_id=message.id
        )

    def owns(self, channel: object) -> bool:
        """Whether ``channel`` is in a server this process serves (always, unless sharded)."""
        return True

    def allowed(self, guild: discord.Guild | None, channel: object, user: discord.abc.User) -> bool:
        """Whether the allow-lists let ``user`` use the bot in ``channel`` (a thread counts as its parent)."""
        channel_ids = {channel.id} if isinstance(channel, discord.abc.Snowflake) else set()
        if isinstance(channel, discord.Thread) and channel.parent_id:
            channel_ids.add(channel.parent_id)
        roles = [role.id for role in user.roles] if isinstance(user, discord.Member) else []
        return self.access.allows(guild.id if guild else None, channel_ids, roles)

    async def _within_rate_limit(self, user: discord.abc.User, channel: discord.abc.Messageable) -> bool:
        wait = self.rate_limiter.acquire(user.id)
        if wait:
            await post_message(channel, f"⏳ Slow down, {user.display_name}: try again in {wait:.0f} s.")
        return not wait

    async def quota_refusal(self, user: discord.abc.User) -> str | None:
        """Why ``user`` may start no more runs today (which limit, when it resets); None if they may."""
        roles = [role.id for role in user.roles] if isinstance(user, discord.Member) else []
        limit = self.quotas.limit_for(roles)
        if not limit:
            return None
        now = time.time()
        used = await self.conversations.usage(day_start(now), user=str(user.id), limit=1)
        return refusal(limit, used[0], now) if used else None

    async def _within_quota(self, user: discord.abc.User, channel: discord.abc.Messageable) -> bool:
        refused = await self.quota_refusal(user)
        if refused:
            await post_message(channel, refused)
        return refused is None

    async def chat_settings(self, channel: object) -> ChatSettings:
        """What ``/config`` set for ``channel`` (a thread: its parent) over what it set for the guild."""
        guild = getattr(channel, "guild", None)
        if guild is None:
            return ChatSettings()
        channel_id = channel.parent_id if isinstance(channel, discord.Thread) else getattr(channel, "id", None)
        own = await self.conversations.chat_settings(str(guild.id), str(channel_id) if channel_id else None)
        return own.over(await self.conversations.chat_settings(str(guild.id)))

    def effective(self, settings: ChatSettings) -> ChatSettings:
        """``settings`` with what they leave unset taken from the deployment's environment."""
        s = self.runtime.settings
        return settings.over(ChatSettings(s.llm_model, s.model_selection, s.max_tasks, None, False))

    # ------------------------------------------------------------------ buttons

    def _may_control(self, interaction: discord.Interaction, requester: str | None) -> bool:
        return str(interaction.user.id) == requester or interaction.permissions.administrator

    async def cancel_from_button(self, interaction: discord.Interaction, run_id: str) -> None:
        """Cancel: only the requester or an administrator; a run that ended disables the button."""
        run = await self.conversations.get_run(run_id)
        if run is None or run.status != "running":
            await _disable(interaction, CancelButton(run_id, disabled=True), "This request has already ended.")
            return
        found = await self.conversations.request_of(run_id)
        if not self._may_control(interaction, found[0].author if found else None):
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
            return
        if not self.conversations.cancel(run_id, by=interaction.user.display_name):
            await interaction.response.send_message(
                "I can't stop this request from here: it is not running in this bot process.", ephemeral=True
            )
            return
        await interaction.response.send_message("⏹️ Stopping it; the files made so far are kept.", ephemeral=True)

    async def retry_from_button(self, interaction: discord.Interaction, run_id: str) -> None:
        """Retry: the same request (its text and files) again in the thread, as a new run."""
        thread = interaction.channel
        conversation = await self.conversation_of(thread) if isinstance(thread, discord.Thread) else None
        run = await self.conversations.get_run(run_id)
        found = await self.conversations.request_of(run_id)
        if conversation is None or run is None or found is None or run.conversation_id != conversation.id:
            notice = "This conversation was reset, so there is nothing to retry; send the request again."
            await _disable(interaction, RetryButton(run_id, disabled=True), notice)
            return
        message, files = found
        if not self._may_control(interaction, message.author):
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
            return
        user = interaction.user
        wait = self.rate_limiter.acquire(user.id)
        refused = f"⏳ Slow down: try again in {wait:.0f} s." if wait else await self.quota_refusal(user)
        if refused:
            await interaction.response.send_message(refused, ephemeral=True)
            return
        assert isinstance(thread, discord.Thread)
        await interaction.response.send_message(f"🔁 {user.display_name} asked me to try that again.")
        await self.serve(thread, conversation.id, message.text, [], author_id=user.id, message_id=None, reuse=files)

    async def conversation_of(self, thread: discord.Thread) -> Conversation | None:
        """The conversation held in ``thread``; None if the bot does not own it."""
        return await self.conversations.find(PLATFORM, str(thread.id))

    async def start_or_continue(
        self,
        channel: discord.Thread | discord.TextChannel,
        anchor: discord.abc.Snowflake,
        text: str,
        owner_id: int,
        conversation: Conversation | None,
    ) -> tuple[discord.Thread, str] | None:
        """Where a request goes, for mentions, ``/ask`` and "Ask HuggingGPT" alike: ``conversation``, held in
        the thread the request was made in; else, in a forum post, a new conversation in that post; else a new
        thread opened on ``anchor`` (a message in a text channel) with a new conversation. None if Discord
        refuses the thread or the conversation cannot be stored (the user has been told why)."""
        if isinstance(channel, discord.Thread):
            if conversation is not None:
                return channel, conversation.id
            return await self._open_in(channel, owner_id) if is_forum_post(channel) else None
        try:
            thread = await channel.create_thread(
                name=thread_name(text), message=anchor, auto_archive_duration=THREAD_ARCHIVE_MINUTES
            )
        except discord.HTTPException as err:
            log.warning("could not create a thread in %s (HTTP %s): %s", channel.id, err.status, err.text)
            if err.status == 403:
                notice = "❌ I could not open a thread here; I need the Create Public Threads permission."
            else:
                notice = f"❌ Discord would not open a thread here (HTTP {err.status}); please try again in a moment."
            await post_message(channel, notice)
            return None
        return await self._open_in(thread, owner_id)

    async def _open_in(self, thread: discord.Thread, owner_id: int) -> tuple[discord.Thread, str] | None:
        """A new conversation held in ``thread`` (one the bot opened, or a forum post)."""
        try:
            conversation = await self.conversations.open(
                PLATFORM,
                external_id=str(thread.id),
                owner=str(owner_id),
                title=thread.name,
                guild_id=str(thread.guild.id),
            )
        except AgentError as err:
            log.error("could not store the conversation of thread %s: %s", thread.id, err)
            await post_message(thread, f"❌ {err}")
            return None
        return thread, conversation.id

    async def serve(
        self,
        thread: discord.Thread,
        conversation_id: str,
        text: str,
        files: Sequence[IncomingFile],
        *,
        author_id: int,
        message_id: int | None,
        reuse: Sequence[str] = (),
    ) -> None:
        """Wait for the thread's turn, then fetch and check the attachments and run the request.

        The turn is held from the start, downloads included: ``/reset`` refuses while any request of the
        thread is queued or running. Never raises (but cancels).
        """
        task = asyncio.current_task()
        if task is not None:
            self._runs.add(task)
        try:
            if self.queue.busy(thread.id):
                await post_message(
                    thread, "⏳ I'm still working on the previous request here; this one is queued."
                )
            async with self.queue.turn(thread.id):
                uploads, problems = await read_attachments(files, self.downloader, self.config.uploads)
                if problems:
                    await post_message(thread, "⚠️ I can't use:\n" + "\n".join(f"- {p}" for p in problems))
                if not text and not uploads:
                    await post_message(
                        thread,
                        "Tell me what you would like me to do (and attach images, audio or video if needed).",
                    )
                    return
                request = ThreadRequest(
                    conversation_id,
                    text,
                    uploads,
                    str(author_id),
                    str(message_id) if message_id else None,
                    tuple(reuse),
                    await self.chat_settings(thread),
                )
                await run_in_thread(
                    self.conversations,
                    thread,
                    request,
                    max_media_seconds=self.config.uploads.max_seconds,
                    edit_interval=self.edit_interval,
                    budget=self.budget,
                )
        except AgentError as err:
            log.warning("request in thread %s failed: %s", thread.id, err)
            await post_message(thread, f"❌ {err}")
        except Exception:
            log.exception("request in thread %s failed", thread.id)
            await post_message(thread, ERROR_NOTICE)
        finally:
            if task is not None:
                self._runs.discard(task)

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop taking requests, cancel running ones (recorded as interrupted), then close Discord."""
        self._accepting = False
        runs = [t for t in self._runs if not t.done()]
        for task in runs:
            task.cancel()
        if runs:
            await asyncio.wait(runs, timeout=_SHUTDOWN_SECONDS)
        await self.downloader.aclose()
        await super().close()


async def _disable(interaction: discord.Interaction, button: discord.ui.Item[Any], notice: str) -> None:
    """Replace a button that no longer applies with a disabled one, and say why."""
    await interaction.response.edit_message(view=controls(button))
    await interaction.followup.send(notice, ephemeral=True)


class ShardedHuggingGPTBot(HuggingGPTBot, commands.AutoShardedBot):
    """One cluster of a sharded bot: the shards ``config.shard_ids`` of ``config.shard_count``, and the servers
    on them (a thread is in one server and a server on one shard, so a conversation always reaches the same
    process). Each IDENTIFY first waits for its bucket's turn at ``identify_gate``, shared by all clusters."""

    def __init__(
        self, runtime: Runtime, config: DiscordConfig, *, identify_gate: IdentifyGate, **kwargs: Any
    ) -> None:
        super().__init__(
            runtime, config, shard_count=config.shard_count, shard_ids=config.shard_ids, **kwargs
        )
        self.identify_gate = identify_gate
        self._max_concurrency: int | None = None

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Discord's buckets: ``shard_id % max_concurrency``, one IDENTIFY each per 5 s across all processes
        (discord.py's own hook only spaces the shards of this process)."""
        if self._max_concurrency is None:
            self._max_concurrency = max(1, (await self.fetch_session_start_limits()).max_concurrency)
        bucket = (shard_id or 0) % self._max_concurrency
        await self.identify_gate.wait_turn(bucket)
        log.info("identifying shard %s (bucket %d)", shard_id, bucket)

    def owns(self, channel: object) -> bool:
        guild = getattr(channel, "guild", None)
        if guild is None:
            return False
        return (guild.id >> 22) % self.config.shard_count in self.config.shard_ids

    async def close(self) -> None:
        await super().close()
        await self.identify_gate.aclose()


def check_config(config: DiscordConfig) -> None:
    """``ConfigurationError`` if the bot cannot start with ``config`` (checked before anything is built)."""
    if not config.token:
        raise ConfigurationError(
            "DISCORD_TOKEN is not set: create a bot in the Discord Developer Portal and set its token."
        )


async def serve(runtime: Runtime, settings: Settings, *, sync_commands: bool) -> int:
    """Run the bot on ``runtime`` until SIGTERM or SIGINT; 0 on a clean stop. Configuration problems raise
    ``ConfigurationError``."""
    config = DiscordConfig.from_settings(settings)
    check_config(config)
    use_discord_endpoints(config.api_base, config.gateway_url)
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # no voice: silence the warnings
    bot: HuggingGPTBot
    if config.shard_count:
        # Clusters on several machines share a PostgreSQL database; on one machine a lock file will do.
        gate: IdentifyGate = (
            PostgresIdentifyGate(re.sub(r"^postgresql\+\w+://", "postgresql://", settings.database_url))
            if settings.database_url
            else FileIdentifyGate(settings.data_dir / "identify")
        )
        bot = ShardedHuggingGPTBot(runtime, config, identify_gate=gate, sync_commands=sync_commands)
        log.info(
            "cluster %d of %d: shards %s of %d",
            config.cluster_index,
            config.cluster_count,
            config.shard_ids,
            config.shard_count,
        )
    else:
        bot = HuggingGPTBot(runtime, config, sync_commands=sync_commands)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with bot:
        running = asyncio.create_task(bot.start(config.token))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not running.done():
            log.info("stopping: signal received")
            await bot.close()
        try:
            await running
        except discord.LoginFailure as err:
            raise ConfigurationError(
                "Discord refused DISCORD_TOKEN; copy the bot token again from the Developer Portal."
            ) from err
        except discord.PrivilegedIntentsRequired as err:
            raise ConfigurationError(
                "Discord refused the Message Content intent: enable it for the bot in the Developer Portal (Bot → "
                "Privileged Gateway Intents), or set DISCORD_MESSAGE_CONTENT=false to answer mentions only."
            ) from err
    log.info("stopped")
    return 0
