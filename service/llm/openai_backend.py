"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, LiteLLM) answering with validated JSON."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Generic, Literal, cast

import openai
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from .parsing import describe, parse_reply, strip_reasoning
from .redact import Redactor
from .request import (
    Answer,
    CallStats,
    Exchange,
    LLMBudgetSpent,
    LLMError,
    LLMInvalidReply,
    LLMRequest,
    LLMUnavailable,
    R,
    Transcript,
)

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 409, 429}
# A refused key or an unknown model fails every question alike: no point answering from the rules.
CONFIGURATION_STATUS = {401, 403, 404}
# Servers that do not implement an optional parameter reject it with a 400 naming it; we then ask without.
_FORMAT_REJECTED = re.compile(r"response_format|json_schema|json_object|json mode|structured output", re.IGNORECASE)
_TEMPERATURE_REJECTED = re.compile(r"temperature", re.IGNORECASE)
_MAX_TOKENS_REJECTED = re.compile(r"max_tokens|max_completion_tokens", re.IGNORECASE)
_STREAM_REJECTED = re.compile(r"stream", re.IGNORECASE)
TokenProgress = Callable[[str, int], None]  # (request kind, tokens received so far in this reply)
# Structured output, strongest first; a server refusing one is asked with the next.
ResponseFormat = Literal["json_schema", "json_object", "none"]
FORMATS: tuple[ResponseFormat, ...] = ("json_schema", "json_object", "none")
_CONTINUE = ("Your reply was cut off by the output limit. Continue exactly where it stopped: no repetition, "
             "no preamble, no code fence.")


