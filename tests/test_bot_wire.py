"""The real wire: the unpatched ``hugginggpt bot`` process against a fake Discord (REST + websocket gateway),
with the scripted LLM and the fake HF inference server behind the agent.

One process lifetime covers login and command sync, a mention with an attachment (downloaded from the fake
CDN), the thread, the edited status message, the multipart upload, a 429 and a 502 from Discord (retried by
discord.py), a request queued behind a running one, and SIGTERM during that run: exit code 0, and the run
stored as interrupted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from storage import Storage
from tests.fakes import discord_server, hf_server, llm_server
from tests.fakes.agent_fakes import agent_settings, hf_tasks, plan, planning_script
from tests.fakes.discord_server import BOT_ID
from tests.fakes.hf_server import png_bytes
from tests.fakes.llm_server import Reply

HUGGINGGPT = Path(sys.executable).with_name("hugginggpt")


def test_the_bot_process_over_the_wire(tmp_path: Path) -> None:
    script = planning_script(
        [
            plan(
                ("image-to-image", {"image": "img-1.png", "text": "blue"}), ("text-to-speech", {"text": "hi"})
            ),
            Reply(text='{"tasks": []}', delay=60),
        ],
        ["Here you are, @everyone."],
    )
    llm = llm_server.start_in_thread(script)
    hf = hf_server.start_in_thread(hf_tasks("image-to-image", "text-to-speech"))
    server = discord_server.start_in_thread()
    fake = server.fake
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_", "HUGGINGGPT_", "DISCORD_"))
    }
    env |= agent_settings(llm.base_url, hf.base_url, tmp_path / "data")
    env |= {
        "DISCORD_TOKEN": "test-token",
        "DISCORD_API_BASE": server.api_base,
        "DISCORD_GATEWAY_URL": server.gateway_url,
    }
    log = (tmp_path / "bot.log").open("w+")
    bot = subprocess.Popen(
        [str(HUGGINGGPT), "bot", "--sync-commands"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        server.wait_for(lambda f: f.identified and f.requests_to("PUT", r"/commands$"), timeout=60)
        assert {c["name"] for c in fake.requests_to("PUT", r"/commands$")[0].json} == {
            "ask",
            "models",
            "status",
            "reset",
            "help",
            "config",
            "usage",
            "Ask HuggingGPT",
        }

        # A mention with a PNG: one thread, a status message (its first POST gets a 429), edits (one gets a
        # 502), the answer with the files as multipart.
        fake.fail_next("POST", r"/channels/\d+/messages$", status=429, retry_after=0.1)
        fake.fail_next("PATCH", r"/messages/\d+$", status=502)
        mention = server.call(
            fake.user_message,
            f"<@{BOT_ID}> make it blue and say hi",
            attachments=[("cat.png", png_bytes(), "image/png")],
        )
        thread = f"/channels/{mention['id']}/messages"
        # The answer is posted at once; the final status edit follows when the edit interval allows.
        server.wait_for(
            lambda f: any(r.files for r in f.requests_to("POST", thread + "$", status=200)), timeout=60
        )
        server.wait_for(
            lambda f: any(
                (r.json or {}).get("content", "").startswith("**HuggingGPT** · done")
                for r in f.requests_to("PATCH", thread, status=200)
            ),
            timeout=30,
        )

        assert [r.json["name"] for r in fake.requests_to("POST", "/threads$")] == ["make it blue and say hi"]
        assert fake.requests_to("POST", thread + "$", status=429), "the injected 429 was met"
        assert fake.requests_to("PATCH", thread, status=502) and fake.requests_to("PATCH", thread, status=200)
        assert fake.requests_to("POST", f"/channels/{mention['id']}/typing$")
        status_edits = [r.json.get("content", "") for r in fake.requests_to("PATCH", thread, status=200)]
        assert any(c.startswith("**HuggingGPT** · done") for c in status_edits)
        answer = next(r for r in fake.requests_to("POST", thread + "$", status=200) if r.files)
        assert answer.json["content"] == "Here you are, @everyone."
        assert answer.json["allowed_mentions"] == {"parse": []}
        assert sorted(answer.files) == ["out-1-0.png", "out-1-1.wav"]  # the speech as made: it fits
        assert fake.heartbeats >= 1

        # A follow-up whose planning hangs, then another one: it is queued. Then SIGTERM.
        server.call(fake.user_message, "and now something slow", channel_id=int(mention["id"]))
        server.wait_for(lambda f: len(llm.requests) == 3, timeout=30)
        server.call(fake.user_message, "and then this", channel_id=int(mention["id"]))
        server.wait_for(
            lambda f: any(
                "queued" in (r.json or {}).get("content", "") for r in f.requests_to("POST", thread)
            ),
            timeout=30,
        )
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(timeout=30) == 0
        stopped = fake.requests_to("PATCH", thread, status=200)[-1].json["content"]
        assert "stopped: the bot is shutting down" in stopped
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait()
        server.stop()
        hf.stop()
        llm.stop()
        log.seek(0)
        output = log.read()
        log.close()
        print(output)
    assert "Traceback" not in output
    assert "test-token" not in output

    async def runs() -> list[str]:
        async with await Storage.open(tmp_path / "data") as storage:
            conversation = await storage.find_conversation("discord", mention["id"])
            assert conversation is not None and conversation.owner == str(discord_server.USER_ID)
            return [r.status for r in await storage.runs(conversation.id)]

    assert asyncio.run(runs()) == ["ok", "interrupted"]
