"""Cancel and Retry over the real wire: the unpatched ``hugginggpt bot`` process against the fake Discord, with a
speech model that never answers, so a run is in flight when its Cancel button is pressed; then the process is
killed mid-run, and a new one answers the buttons the old one sent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bot.controls import NOT_YOURS
from storage import Storage
from tests.fakes import discord_server, hf_server, llm_server
from tests.fakes.agent_fakes import agent_settings, hf_tasks, plan, planning_script
from tests.fakes.discord_server import BOT_ID, FakeDiscord
from tests.fakes.hf_server import Fault, png_bytes

CLI = "app.cli"  # the console script of this tree
PICTURE_AND_SPEECH = plan(
    ("image-to-image", {"image": "img-1.png", "text": "blue"}), ("text-to-speech", {"text": "hi"})
)


def buttons(message: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """label -> (custom id, disabled)"""
    return {
        c["label"]: (c["custom_id"], bool(c.get("disabled")))
        for row in message.get("components", [])
        for c in row.get("components", [])
    }


def replies(fake: FakeDiscord, token: str) -> list[str]:
    return [(r.get("data") or r).get("content", "") for r in fake.interaction_replies[token]]


def test_cancel_and_retry_buttons_over_the_wire_and_across_a_restart(tmp_path: Path) -> None:
    llm = llm_server.start_in_thread(planning_script([PICTURE_AND_SPEECH], ["Here you are."]))
    hf = hf_server.start_in_thread(hf_tasks("image-to-image", "text-to-speech"))
    for model in hf_tasks("text-to-speech"):
        hf.server.script(model, *[Fault.slow(120)] * 4)
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

    def start() -> subprocess.Popen[bytes]:
        fake.identified = False
        bot = subprocess.Popen(
            [sys.executable, "-m", CLI, "bot"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        server.wait_for(lambda f: f.identified, timeout=60)
        return bot

    def status_of(thread: int) -> dict[str, Any]:
        mine = (
            m for m in list(fake.messages.values()) if int(m["channel_id"]) == thread and m["author"]["bot"]
        )
        return next(mine, {"content": "", "components": []})

    bot = start()
    try:
        mention = server.call(
            fake.user_message,
            f"<@{BOT_ID}> make it blue and say hi",
            attachments=[("cat.png", png_bytes(), "image/png")],
        )
        thread = int(mention["id"])
        # The picture is done, the speech hangs: the status message offers Cancel.
        server.wait_for(
            lambda f: "✅ 0" in status_of(thread)["content"] and "Cancel" in buttons(status_of(thread)),
            timeout=60,
        )
        status = status_of(thread)
        cancel_id, disabled = buttons(status)["Cancel"]
        assert not disabled

        refused = server.call(fake.click, int(status["id"]), cancel_id, user_id=4001, name="bob")
        server.wait_for(lambda f: f.interaction_replies[refused], timeout=20)
        assert replies(fake, refused) == [NOT_YOURS]

        pressed = server.call(fake.click, int(status["id"]), cancel_id)
        server.wait_for(
            lambda f: any("Cancelled by alice" in m["content"] for m in f.messages.values()), timeout=30
        )
        assert "Stopping it" in replies(fake, pressed)[0]
        answer = next(m for m in fake.messages.values() if "Cancelled by alice" in m["content"])
        assert "out-1-0.png" in answer["content"] and [a["filename"] for a in answer["attachments"]] == [
            "out-1-0.png"
        ]
        server.wait_for(lambda f: buttons(status_of(thread))["Cancel"][1], timeout=20)  # disabled once ended

        # Retry on the cancelled answer: the same request again; the speech hangs again. Then kill -9.
        retry_id, _ = buttons(answer)["Retry"]
        before = len(fake.messages)
        server.call(fake.click, int(answer["id"]), retry_id)
        server.wait_for(
            lambda f: any(
                "Cancel" in buttons(m) and not buttons(m)["Cancel"][1] and int(m["id"]) != int(status["id"])
                for m in list(f.messages.values())[before:]
            ),
            timeout=60,
        )
        second = next(m for m in list(fake.messages.values())[before:] if "Cancel" in buttons(m))
        bot.send_signal(signal.SIGKILL)
        bot.wait(timeout=30)

        # A new process: the stale Cancel of the killed run disables itself and says why.
        bot = start()
        stale = server.call(fake.click, int(second["id"]), buttons(second)["Cancel"][0])
        server.wait_for(lambda f: len(f.interaction_replies[stale]) == 2, timeout=30)
        update, notice = fake.interaction_replies[stale]
        assert update["type"] == 7 and notice["content"] == "This request has already ended."
        assert buttons(fake.messages[int(second["id"])])["Cancel"][1]
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(timeout=30) == 0
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

    async def runs() -> list[str]:
        async with await Storage.open(tmp_path / "data") as storage:
            conversation = await storage.find_conversation("discord", str(thread))
            assert conversation is not None
            return [r.status for r in await storage.runs(conversation.id)]

    assert asyncio.run(runs()) == ["cancelled", "interrupted"]
