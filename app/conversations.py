"""Stored conversations: the one service every front end (terminal, Discord) calls.

``Conversations`` opens, finds and resets conversations, reads their files, lists the runs a restart
interrupted, and runs a user turn: ``ask`` records the user's message, its files and a running run in one
transaction, builds the ``Request`` from the stored history, runs the agent, and persists the run as it happens
(plan, each task, the answer, the final status), so a crash leaves everything committed so far and the run is
found ``interrupted`` at the next start. A run can be cancelled (``cancel``): its tasks stop, what they made is
kept, and it is recorded ``cancelled``. Settings per guild or channel and usage are read and kept here too.
Front ends never touch ``Storage`` themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from agent.agent import Agent
from agent.errors import AgentError
from agent.events import Done, Event, LLMUsage, ModelsSelected, PlanReady, RunResult, TaskEnded
from agent.plan import Plan
from agent.request import ChatTurn, Request
from agent.resources import Resource
from agent.text import valid_text
from agent.uploads import Upload, check_upload_count
from storage import (
    ChatSettings,
    Conversation,
    Message,
    Run,
    RunEnd,
    Storage,
    TaskRecord,
    Turn,
    TurnBusyError,
    Usage,
)

__all__ = ["HISTORY_TURNS", "AgentFor", "Conversation", "Conversations", "Interruption"]

log = logging.getLogger(__name__)

# The most earlier messages handed to the planner; it trims further to fit the LLM's context.
HISTORY_TURNS = 40
# While another run of the conversation runs, how often to look again: from 0.1 s, doubling, up to 2 s.
_FIRST_WAIT = 0.1
_LONGEST_WAIT = 2.0

AgentFor = Callable[[ChatSettings], Agent]
"""The agent that runs a turn under a guild's or channel's settings (``Runtime.agent_for``)."""


@dataclass(frozen=True)
class Interruption:
    """A run that a stop or a crash cut short, which its conversation's front end has not reported yet."""

    run_id: str
    conversation: Conversation
    error: str | None