class OpenAIBackend:
    """Structured answers from a chat-completions endpoint.

    Transient failures (429, 408, 409, 5xx, timeouts, connection errors) are retried with exponential
    backoff and jitter, honouring `Retry-After`, bounded by `max_attempts` and `max_seconds` per completion.
    The reply is read leniently (`parse_reply`); one that does not validate against the schema and the
    request's check is re-asked `max_reasks` times, quoting the exact problem. A reply cut by the output
    cap (`finish_reason == "length"`) is continued up to `max_continuations` times. Structured output
    (`response_format`) is asked as a JSON schema, stepping down to JSON mode, then none, when refused.
    `token_budget` bounds the tokens one question may spend, re-asks and continuations included;
    `total_seconds` the wall time of all completions together (concurrent ones overlapping are each
    counted), after which every question raises `LLMBudgetSpent`."""

    name = "openai"

    def __init__(
        self,
        base_url: str | None,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_attempts: int = 5,
        max_seconds: float = 300.0,
        max_reasks: int = 2,
        response_format: ResponseFormat = "json_schema",
        temperature: float | None = 0.0,
        max_tokens: int | None = 8192,
        max_continuations: int = 2,
        token_budget: int | None = None,
        max_parallel: int = 4,
        total_seconds: float | None = None,
        stream: bool = False,
        on_tokens: TokenProgress | None = None,
        progress_interval: float = 0.5,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.model = model
        self.base_url = base_url
        self.max_attempts = max_attempts
        self.max_seconds = max_seconds
        self.max_reasks = max_reasks
        self.response_format: ResponseFormat = response_format
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_continuations = max_continuations
        self.token_budget = token_budget
        self.max_parallel = max_parallel
        self.total_seconds = total_seconds
        self.spent_seconds = 0.0
        self.stream = stream
        self.on_tokens = on_tokens
        self.progress_interval = progress_interval
        self._spent_lock = threading.Lock()
        self._token_param: str | None = "max_tokens"
        # Jitter as large as the first wait spreads clients that failed together.
        self._backoff = wait_exponential_jitter(multiplier=backoff_initial, jitter=backoff_initial, max=backoff_max)
        self.redactor = Redactor([api_key])
        # Local servers (vLLM, Ollama) ignore the key but the SDK insists on one.
        self._client = OpenAI(base_url=base_url, api_key=api_key or "unused", timeout=timeout, max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r})"

    def ask(self, request: LLMRequest[R]) -> R:
        return self.answer(request).reply

    def answer(self, request: LLMRequest[R]) -> Answer[R]:
        # A key pasted into a prompt or context would otherwise travel to the provider and its logs.
        user = _user_prompt(request, self.redactor.data(request.context))
        call = _Call(request, Transcript(messages=[
            {"role": "system", "content": self.redactor.text(system_prompt(request))},
            {"role": "user", "content": self.redactor.text(user)},
        ]))
        try:
            return self._answer(call)
        except LLMError as exc:
            exc.stats, exc.transcript = call.stats(self), call.transcript
            raise

    def _answer(self, call: _Call[R]) -> Answer[R]:
        request, messages = call.request, call.transcript.messages
        last_part = problem = ""  # of the previous reply, quoted back to the model on a re-ask
        for reask in range(self.max_reasks + 1):
            call.reasks = reask
            if reask:
                messages += [
                    {"role": "assistant", "content": self.redactor.text(last_part)},
                    {"role": "user", "content": self.redactor.text(_reask_prompt(request, problem))},
                ]
            content, last_part, truncated = self._reply(call)
            try:
                reply = request.validate(parse_reply(content, request.schema))
            except ValueError as exc:  # pydantic's ValidationError included
                problem = (f"- the reply was cut off by the output limit ({self._cap(request)} tokens) after "
                           f"{self.max_continuations} continuation(s); answer more concisely" if truncated
                           else describe(exc))
                call.transcript.exchanges[-1].outcome = "rejected"
                call.transcript.exchanges[-1].problem = problem
            else:
                call.transcript.exchanges[-1].outcome = "accepted"
                return Answer(reply=reply, stats=call.stats(self), transcript=call.transcript)
            log.warning("LLM reply for %s is not a valid %s: %s", request.kind, request.schema.__name__,
                        self.redactor.text(problem))
        raise LLMInvalidReply(
            f"{self.model} did not produce a valid {request.schema.__name__} for {request.kind!r} after "
            f"{self.max_reasks + 1} replies; last problem: {self.redactor.text(problem)}",
            kind=request.kind,
            content=self.redactor.text(content),
        )

    def _reply(self, call: _Call) -> tuple[str, str, bool]:
        """One reply, continued while the output cap cut it: (whole text, last part, still truncated)."""
        parts: list[str] = []
        for continuation in range(self.max_continuations + 1):
            content, finish = self._complete(call, continuation=continuation > 0)
            # A continuation may come back fenced or with reasoning although asked not to.
            parts.append(_unwrap(content) if continuation else content)
            if finish != "length":
                return "".join(parts), content, False
            call.transcript.exchanges[-1].outcome = "truncated"
            if continuation == self.max_continuations:
                break
            call.transcript.messages += [{"role": "assistant", "content": self.redactor.text(content)},
                                         {"role": "user", "content": _CONTINUE}]
        return "".join(parts), content, True

    def _complete(self, call: _Call, *, continuation: bool) -> tuple[str, str | None]:
        """One completion, retried on transient errors: (content, finish_reason)."""
        kind = call.request.kind
        if self.token_budget is not None and call.tokens >= self.token_budget:
            raise LLMBudgetSpent(f"{kind!r} spent its token budget ({call.tokens} of {self.token_budget} tokens) "
                                 "before a valid reply")
        left = self.max_seconds
        if self.total_seconds is not None:
            left = min(left, self.total_seconds - self.spent_seconds)
            if left <= 0:
                raise LLMBudgetSpent(f"the run's LLM time budget ({self.total_seconds:g}s) is spent; {kind!r} "
                                     "is not asked")
        started = time.monotonic()
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts) | stop_before_delay(left),
            wait=self._wait,
            retry=retry_if_exception(_is_transient),
            before_sleep=lambda state: self._log_retry(state, kind),
            reraise=False,
        )
        try:
            response = retrying(self._create, call, continuation)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            elapsed = time.monotonic() - started
            asked = _retry_after(last)
            beyond = (f"; the server asked to wait {asked:g}s, past the time budget"
                      if asked is not None and elapsed + asked >= self.max_seconds else "")
            raise LLMUnavailable(
                f"{self._where()} gave no answer for {kind!r} after {exc.last_attempt.attempt_number} "
                f"attempt(s) in {elapsed:.1f}s (limits: {self.max_attempts} attempts, {self.max_seconds:g}s); "
                f"last error: {self._explain(last)}{beyond}",
                attempts=call.attempts,
                status=getattr(last, "status_code", None),
            ) from None
        except openai.APIStatusError as exc:
            raise LLMUnavailable(
                f"{self._where()} refused the request for {kind!r}: {self._explain(exc)}",
                attempts=call.attempts,
                status=exc.status_code,
            ) from None
        except openai.OpenAIError as exc:
            raise LLMUnavailable(
                f"{self._where()} failed for {kind!r}: {self._explain(exc)}", attempts=call.attempts
            ) from None
        finally:
            with self._spent_lock:
                self.spent_seconds += time.monotonic() - started
        exchange = call.transcript.exchanges[-1]
        if response.usage is not None:
            exchange.prompt_tokens = response.usage.prompt_tokens or 0
            exchange.completion_tokens = response.usage.completion_tokens or 0
        call.model = response.model or call.model
        choice = response.choices[0] if response.choices else None
        exchange.content = self.redactor.text(choice.message.content or "") if choice else ""
        exchange.finish_reason = choice.finish_reason if choice else None
        return (choice.message.content or "" if choice else ""), exchange.finish_reason

    def _create(self, call: _Call, continuation: bool) -> Any:
        """One HTTP request; an optional parameter the server rejects is dropped for good and re-sent."""
        messages = call.transcript.messages
        while True:
            call.attempts += 1
            params = self._params(call.request, continuation)
            exchange = Exchange(sent=len(messages), params=_recorded(params), outcome="failed")
            call.transcript.exchanges.append(exchange)
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=cast("list[ChatCompletionMessageParam]", messages), **params)
                return self._collect(response, call.request.kind) if params.get("stream") else response
            except openai.BadRequestError as exc:
                exchange.problem = self._explain(exc)
                dropped = self._drop_refused(str(exc), params)
                if dropped is None:
                    raise
                exchange.outcome = "param_refused"
                log.info("%s rejected %s; asking without it", self._where(), dropped)
            except openai.OpenAIError as exc:
                exchange.problem = self._explain(exc)
                raise

    def _collect(self, chunks: Any, kind: str) -> Any:
        """A streamed reply read to its end, shaped like a whole one; `on_tokens` hears how many tokens
        (chunks) have arrived, every `progress_interval` seconds and at the end."""
        parts: list[str] = []
        finish = usage = model = None
        received, shown = 0, time.monotonic()
        for chunk in chunks:
            model = chunk.model or model
            usage = chunk.usage or usage
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    parts.append(choice.delta.content)
                    received += 1
                finish = choice.finish_reason or finish
            if self.on_tokens is not None and time.monotonic() - shown >= self.progress_interval:
                self.on_tokens(kind, received)
                shown = time.monotonic()
        if self.on_tokens is not None:
            self.on_tokens(kind, received)
        message = SimpleNamespace(content="".join(parts))
        return SimpleNamespace(model=model, usage=usage, choices=[SimpleNamespace(message=message,
                                                                                  finish_reason=finish)])

    def _params(self, request: LLMRequest, continuation: bool) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.stream:  # tokens arrive as they are written: progress to show, and no read timeout on a slow reply
            params["stream"] = True
            params["stream_options"] = {"include_usage": True}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        cap = self._cap(request)
        if cap is not None and self._token_param is not None:
            params[self._token_param] = cap
        # A continuation is the rest of a JSON text, not an object of its own: no structured output.
        if self.response_format == "json_schema" and not continuation:
            params["response_format"] = {"type": "json_schema", "json_schema": {
                "name": request.schema.__name__, "schema": json.loads(schema_text(request.schema)), "strict": False}}
        elif self.response_format == "json_object" and not continuation:
            params["response_format"] = {"type": "json_object"}
        return params

    def _cap(self, request: LLMRequest) -> int | None:
        return request.max_tokens or self.max_tokens

    def _drop_refused(self, message: str, params: dict[str, Any]) -> str | None:
        """Step down from a parameter the server refused; what was dropped, or None if nothing applies."""
        if "stream" in params and _STREAM_REJECTED.search(message):
            self.stream = False
            return "stream"
        if "response_format" in params and _FORMAT_REJECTED.search(message):
            sent = params["response_format"]["type"]
            # Concurrent questions may meet the same refusal: step down from what was sent, never twice.
            weaker = FORMATS[FORMATS.index(sent) + 1]
            if FORMATS.index(weaker) > FORMATS.index(self.response_format):
                self.response_format = weaker
            return f"response_format={sent}"
        if "temperature" in params and _TEMPERATURE_REJECTED.search(message):
            self.temperature = None  # reasoning models accept only their default temperature
            return "temperature"
        if self._token_param in params and _MAX_TOKENS_REJECTED.search(message):
            dropped = self._token_param
            # OpenAI's reasoning models take the cap under its newer name; others may take none.
            self._token_param = ("max_completion_tokens" if dropped == "max_tokens"
                                 and "max_completion_tokens" in message else None)
            return dropped
        return None

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        asked = _retry_after(exc)
        return backoff if asked is None else asked

    def _log_retry(self, state: RetryCallState, kind: str) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("LLM call %s: attempt %d failed (%s); retrying in %.2fs", kind, state.attempt_number,
                    self._explain(exc), wait)

    def _where(self) -> str:
        return f"LLM endpoint {self.base_url or 'api.openai.com'} (model {self.model})"

    def _explain(self, exc: BaseException | None) -> str:
        if exc is None:
            return "unknown error"
        if isinstance(exc, openai.APIStatusError):
            text = f"HTTP {exc.status_code}: {exc.message}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self.redactor.text(text)


