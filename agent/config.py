"""The engine's configuration, in sections: each component receives the one it uses, never the whole set.

Loading them from the environment is the application's job (``Settings.load``); the engine only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ExecutionConfig"]


@dataclass(frozen=True)
class ExecutionConfig:
    """How plans are made and run: the most tasks a plan may have, how models are chosen (``llm``: the
    paper's way, or ``downloads``: the top one, no LLM call) and how many are shown or tried per task, and
    how long and how often one model call may take."""

    max_tasks: int = 12
    model_selection: Literal["llm", "downloads"] = "llm"
    top_k: int = 5
    task_timeout: float = 120.0
    task_retries: int = 2
