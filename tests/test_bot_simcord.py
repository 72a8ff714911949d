"""The bot's behaviour in SimCord (an in-memory Discord running the real discord.py), with the real agent behind
it: storage on disk, the scripted LLM server and the fake HF inference server.

Attachments live in SimCord's in-memory CDN; ``SimcordCDN`` serves them over HTTP so the bot downloads them
with its real aiohttp ``Downloader``, as it does from Discord.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import simcord
from aiohttp import web
from PIL import Image

from agent.settings import Settings
from app.runtime import Runtime
from bot.app import INTERRUPTED_NOTICE, PLATFORM, HuggingGPTBot
from bot.attachments import Downloader
from bot.config import DiscordConfig
from bot.limits import AccessPolicy
from tests.fakes.agent_fakes import agent_settings, hf_tasks, plan, planning_script
from tests.fakes.hf_server import FakeHF, png_bytes
from tests.fakes.llm_server import FakeLLMServer

CDN = "https://cdn.simcord.invalid/"
SECRETS = ("test-key", "hf_test")

PICTURE_PLAN = plan(("image-to-image", {"image": "img-1.png", "text": "make it blue"}), ("text-to-speech", {"text": "hello"}))
NO_TASKS = json.dumps({"tasks": []})


class SimcordCDN:
    """Serves SimCord's in-memory attachments over HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        self.env: simcord.Env | None = None
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> SimcordCDN:
        app = web.Application()
        app.router.add_get("/{path:.+}", self._get)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _get(self, request: web.Request) -> web.Response:
        assert self.env is not None
        data = self.env.backend.cdn.get(CDN + request.match_info["path"])
        return web.Response(status=404) if data is None else web.Response(body=data)


class CDNDownloader(Downloader):
    """The bot's downloader, pointed from SimCord's CDN address at ``SimcordCDN``."""

    def __init__(self, cdn: SimcordCDN) -> None:
        super().__init__()
        self.cdn = cdn

    async def fetch(self, url: str, *, name: str, max_bytes: int) -> bytes:
        return await super().fetch(url.replace(CDN, self.cdn.base_url), name=name, max_bytes=max_bytes)


@dataclass
class World:
    env: simcord.Env
    bot: HuggingGPTBot
    llm: FakeLLMServer
    hf: FakeHF
    cdn: SimcordCDN
    settings: Settings
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    alice: simcord.MemberActor

    async def stop(self) -> None:
        """Stop the bot process: the bot first, then the runtime its entry point built."""
        await self.bot.close()
        await self.bot.runtime.close()

    async def mention(self, text: str, *, member: simcord.MemberActor | None = None,
                      attachments: Sequence[tuple[str, bytes]] = ()) -> None:
        assert self.bot.user is not None
        await (member or self.alice).send(self.channel, f"<@{self.bot.user.id}> {text}", attachments=attachments)

    def thread(self) -> simcord.ChannelHandle:
        threads = self.channel.threads
        assert len(threads) == 1, f"expected exactly one thread, got {len(threads)}"
        return threads[0]

    def bot_messages(self, channel: simcord.ChannelHandle) -> list[discord.Message]:
        """The bot's own messages (not the system notices of threads it opened)."""
        assert self.bot.user is not None
        return [m for m in channel.history() if m.author.id == self.bot.user.id and m.type == discord.MessageType.default]

    def requests(self, method: str, suffix: str) -> list[simcord.HttpLogEntry]:
        return [r for r in self.env.http_requests if r.method == method and r.path.endswith(suffix)]

    async def restart(self, *, sync_commands: bool = True) -> None:
        """A new bot process on the same data directory: the old one stops first."""
        await self.stop()
        self.bot = await start_bot(self.settings, self.cdn, sync_commands=sync_commands)
        await self.env.restart_bot(self.bot)


async def start_bot(settings: Settings, cdn: SimcordCDN, *, sync_commands: bool = True) -> HuggingGPTBot:
    """The bot as its entry point builds it: the runtime first, handed to the bot."""
    runtime = await Runtime.start(settings)
    config = DiscordConfig.from_settings(settings)
    return HuggingGPTBot(
        runtime, config, sync_commands=sync_commands, downloader=CDNDownloader(cdn), edit_interval=0.05
    )


