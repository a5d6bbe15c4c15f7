"""Serves a recorded run's LLM replies back in order, so the run reproduces without any endpoint."""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import ValidationError

from .accounting import CALLS_FILE, read_calls
from .request import Answer, CallStats, LLMRequest, R, ReplayedError, ReplayExhausted, ReplayMismatch


class ReplayBackend:
    """Answers the n-th request with the n-th recorded reply of `run_dir/llm_calls.jsonl`.

    The recorded kind must equal the request's kind and the reply must validate into the request's
    schema; otherwise `ReplayMismatch`. A recorded failure is raised again as `ReplayedError`."""

    name = "replay"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / CALLS_FILE
        self.records = read_calls(self.path)
        self._position = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int:
        return len(self.records) - self._position

    def answer(self, request: LLMRequest[R]) -> Answer[R]:
        with self._lock:
            position = self._position
            if position >= len(self.records):
                raise ReplayExhausted(
                    f"{self.path} holds {len(self.records)} recorded calls; call #{position} "
                    f"(kind {request.kind!r}) was never recorded"
                )
            self._position += 1
        record = self.records[position]
        if record.kind != request.kind:
            raise ReplayMismatch(
                f"{self.path}: call #{position} was recorded as kind {record.kind!r} "
                f"but the replayed run asked kind {request.kind!r}"
            )
        stats = CallStats(backend=self.name, model=record.model, attempts=0)
        if record.reply is None:
            raise ReplayedError(
                f"recorded call #{position} ({record.kind}) failed: {record.error}",
                error_type=record.error_type or "LLMError",
            )
        try:
            reply = request.schema.model_validate(record.reply)
        except ValidationError as exc:
            raise ReplayMismatch(
                f"{self.path}: call #{position} ({record.kind}) recorded a reply that is not a valid "
                f"{request.schema.__name__}: {exc}"
            ) from None
        return Answer(reply=reply, stats=stats)

    def ask(self, request: LLMRequest[R]) -> R:
        return self.answer(request).reply
