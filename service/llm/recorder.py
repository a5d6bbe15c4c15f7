"""Writes every LLM call of a run to `run_dir/llm_calls.jsonl`, keys redacted."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path


from .accounting import CALLS_FILE, CallRecord, RecordedRequest, UsageSummary, summarize_run
from .redact import Redactor
from .request import Answer, Backend, CallStats, LLMRequest, R, Transcript

log = logging.getLogger(__name__)


class RecordingBackend:
    """Wraps a backend; appends one `CallRecord` line per call (failed calls too), then returns or
    re-raises what the inner backend did. Indices continue after lines already in the file."""

    def __init__(self, inner: Backend, run_dir: Path, *, secrets: Iterable[str | None] = ()) -> None:
        self.inner = inner
        self.name = inner.name
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / CALLS_FILE
        self.redactor = Redactor(secrets)
        self._lock = threading.Lock()
        self._next_index = _count_lines(self.path)

    @property
    def max_parallel(self) -> int:
        return getattr(self.inner, "max_parallel", 1)

    def answer(self, request: LLMRequest[R]) -> Answer[R]:
        started_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        t0 = time.perf_counter()
        try:
            answer = _answer(self.inner, request)
        except Exception as exc:
            latency_ms = (time.perf_counter() - t0) * 1000
            self._write(request, None, latency_ms, started_at, error=exc)
            raise
        latency_ms = (time.perf_counter() - t0) * 1000
        self._write(request, answer, latency_ms, started_at)
        return answer

    def ask(self, request: LLMRequest[R]) -> R:
        return self.answer(request).reply

    def usage_summary(self) -> UsageSummary:
        """Calls, tokens and latency of everything recorded in this run directory."""
        return summarize_run(self.run_dir)

    def _write(self, request: LLMRequest, answer: Answer | None, latency_ms: float, started_at: str,
               error: Exception | None = None) -> None:
        r = self.redactor
        if answer is not None:
            reply, stats, transcript, fallback = answer.reply, answer.stats, answer.transcript, answer.fallback
        else:  # a failed call still cost what it sent: its stats and transcript travel on the error
            reply, transcript, fallback = None, getattr(error, "transcript", None), None
            stats = getattr(error, "stats", None) or CallStats(backend=self.name,
                                                               attempts=getattr(error, "attempts", 0) or 1)
        transcript = transcript or Transcript()
        with self._lock:
            record = CallRecord(
                index=self._next_index,
                kind=request.kind,
                key=request.key,
                backend=stats.backend,
                model=stats.model,
                request=RecordedRequest(
                    system=r.text(request.system),
                    user=r.text(request.user),
                    context=r.data(request.context),
                    schema_name=request.schema.__name__,
                    messages=r.data(transcript.messages),
                ),
                reply=r.data(reply.model_dump(mode="json")) if reply is not None else None,
                error=r.text(str(error)) if error is not None else None,
                error_type=type(error).__name__ if error is not None else None,
                latency_ms=round(latency_ms, 3),
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
                attempts=stats.attempts,
                reasks=stats.reasks,
                exchanges=[e.model_copy(update={"content": r.text(e.content) if e.content else e.content,
                                                "problem": r.text(e.problem) if e.problem else e.problem})
                           for e in transcript.exchanges],
                fallback=fallback,
                started_at=started_at,
            )
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record.model_dump(mode="json"), ensure_ascii=False) + "\n")
            self._next_index += 1
        log.debug("recorded LLM call %d (%s, %.0f ms)", record.index, record.kind, record.latency_ms)


def _answer(backend: Backend, request: LLMRequest[R]) -> Answer[R]:
    answer = getattr(backend, "answer", None)
    if callable(answer):
        return answer(request)
    return Answer(reply=backend.ask(request), stats=CallStats(backend=getattr(backend, "name", "unknown")))


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())
