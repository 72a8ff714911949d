"""The agent's exception tree.

Every message is meant for the user: short, specific, and saying what to do. Details go to the log.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "BackendUnavailableError",
    "ConfigurationError",
    "ExecutionError",
    "GenerationError",
    "LLMError",
    "LLMTimeoutError",
    "ModelError",
    "ModelTimeoutError",
    "PlanParseError",
    "PlanValidationError",
    "PlanningError",
    "ResourceError",
    "ResourceStoreError",
    "RetryableModelError",
]


class AgentError(Exception):
    """Base of every error the agent raises on purpose. ``str(err)`` is safe to show a user."""


class ConfigurationError(AgentError):
    """A setting is missing or wrong."""


class LLMError(AgentError):
    """The controller LLM could not be reached or answered with an error."""


class LLMTimeoutError(LLMError, TimeoutError):
    """The controller LLM did not answer in time."""


class PlanningError(AgentError):
    """Stage 1 failed: no usable plan."""


class PlanParseError(PlanningError, ValueError):
    """The LLM's plan is not JSON we can read, even after repair."""


class PlanValidationError(PlanningError, ValueError):
    """The plan is JSON but breaks a rule (unknown task, cycle, missing resource, ...)."""


class ExecutionError(AgentError):
    """Stage 3: a task could not run."""


class ModelError(ExecutionError):
    """A model answered with an error or with output we cannot use."""


class ModelTimeoutError(ModelError, TimeoutError):
    """A model did not answer within the task timeout.

    ``retryable`` is False when asking the same model again cannot help: a local model that ran out of time
    on this input would only burn the same CPU time again.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class RetryableModelError(ModelError):
    """A model failed in a way that may pass if asked again later (loading, rate limited, connection lost).

    ``retry_after`` is the server's hint in seconds (``Retry-After``), if it gave one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailableError(ExecutionError):
    """No backend can run this task here; the message names the setting that would enable it."""


class ResourceError(AgentError, ValueError):
    """A file is missing, too large, corrupt or of a type we do not handle."""


class ResourceStoreError(AgentError):
    """The conversation's store could not save or read (disk full, database busy or damaged).

    Not a fault of the model that was running: no other model would fare better, so the run stops.
    """


class GenerationError(AgentError):
    """Stage 4: the final answer could not be produced."""
