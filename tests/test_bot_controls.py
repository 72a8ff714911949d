"""The Retry button, ``/config`` and ``/usage`` through discord.py in SimCord, with the real agent on the fake LLM
and HF servers: who may press, buttons after a restart, settings stored, inherited by threads and enforced,
daily limits enforced with their reset time. (Cancel needs a run in flight while a button is pressed, which
SimCord's settling does not allow: ``test_bot_controls_wire`` presses it over the wire.)"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import discord
import simcord

from bot.app import PLATFORM
from bot.controls import NOT_YOURS
from bot.quotas import DAY_SECONDS, DailyLimit, QuotaPolicy, day_start
from storage import ChatSettings
from tests.fakes.hf_server import png_bytes
from tests.test_bot_simcord import NO_TASKS, PICTURE_PLAN, World, world


def buttons(message: discord.Message) -> dict[str, bool]:
    """The message's buttons: label -> disabled."""
    found = {}
    for row in message.components:
        for item in getattr(row, "children", []):
            found[str(item.label)] = bool(item.disabled)
    return found


def fresh(w: World, channel: simcord.ChannelHandle, message: discord.Message) -> discord.Message:
    return next(m for m in w.bot_messages(channel) if m.id == message.id)


async def test_retry_reruns_the_request_with_its_files_only_for_the_requester_and_after_a_restart(
    tmp_path: Path,
) -> None:
    plans = [PICTURE_PLAN, PICTURE_PLAN, PICTURE_PLAN]
    async with world(tmp_path, plans=plans, answers=["First.", "Second.", "Third."]) as w:
        await w.mention("make this blue and say hello", attachments=[("cat.png", png_bytes())])
        thread = w.thread()
        status, answer = w.bot_messages(thread)
        assert buttons(status) == {"Cancel": True}, "the run ended: its Cancel is disabled"
        assert buttons(answer) == {"Retry": False}

        bob = w.guild.add_member(w.env.create_user("bob"))
        refused = await bob.click(answer, label="Retry")
        assert refused.ephemeral and refused.response is not None and refused.response.content == NOT_YOURS
        assert len(w.bot_messages(thread)) == 2, "nothing ran for bob"

        await w.restart()
        # The button sent by the first process still works in the second.
        await w.alice.click(answer, label="Retry")
        contents = [m.content for m in w.bot_messages(thread)]
        assert "Second." in contents
        storage = w.bot.runtime.storage
        conversation = await storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None
        first, second = await storage.runs(conversation.id)
        assert (first.status, second.status) == ("ok", "ok")
        texts = [m.text for m in await storage.messages(conversation.id) if m.role == "user"]
        assert texts == ["make this blue and say hello"] * 2
        # The retry's plan named the first request's picture, which was not uploaded again.
        assert [t.task for t in second.tasks] == ["image-to-image", "text-to-speech"]
        assert [r.name for r in await storage.resources(conversation.id) if r.origin.source == "upload"] == [
            "img-1.png"
        ]

        await w.alice.slash(thread, "reset")
        gone = await w.alice.click(answer, label="Retry")
        assert "reset" in gone.followups[0].content
        assert buttons(fresh(w, thread, answer)) == {"Retry": True}


async def test_config_needs_manage_server_is_stored_inherited_by_threads_and_enforced(tmp_path: Path) -> None:
    answers = ["First.", "Second.", "Third."]
    async with world(tmp_path, plans=[NO_TASKS], answers=answers, LLM_MODELS_ALLOWED="big-model") as w:
        mods = w.guild.create_role("mods", permissions=discord.Permissions(manage_guild=True))
        carol = w.guild.add_member(w.env.create_user("carol"), roles=[mods])
        # Discord hides /config from members without Manage Server; a server that shows it to them anyway
        # still gets a refusal from the bot.
        assert "config set" not in w.alice.available_commands(w.channel)
        assert "config set" in carol.available_commands(w.channel)
        config = next(c for c in await w.bot.tree.fetch_commands() if c.name == "config")
        w.guild.set_command_permissions(config, {w.alice: True})
        refused = await w.alice.slash(w.channel, "config set", mention_required="yes")
        assert refused.response is not None and "Manage Server" in refused.response.content
        assert await w.bot.runtime.storage.chat_settings(str(w.guild.id)) == ChatSettings()

        wrong = await carol.slash(w.channel, "config set", model="gpt-5-secret")
        assert wrong.response is not None and "not an approved controller model" in wrong.response.content
        done = await carol.slash(
            w.channel, "config set", channel=w.channel, mention_required="yes", max_tasks=3
        )
        assert (
            done.ephemeral
            and done.response is not None
            and "follow-ups need a mention: yes" in done.response.content
        )
        await carol.slash(w.channel, "config set", model="big-model")
        storage = w.bot.runtime.storage
        assert await storage.chat_settings(str(w.guild.id), str(w.channel.id)) == ChatSettings(
            max_tasks=3, mention_required=True
        )
        assert await storage.chat_settings(str(w.guild.id)) == ChatSettings(llm_model="big-model")

        await w.restart()
        shown = await carol.slash(w.channel, "config show", channel=w.channel)
        assert shown.response is not None
        assert "controller model: `big-model`" in shown.response.content  # the server's, in effect there
        assert "maximum tasks: `3`" in shown.response.content

        # The thread follows its channel: a follow-up without a mention is ignored, one with a mention runs.
        await w.mention("hello")
        thread = w.thread()
        await w.alice.send(thread, "are you there?")
        assert [m.content for m in w.bot_messages(thread) if not m.content.startswith("**")] == ["First."]
        assert w.bot.user is not None
        await w.alice.send(thread, f"<@{w.bot.user.id}> are you there?")
        assert [m.content for m in w.bot_messages(thread) if not m.content.startswith("**")] == [
            "First.",
            "Second.",
        ]

        await carol.slash(w.channel, "config reset", channel=w.channel)
        await w.alice.send(thread, "and now?")
        assert [m.content for m in w.bot_messages(thread) if not m.content.startswith("**")][-1] == "Third."


