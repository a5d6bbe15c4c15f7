"""What every backend speaks: the request, the answer with its cost, the backend protocol, the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel
from service.errors import CellForgeError

# The reply type of a request: `Backend.ask(LLMRequest[R]) -> R`, so callers need no isinstance checks.
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class LLMRequest(Generic[R]):
    """One question an agent asks. `kind` names the step (e.g. "task_analysis", "propose", "debug");
    offline handlers and replay dispatch on it. `context` is the structured input (JSON-able): offline
    handlers reason over it, the OpenAI backend shows it to the model, the recorder stores it."""

    kind: str
    system: str
    user: str
    context: dict[str, Any]
    schema: type[R]


@dataclass(frozen=True)
class CallStats:
    """What one answered request cost. `attempts` counts HTTP requests (retries and re-asks included)."""

    backend: str
    model: str | None = None
    attempts: int = 1
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Answer(Generic[R]):
    reply: R
    stats: CallStats = field(default_factory=lambda: CallStats(backend="unknown"))


@runtime_checkable
class Backend(Protocol):
    """What agents call: a validated instance of `request.schema`, or an `LLMError`."""

    name: str

    def ask(self, request: LLMRequest[R]) -> R: ...


@runtime_checkable
class TracedBackend(Backend, Protocol):
    """A backend that also reports what each answer cost; the recorder prefers this."""

    def answer(self, request: LLMRequest[R]) -> Answer[R]: ...


class LLMError(CellForgeError):
    """Base of every error the LLM layer raises."""


class LLMConfigError(LLMError):
    """The configuration (flags, environment, config file) is incomplete or malformed."""


class LLMUnavailable(LLMError):
    """The endpoint could not answer within the allowed attempts and time, or refused the request."""

    def __init__(self, message: str, *, attempts: int = 0, status: int | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status


class LLMInvalidReply(LLMError):
    """The model's reply never validated against the requested schema, re-asks included."""

    def __init__(self, message: str, *, kind: str, content: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.content = content


class MissingHandler(LLMError):
    """The offline backend has no rule-based handler for a request kind."""


class ReplayMismatch(LLMError):
    """A replayed run asked something other than what was recorded at that position."""


class ReplayExhausted(LLMError):
    """A replayed run asked more questions than were recorded."""


class ReplayFileError(LLMError):
    """The recorded `llm_calls.jsonl` is missing or malformed."""


class ReplayedError(LLMError):
    """The recorded call failed; replay fails the same way (`error_type` is the original class name)."""

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type
