"""The agent for a guild's or a channel's ``/config``: the deployment's catalog, backends and demonstrations,
with that channel's controller model, model selection mode, task limit and allowed task types.

One agent per distinct settings, built on first use and kept (they are cheap: planner, selector, executor and
responder objects over shared clients); one LLM client per approved controller model. A stored model that is
no longer in ``LLM_MODELS_ALLOWED``, or any model while the embedded LLM serves (it has one model), is ignored.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from agent.agent import Agent
from agent.llm import LLM, OpenAILLM
from agent.settings import Settings
from storage import ChatSettings

__all__ = ["ChannelAgents"]

log = logging.getLogger(__name__)

_KEPT = 64  # distinct settings kept; the oldest agent goes first


class ChannelAgents:
    def __init__(self, base: Agent, settings: Settings) -> None:
        self.base = base
        self.settings = settings
        self._agents: dict[ChatSettings, Agent] = {}
        self._llms: dict[str, LLM] = {}

    def __call__(self, chat: ChatSettings) -> Agent:
        """The agent that runs a turn under ``chat`` (the base agent if it changes nothing)."""
        key = self._usable(chat)
        if key == ChatSettings():
            return self.base
        agent = self._agents.get(key)
        if agent is None:
            agent = self._build(key)
            if len(self._agents) >= _KEPT:
                self._agents.pop(next(iter(self._agents)))
            self._agents[key] = agent
        return agent

    async def aclose(self) -> None:
        for llm in self._llms.values():
            await llm.aclose()
        self._llms.clear()
        self._agents.clear()

    def _usable(self, chat: ChatSettings) -> ChatSettings:
        """``chat`` without what this deployment cannot do."""
        model = chat.llm_model
        if model is not None and (
            model == self.base.llm.model
            or self.settings.uses_embedded_llm
            or model not in self.settings.llm_models_allowed
        ):
            model = None
        limit = chat.max_tasks
        if limit is not None and not 0 < limit <= self.base.config.max_tasks:
            limit = None
        return replace(chat, llm_model=model, max_tasks=limit, mention_required=None)

    def _build(self, chat: ChatSettings) -> Agent:
        base = self.base
        llm = base.llm if chat.llm_model is None else self._llm(chat.llm_model)
        selection = base.config.model_selection
        if chat.model_selection == "llm":
            selection = "llm"
        elif chat.model_selection == "downloads":
            selection = "downloads"
        config = replace(
            base.config, max_tasks=chat.max_tasks or base.config.max_tasks, model_selection=selection
        )
        task_types = base.task_types
        if chat.task_types is not None:
            allowed = frozenset(chat.task_types)
            task_types = allowed if task_types is None else task_types & allowed
        # The deployment's demonstrations, unless the channel narrows the task types (then those of its own).
        demos = base.planner.demos if task_types == base.task_types else None
        return Agent(llm, base.catalog, base.backends, config, demos=demos, task_types=task_types)

    def _llm(self, model: str) -> LLM:
        if model not in self._llms:
            self._llms[model] = OpenAILLM(replace(self.settings, llm_model=model))
        return self._llms[model]
