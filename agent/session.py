"""Stored conversations: the one flow every front end (terminal, Discord) uses to run the agent.

``Conversations.ask`` records the user's message and files, builds the ``Request`` from the stored history,
runs the agent, and persists the run as it happens (plan, each task, the answer, the final status), so a
crash leaves everything committed so far and the run is found ``interrupted`` at the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from storage import RunEnd, Storage, TaskRecord, Turn, TurnBusyError

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

    async def ask(
        self,
        conversation_id: str,
        text: str,
        *,
        uploads: Sequence[Upload] = (),
        author: str | None = None,
        platform_message_id: str | None = None,
        dry_run: bool = False,
    ) -> AsyncIterator[Event]:
        """Run one user turn of ``conversation_id`` (which must exist), yielding the agent's events.

        Too many uploads raise ``ResourceError`` before anything is recorded.
        """
        check_upload_count(len(uploads))
        text = valid_text(text)
        storage = self.storage
        turn = await self._begin_turn(conversation_id, text, uploads, author, platform_message_id)
        run_id = turn.run_id
        request = Request(
            text=text,
            history=tuple(ChatTurn(m.role, m.text) for m in turn.history),
            resources=tuple(turn.resources),
            attachments=tuple(r.name for r in turn.attached),
            turn=turn.turn,
            run_id=run_id,
        )
        plan = Plan()
        try:
            async for event in self.agent.run(request, storage.resource_store(conversation_id), dry_run=dry_run):
                if isinstance(event, PlanReady):
                    plan = event.plan
                await self._record(conversation_id, run_id, event, plan)
                yield event
        except AgentError as err:
            # Storage failures while recording: the run cannot be trusted to be complete.
            log.warning("run %s stopped: %s", run_id, err)
            yield await self._fail(conversation_id, run_id, str(err))
        except Exception:
            log.exception("run %s crashed", run_id)
            yield await self._fail(conversation_id, run_id, "Something went wrong inside the bot; the details are in its log.")
        except BaseException:
            # Cancelled (shutdown, kill of the front end): keep what is committed, say so at the next start.
            try:
                await storage.mark_interrupted(run_id, "the run was stopped before it finished")
            except AgentError:
                log.warning("could not mark run %s interrupted; the next start will", run_id)
            raise

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