class _Call(Generic[R]):
    """One question in progress: its conversation and what it has cost so far."""

    def __init__(self, request: LLMRequest[R], transcript: Transcript) -> None:
        self.request = request
        self.transcript = transcript
        self.attempts = 0
        self.reasks = 0
        self.model: str | None = None

    @property
    def tokens(self) -> int:
        return sum(e.prompt_tokens + e.completion_tokens for e in self.transcript.exchanges)

    def stats(self, backend: OpenAIBackend) -> CallStats:
        exchanges = self.transcript.exchanges
        return CallStats(backend=backend.name, model=self.model or backend.model, attempts=self.attempts,
                         reasks=self.reasks, prompt_tokens=sum(e.prompt_tokens for e in exchanges),
                         completion_tokens=sum(e.completion_tokens for e in exchanges))


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRYABLE_STATUS or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError))


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, or `Retry-After` as seconds or HTTP date)."""
    # The SDK's status errors carry the HTTP response; connection errors and timeouts carry none.
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


_SCHEMA_TEXTS: dict[type[BaseModel], str] = {}


def schema_text(schema: type[BaseModel]) -> str:
    """A reply type's JSON schema as compact JSON, generated once per type (pydantic takes tens of
    milliseconds a time, and a discussion asks ~40 questions)."""
    text = _SCHEMA_TEXTS.get(schema)
    if text is None:
        text = _SCHEMA_TEXTS[schema] = json.dumps(schema.model_json_schema(), separators=(",", ":"))
    return text


def system_prompt(request: LLMRequest) -> str:
    """The request's system text and, once, the JSON schema its reply must follow (compact: it is sent
    with every question)."""
    schema = schema_text(request.schema)
    return (
        f"{request.system}\n\n"
        "Reply with one JSON object and nothing else (no prose, no code fences). "
        f"It must validate against this JSON schema ({request.schema.__name__}):\n{schema}"
    )


def _user_prompt(request: LLMRequest, context: dict[str, Any]) -> str:
    if not context:
        return request.user
    return f"{request.user}\n\nContext (JSON):\n{json.dumps(context, separators=(',', ':'), ensure_ascii=False)}"


def _reask_prompt(request: LLMRequest, problem: str) -> str:
    return (
        f"Your previous reply is not a valid {request.schema.__name__}:\n{problem}\n\n"
        "Reply again with only the corrected JSON object, following the schema exactly."
    )


def _unwrap(content: str) -> str:
    """A continuation without reasoning or an enclosing fence."""
    text = strip_reasoning(content)
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        return stripped.split("\n", 1)[1][:-3] if "\n" in stripped else stripped.strip("`")
    return text


def _recorded(params: dict[str, Any]) -> dict[str, Any]:
    """Request parameters as recorded: the response_format schema is the one in the system prompt, so
    only its type is kept."""
    out = {k: v for k, v in params.items() if k != "stream_options"}
    if "response_format" in out:
        out["response_format"] = out["response_format"]["type"]
    return out
