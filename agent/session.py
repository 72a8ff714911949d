"""Stored conversations: the one flow every front end (terminal, Discord) uses to run the agent.

``Conversations.ask`` records the user's message and files, builds the ``Request`` from the stored history,
runs the agent, and persists the run as it happens (plan, each task, the answer, the final status), so a
crash leaves everything committed so far and the run is found ``interrupted`` at the next start.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from storage import Storage

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
from .resources import Origin, extension_for, name_prefix
from .uploads import Upload, check_upload_count

__all__ = ["HISTORY_TURNS", "Conversations"]

log = logging.getLogger(__name__)

# The most earlier messages handed to the planner; it trims further to fit the LLM's context.
HISTORY_TURNS = 40


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
        history = await storage.messages(conversation_id, limit=HISTORY_TURNS)
        message = await storage.add_message(
            conversation_id, "user", text, author=author, platform_message_id=platform_message_id
        )
        attached: list[str] = []
        for upload in uploads:
            prefix = name_prefix(upload.kind)
            number = await storage.next_resource_number(conversation_id, prefix)
            res = await storage.add_resource(
                conversation_id,
                upload.data,
                name=f"{prefix}-{number}{extension_for(upload.mime)}",
                mime=upload.mime,
                origin=Origin("upload"),
                message_id=message.id,
            )
            attached.append(res.name)
        run_id = await storage.start_run(conversation_id, message.id)
        request = Request(
            text=text,
            history=tuple(ChatTurn(m.role, m.text) for m in history),
            resources=tuple(await storage.resources(conversation_id)),
            attachments=tuple(attached),
            turn=await storage.count_user_turns(conversation_id),
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
                run_id, event.task_id, task=event.task, model=event.model, status="ok",
                seconds=event.seconds, output=event.output.to_json(), error=None,
            )
        elif isinstance(event, TaskFailed):
            await storage.record_task(
                run_id, event.task_id, task=event.task, model=event.model, status="failed",
                seconds=event.seconds, output=None, error=event.error,
            )
        elif isinstance(event, TaskSkipped):
            await storage.record_task(
                run_id, event.task_id, task=event.task, model=None, status="skipped",
                seconds=0.0, output=None, error=event.reason,
            )
        elif isinstance(event, Done):
            result = event.result
            if result.answer:
                await storage.add_message(conversation_id, "assistant", result.answer, run_id=run_id)
            await storage.finish_run(
                run_id, result.status, answer=result.answer, error=result.error,
                llm_calls=result.llm.calls, prompt_tokens=result.llm.prompt_tokens,
                completion_tokens=result.llm.completion_tokens, seconds=result.seconds,
            )

    async def _fail(self, conversation_id: str, run_id: str, message: str) -> Done:
        try:
            await self.storage.finish_run(
                run_id, "failed", answer=None, error=message, llm_calls=0, prompt_tokens=0,
                completion_tokens=0, seconds=0.0,
            )
        except AgentError:
            log.exception("could not record the failure of run %s", run_id)
        return Done(RunResult(run_id, "failed", Plan(), {}, [], message, [], LLMUsage(), 0.0, error=message))