@asynccontextmanager
async def world(
    tmp_path: Path, plans: Sequence[str] = (PICTURE_PLAN,), answers: Sequence[str] = ("Done.",), **settings: str
) -> AsyncIterator[World]:
    script = planning_script(plans, answers)
    async with (
        FakeLLMServer(script) as llm,
        FakeHF(hf_tasks("image-to-image", "text-to-speech", "image-classification")) as hf,
        SimcordCDN() as cdn,
    ):
        config = Settings.from_mapping(agent_settings(llm.base_url, hf.base_url, tmp_path / "data", **settings))
        bot = await start_bot(config, cdn)
        async with simcord.run(bot) as env:
            cdn.env = env
            guild = env.create_guild()
            channel = guild.create_text_channel("general")
            alice = guild.add_member(env.create_user("alice"))
            w = World(env, bot, llm, hf, cdn, config, guild, channel, alice)
            try:
                yield w
                assert_clean(w)
            finally:
                await w.stop()


def assert_clean(w: World) -> None:
    """No message of the bot shows a traceback or a secret; every message is within Discord's limit."""
    for channel in [w.channel, *w.channel.threads]:
        for m in w.bot_messages(channel):
            assert "Traceback" not in m.content
            assert len(m.content) <= 2000
            for secret in SECRETS:
                assert secret not in m.content


def carries(body: bytes, data: bytes) -> bool:
    """Whether an inference request sent ``data``, raw or base64-encoded in JSON."""
    return body == data or base64.b64encode(data) in body


def noise_png(side: int) -> bytes:
    rng = random.Random(side)
    img = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------- mention → thread → answer


async def test_mention_with_png_opens_one_thread_with_progress_answer_and_files(tmp_path: Path) -> None:
    async with world(tmp_path, answers=["Here is your picture and a greeting, @everyone and <@&1>."]) as w:
        await w.mention("make this blue and say hello", attachments=[("cat.png", png_bytes())])

        thread = w.thread()
        assert thread.name == "make this blue and say hello"
        status, answer = w.bot_messages(thread)
        # The status message was edited to its final state and carries the picture of the two-task plan.
        assert w.requests("PATCH", f"/messages/{status.id}")
        assert status.content.startswith("**HuggingGPT** · done")
        assert "✅ 0 image-to-image" in status.content and "✅ 1 text-to-speech" in status.content
        assert [a.filename for a in status.attachments] == ["plan.png"]
        # The answer, with the generated image and the speech as the model made it (it fits).
        assert answer.content.startswith("Here is your picture")
        names = sorted(a.filename for a in answer.attachments)
        assert names == ["out-1-0.png", "out-1-1.wav"]
        # Nobody is pinged: the bot sends allowed_mentions none, so the @everyone in the model's text is inert.
        assert not answer.mention_everyone and not answer.role_mentions
        sends = w.requests("POST", f"/channels/{thread.id}/messages")
        assert sends and all(r.json and r.json.get("allowed_mentions") == {"parse": []} for r in sends)

        conversation = await w.bot.runtime.storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None
        assert conversation.owner == str(w.alice.id)
        messages = await w.bot.runtime.storage.messages(conversation.id)
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[0].text == "make this blue and say hello"
        # The uploaded PNG reached the model.
        assert any(carries(r.body, png_bytes()) for r in w.hf.requests)


async def test_follow_up_in_the_thread_continues_the_conversation_without_a_mention(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["It is blue.", "Now it is red."]) as w:
        await w.mention("what colour is the sky?")
        thread = w.thread()
        await w.alice.send(thread, "and at sunset?")
        assert w.bot.user is not None
        await w.alice.send(thread, f"<@{w.bot.user.id}> thanks!")

        assert len(w.channel.threads) == 1, "a mention inside the bot's thread does not open another thread"
        answers = [m.content for m in w.bot_messages(thread) if not m.content.startswith("**HuggingGPT**")]
        assert answers == ["It is blue.", "Now it is red.", "Now it is red."]
        second_plan = [r for r in w.llm.requests if not r.get("stream")][1]
        history = json.dumps(second_plan["messages"])
        assert "what colour is the sky?" in history and "It is blue." in history


