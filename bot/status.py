"""The live status message of a run: one message, edited as the agent's events arrive.

Discord rate-limits edits, so the message is edited at most once per ``interval``; updates in between
replace each other and the latest one is written when the interval is up. ``finish`` always writes the final
state. Failed edits are logged and never stop the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import time
from collections.abc import Callable

import discord

from agent.progress import RunProgress
from agent.text import clip

from .text import MESSAGE_LIMIT

__all__ = ["TYPING_EVERY", "StatusMessage", "keep_typing", "render_progress"]

log = logging.getLogger(__name__)

TYPING_EVERY = 8.0  # Discord shows "typing" for 10 s after each request
_LINE_LIMIT = 300


def render_progress(progress: RunProgress, *, seconds: float | None = None) -> str:
    """The status text: the stage (and what the LLM is busy with, if that keeps the run waiting), then one
    line per task (state, task, model, seconds, note)."""
    head = f"**HuggingGPT** · {progress.headline}"
    if seconds is not None:
        head += f" · {seconds:.1f}s"
    lines = [head]
    lines += [clip(line, _LINE_LIMIT) for line in progress.lines()]
    return clip("\n".join(lines), MESSAGE_LIMIT)


def _steady() -> float:
    return 1.0


class StatusMessage:
    """A message edited at most once per ``interval`` seconds (times ``stretch()``, which grows when many
    runs share the REST budget: ``bot.budget``), never losing the last update."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        interval: float = 1.0,
        stretch: Callable[[], float] = _steady,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.interval = interval
        self.stretch = stretch
        self.clock = clock
        self.message: discord.Message | None = None
        self._content: str | None = None
        self._file: tuple[str, bytes] | None = None
        self._written: str | None = None
        self._last = -math.inf
        self._flusher: asyncio.Task[None] | None = None
        self._first_written = asyncio.Event()
        self._view: discord.ui.View | None = None
        self._view_changed = False

    def show(
        self, content: str, *, file: tuple[str, bytes] | None = None, view: discord.ui.View | None = None
    ) -> None:
        """Make ``content`` (and ``file``, attached once, and the buttons of ``view``) the next state written."""
        self._content = content
        if file is not None:
            self._file = file
        if view is not None:
            self._view, self._view_changed = view, True
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    def show_view(self, view: discord.ui.View) -> None:
        """Put ``view``'s buttons on the message, with the latest content."""
        self.show(self._content or self._written or "", view=view)

    async def finish(self, content: str, *, view: discord.ui.View | None = None) -> None:
        """Write ``content`` (and ``view``) as the final state, after the interval since the previous edit."""
        self.show(content, view=view)
        assert self._flusher is not None
        await self._flusher

    async def posted(self) -> None:
        """Wait until the first state was sent (or refused), so later messages come below the status."""
        await self._first_written.wait()

    async def _flush(self) -> None:
        while self._content is not None:
            wait = self._last + self.interval * self.stretch() - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            content, file = self._content, self._file
            self._content = self._file = None
            if content == self._written and file is None and not self._view_changed:
                continue
            await self._write(content, file)
            self._written, self._last = content, self.clock()

    async def _write(self, content: str, file: tuple[str, bytes] | None) -> None:
        files = [discord.File(io.BytesIO(file[1]), filename=file[0])] if file else []
        # MISSING leaves the buttons as they are (None would remove them).
        view = self._view if self._view_changed and self._view is not None else discord.utils.MISSING
        self._view_changed = False
        try:
            if self.message is None:
                self.message = await self.channel.send(content, files=files, suppress_embeds=True, view=view)
            elif files:
                self.message = await self.message.edit(content=content, attachments=files, view=view)
            else:
                self.message = await self.message.edit(content=content, view=view)
        except discord.HTTPException as err:
            log.warning("could not update the status message: %s %s", err.status, err.text)
        finally:
            self._first_written.set()


async def keep_typing(channel: discord.abc.Messageable, *, stretch: Callable[[], float] = _steady) -> None:
    """Show "typing…" in ``channel`` until cancelled: every 8 s, times ``stretch()`` under a busy budget."""
    while True:
        with contextlib.suppress(discord.HTTPException):
            await channel.typing()
        await asyncio.sleep(TYPING_EVERY * stretch())
