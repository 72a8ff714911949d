"""One request run in a thread: agent events become the status message, then the answer and files are posted.

Flow: the status message and "typing…" start → ``Conversations.ask`` yields events → each event updates the
status (and the plan picture when the plan has several tasks) → the answer, split into messages, with the
generated files attached (fitted to the guild's upload limit, ten per message), while the final status is
written as soon as Discord's edit rate allows. A long answer is posted as a few messages and the whole text
as a file, not as a wall of messages. Masked links in model text are shown with their real target, and no
message of the bot gets link previews.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import discord

from agent.events import Done, Event, PlanReady, RunResult
from agent.progress import LLM_STAGES, RunProgress
from agent.uploads import Upload
from app.conversations import Conversations
from storage import ChatSettings

from .budget import RestBudget
from .controls import CancelButton, RetryButton, controls
from .graph import draw_plan
from .media import OutgoingFile, batches, fit_for_upload
from .status import TYPING_EVERY, StatusMessage, keep_typing, render_progress
from .text import split_message, unmask_links

__all__ = ["ANSWER_MESSAGES", "ThreadRequest", "post_message", "run_in_thread"]

log = logging.getLogger(__name__)

ANSWER_MESSAGES = 3
"""The most messages one answer takes; beyond that, the first ones and the whole answer as a text file."""
_STOP_NOTICE_SECONDS = 3.0
_ACTIVITY_SECONDS = 1.0
_ANSWER_FILE = "answer.txt"


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
    # What /config set for the thread's channel and guild.
    settings: ChatSettings | None = None


async def run_in_thread(
    conversations: Conversations,
    thread: discord.Thread,
    request: ThreadRequest,
    *,
    max_media_seconds: float,
    edit_interval: float = 1.0,
    budget: RestBudget | None = None,
) -> RunResult | None:
    """Run ``request`` with live progress in ``thread``, then post the answer. None if no result came.
    Model-made audio or video longer than ``max_media_seconds`` is refused, not encoded (``fit_for_upload``).

    Whatever ends the run early (a failure, a shutdown), the status message is left saying so: it never
    stays at "planning". The status message carries a Cancel button while the run runs; the answer a Retry
    button. With a ``budget``, the run
    counts as one of those sharing it, and its status edits and typing slow down as their number grows."""
    if budget is None:
        return await _run(conversations, thread, request, max_media_seconds, edit_interval, lambda: 1.0)
    per_run = (1 / edit_interval if edit_interval > 0 else 0.0) + 1 / TYPING_EVERY
    with budget.run():
        return await _run(
            conversations, thread, request, max_media_seconds, edit_interval, lambda: budget.stretch(per_run)
        )


async def _run(
    conversations: Conversations,
    thread: discord.Thread,
    request: ThreadRequest,
    max_media_seconds: float,
    edit_interval: float,
    stretch: Callable[[], float],
) -> RunResult | None:
    progress = RunProgress()
    status = StatusMessage(thread, interval=edit_interval, stretch=stretch)
    status.show(render_progress(progress))
    typing = asyncio.create_task(keep_typing(thread, stretch=stretch))
    watching = asyncio.create_task(_show_llm_activity(conversations, progress, status))
    result: RunResult | None = None
    run_ids: list[str] = []

    def started(run_id: str) -> None:
        run_ids.append(run_id)
        status.show_view(controls(CancelButton(run_id)))

    def ended() -> discord.ui.View | None:
        return controls(CancelButton(run_ids[0], disabled=True)) if run_ids else None

    try:
        events = conversations.ask(
            request.conversation_id,
            request.text,
            uploads=request.uploads,
            author=request.author,
            platform_message_id=request.message_id,
            reuse=request.reuse,
            settings=request.settings,
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
    except BaseException as err:
        progress.stage = (
            "stopped: the bot is shutting down" if isinstance(err, asyncio.CancelledError) else "failed"
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(status.finish(render_progress(progress), view=ended()), _STOP_NOTICE_SECONDS)
        raise
    finally:
        typing.cancel()
        watching.cancel()
    # The answer goes out at once; the final status edit follows when the edit interval allows.
    final = asyncio.create_task(
        status.finish(render_progress(progress, seconds=result.seconds if result else None), view=ended())
    )
    try:
        if result is not None:
            await status.posted()
            await _post_answer(conversations, thread, result, max_media_seconds)
    finally:
        await final
    return result


async def _show_llm_activity(
    conversations: Conversations, progress: RunProgress, status: StatusMessage
) -> None:
    """While the run waits on the LLM, say what keeps it (loading the model, queued behind other requests);
    checked every second, written only when it changes (the status message throttles its own edits)."""
    while True:
        await asyncio.sleep(_ACTIVITY_SECONDS)
        busy = conversations.activity() if progress.stage in LLM_STAGES else None
        if busy != progress.busy:
            progress.busy = busy
            status.show(render_progress(progress))


async def _plan_picture(event: Event) -> tuple[str, bytes] | None:
    if not isinstance(event, PlanReady) or len(event.plan) < 2:
        return None
    try:
        return "plan.png", await asyncio.to_thread(draw_plan, event.plan)
    except Exception:
        log.exception("could not draw the plan")
        return None


async def _post_answer(
    conversations: Conversations, thread: discord.Thread, result: RunResult, max_media_seconds: float
) -> None:
    limit = thread.guild.filesize_limit
    files: list[OutgoingFile] = []
    problems: list[str] = []
    for resource in result.files:
        try:
            data = await conversations.read_file(resource)
            fitted = await fit_for_upload(resource, data, limit, max_seconds=max_media_seconds)
        except Exception:
            log.exception("could not prepare %s for upload", resource.name)
            fitted = f"{resource.name}: could not be read"
        if isinstance(fitted, str):
            problems.append(fitted)
        else:
            files.append(fitted)
    text = unmask_links(result.answer or result.error or "I have no answer to give.")
    if problems:
        text += "\n\n⚠️ Not uploaded:\n" + "\n".join(f"- {p}" for p in problems)
    chunks = split_message(text)
    if len(chunks) > ANSWER_MESSAGES:
        whole = OutgoingFile(_ANSWER_FILE, text.encode("utf-8"))
        note = f"(The answer is long: the rest is in {_ANSWER_FILE}, with the whole text.)"
        chunks = [*chunks[: ANSWER_MESSAGES - 1], note]
        files.insert(0, whole)
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
    """Send a message (with ``view``'s buttons) without link previews; if Discord refuses it, log why and try
    to say so."""
    try:
        await channel.send(
            content,
            files=[discord.File(io.BytesIO(f.data), filename=f.filename) for f in files],
            view=view or discord.utils.MISSING,
            suppress_embeds=True,
        )
    except discord.HTTPException as err:
        log.warning("Discord refused a message (HTTP %s): %s", err.status, err.text)
        with contextlib.suppress(discord.HTTPException):
            await channel.send(
                f"⚠️ Discord refused part of my reply (HTTP {err.status}).", suppress_embeds=True
            )
