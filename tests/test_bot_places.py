"""Where the bot can be asked, in SimCord (an in-memory Discord running the real discord.py) with the real
agent behind it: a mention in a forum post answers in that post, and the message command "Ask HuggingGPT"
takes an existing message (its text and files) as the request."""

from __future__ import annotations

import json
from pathlib import Path

from discord import app_commands

from bot.app import PLATFORM
from bot.commands import ASK_MENU
from tests.fakes.agent_fakes import plan
from tests.fakes.hf_server import png_bytes
from tests.test_bot_simcord import NO_TASKS, carries, world

CLASSIFY = plan(("image-classification", {"image": "img-1.png"}))


async def test_a_mention_in_a_forum_post_is_answered_in_that_post(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[CLASSIFY, NO_TASKS], answers=["A red square.", "Yes, red."]) as w:
        forum = w.guild.create_forum_channel("help")
        w.env.backend.create_thread(forum.id, "What is this picture?", w.alice.id)
        (post,) = forum.threads
        assert w.bot.user is not None
        await w.alice.send(post, f"<@{w.bot.user.id}> what is this?", attachments=[("sq.png", png_bytes())])
        await w.alice.send(post, "is it red?")  # a follow-up in the post needs no mention

        assert len(forum.threads) == 1  # no thread opened inside the post
        answers = [m.content for m in w.bot_messages(post) if not m.content.startswith("**HuggingGPT**")]
        assert answers == ["A red square.", "Yes, red."]
        conversation = await w.bot.runtime.storage.find_conversation(PLATFORM, str(post.id))
        assert conversation is not None and conversation.owner == str(w.alice.id)
        assert carries(w.hf.requests[0].body, png_bytes())
        second_plan = [r for r in w.llm.requests if not r.get("stream")][1]
        assert "what is this?" in json.dumps(second_plan["messages"])


async def test_a_forum_post_without_a_mention_is_left_alone(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS]) as w:
        forum = w.guild.create_forum_channel("help")
        w.env.backend.create_thread(forum.id, "Chat", w.alice.id)
        (post,) = forum.threads
        await w.alice.send(post, "anyone here?")
        assert w.bot_messages(post) == [] and w.llm.requests == []


async def test_ask_hugginggpt_takes_a_message_text_and_files_as_the_request(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[CLASSIFY], answers=["A red square."]) as w:
        bob = w.guild.add_member(w.env.create_user("bob"))
        message = await bob.send(w.channel, "what is in this picture?", attachments=[("sq.png", png_bytes())])
        result = await w.alice.context_menu(w.channel, ASK_MENU, message)

        assert result.acknowledged and result.response is not None
        assert result.response.content.startswith("**alice** asked about ")
        assert result.response.content.endswith(": what is in this picture? [1 file]")
        thread = w.thread()
        assert thread.name == "what is in this picture?"
        assert w.bot_messages(thread)[-1].content == "A red square."
        assert len(w.hf.requests) == 1 and carries(w.hf.requests[0].body, png_bytes())
        conversation = await w.bot.runtime.storage.find_conversation(PLATFORM, str(thread.id))
        assert conversation is not None and conversation.owner == str(w.alice.id)  # who asked, not who wrote
        messages = await w.bot.runtime.storage.messages(conversation.id)
        assert [m.text for m in messages if m.role == "user"] == ["what is in this picture?"]
        first_plan = w.llm.requests[0]["messages"][-1]["content"]
        assert "img-1.png (image, attached to this request)" in first_plan


async def test_ask_hugginggpt_in_a_thread_continues_it_and_an_empty_message_is_refused(
    tmp_path: Path,
) -> None:
    async with world(tmp_path, plans=[NO_TASKS], answers=["Hello.", "Paris."]) as w:
        await w.mention("hi")
        thread = w.thread()
        bob = w.guild.add_member(w.env.create_user("bob"))
        question = await bob.send(thread, "what is the capital of France?")
        await w.alice.context_menu(thread, ASK_MENU, question)
        assert len(w.channel.threads) == 1
        assert w.bot_messages(thread)[-1].content == "Paris."

        assert w.bot.user is not None
        calls = len(w.llm.requests)
        only_a_mention = await bob.send(thread, f"<@{w.bot.user.id}>")
        refused = await w.alice.context_menu(thread, ASK_MENU, only_a_mention)
        assert refused.ephemeral and refused.response is not None
        assert refused.response.content == "That message has no text or files to ask about."
        assert len(w.llm.requests) == calls


async def test_ask_hugginggpt_follows_the_allow_lists(tmp_path: Path) -> None:
    async with world(tmp_path, plans=[NO_TASKS], DISCORD_ALLOWED_CHANNELS="1") as w:
        message = await w.alice.send(w.channel, "hello")
        refused = await w.alice.context_menu(w.channel, ASK_MENU, message)
        assert refused.ephemeral and refused.response is not None
        assert refused.response.content == "I'm not available here."
        assert w.llm.requests == [] and w.channel.threads == []
        # The refusal went through the tree's error handler, which SimCord also records.
        assert [type(e) for e in w.env.errors] == [app_commands.CheckFailure]
