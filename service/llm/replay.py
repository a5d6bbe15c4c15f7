"""Serves a recorded run's LLM replies back in order, so the run reproduces without any endpoint."""

from __future__ import annotations

import threading
from pathlib import Path

from .accounting import CALLS_FILE, read_calls
from .request import Answer, CallStats, LLMRequest, R, ReplayedError, ReplayExhausted, ReplayMismatch


class ReplayBackend:
    """Answers each request with the first unused recorded call of the same kind and key, in file order
    (calls asked concurrently were recorded in the order they finished; their keys tell them apart; a
    record without a key, from before keys, matches its kind in order).

    The reply must validate into the request's schema and pass its check; otherwise `ReplayMismatch`.
    A recorded failure is raised again as `ReplayedError`; a recorded fallback is served as it was."""

    name = "replay"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / CALLS_FILE
        self.records = read_calls(self.path)
        self._unused = list(range(len(self.records)))
        self._served = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int:
        return len(self._unused)

    def answer(self, request: LLMRequest[R]) -> Answer[R]:
        with self._lock:
            if not self._unused:
                raise ReplayExhausted(
                    f"{self.path} holds {len(self.records)} recorded calls; call #{self._served} "
                    f"(kind {request.kind!r}) was never recorded"
                )
            # Records written before calls had keys match on kind alone, in order.
            position = next((i for i in self._unused if self.records[i].kind == request.kind
                             and self.records[i].key in (request.key, "")), None)
            if position is None:
                first = self.records[self._unused[0]]
                asked = f"kind {request.kind!r}" + (f" (key {request.key!r})" if request.key else "")
                raise ReplayMismatch(
                    f"{self.path}: call #{self._unused[0]} was recorded as kind {first.kind!r}"
                    + (f" (key {first.key!r})" if first.key else "")
                    + f" but the replayed run asked {asked}, which no unused record matches"
                )
            self._unused.remove(position)
            self._served += 1
        record = self.records[position]
        stats = CallStats(backend=self.name, model=record.model, attempts=0)
        if record.reply is None:
            raise ReplayedError(
                f"recorded call #{position} ({record.kind}) failed: {record.error}",
                error_type=record.error_type or "LLMError",
            )
        try:
            reply = request.validate(request.schema.model_validate(record.reply))
        except ValueError as exc:  # pydantic's ValidationError included
            raise ReplayMismatch(
                f"{self.path}: call #{position} ({record.kind}) recorded a reply that is not a valid "
                f"{request.schema.__name__}: {exc}"
            ) from None
        return Answer(reply=reply, stats=stats, fallback=record.fallback)

    def ask(self, request: LLMRequest[R]) -> R:
        return self.answer(request).reply
