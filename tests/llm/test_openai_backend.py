"""OpenAIBackend through the real `openai` client against the scripted loopback server."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from fake_llm_server import Fail, Reply
from pydantic import BaseModel, Field

from service.llm import LLMInvalidReply, LLMRequest, LLMUnavailable, OpenAIBackend

KEY = "cf-test-key-5f3a9b2c7d1e"


class Plan(BaseModel):
    architecture: str
    epochs: int = Field(ge=1)
    learning_rate: float


GOOD = json.dumps({"architecture": "mlp", "epochs": 20, "learning_rate": 0.001})


def request(kind: str = "plan", **context) -> LLMRequest:
    return LLMRequest(kind=kind, system="You design models.", user="Propose a plan.",
                      context=context or {"n_genes": 2000}, schema=Plan)


def backend(fake_llm, **kw) -> OpenAIBackend:
    kw = {"timeout": 5.0, "max_attempts": 4, "max_seconds": 20.0, "backoff_initial": 0.01,
          "backoff_max": 0.05} | kw
    return OpenAIBackend(fake_llm.base_url, "fake-model", KEY, **kw)


def test_structured_reply_is_parsed_and_prompt_carries_schema_and_context(fake_llm):
    fake_llm.script(Reply(GOOD, prompt_tokens=120, completion_tokens=30))
    answer = backend(fake_llm).answer(request(n_genes=2000))

    assert answer.reply == Plan(architecture="mlp", epochs=20, learning_rate=0.001)
    assert (answer.stats.attempts, answer.stats.reasks) == (1, 0)
    assert (answer.stats.prompt_tokens, answer.stats.completion_tokens) == (120, 30)
    assert answer.stats.model == "fake-model"
    sent = fake_llm.requests[0]
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body["model"] == "fake-model"
    assert sent.body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "Plan", "schema": Plan.model_json_schema(), "strict": False}}
    assert sent.body["max_tokens"] == 8192
    system, user = sent.messages
    assert '"learning_rate"' in system["content"] and "JSON schema" in system["content"]
    assert user["content"].endswith('Context (JSON):\n{"n_genes":2000}')  # compact: it is sent every call


def test_fenced_json_reply_is_accepted(fake_llm):
    fake_llm.script(Reply(f"Here is the plan:\n```json\n{GOOD}\n```"))
    assert backend(fake_llm).ask(request()).epochs == 20


def test_invalid_json_is_reasked_with_the_validation_error(fake_llm):
    fake_llm.script(
        Reply('{"architecture": "mlp", "epochs": 0}', prompt_tokens=100, completion_tokens=10),
        Reply(GOOD, prompt_tokens=150, completion_tokens=20),
    )
    answer = backend(fake_llm).answer(request())

    assert answer.reply.epochs == 20
    assert (answer.stats.attempts, answer.stats.reasks) == (2, 1)
    assert (answer.stats.prompt_tokens, answer.stats.completion_tokens) == (250, 30)
    second = fake_llm.requests[1].messages
    assert second[-2] == {"role": "assistant", "content": '{"architecture": "mlp", "epochs": 0}'}
    reask = second[-1]["content"]
    assert "not a valid Plan" in reask
    assert "epochs: Input should be greater than or equal to 1" in reask
    assert "learning_rate: Field required" in reask


def test_reply_that_is_not_json_at_all_is_reasked(fake_llm):
    fake_llm.script(Reply("I think an MLP would be nice."), Reply(GOOD))
    assert backend(fake_llm).ask(request()).architecture == "mlp"
    assert "Invalid JSON" in fake_llm.requests[1].messages[-1]["content"]


def test_reasks_are_bounded(fake_llm):
    fake_llm.script(Reply("nope"), Reply("still nope"), Reply("never"))
    with pytest.raises(LLMInvalidReply, match=r"did not produce a valid Plan for 'plan' after 2 replies") as info:
        backend(fake_llm, max_reasks=1).ask(request())
    assert info.value.content == "still nope"
    assert len(fake_llm.requests) == 2


def test_429_waits_for_retry_after_seconds(fake_llm):
    fake_llm.script(Fail(429, "slow down", retry_after="1"), Reply(GOOD))
    answer = backend(fake_llm).answer(request())

    assert answer.reply.epochs == 20 and answer.stats.attempts == 2
    first, second = fake_llm.requests
    assert second.received_at - first.received_at >= 1.0


def test_retry_after_as_http_date_is_honoured(fake_llm):
    # HTTP dates have whole-second resolution and the formatter truncates: rounding up to the next
    # whole second keeps the date at least 2 s ahead when written, so the client (which parses it a
    # moment later) still has to wait more than 1 s.
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=3)
    when = format_datetime(soon, usegmt=True)
    fake_llm.script(Fail(503, "overloaded", retry_after=when), Reply(GOOD))
    backend(fake_llm).ask(request())
    first, second = fake_llm.requests
    assert second.received_at - first.received_at >= 1.0


def test_500_then_success(fake_llm):
    fake_llm.script(Fail(500, "boom"), Reply(GOOD))
    answer = backend(fake_llm).answer(request())
    assert answer.reply.epochs == 20
    assert answer.stats.attempts == 2


def test_attempts_are_bounded(fake_llm):
    fake_llm.script(*[Fail(500, "always broken")] * 5)
    with pytest.raises(LLMUnavailable, match=r"after 3 attempt\(s\).*HTTP 500.*always broken") as info:
        backend(fake_llm, max_attempts=3).ask(request())
    assert info.value.attempts == 3 and info.value.status == 500
    assert len(fake_llm.requests) == 3


def test_retry_after_beyond_the_time_budget_gives_up_without_waiting(fake_llm):
    fake_llm.script(Fail(429, "come back later", retry_after="30"), Reply(GOOD))
    with pytest.raises(LLMUnavailable, match=r"HTTP 429.*asked to wait 30s, past the time budget"):
        backend(fake_llm, max_seconds=5.0).ask(request())
    assert len(fake_llm.requests) == 1


def test_client_timeout_is_retried(fake_llm):
    fake_llm.script(Reply(GOOD, delay=1.5), Reply(GOOD))
    answer = backend(fake_llm, timeout=0.5).answer(request())
    assert answer.reply.epochs == 20 and answer.stats.attempts == 2


def test_client_error_is_not_retried(fake_llm):
    fake_llm.script(Fail(404, "model fake-model does not exist"), Reply(GOOD))
    with pytest.raises(LLMUnavailable, match=r"refused the request for 'plan': HTTP 404") as info:
        backend(fake_llm).ask(request())
    assert info.value.status == 404
    assert len(fake_llm.requests) == 1


def test_connection_refused_is_a_clear_error():
    dead = OpenAIBackend("http://127.0.0.1:9/v1", "m", KEY, timeout=1.0, max_attempts=2,
                         backoff_initial=0.01, backoff_max=0.02)
    with pytest.raises(LLMUnavailable, match=r"127\.0\.0\.1:9.*after 2 attempt\(s\).*APIConnectionError"):
        dead.ask(request())


def test_structured_output_steps_down_when_refused(fake_llm):
    fake_llm.script(Fail(400, "response_format json_schema is not supported by this server"),
                    Fail(400, "response_format json_object is not supported by this model"), Reply(GOOD))
    b = backend(fake_llm)
    answer = b.answer(request())
    assert answer.reply.epochs == 20
    assert [r.body.get("response_format", {}).get("type") for r in fake_llm.requests] == [
        "json_schema", "json_object", None]
    assert b.response_format == "none"
    assert [e.outcome for e in answer.transcript.exchanges] == ["param_refused", "param_refused", "accepted"]


def test_model_without_temperature_is_asked_again_without_it(fake_llm):
    fake_llm.script(Fail(400, "Unsupported value: 'temperature' does not support 0.0 with this model."),
                    Reply(GOOD))
    answer = backend(fake_llm).answer(request())
    assert answer.stats.attempts == 2
    assert fake_llm.requests[0].body["temperature"] == 0.0
    assert "temperature" not in fake_llm.requests[1].body


def test_key_never_reaches_errors_or_logs(fake_llm, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included
    fake_llm.script(
        Fail(500, f"upstream rejected Authorization: Bearer {KEY}"),
        Reply(f'{{"architecture": "{KEY}", "epochs": 0}}'),
        Reply(GOOD),
        Fail(401, f"Incorrect API key provided: {KEY}"),
    )
    b = backend(fake_llm)
    assert b.ask(request(note=f"my key is {KEY}")).epochs == 20
    assert all(KEY not in r.text for r in fake_llm.requests)  # a pasted key never reaches the model
    with pytest.raises(LLMUnavailable) as info:
        b.ask(request())

    assert fake_llm.requests[0].headers["authorization"] == f"Bearer {KEY}"  # it was really used
    assert "HTTP 401" in str(info.value) and KEY not in str(info.value)
    assert "[REDACTED]" in caplog.text
    assert KEY not in caplog.text
    assert KEY not in repr(b)
