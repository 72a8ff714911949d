"""Stored conversations: the one flow every front end (terminal, Discord) uses to run the agent.

``Conversations.ask`` records the user's message and files, builds the ``Request`` from the stored history,
runs the agent, and persists the run as it happens (plan, each task, the answer, the final status), so a
crash leaves everything committed so far and the run is found ``interrupted`` at the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from storage import ChatSettings, Message, Run, RunEnd, Storage, TaskRecord, Turn, TurnBusyError, Usage

from .errors import AgentError
from .events import (
    Done,
    Event,
    LLMUsage,
    ModelsSelected,
    PlanReady,
    RunResult,
    TaskFailed,
    TaskFinished,
    TaskSkipped,
)
from .pipeline import Agent
from .plan import Plan
from .request import ChatTurn, Request, valid_text
from .uploads import Upload, check_upload_count

__all__ = ["HISTORY_TURNS", "Conversations"]

log = logging.getLogger(__name__)

# The most earlier messages handed to the planner; it trims further to fit the LLM's context.
HISTORY_TURNS = 40
# While another run of the conversation runs, how often to look again: from 0.1 s, doubling, up to 2 s.
_FIRST_WAIT = 0.1
_LONGEST_WAIT = 2.0


class Conversations:
    def __init__(self, agent: Agent, storage: Storage) -> None:
        self.agent = agent
        self.storage = storage
        self._workers: dict[str, asyncio.Task[None]] = {}  # the runs of this process, by run id
        self._cancelled: dict[str, str | None] = {}  # runs a user stopped, and who

    # Settings per guild and channel, and usage: stored, so every process of a deployment sees the same.

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
        on_run: Callable[[str], object] | None = None,
    ) -> AsyncIterator[Event]:
        """Run one user turn of ``conversation_id`` (which must exist), yielding the agent's events.

        ``reuse`` names files already in the conversation that the request is about, as if attached again (a
        retry's); names no longer there are left out. ``on_run`` is told the run's id as soon as it is recorded (a front end's handle for ``cancel``). Too
        many uploads raise ``ResourceError`` before anything is recorded.
        """
        check_upload_count(len(uploads))
        text = valid_text(text)
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
        if on_run is not None:
            on_run(run_id)
        async for event in self._run(conversation_id, run_id, request, dry_run):
            yield event

    async def get_run(self, run_id: str) -> Run | None:
        return await self.storage.get_run(run_id)

    async def request_of(self, run_id: str) -> tuple[Message, list[str]] | None:
        """The message that started a run and the names of its attached files (what a retry repeats)."""
        return await self.storage.request_of(run_id)

    def cancel(self, run_id: str, by: str | None = None) -> bool:
        """Stop a run this process is running: its tasks stop, what they finished is kept, and the run is
        recorded ``cancelled``; its ``ask`` ends with that result. False if no such run runs here."""
        worker = self._workers.get(run_id)
        if worker is None or worker.done():
            return False
        self._cancelled[run_id] = by
        worker.cancel()
        return True

    async def _run(self, conversation_id: str, run_id: str, request: Request, dry_run: bool) -> AsyncIterator[Event]:
        """Run the agent in a task of its own, recording and passing on its events, so ``cancel`` can stop the
        agent alone while the front end still gets a last ``Done``. If the front end itself is cancelled (a
        shutdown), the agent stops too and the run is recorded interrupted."""
        storage = self.storage
        events: asyncio.Queue[Event] = asyncio.Queue()
        plan = Plan()

        async def work() -> None:
            nonlocal plan
            async for event in self.agent.run(request, storage.resource_store(conversation_id), dry_run=dry_run):
                if isinstance(event, PlanReady):
                    plan = event.plan
                await self._record(conversation_id, run_id, event, plan)
                await events.put(event)

        worker = asyncio.create_task(work(), name=f"run-{run_id}")
        self._workers[run_id] = worker
        try:
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
                yield await self._fail(conversation_id, run_id, str(err))
            else:
                log.error("run %s crashed", run_id, exc_info=err)
                yield await self._fail(conversation_id, run_id, "Something went wrong inside the bot; the details are in its log.")
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
        return Done(RunResult(run_id, "cancelled", plan, {}, [], answer, files, LLMUsage(), 0.0, error="cancelled"))

    async def _begin_turn(
        self, conversation_id: str, text: str, uploads: Sequence[Upload], author: str | None, message_id: str | None
    ) -> Turn:
        """Record the message, its files and a running run in one transaction. While another run of the
        conversation runs (another process's, or a request queued here), wait for it to end or for its process
        to be reaped."""
        delay = _FIRST_WAIT
        while True:
            try:
                return await self.storage.begin_turn(
                    conversation_id, text, uploads, author=author, platform_message_id=message_id, history_limit=HISTORY_TURNS
                )
            except TurnBusyError as busy:
                if await self.storage.reap():
                    continue  # its process was dead: that run is interrupted now
                log.info("conversation %s is busy with run %s; waiting %.1f s", conversation_id, busy.run_id, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LONGEST_WAIT)

    async def _record(self, conversation_id: str, run_id: str, event: Event, plan: Plan) -> None:
        storage = self.storage
        if isinstance(event, PlanReady):
            await storage.set_plan(run_id, plan.to_json(), {})
        elif isinstance(event, ModelsSelected):
            await storage.set_plan(
                run_id,
                plan.to_json(),
                {str(k): {"model": c.model, "reason": c.reason, "candidates": list(c.candidates)} for k, c in event.choices.items()},
            )
        elif isinstance(event, TaskFinished):
            await storage.record_task(
                TaskRecord(run_id, event.task_id, event.task, event.model, "ok", event.seconds, event.output.to_json(), None)
            )
        elif isinstance(event, TaskFailed):
            await storage.record_task(
                TaskRecord(run_id, event.task_id, event.task, event.model, "failed", event.seconds, None, event.error)
            )
        elif isinstance(event, TaskSkipped):
            await storage.record_task(TaskRecord(run_id, event.task_id, event.task, None, "skipped", 0.0, None, event.reason))
        elif isinstance(event, Done):
            result = event.result
            if result.answer:
                await storage.add_message(conversation_id, "assistant", result.answer, run_id=run_id)
            await storage.finish_run(
                run_id,
                RunEnd(result.status, result.answer, result.error, result.llm.calls, result.llm.prompt_tokens,
                       result.llm.completion_tokens, result.seconds),
            )

    async def _fail(self, conversation_id: str, run_id: str, message: str) -> Done:
        try:
            await self.storage.finish_run(run_id, RunEnd("failed", error=message))
        except AgentError:
            log.exception("could not record the failure of run %s", run_id)
        return Done(RunResult(run_id, "failed", Plan(), {}, [], message, [], LLMUsage(), 0.0, error=message))
