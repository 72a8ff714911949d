"""One request run in a thread: agent events become the status message, then the answer and files are posted.

Flow: the status message and "typing…" start → ``Conversations.ask`` yields events → each event updates the
status (and the plan picture when the plan has several tasks) → the answer, split into messages, with the
generated files attached (fitted to the guild's upload limit, ten per message), while the final status is
written as soon as Discord's edit rate allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import discord

from agent.events import Done, Event, PlanReady, RunResult
from agent.progress import RunProgress
from agent.runtime import Runtime
from agent.uploads import Upload

from .controls import CancelButton, RetryButton, controls
from .graph import draw_plan
from .media import OutgoingFile, batches, fit_for_upload
from .status import StatusMessage, keep_typing, render_progress
from .text import split_message

__all__ = ["ThreadRequest", "post_message", "run_in_thread"]

log = logging.getLogger(__name__)

_STOP_NOTICE_SECONDS = 3.0


@dataclass(frozen=True)
class ThreadRequest:
    """A user's turn in a conversation, ready for the agent."""

    conversation_id: str
    text: str
    uploads: Sequence[Upload]
    author: str
    message_id: str | None
    # Files of the conversation the request is about besides its uploads (a retry names its first try's).
    reuse: tuple[str, ...] = ()


async def run_in_thread(
    runtime: Runtime, thread: discord.Thread, request: ThreadRequest, *, edit_interval: float = 1.0
) -> RunResult | None:
    """Run ``request`` with live progress in ``thread``, then post the answer. None if no result came.

    The status message carries a Cancel button while the run runs; the answer a Retry button."""
    progress = RunProgress()
    status = StatusMessage(thread, interval=edit_interval)
    status.show(render_progress(progress))
    typing = asyncio.create_task(keep_typing(thread))
    result: RunResult | None = None
    run_ids: list[str] = []

    def started(run_id: str) -> None:
        run_ids.append(run_id)
        status.show_view(controls(CancelButton(run_id)))

    def ended() -> discord.ui.View | None:
        return controls(CancelButton(run_ids[0], disabled=True)) if run_ids else None

    try:
        events = runtime.conversations.ask(
            request.conversation_id,
            request.text,
            uploads=request.uploads,
            author=request.author,
            platform_message_id=request.message_id,
            reuse=request.reuse,
            on_run=started,
        )
        async for event in events:
            if isinstance(event, Done):
                result = event.result
            if progress.apply(event):
                status.show(
                    render_progress(progress, seconds=result.seconds if result else None),
                    file=await _plan_picture(event),
                )
    except asyncio.CancelledError:
        progress.stage = "stopped: the bot is shutting down"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(status.finish(render_progress(progress), view=ended()), _STOP_NOTICE_SECONDS)
        raise
    finally:
        typing.cancel()
    # The answer goes out at once; the final status edit follows when the edit interval allows.
    final = asyncio.create_task(
        status.finish(render_progress(progress, seconds=result.seconds if result else None), view=ended())
    )
    try:
        if result is not None:
            await status.posted()
            await _post_answer(runtime, thread, result)
    finally:
        await final
    return result


async def _plan_picture(event: Event) -> tuple[str, bytes] | None:
    if not isinstance(event, PlanReady) or len(event.plan) < 2:
        return None
    try:
        return "plan.png", await asyncio.to_thread(draw_plan, event.plan)
    except Exception:
        log.exception("could not draw the plan")
        return None


async def _post_answer(runtime: Runtime, thread: discord.Thread, result: RunResult) -> None:
    limit = thread.guild.filesize_limit
    files: list[OutgoingFile] = []
    problems: list[str] = []
    for resource in result.files:
        try:
            fitted = await fit_for_upload(resource, await runtime.storage.read_resource(resource), limit)
        except Exception:
            log.exception("could not prepare %s for upload", resource.name)
            fitted = f"{resource.name}: could not be read"
        if isinstance(fitted, str):
            problems.append(fitted)
        else:
            files.append(fitted)
    text = result.answer or result.error or "I have no answer to give."
    if problems:
        text += "\n\n⚠️ Not uploaded:\n" + "\n".join(f"- {p}" for p in problems)
    chunks = split_message(text)
    groups = batches(files, limit)
    messages: list[tuple[str, Sequence[OutgoingFile]]] = []
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        messages.append((chunk, groups.pop(0) if last and groups else ()))
    messages += [("", group) for group in groups]
    for n, (content, attached) in enumerate(messages):
        retry = controls(RetryButton(result.run_id)) if n == len(messages) - 1 else None
        await post_message(thread, content, attached, view=retry)


async def post_message(
    channel: discord.abc.Messageable,
    content: str,
    files: Sequence[OutgoingFile] = (),
    *,
    view: discord.ui.View | None = None,
) -> None:
    """Send a message (with ``view``'s buttons); if Discord refuses it, log why and try to say so."""
    try:
        await channel.send(
            content,
            files=[discord.File(io.BytesIO(f.data), filename=f.filename) for f in files],
            view=view or discord.utils.MISSING,
        )
    except discord.HTTPException as err:
        log.warning("Discord refused a message (HTTP %s): %s", err.status, err.text)
        with contextlib.suppress(discord.HTTPException):
            await channel.send(f"⚠️ Discord refused part of my reply (HTTP {err.status}).")
