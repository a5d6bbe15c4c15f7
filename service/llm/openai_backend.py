"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, LiteLLM) answering with validated JSON."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import openai
from openai import OpenAI
from pydantic import ValidationError
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from .redact import Redactor
from .request import Answer, CallStats, LLMInvalidReply, LLMRequest, LLMUnavailable, R

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 409, 429}
# Servers that do not implement an optional parameter reject it with a 400 naming it; we then ask without.
_JSON_MODE_REJECTED = re.compile(r"response_format|json_object|json mode", re.IGNORECASE)
_TEMPERATURE_REJECTED = re.compile(r"temperature", re.IGNORECASE)
_FENCED_JSON = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


class OpenAIBackend:
    """Structured answers from a chat-completions endpoint.

    Transient failures (429, 408, 409, 5xx, timeouts, connection errors) are retried with exponential
    backoff and jitter, honouring `Retry-After`, bounded by `max_attempts` and `max_seconds` for the
    whole call. A reply that is not valid JSON for the schema is re-asked `max_reasks` times, quoting
    the validation error to the model."""

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
        max_reasks: int = 1,
        json_mode: bool = True,
        temperature: float | None = 0.0,
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
        self.json_mode = json_mode
        self.temperature = temperature
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
        messages = [
            {"role": "system", "content": self.redactor.text(_system_prompt(request))},
            {"role": "user", "content": self.redactor.text(user)},
        ]
        tally = _Tally()
        for reask in range(self.max_reasks + 1):
            content = self._complete(messages, tally, request.kind)
            try:
                reply = request.schema.model_validate_json(_extract_json(content))
            except ValidationError as exc:
                problem = _describe(exc)
            else:
                return Answer(
                    reply=reply,
                    stats=CallStats(
                        backend=self.name,
                        model=tally.model or self.model,
                        attempts=tally.attempts,
                        reasks=reask,
                        prompt_tokens=tally.prompt_tokens,
                        completion_tokens=tally.completion_tokens,
                    ),
                )
            log.warning("LLM reply for %s is not a valid %s: %s", request.kind, request.schema.__name__,
                        self.redactor.text(problem))
            messages += [
                {"role": "assistant", "content": self.redactor.text(content)},
                {"role": "user", "content": self.redactor.text(_reask_prompt(request, problem))},
            ]
        raise LLMInvalidReply(
            f"{self.model} did not produce a valid {request.schema.__name__} for {request.kind!r} after "
            f"{self.max_reasks + 1} replies; last problem: {self.redactor.text(problem)}",
            kind=request.kind,
            content=self.redactor.text(content),
        )

    def _complete(self, messages: list[dict[str, str]], tally: _Tally, kind: str) -> str:
        """One completion, retried on transient errors; returns the message content."""
        started = time.monotonic()
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts) | stop_before_delay(self.max_seconds),
            wait=self._wait,
            retry=retry_if_exception(_is_transient),
            before_sleep=lambda state: self._log_retry(state, kind),
            reraise=False,
        )
        try:
            response = retrying(self._create, messages, tally)
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
                attempts=exc.last_attempt.attempt_number,
                status=getattr(last, "status_code", None),
            ) from None
        except openai.APIStatusError as exc:
            raise LLMUnavailable(
                f"{self._where()} refused the request for {kind!r}: {self._explain(exc)}",
                attempts=tally.attempts,
                status=exc.status_code,
            ) from None
        except openai.OpenAIError as exc:
            raise LLMUnavailable(
                f"{self._where()} failed for {kind!r}: {self._explain(exc)}", attempts=tally.attempts
            ) from None
        usage = response.usage
        if usage is not None:
            tally.prompt_tokens += usage.prompt_tokens or 0
            tally.completion_tokens += usage.completion_tokens or 0
        tally.model = response.model or tally.model
        if not response.choices or response.choices[0].message.content is None:
            return ""
        return response.choices[0].message.content

    def _create(self, messages: list[dict[str, str]], tally: _Tally) -> Any:
        """One HTTP request; an optional parameter the server rejects is dropped for good and re-sent."""
        while True:
            tally.attempts += 1
            kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
            if self.temperature is not None:
                kwargs["temperature"] = self.temperature
            if self.json_mode:
                kwargs["response_format"] = {"type": "json_object"}
            try:
                return self._client.chat.completions.create(**kwargs)
            except openai.BadRequestError as exc:
                if self.json_mode and _JSON_MODE_REJECTED.search(str(exc)):
                    self.json_mode = False
                    dropped = "response_format=json_object"
                elif self.temperature is not None and _TEMPERATURE_REJECTED.search(str(exc)):
                    self.temperature = None  # reasoning models accept only their default temperature
                    dropped = "temperature"
                else:
                    raise
                log.info("%s rejected %s; asking without it", self._where(), dropped)

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


class _Tally:
    """Cost of one `answer`, summed over retries and re-asks."""

    def __init__(self) -> None:
        self.attempts = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.model: str | None = None


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


def _system_prompt(request: LLMRequest) -> str:
    schema = json.dumps(request.schema.model_json_schema(), indent=1)
    return (
        f"{request.system}\n\n"
        "Reply with one JSON object and nothing else (no prose, no code fences). "
        f"It must validate against this JSON schema ({request.schema.__name__}):\n{schema}"
    )


def _user_prompt(request: LLMRequest, context: dict[str, Any]) -> str:
    if not context:
        return request.user
    return f"{request.user}\n\nContext (JSON):\n{json.dumps(context, indent=1, ensure_ascii=False)}"


def _reask_prompt(request: LLMRequest, problem: str) -> str:
    return (
        f"Your previous reply is not a valid {request.schema.__name__}:\n{problem}\n\n"
        "Reply again with only the corrected JSON object, following the schema exactly."
    )


def _extract_json(content: str) -> str:
    """The JSON object inside a reply; models often wrap it in fences or a sentence despite the prompt."""
    text = content.strip()
    if text.startswith("{"):
        return text
    fenced = _FENCED_JSON.search(text)
    if fenced:
        return fenced.group(1).strip()
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else text


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"- {where}: {err['msg']}")
    return "\n".join(lines)