async def test_without_the_message_content_intent_only_mentions_continue_and_help_says_so(tmp_path: Path) -> None:
    async with world(
        tmp_path, plans=[NO_TASKS], answers=["It is blue.", "Now it is red."], DISCORD_MESSAGE_CONTENT="false"
    ) as w:
        assert not w.bot.intents.message_content
        await w.mention("what colour is the sky?")
        thread = w.thread()
        await w.alice.send(thread, "and at sunset?")  # Discord would give this message no text: ignored
        assert w.bot.user is not None
        await w.alice.send(thread, f"<@{w.bot.user.id}> and at sunset?")

        answers = [m.content for m in w.bot_messages(thread) if not m.content.startswith("**HuggingGPT**")]
        assert answers == ["It is blue.", "Now it is red."]
        help_ = await w.alice.slash(thread, "help")
        assert help_.response is not None and "mention me" in help_.response.content


async def test_restart_keeps_the_conversation(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["First answer.", "Second answer."]) as w:
        await w.mention("remember the word pineapple")
        thread = w.thread()
        await w.restart()
        await w.alice.send(thread, "which word?")

        assert w.bot_messages(thread)[-1].content == "Second answer."
        last_plan = [r for r in w.llm.requests if not r.get("stream")][-1]
        assert "remember the word pineapple" in json.dumps(last_plan["messages"])


async def test_interrupted_run_is_reported_in_its_thread_after_a_restart(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS]) as w:
        await w.mention("a long job")
        thread = w.thread()
        storage = w.bot.runtime.storage
        conversation = await storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None
        run_id = await storage.start_run(conversation.id, None)
        await storage.mark_interrupted(run_id, "the run was stopped before it finished")
        await w.restart()

        assert w.bot_messages(thread)[-1].content == INTERRUPTED_NOTICE
        assert await w.bot.runtime.storage.unreported_interrupted_runs() == []


# --------------------------------------------------------------------------- attachments and long answers


async def test_refused_attachments_are_named_and_the_run_goes_on_with_the_good_file(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[plan(("image-classification", {"image": "img-1.png"}))],
                     HUGGINGGPT_MAX_ATTACHMENT_MB="0.05") as w:
        files = [
            ("notes.txt", b"just some text, not media"),
            ("broken.png", png_bytes()[:60]),
            ("huge.png", noise_png(200)),
            ("good.png", png_bytes()),
        ]
        await w.mention("what is in these?", attachments=files)

        thread = w.thread()
        notice = next(m.content for m in w.bot_messages(thread) if m.content.startswith("⚠️"))
        assert "notes.txt: not an image, audio or video file" in notice
        assert "broken.png: the image is corrupt" in notice
        assert "huge.png: 1" in notice and "KiB is over the 51 KiB limit" in notice
        assert "good.png" not in notice
        assert w.bot_messages(thread)[-1].content == "Done."
        assert len(w.hf.requests) == 1 and carries(w.hf.requests[0].body, png_bytes())


async def test_a_long_answer_is_split_into_messages_with_code_blocks_kept_whole(tmp_path: Path) -> None:
    code = "\n".join(f"print({n})  # line {n}" for n in range(200))
    answer = "Here is the program:\n```python\n" + code + "\n```\nThat is all."
    async with world(tmp_path, plans=[NO_TASKS], answers=[answer]) as w:
        await w.mention("write a long program")
        parts = [m.content for m in w.bot_messages(w.thread())][1:]

        assert len(parts) >= 3
        assert all(len(p) <= 2000 for p in parts)
        assert all(p.count("```") % 2 == 0 for p in parts)
        assert parts[0].startswith("Here is the program:") and parts[-1].endswith("That is all.")
        assert all(p.startswith("```python") for p in parts[1:])