async def test_daily_limits_refuse_with_the_limit_and_its_reset_and_usage_shows_them(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["Yes."], DISCORD_USER_RUNS_PER_DAY="1") as w:
        vip = w.guild.create_role("vip")
        mods = w.guild.create_role("mods", permissions=discord.Permissions(manage_guild=True))
        w.bot.quotas = QuotaPolicy(w.bot.quotas.user, {vip.id: DailyLimit(runs=2)})
        dave = w.guild.add_member(w.env.create_user("dave"), roles=[vip, mods])

        await w.mention("one")
        thread = w.thread()
        await w.alice.send(thread, "two")
        refusal = w.bot_messages(thread)[-1].content
        midnight = int(day_start(time.time()) + DAY_SECONDS)
        assert "your 1 runs for today (the daily limit on runs)" in refusal
        assert f"It resets at 00:00 UTC, <t:{midnight}:t>" in refusal
        storage = w.bot.runtime.storage
        conversation = await storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None and len(await storage.runs(conversation.id)) == 1

        await dave.send(thread, "three")  # the role allows two
        await dave.send(thread, "four")
        await dave.send(thread, "five")
        assert "daily limit on runs" in w.bot_messages(thread)[-1].content
        assert len(await storage.runs(conversation.id)) == 3

        mine = await w.alice.slash(thread, "usage")
        assert mine.response is not None and "1 of 1 runs" in mine.response.content
        assert f"<t:{midnight}:t>" in mine.response.content
        refused = await w.alice.slash(thread, "usage", guild=True)
        assert refused.response is not None and "Manage Server" in refused.response.content
        everyone = await dave.slash(thread, "usage", guild=True)
        assert everyone.response is not None
        text = everyone.response.content
        assert "2 of 2 runs" in text and "**This server today**: 3 runs" in text
        assert text.index(f"<@{dave.id}>: 2 runs") < text.index(f"<@{w.alice.id}>: 1 runs")


async def test_a_token_limit_counts_the_tokens_of_stored_runs(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["Yes."], DISCORD_USER_TOKENS_PER_DAY="1") as w:
        await w.mention("one")
        thread = w.thread()
        storage = w.bot.runtime.storage
        conversation = await storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None
        (run,) = await storage.runs(conversation.id)
        assert run.prompt_tokens + run.completion_tokens > 1
        await w.alice.send(thread, "two")
        assert "LLM tokens for today (the daily limit on tokens)" in w.bot_messages(thread)[-1].content


async def test_config_picks_the_controller_model_selection_tasks_and_task_types_of_runs(
    tmp_path: Path,
) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["Yes."], LLM_MODELS_ALLOWED="big-model") as w:
        mods = w.guild.create_role("mods", permissions=discord.Permissions(manage_guild=True))
        carol = w.guild.add_member(w.env.create_user("carol"), roles=[mods])
        await carol.slash(w.channel, "config set", model="big-model", selection="llm")
        await carol.slash(
            w.channel, "config set", channel=w.channel, max_tasks=2, task_types="text-to-speech"
        )

        await w.mention("say hello")
        planning = next(r for r in w.llm.requests if not r.get("stream"))
        assert planning["model"] == "big-model"
        system = planning["messages"][0]["content"]
        assert "- text-to-speech:" in system and "- image-to-image:" not in system
        assert "at most 2" in system
        answering = next(r for r in w.llm.requests if r.get("stream"))
        assert answering["model"] == "big-model"

        # Elsewhere in the server: the server's model, every task type, the deployment's limit.
        other = w.guild.create_text_channel("random")
        await w.alice.send(other, f"<@{w.bot.user.id}> say hello")  # type: ignore[union-attr]
        planning = [r for r in w.llm.requests if not r.get("stream")][-1]
        assert planning["model"] == "big-model"
        assert "- image-to-image:" in planning["messages"][0]["content"]
        assert f"at most {w.settings.max_tasks}" in planning["messages"][0]["content"]

        # A model the operator no longer approves is ignored: the deployment's LLM_MODEL plans.
        w.settings = replace(w.settings, llm_models_allowed=())
        await w.restart()
        await w.alice.send(other, f"<@{w.bot.user.id}> again")  # type: ignore[union-attr]
        assert [r for r in w.llm.requests if not r.get("stream")][-1]["model"] == w.settings.llm_model
