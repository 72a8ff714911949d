"""Stored conversations: the one service every front end (terminal, Discord) calls.

``Conversations`` opens, finds and resets conversations, reads their files, lists the runs a restart
interrupted, and runs a user turn: ``ask`` records the user's message and files, builds the ``Request`` from
the stored history, runs the agent, and persists the run as it happens (plan, each task, the answer, the final
status), so a crash leaves everything committed so far and the run is found ``interrupted`` at the next
start. Front ends never touch ``Storage`` themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from agent.agent import Agent
from agent.errors import AgentError
from agent.events import Done, Event, LLMUsage, ModelsSelected, PlanReady, RunResult, TaskEnded
from agent.plan import Plan
from agent.request import ChatTurn, Request
from agent.resources import Resource
from agent.text import valid_text
from agent.uploads import Upload, check_upload_count
from storage import Conversation, RunEnd, Storage, TaskRecord, Turn, TurnBusyError

__all__ = ["HISTORY_TURNS", "Conversation", "Conversations", "Interruption"]

log = logging.getLogger(__name__)

# The most earlier messages handed to the planner; it trims further to fit the LLM's context.
HISTORY_TURNS = 40
# While another run of the conversation runs, how often to look again: from 0.1 s, doubling, up to 2 s.
_FIRST_WAIT = 0.1
_LONGEST_WAIT = 2.0


@dataclass(frozen=True)
class Interruption:
    """A run that a stop or a crash cut short, which its conversation's front end has not reported yet."""

    run_id: str
    conversation: Conversation
    error: str | None


class Conversations:
    def __init__(self, agent: Agent, storage: Storage) -> None:
        self.agent = agent
        self.storage = storage

    # Lifecycle

    async def open(
        self,
        platform: str,
        *,
        external_id: str | None = None,
        conversation_id: str | None = None,
        owner: str | None = None,
        title: str | None = None,
    ) -> Conversation:
        """The conversation with this id (or this platform's ``external_id``), created if there is none:
        atomic, so two processes opening the same one at once get the same conversation."""
        return await self.storage.open_conversation(
            platform, external_id=external_id, conversation_id=conversation_id, owner=owner, title=title
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
            events = self.agent.run(request, storage.resource_store(conversation_id), dry_run=dry_run)
            async for event in events:
                if isinstance(event, PlanReady):
                    plan = event.plan
                await self._record(conversation_id, run_id, event, plan)
                yield event
        except AgentError as err:
            # Storage failures while recording: the run cannot be trusted to be complete.
            log.warning("run %s stopped: %s", run_id, err)
            yield await self._fail(run_id, str(err))
        except Exception:
            log.exception("run %s crashed", run_id)
            yield await self._fail(run_id, "Something went wrong inside the bot; the details are in its log.")
        except BaseException:
            # Cancelled (shutdown, kill of the front end): keep what is committed, say so at the next start.
            try:
                await storage.mark_interrupted(run_id, "the run was stopped before it finished")
            except AgentError:
                log.warning("could not mark run %s interrupted; the next start will", run_id)
            raise

    async def _begin_turn(
        self,
        conversation_id: str,
        text: str,
        uploads: Sequence[Upload],
        author: str | None,
        message_id: str | None,
    ) -> Turn:
        """Record the message, its files and a running run in one transaction. While another run of the
        conversation runs (another process's, or a request queued here), wait for it to end or for its
        process to be reaped."""
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
            llm = result.llm
            end = RunEnd(
                result.status,
                result.answer,
                result.error,
                llm.calls,
                llm.prompt_tokens,
                llm.completion_tokens,
                result.seconds,
            )
            await storage.finish_run(run_id, end)

    async def _fail(self, run_id: str, message: str) -> Done:
        try:
            await self.storage.finish_run(run_id, RunEnd("failed", error=message))
        except AgentError:
            log.exception("could not record the failure of run %s", run_id)
        return Done(RunResult(run_id, "failed", Plan(), {}, [], message, [], LLMUsage(), 0.0, error=message))