async def test_a_huge_answer_is_a_few_messages_and_the_whole_text_as_a_file(tmp_path: Path) -> None:
    """A 1 MB answer once became 1,000 Discord messages."""
    answer = "\n".join(f"Paragraph {n}: " + "words " * 60 for n in range(40))  # 8 messages' worth
    async with world(tmp_path, plans=[NO_TASKS], answers=[answer]) as w:
        await w.mention("tell me everything")
        _status, *parts = w.bot_messages(w.thread())
        assert len(parts) == 3
        assert parts[0].content.startswith("Paragraph 0:")
        assert "answer.txt" in parts[-1].content
        [attached] = parts[-1].attachments
        assert attached.filename == "answer.txt"
        assert (await attached.read()).decode() == answer.strip()


async def test_masked_links_show_their_target_and_nothing_is_previewed(tmp_path: Path) -> None:
    bait = "Claim it here: [discord.com/gifts/free-nitro](https://evil.example/claim) now!"
    async with world(tmp_path, plans=[NO_TASKS], answers=[bait]) as w:
        await w.mention("any gifts?")
        thread = w.thread()
        answer = w.bot_messages(thread)[-1].content
        assert answer == "Claim it here: discord.com/gifts/free-nitro (<https://evil.example/claim>) now!"
        sends = w.requests("POST", f"/channels/{thread.id}/messages")
        assert sends and all(r.json and r.json.get("flags", 0) & 4 for r in sends), "SUPPRESS_EMBEDS on every message"


# --------------------------------------------------------------------------- who may use the bot


async def test_allow_lists_keep_the_bot_quiet_elsewhere(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS]) as w:
        other = w.guild.create_text_channel("bots")
        helpers = w.guild.create_role("helpers")
        bob = w.guild.add_member(w.env.create_user("bob"), roles=[helpers])
        w.bot.access = AccessPolicy(channels=frozenset({other.id}), roles=frozenset({helpers.id}))

        await w.mention("hello?")  # wrong channel
        assert w.channel.threads == []
        assert w.bot.user is not None
        await w.alice.send(other, f"<@{w.bot.user.id}> hello?")  # right channel, no allowed role
        await bob.send(other, f"<@{w.bot.user.id}> hello!")  # right channel and role

        assert [t.name for t in other.threads] == ["hello!"]
        assert w.bot_messages(w.channel) == [] and [m.content for m in w.bot_messages(other)] == []

        w.bot.access = AccessPolicy(guilds=frozenset({w.guild.id + 1}))
        await bob.send(other, f"<@{w.bot.user.id}> and now?")
        assert len(other.threads) == 1


async def test_bots_are_ignored_and_users_are_rate_limited(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], DISCORD_USER_RUNS_PER_MINUTE="1") as w:
        robot = w.guild.add_member(w.env.create_user("robot", bot=True))
        await w.mention("hi from a bot", member=robot)
        assert w.channel.threads == []

        await w.mention("first")
        await w.mention("second")
        assert [t.name for t in w.channel.threads] == ["first"]
        assert "Slow down" in w.bot_messages(w.channel)[-1].content


async def test_a_mention_in_a_thread_without_a_conversation_gets_a_hint(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS]) as w:
        await w.mention("start")
        thread = w.thread()
        storage = w.bot.runtime.storage
        conversation = await storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None
        await storage.delete_conversation(conversation.id)

        await w.alice.send(thread, "are you there?")
        assert w.bot.user is not None
        await w.alice.send(thread, f"<@{w.bot.user.id}> are you there?")
        assert "Mention me in a text channel" in w.bot_messages(thread)[-1].content
        assert len(w.bot_messages(thread)) == 3  # status, answer, hint


# --------------------------------------------------------------------------- slash commands


async def test_slash_ask_opens_a_thread_and_answers_with_the_attachment(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[plan(("image-classification", {"image": "img-1.png"}))],
                     answers=["A red square."]) as w:
        result = await w.alice.slash(w.channel, "ask", prompt="what is this?", attachment=("square.png", png_bytes()))

        assert result.acknowledged and result.response is not None
        assert result.response.content == "**alice** asked: what is this?"
        thread = w.thread()
        assert thread.name == "what is this?"
        assert w.bot_messages(thread)[-1].content == "A red square."
        assert len(w.hf.requests) == 1 and carries(w.hf.requests[0].body, png_bytes())

        again = await w.alice.slash(thread, "ask", prompt="and its colour?")  # in the thread: same conversation
        assert again.response is not None and again.response.content == "**alice** asked: and its colour?"
        assert len(w.channel.threads) == 1
        conversation = await w.bot.conversation_of(w.bot.get_channel(thread.id))  # type: ignore[arg-type]
        assert conversation is not None
        texts = [m.text for m in await w.bot.runtime.storage.messages(conversation.id) if m.role == "user"]
        assert texts == ["what is this?", "and its colour?"]


