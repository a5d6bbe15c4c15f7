"""One bad question never ends a run: when the model gives no valid reply, the offline rules answer it."""

from __future__ import annotations

import logging

from .offline import OfflineBackend
from .openai_backend import CONFIGURATION_STATUS
from .request import (
    Answer,
    CallStats,
    Fallback,
    LLMBudgetSpent,
    LLMInvalidReply,
    LLMRequest,
    LLMUnavailable,
    R,
    TracedBackend,
)

log = logging.getLogger(__name__)


class FallbackBackend:
    """Asks `primary`; when its reply never validates (re-asks spent), the question's token budget is
    spent, or the endpoint stays unavailable, answers that one question with `rules` instead. The answer
    carries the primary's cost and transcript and a `Fallback` saying why, so the record shows both.

    Not answered by the rules: a refused key or unknown model (HTTP 401/403/404), which would turn the
    whole run into an offline run silently, and kinds the rules have no handler for."""

    def __init__(self, primary: TracedBackend, rules: OfflineBackend) -> None:
        self.primary = primary
        self.rules = rules
        self.name = primary.name

    @property
    def max_parallel(self) -> int:
        return getattr(self.primary, "max_parallel", 1)

    def ask(self, request: LLMRequest[R]) -> R:
        return self.answer(request).reply

    def answer(self, request: LLMRequest[R]) -> Answer[R]:
        try:
            return self.primary.answer(request)
        except LLMUnavailable as exc:
            if exc.status in CONFIGURATION_STATUS or request.kind not in self.rules.handlers:
                raise
            failure: Exception = exc
        except (LLMInvalidReply, LLMBudgetSpent) as exc:
            if request.kind not in self.rules.handlers:
                raise
            failure = exc
        log.warning("LLM gave no valid %s (%s); the offline rules answer this question", request.kind,
                    type(failure).__name__)
        ruled = self.rules.answer(request)
        spent = getattr(failure, "stats", None) or CallStats(backend=self.name)
        return Answer(reply=ruled.reply, stats=spent, transcript=getattr(failure, "transcript", None),
                      fallback=Fallback(error_type=type(failure).__name__, reason=str(failure)))
