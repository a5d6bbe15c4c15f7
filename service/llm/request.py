"""What every backend speaks: the request, the answer with its cost, the backend protocol, the errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, Field
from service.errors import CellForgeError

# The reply type of a request: `Backend.ask(LLMRequest[R]) -> R`, so callers need no isinstance checks.
R = TypeVar("R", bound=BaseModel)

Check = Callable[[Any], None]  # raises ValueError with the reason the model is shown


@dataclass(frozen=True)
class LLMRequest(Generic[R]):
    """One question an agent asks. `kind` names the step (e.g. "task_analysis", "propose", "debug");
    offline handlers and replay dispatch on it. `context` is the structured input (JSON-able): offline
    handlers reason over it, the OpenAI backend shows it to the model, the recorder stores it.

    `key` tells apart questions of one kind asked concurrently (replay matches on kind and key).
    `check` is the asker's rule beyond the schema (an expert's remit, a cross-field rule): it raises
    `ValueError` with a reason the model is shown when it re-asks. `max_tokens` overrides the backend's
    output cap for this question."""

    kind: str
    system: str
    user: str
    context: dict[str, Any]
    schema: type[R]
    key: str = ""
    check: Check | None = field(default=None, compare=False, repr=False)
    max_tokens: int | None = None

    def validate(self, reply: R) -> R:
        """`reply` if it passes `check`; the check's `ValueError` otherwise."""
        if self.check is not None:
            self.check(reply)
        return reply


@dataclass(frozen=True)
class CallStats:
    """What one answered request cost. `attempts` counts HTTP requests (retries and re-asks included)."""

    backend: str
    model: str | None = None
    attempts: int = 1
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Exchange(BaseModel):
    """One HTTP request of a call and what came back. `sent` counts the leading messages of the call's
    conversation that this request carried; `params` are the request's other settings."""

    sent: int
    params: dict[str, Any] = Field(default_factory=dict)
    outcome: Literal["accepted", "rejected", "truncated", "failed", "param_refused"]
    content: str | None = None
    finish_reason: str | None = None
    problem: str | None = None  # why the reply was rejected, or the request failed
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Transcript:
    """Everything one call said to the model and heard back: the conversation (the exact messages, the
    schema block, rejected replies and re-asks included) and each HTTP exchange."""

    messages: list[dict[str, str]] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)


class Fallback(BaseModel):
    """Why a question was answered by the offline rules instead of the model."""

    error_type: str
    reason: str


@dataclass(frozen=True)
class Answer(Generic[R]):
    reply: R
    stats: CallStats = field(default_factory=lambda: CallStats(backend="unknown"))
    transcript: Transcript | None = None
    fallback: Fallback | None = None


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
    """Base of every error the LLM layer raises. A call that failed after reaching the model carries
    what it cost (`stats`) and what was said (`transcript`), so the record keeps both."""

    stats: CallStats | None = None
    transcript: Transcript | None = None


class LLMConfigError(LLMError):
    """The configuration (flags, environment, config file) is incomplete or malformed."""


class LLMUnavailable(LLMError):
    """The endpoint could not answer within the allowed attempts and time, or refused the request."""

    def __init__(self, message: str, *, attempts: int = 0, status: int | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status


class LLMInvalidReply(LLMError):
    """The model's reply never validated against the requested schema and check, re-asks included."""

    def __init__(self, message: str, *, kind: str, content: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.content = content


class LLMBudgetSpent(LLMError):
    """A question used up its token budget (re-asks and continuations included) before a valid reply."""


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