class Conversations:
    """``agent_for`` gives the agent for a turn's ``ChatSettings``; without it every turn uses ``agent``."""

    def __init__(self, agent: Agent, storage: Storage, *, agent_for: AgentFor | None = None) -> None:
        self.agent = agent
        self.storage = storage
        self._agent_for = agent_for
        self._workers: dict[str, asyncio.Task[None]] = {}  # the runs of this process, by run id
        self._cancelled: dict[str, str | None] = {}  # runs a user stopped, and who

    # Lifecycle

    async def open(
        self,
        platform: str,
        *,
        external_id: str | None = None,
        conversation_id: str | None = None,
        owner: str | None = None,
        title: str | None = None,
        guild_id: str | None = None,
    ) -> Conversation:
        """The conversation with this id (or this platform's ``external_id``), created if there is none;
        atomic, so two processes opening the same one get the same conversation."""
        return await self.storage.open_conversation(
            platform,
            external_id=external_id,
            conversation_id=conversation_id,
            owner=owner,
            title=title,
            guild_id=guild_id,
        )

    async def find(self, platform: str, external_id: str) -> Conversation | None:
        return await self.storage.find_conversation(platform, external_id)

    async def get(self, conversation_id: str) -> Conversation | None:
        return await self.storage.get_conversation(conversation_id)

    async def reset(self, conversation: Conversation) -> Conversation:
        """Forget ``conversation`` (messages, files, runs) and start an empty one in the same place."""
        await self.storage.delete_conversation(conversation.id)
        return await self.storage.create_conversation(
            conversation.platform,
            external_id=conversation.external_id,
            owner=conversation.owner,
            title=conversation.title,
            guild_id=conversation.guild_id,
        )

    async def read_file(self, resource: Resource) -> bytes:
        return await self.storage.read_resource(resource)

    async def interrupted_to_report(self, platform: str) -> list[Interruption]:
        """Interrupted runs of ``platform``'s conversations that nobody has told their user about."""
        found = []
        for run in await self.storage.unreported_interrupted_runs():
            conversation = await self.storage.get_conversation(run.conversation_id)
            if conversation is not None and conversation.platform == platform:
                found.append(Interruption(run.id, conversation, run.error))
        return found

    async def mark_reported(self, run_id: str) -> None:
        await self.storage.mark_reported(run_id)

    def activity(self) -> str | None:
        """What keeps runs waiting on the controller LLM right now (loading it, other requests ahead), for
        the front ends' progress displays; None when nothing does."""
        return self.agent.llm.activity()

    # Runs, settings and usage

    async def get_run(self, run_id: str) -> Run | None:
        return await self.storage.get_run(run_id)

    async def request_of(self, run_id: str) -> tuple[Message, list[str]] | None:
        """The message that started a run and the names of its attached files (what a retry repeats)."""
        return await self.storage.request_of(run_id)

    async def chat_settings(self, guild_id: str, channel_id: str | None = None) -> ChatSettings:
        return await self.storage.chat_settings(guild_id, channel_id)

    async def set_chat_settings(
        self, guild_id: str, channel_id: str | None, settings: ChatSettings, *, by: str | None = None
    ) -> None:
        await self.storage.set_chat_settings(guild_id, channel_id, settings, by=by)

    async def usage(
        self, since: float, *, user: str | None = None, guild_id: str | None = None, limit: int = 10
    ) -> list[Usage]:
        return await self.storage.usage(since, user=user, guild_id=guild_id, limit=limit)

    async def usage_total(self, since: float, *, guild_id: str | None = None) -> Usage:
        return await self.storage.usage_total(since, guild_id=guild_id)

    # A turn

    async def ask(
        self,
        conversation_id: str,
        text: str,
        *,
        uploads: Sequence[Upload] = (),
        author: str | None = None,
        platform_message_id: str | None = None,
        dry_run: bool = False,
        reuse: Sequence[str] = (),
        settings: ChatSettings | None = None,
        on_run: Callable[[str], object] | None = None,
    ) -> AsyncIterator[Event]:
        """Run one user turn of ``conversation_id`` (which must exist), yielding the agent's events.

        ``reuse`` names files already in the conversation that the request is about, as if attached again (a
        retry's); names no longer there are left out. ``settings`` are the guild's or channel's (``/config``).
        ``on_run`` is told the run's id as soon as it is recorded (a front end's handle for ``cancel``). Too
        many uploads raise ``ResourceError`` before anything is recorded.
        """
        check_upload_count(len(uploads))
        text = valid_text(text)
        agent = self._agent_for(settings) if self._agent_for is not None and settings else self.agent
        turn = await self._begin_turn(conversation_id, text, uploads, author, platform_message_id)
        run_id = turn.run_id
        request = Request(
            text=text,
            history=tuple(ChatTurn(m.role, m.text) for m in turn.history),
            resources=tuple(turn.resources),
            attachments=(
                *(r.name for r in turn.attached),
                *(n for n in reuse if any(r.name == n for r in turn.resources)),
            ),
            turn=turn.turn,
            run_id=run_id,
        )
        async for event in self._run(agent, conversation_id, run_id, request, dry_run, on_run):
            yield event

    def cancel(self, run_id: str, by: str | None = None) -> bool:
        """Stop a run this process is running: its tasks stop, what they finished is kept, and the run is
        recorded ``cancelled``; its ``ask`` ends with that result. False if no such run runs here."""
        worker = self._workers.get(run_id)
        if worker is None or worker.done():
            return False
        self._cancelled[run_id] = by
        worker.cancel()
        return True

    async def _begin_turn(
        self,
        conversation_id: str,
        text: str,
        uploads: Sequence[Upload],
        author: str | None,
        message_id: str | None,
    ) -> Turn:
        """Record the message, its files and a running run in one transaction. While another run of the
        conversation runs (another process's, or a request queued here), wait for it to end or for its process
        to be reaped."""
        delay = _FIRST_WAIT
        while True:
            try:
                return await self.storage.begin_turn(
                    conversation_id,
                    text,
                    uploads,
                    author=author,
                    platform_message_id=message_id,
                    history_limit=HISTORY_TURNS,
                )
            except TurnBusyError as busy:
                if await self.storage.reap():
                    continue  # its process was dead: that run is interrupted now
                log.info(
                    "conversation %s is busy with run %s; waiting %.1f s", conversation_id, busy.run_id, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LONGEST_WAIT)

    async def _run(
        self,
        agent: Agent,
        conversation_id: str,
        run_id: str,
        request: Request,
        dry_run: bool,
        on_run: Callable[[str], object] | None,
    ) -> AsyncIterator[Event]:
        """Run the agent in a task of its own, recording and passing on its events, so ``cancel`` can stop the
        agent alone while the front end still gets a last ``Done``. If the front end itself is cancelled (a
        shutdown), the agent stops too and the run is recorded interrupted."""
        storage = self.storage
        events: asyncio.Queue[Event] = asyncio.Queue()
        plan = Plan()

        async def work() -> None:
            nonlocal plan
            async for event in agent.run(request, storage.resource_store(conversation_id), dry_run=dry_run):
                if isinstance(event, PlanReady):
                    plan = event.plan
                await self._record(conversation_id, run_id, event, plan)
                await events.put(event)

        worker = asyncio.create_task(work(), name=f"run-{run_id}")
        self._workers[run_id] = worker
        try:
            if on_run is not None:
                on_run(run_id)  # from here on, ``cancel`` can stop it
            while True:
                getter = asyncio.ensure_future(events.get())
                try:
                    await asyncio.wait({getter, worker}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    event = getter.result()
                    yield event
                    if isinstance(event, Done):
                        return
                elif events.empty():
                    break
            if worker.cancelled():
                yield await self._cancelled_result(conversation_id, run_id, plan)
                return
            err = worker.exception()
            if isinstance(err, AgentError):
                # Storage failures while recording: the run cannot be trusted to be complete.
                log.warning("run %s stopped: %s", run_id, err)
                yield await self._fail(run_id, str(err))
            else:
                log.error("run %s crashed", run_id, exc_info=err)
                yield await self._fail(
                    run_id, "Something went wrong inside the bot; the details are in its log."
                )
        except BaseException:
            # Cancelled (shutdown, kill of the front end): keep what is committed, say so at the next start.
            worker.cancel()
            await asyncio.wait({worker})
            try:
                await storage.mark_interrupted(run_id, "the run was stopped before it finished")
            except AgentError:
                log.warning("could not mark run %s interrupted; the next start will", run_id)
            raise
        finally:
            self._workers.pop(run_id, None)
            self._cancelled.pop(run_id, None)

    async def _cancelled_result(self, conversation_id: str, run_id: str, plan: Plan) -> Done:
        """Record a run a user stopped as ``cancelled``; the files its finished tasks made are kept."""
        by = self._cancelled.get(run_id)
        files = [r for r in await self.storage.resources(conversation_id) if r.origin.run_id == run_id]
        kept = (
            "Kept from the tasks that finished: " + ", ".join(r.name for r in files) + "."
            if files
            else "No task had finished, so nothing was kept."
        )
        answer = f"⏹️ Cancelled{f' by {by}' if by else ''}. {kept}"
        await self.storage.add_message(conversation_id, "assistant", answer, run_id=run_id)
        await self.storage.finish_run(run_id, RunEnd("cancelled", answer, "cancelled"))
        return Done(
            RunResult(run_id, "cancelled", plan, {}, [], answer, files, LLMUsage(), 0.0, error="cancelled")
        )

    async def _record(self, conversation_id: str, run_id: str, event: Event, plan: Plan) -> None:
        storage = self.storage
        if isinstance(event, PlanReady):
            await storage.set_plan(run_id, plan.to_json(), {})
        elif isinstance(event, ModelsSelected):
            choices = {
                str(k): {"model": c.model, "reason": c.reason, "candidates": list(c.candidates)}
                for k, c in event.choices.items()
            }
            await storage.set_plan(run_id, plan.to_json(), choices)
        elif isinstance(event, TaskEnded):
            r = event.result
            output = r.output.to_json() if r.output is not None else None
            await storage.record_task(
                TaskRecord(run_id, r.id, r.task, r.model, r.status, r.seconds, output, r.error)
            )
        elif isinstance(event, Done):
            result = event.result
            if result.answer:
                await storage.add_message(conversation_id, "assistant", result.answer, run_id=run_id)
            usage = result.llm
            await storage.finish_run(
                run_id,
                RunEnd(
                    result.status,
                    result.answer,
                    result.error,
                    usage.calls,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    result.seconds,
                ),
            )

    async def _fail(self, run_id: str, message: str) -> Done:
        try:
            await self.storage.finish_run(run_id, RunEnd("failed", error=message))
        except AgentError:
            log.exception("could not record the failure of run %s", run_id)
        return Done(RunResult(run_id, "failed", Plan(), {}, [], message, [], LLMUsage(), 0.0, error=message))
