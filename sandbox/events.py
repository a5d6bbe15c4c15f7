"""Typed execution events (streamed while code runs) and the final `ExecutionResult`.

Events are pydantic models with a `kind` discriminator, so they serialize as-is to JSON for the
HTTP/gRPC layers (`StreamEventAdapter` reads them back).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter


class Outcome(str, Enum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"  # interrupted; kernel state kept
    KILLED = "killed"  # interrupt ignored; kernel restarted, state lost
    DIED = "died"  # kernel or container gone; see `died_cause`


class StreamEvent(BaseModel):
    """Base of every event streamed while code runs."""

    kind: str


class StdoutEvent(StreamEvent):
    kind: Literal["stdout"] = "stdout"
    text: str


class StderrEvent(StreamEvent):
    kind: Literal["stderr"] = "stderr"
    text: str


class DisplayEvent(StreamEvent):
    """Rich output (`display_data`): MIME type → data; binary types such as image/png are base64."""

    kind: Literal["display"] = "display"
    data: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)


class ResultEvent(StreamEvent):
    """The value of the cell's last expression (`execute_result`)."""

    kind: Literal["result"] = "result"
    data: dict[str, Any]


class ErrorEvent(StreamEvent):
    kind: Literal["error"] = "error"
    ename: str
    evalue: str
    traceback: list[str]


class TruncatedEvent(StreamEvent):
    """Output passed the per-execution limit; what follows is dropped."""

    kind: Literal["truncated"] = "truncated"
    limit_bytes: int


class StatusEvent(StreamEvent):
    """Something happened to the kernel itself: interrupted, restarted, died."""

    kind: Literal["status"] = "status"
    state: Literal["interrupting", "restarting", "restarted", "died"]
    detail: str = ""


AnyStreamEvent = Annotated[
    StdoutEvent | StderrEvent | DisplayEvent | ResultEvent | ErrorEvent | TruncatedEvent | StatusEvent,
    Field(discriminator="kind"),
]
StreamEventAdapter: TypeAdapter[AnyStreamEvent] = TypeAdapter(AnyStreamEvent)


class ExecutionResult(BaseModel):
    """How one execution (code or command) ended, with everything it printed (capped)."""

    outcome: Outcome
    stdout: str = ""
    stderr: str = ""
    ename: str | None = None
    evalue: str | None = None
    traceback: list[str] = Field(default_factory=list)
    died_cause: str | None = None
    duration_ms: float = 0.0
    stdout_bytes: int = Field(default=0, description="bytes printed in total, kept or not")
    truncated: bool = False
    displays: list[dict[str, Any]] = Field(default_factory=list)
    result: str | None = None
    exit_code: int | None = None
    state_lost: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK
