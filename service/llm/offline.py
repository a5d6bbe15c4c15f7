"""The embedded default backend: rule-based handlers (written in service.agents) dispatched on `kind`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .request import Answer, CallStats, LLMError, LLMRequest, MissingHandler, R

Handler = Callable[[dict[str, Any]], BaseModel]


class OfflineBackend:
    """Answers each request with `handlers[request.kind](request.context)`; no network, deterministic."""

    name = "offline"

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = dict(handlers)

    def answer(self, request: LLMRequest[R]) -> Answer[R]:
        handler = self.handlers.get(request.kind)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            raise MissingHandler(
                f"offline backend has no handler for request kind {request.kind!r} (handlers: {known})"
            )
        reply = _as_schema(handler(request.context), request)
        try:
            request.validate(reply)
        except ValueError as exc:
            raise LLMError(f"offline handler for {request.kind!r} broke the asker's rule: {exc}") from exc
        return Answer(reply=reply, stats=CallStats(backend=self.name, model="rules"))

    def ask(self, request: LLMRequest[R]) -> R:
        return self.answer(request).reply


def _as_schema(reply: object, request: LLMRequest[R]) -> R:
    # A handler may build a sibling model or a dict; the contract is an instance of the request's schema.
    if isinstance(reply, request.schema):
        return reply
    data = reply.model_dump() if isinstance(reply, BaseModel) else reply
    try:
        return request.schema.model_validate(data)
    except ValidationError as exc:
        raise LLMError(
            f"offline handler for {request.kind!r} returned {type(reply).__name__}, "
            f"not a valid {request.schema.__name__}: {exc}"
        ) from exc
