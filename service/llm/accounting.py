"""The format of one recorded LLM call (a line of `llm_calls.jsonl`) and the per-run usage summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from .request import Exchange, Fallback, ReplayFileError

CALLS_FILE = "llm_calls.jsonl"


class RecordedRequest(BaseModel):
    """The question as the agent asked it, and `messages`: the conversation exactly as sent to a model
    (schema block, rejected replies, re-asks and continuations included; empty for the offline rules)."""

    system: str
    user: str
    context: dict[str, Any] = Field(default_factory=dict)
    schema_name: str = ""
    messages: list[dict[str, str]] = Field(default_factory=list)


class CallRecord(BaseModel):
    """One line of `llm_calls.jsonl`. `reply` is None and `error`/`error_type` are set for failed calls.
    `exchanges` holds each HTTP request of the call with its reply (rejected ones with the problem);
    `fallback` is set when the model never gave a valid reply and the offline rules answered instead.
    Token counts include every exchange, those of failed calls too."""

    index: int
    kind: str
    key: str = ""
    backend: str
    model: str | None = None
    request: RecordedRequest
    reply: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    reasks: int = 0
    exchanges: list[Exchange] = Field(default_factory=list)
    fallback: Fallback | None = None
    started_at: str


class UsageSummary(BaseModel):
    calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    attempts: int = 0
    reasks: int = 0
    rejected_replies: int = 0
    fallbacks: int = 0
    latency_ms_total: float = 0.0
    latency_ms_mean: float = 0.0
    latency_ms_max: float = 0.0
    by_kind: dict[str, int] = Field(default_factory=dict)
    backends: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)


def read_calls(path: Path) -> list[CallRecord]:
    """Every record of a calls file (or of `run_dir/llm_calls.jsonl` when given a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / CALLS_FILE
    if not path.is_file():
        raise ReplayFileError(f"no recorded LLM calls: {path} does not exist")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(CallRecord.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ReplayFileError(f"{path}:{lineno}: not a recorded LLM call ({_first_line(exc)})") from None
    return records


def summarize(records: list[CallRecord]) -> UsageSummary:
    summary = UsageSummary()
    for rec in records:
        summary.calls += 1
        summary.failed_calls += rec.error is not None
        summary.prompt_tokens += rec.prompt_tokens
        summary.completion_tokens += rec.completion_tokens
        summary.attempts += rec.attempts
        summary.reasks += rec.reasks
        summary.rejected_replies += sum(e.outcome == "rejected" for e in rec.exchanges)
        summary.fallbacks += rec.fallback is not None
        summary.latency_ms_total += rec.latency_ms
        summary.latency_ms_max = max(summary.latency_ms_max, rec.latency_ms)
        summary.by_kind[rec.kind] = summary.by_kind.get(rec.kind, 0) + 1
        if rec.backend not in summary.backends:
            summary.backends.append(rec.backend)
        if rec.model and rec.model not in summary.models:
            summary.models.append(rec.model)
    summary.total_tokens = summary.prompt_tokens + summary.completion_tokens
    summary.latency_ms_total = round(summary.latency_ms_total, 3)
    summary.latency_ms_mean = round(summary.latency_ms_total / summary.calls, 3) if summary.calls else 0.0
    return summary


def summarize_run(run_dir: Path) -> UsageSummary:
    """Usage of a run directory; an empty summary when the run made no LLM call."""
    path = Path(run_dir) / CALLS_FILE
    return summarize(read_calls(path)) if path.is_file() else UsageSummary()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
