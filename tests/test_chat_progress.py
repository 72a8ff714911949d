"""The terminal chat shows what it is doing from Enter on, and keeps library logs out of the conversation.

``hugginggpt chat`` runs in a pseudo-terminal, as a user would run it. The scripted LLM holds its plan back
until the test has seen the chat say it is planning, so the stage must be on screen before any plan exists.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.local_llm import assemble_parts
from storage import Storage
from tests.fakes.llm_server import start_in_thread

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Terminal:
    """A process on a pseudo-terminal: everything it writes, readable as plain text."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "\n")

    def read_until(self, pattern: str, seconds: float = 60.0) -> str:
        deadline = time.monotonic() + seconds
        while not re.search(pattern, self.text):
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} did not appear; the terminal shows:\n{self.text[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # the process ended
                    assert re.search(pattern, self.text), self.text[-2000:]
        return self.text

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.master)


def test_the_chat_shows_it_is_planning_before_the_plan_exists_and_keeps_logs_in_a_file(tmp_path: Path) -> None:
    may_plan = threading.Event()

    def script(body: dict[str, Any]) -> str:
        if "You are the planner" in str(body["messages"][0]["content"]):
            assert may_plan.wait(60), "the test never saw the planning stage"
            return '{"tasks": []}'
        return "Hello from the model."

    llm = start_in_thread(script)
    env = dict(os.environ)
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY="sk-test-chat",
        HUGGINGGPT_DATA_DIR=str(tmp_path / "data"),
        HUGGINGGPT_DEMOS="fixed",
        LOG_LEVEL="INFO",
    )
    terminal = Terminal([sys.executable, "-m", "app.cli", "chat"], env, tmp_path)
    try:
        terminal.read_until(r"you> ")
        assert "the log goes to" in terminal.text
        terminal.type("hi there")
        terminal.read_until(r"planning · \d+s")  # drawn while the LLM still holds the plan back
        may_plan.set()
        shown = terminal.read_until(r"Hello from the model\.")
        terminal.type("/quit")
        terminal.process.wait(timeout=30)
    finally:
        may_plan.set()
        terminal.close()
        llm.stop()
    # Library INFO lines went to the log file, not between the user's lines.
    log = (tmp_path / "data" / "logs" / "hugginggpt.log").read_text()
    assert " INFO " in log
    assert " INFO " not in shown


def test_assembling_the_packaged_model_reports_its_progress(tmp_path: Path) -> None:
    parts = []
    for n in range(3):
        part = tmp_path / f"part{n}.bin"
        part.write_bytes(bytes([n]) * 1000)
        parts.append(part)
    heard: list[tuple[int, int]] = []
    assemble_parts(parts, tmp_path / "model.gguf", "", progress=lambda done, total: heard.append((done, total)))
    assert heard[-1] == (3000, 3000)
    assert [done for done, _ in heard] == sorted(done for done, _ in heard)


def test_ctrl_c_in_the_chat_cancels_the_request_and_the_chat_goes_on(tmp_path: Path) -> None:
    may_plan = threading.Event()

    def script(body: dict[str, Any]) -> str:
        if "You are the planner" in str(body["messages"][0]["content"]):
            may_plan.wait(60)  # the first plan waits until the test has cancelled its request
            return '{"tasks": []}'
        return "Hello again."

    llm = start_in_thread(script)
    env = dict(os.environ)
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY="sk-test-chat",
        HUGGINGGPT_DATA_DIR=str(tmp_path / "data"),
        HUGGINGGPT_DEMOS="fixed",
    )
    terminal = Terminal([sys.executable, "-m", "app.cli", "chat", "--conversation", "c1"], env, tmp_path)
    try:
        terminal.read_until(r"you> ")
        terminal.type("draw something slowly")
        terminal.read_until(r"planning · \d+s")
        terminal.process.send_signal(signal.SIGINT)
        terminal.read_until(r"Cancelled by you\. No task had finished")
        may_plan.set()
        terminal.read_until(r"you> [^\n]*$")
        assert terminal.process.poll() is None, "Ctrl-C during a request does not end the chat"
        terminal.type("hello?")
        terminal.read_until(r"Hello again\.")
        terminal.type("/quit")
        assert terminal.process.wait(timeout=30) == 0
    finally:
        may_plan.set()
        terminal.close()
        llm.stop()

    async def statuses() -> list[str]:
        async with await Storage.open(tmp_path / "data") as storage:
            return [r.status for r in await storage.runs("c1")]

    assert asyncio.run(statuses()) == ["cancelled", "ok"]