async def test_slash_models_status_and_help(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        models = await w.alice.slash(w.channel, "models", task="image-to-image")
        assert models.ephemeral and models.response is not None
        assert "**image-to-image**" in models.response.content and "✅" in models.response.content
        assert "downloads" in models.response.content

        unknown = await w.alice.slash(w.channel, "models", task="time-travel")
        assert unknown.response is not None and "don't know the task" in unknown.response.content

        choices = await w.alice.autocomplete(w.channel, "models", "task", "speech")
        assert {c["value"] for c in choices} == {"text-to-speech", "automatic-speech-recognition"}

        status = await w.alice.slash(w.channel, "status")
        assert status.ephemeral and status.response is not None
        text = status.response.content
        assert "database" in text and "✅" in text
        assert not any(secret in text for secret in SECRETS)

        help_ = await w.alice.slash(w.channel, "help")
        assert help_.response is not None and "/ask" in help_.response.content


async def test_slash_reset_is_for_the_owner_or_an_admin(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["Noted."]) as w:
        await w.mention("remember pineapple")
        thread = w.thread()
        storage = w.bot.runtime.storage
        before = await storage.find_conversation(PLATFORM, str(thread.id))
        assert before is not None

        bob = w.guild.add_member(w.env.create_user("bob"))
        refused = await bob.slash(thread, "reset")
        assert refused.ephemeral and refused.response is not None and "Only the person" in refused.response.content
        assert await storage.find_conversation(PLATFORM, str(thread.id)) == before

        done = await w.alice.slash(thread, "reset")
        assert done.response is not None and "forgot" in done.response.content
        after = await storage.find_conversation(PLATFORM, str(thread.id))
        assert after is not None and after.id != before.id and after.owner == str(w.alice.id)
        assert await storage.messages(after.id) == []

        admins = w.guild.create_role("admins", permissions=discord.Permissions(administrator=True))
        carol = w.guild.add_member(w.env.create_user("carol"), roles=[admins])
        again = await carol.slash(thread, "reset")
        assert again.response is not None and "forgot" in again.response.content

        outside = await w.alice.slash(w.channel, "reset")
        assert outside.response is not None and "one of my conversation threads" in outside.response.content


async def test_commands_are_synced_only_when_asked(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        assert len(w.requests("PUT", "/commands")) == 1
        await w.restart(sync_commands=False)
        assert len(w.requests("PUT", "/commands")) == 1


# --------------------------------------------------------------------------- Discord failures


async def test_failed_edits_do_not_stop_the_run(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["Still here."]) as w:
        w.env.inject_error("PATCH", "/channels/*/messages/*", status=500, times=None)
        w.env.inject_error("POST", "/channels/*/typing", status=429, times=None)
        await w.mention("hello")

        thread = w.thread()
        assert w.bot_messages(thread)[-1].content == "Still here."
        conversation = await w.bot.runtime.storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None
        runs = await w.bot.runtime.storage.runs(conversation.id)
        assert [r.status for r in runs] == ["ok"]


async def test_a_refused_answer_is_reported_in_the_thread(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["x" * 10]) as w:
        # The status message goes first and succeeds; then the answer is refused once.
        original = w.bot.http.request

        async def refuse_answer(route: Any, **kwargs: Any) -> Any:
            payload = kwargs.get("json") or {}
            if route.method == "POST" and payload.get("content") == "x" * 10:
                raise discord.HTTPException(_Response(500), {"message": "boom", "code": 0})
            return await original(route, **kwargs)

        w.bot.http.request = refuse_answer  # type: ignore[method-assign]
        await w.mention("hello")
        assert w.bot_messages(w.thread())[-1].content == "⚠️ Discord refused part of my reply (HTTP 500)."


@dataclass
class _Response:
    status: int
    reason: str = "Server Error"
