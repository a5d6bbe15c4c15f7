"""Replies real models give, through the real `openai` client against the scripted server: each failure
is reproduced (what the reply is, why a plain reader fails on it), then shown handled and recorded."""

from __future__ import annotations

import json

import pytest
from fake_llm_server import Fail, Reply
from pydantic import BaseModel, Field, ValidationError

from service.llm import (
    LLMConfig,
    LLMInvalidReply,
    LLMRequest,
    LLMUnavailable,
    OpenAIBackend,
    RecordingBackend,
    make_backend,
    parse_reply,
    read_calls,
    summarize_run,
    system_prompt,
)

KEY = "cf-robust-key-7a1c9e3b"


class Plan(BaseModel):
    architecture: str
    epochs: int = Field(ge=1)
    learning_rate: float


GOOD = json.dumps({"architecture": "mlp", "epochs": 20, "learning_rate": 0.001})
RULES_PLAN = Plan(architecture="rules-mlp", epochs=10, learning_rate=0.01)


def request(**kw) -> LLMRequest:
    return LLMRequest(kind="plan", system="You design models.", user="Propose a plan.",
                      context={"n_genes": 2000}, schema=Plan, **kw)


def backend(fake_llm, **kw) -> OpenAIBackend:
    kw = {"timeout": 5.0, "max_attempts": 3, "max_seconds": 20.0, "backoff_initial": 0.01,
          "backoff_max": 0.05} | kw
    return OpenAIBackend(fake_llm.base_url, "fake-model", KEY, **kw)


def stack(fake_llm, run_dir, **settings):
    """What a run uses: recording, then fallback to the rules, then the model."""
    config = LLMConfig.resolve({"model": "fake-model", "base_url": fake_llm.base_url, "api_key": KEY,
                                **settings}, env={}, config_path=None)
    return make_backend(config, {"plan": lambda ctx: RULES_PLAN}, run_dir)


def old_extraction(content: str) -> str:
    """How replies were read before: the text from the first '{' to the last '}'."""
    text = content.strip()
    return text[text.find("{"): text.rfind("}") + 1]


# ------------------------------------------------------------------ lenient reading

THINKING = ("<think>The user wants {architecture, epochs}. Maybe {\"epochs\": 0}? No, that is invalid; "
            "I will say 20.</think>\n" + GOOD)


def test_reasoning_block_with_braces_before_the_json(fake_llm):
    with pytest.raises(ValidationError):  # the failure: braces of the reasoning were read as the answer
        Plan.model_validate_json(old_extraction(THINKING))
    fake_llm.script(Reply(THINKING))
    answer = backend(fake_llm).answer(request())
    assert answer.reply.epochs == 20 and answer.stats.reasks == 0 and len(fake_llm.requests) == 1


def test_reasoning_whose_opening_tag_the_server_dropped():
    content = "so {a} or {b}... the answer is clear.</think>\n\n" + GOOD
    assert parse_reply(content, Plan).epochs == 20


def test_fenced_reply_after_prose_with_braces(fake_llm):
    content = f"Sure! Using {{mlp}} as discussed:\n```json\n{GOOD}\n```\nLet me know {{if}} you need more."
    with pytest.raises(ValidationError):
        Plan.model_validate_json(old_extraction(content))
    fake_llm.script(Reply(content))
    assert backend(fake_llm).ask(request()).architecture == "mlp"


def test_the_valid_object_among_several_is_taken_and_errors_name_the_intended_one():
    content = 'Example: {"x": 1}. Answer: ' + GOOD
    assert parse_reply(content, Plan).epochs == 20
    with pytest.raises(ValidationError, match="epochs") as info:
        parse_reply('Note {"a": 1}. {"architecture": "mlp", "epochs": 0, "learning_rate": 0.1}', Plan)
    assert "architecture" not in str(info.value)  # the error is that of the larger, intended object


# ------------------------------------------------------------------ structured output and caps

def test_json_schema_response_format_and_max_tokens_are_sent(fake_llm):
    fake_llm.script(Reply(GOOD))
    backend(fake_llm, max_tokens=512).ask(request(max_tokens=2048))
    body = fake_llm.requests[0].body
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == Plan.model_json_schema()
    assert body["max_tokens"] == 2048  # the question's own cap beats the backend's


def test_max_tokens_refused_is_sent_under_its_newer_name(fake_llm):
    fake_llm.script(Fail(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                              "Use 'max_completion_tokens' instead."), Reply(GOOD))
    backend(fake_llm).ask(request())
    first, second = fake_llm.requests
    assert first.body["max_tokens"] == 8192 and "max_tokens" not in second.body
    assert second.body["max_completion_tokens"] == 8192


def test_truncated_reply_is_continued(fake_llm):
    cut = len(GOOD) // 2
    fake_llm.script(Reply(GOOD[:cut], finish_reason="length"))
    with pytest.raises(LLMInvalidReply, match="cut off by the output limit"):  # the failure: half a JSON text
        backend(fake_llm, max_continuations=0, max_reasks=0).ask(request())

    fake_llm.script(Reply(GOOD[:cut], finish_reason="length", completion_tokens=50),
                    Reply("```json\n" + GOOD[cut:] + "\n```", completion_tokens=30))
    answer = backend(fake_llm).answer(request())

    assert answer.reply == Plan.model_validate_json(GOOD)
    assert [e.outcome for e in answer.transcript.exchanges] == ["truncated", "accepted"]
    assert answer.stats.completion_tokens == 80 and answer.stats.reasks == 0
    second = fake_llm.requests[1]
    assert second.messages[-2] == {"role": "assistant", "content": GOOD[:cut]}
    assert "cut off by the output limit" in second.messages[-1]["content"]
    assert "response_format" not in second.body  # the rest of a JSON text is not an object of its own


def test_reply_still_truncated_after_continuations_is_reasked_to_be_shorter(fake_llm):
    fake_llm.script(Reply(GOOD[:20], finish_reason="length"), Reply(GOOD))
    answer = backend(fake_llm, max_continuations=0, max_tokens=300).answer(request())
    assert answer.reply.epochs == 20 and answer.stats.reasks == 1
    assert "cut off by the output limit (300 tokens)" in fake_llm.requests[1].messages[-1]["content"]


# ------------------------------------------------------------------ re-ask, then the rules

def test_check_failure_is_reasked_with_the_askers_reason(fake_llm):
    def no_transformers(plan: Plan) -> None:
        if plan.architecture == "transformer":
            raise ValueError("architecture 'transformer' is outside this expert's remit")

    fake_llm.script(Reply(GOOD.replace("mlp", "transformer")), Reply(GOOD))
    answer = backend(fake_llm).answer(request(check=no_transformers))
    assert answer.reply.architecture == "mlp" and answer.stats.reasks == 1
    reask = fake_llm.requests[1].messages[-1]["content"]
    assert "architecture 'transformer' is outside this expert's remit" in reask


def test_invalid_twice_then_the_rules_answer_and_the_record_says_so(fake_llm, tmp_path):
    bad = '{"architecture": "mlp", "epochs": 0, "learning_rate": 0.1}'
    fake_llm.script(Reply("<think>hmm</think> I would use an MLP.", prompt_tokens=100, completion_tokens=10),
                    Reply(bad, prompt_tokens=150, completion_tokens=20))
    llm = stack(fake_llm, tmp_path / "run", max_reasks=1)
    reply = llm.ask(request())

    assert reply == RULES_PLAN  # the run goes on with the rules' answer to this one question
    (record,) = read_calls(tmp_path / "run")
    assert record.reply == RULES_PLAN.model_dump() and record.error is None
    assert record.fallback.error_type == "LLMInvalidReply"
    assert "did not produce a valid Plan for 'plan' after 2 replies" in record.fallback.reason
    assert (record.backend, record.attempts, record.reasks) == ("openai", 2, 1)
    assert (record.prompt_tokens, record.completion_tokens) == (250, 30)
    first, second = record.exchanges
    assert (first.outcome, first.content) == ("rejected", "<think>hmm</think> I would use an MLP.")
    assert "Invalid JSON" in first.problem
    assert (second.outcome, second.content) == ("rejected", bad)
    assert "epochs: Input should be greater than or equal to 1" in second.problem
    # The exact conversation: the system prompt with its schema block, the context, the rejected reply, the re-ask.
    system, user, rejected, reask = record.request.messages
    assert system == {"role": "system", "content": system_prompt(request())}
    assert user["content"] == 'Propose a plan.\n\nContext (JSON):\n{"n_genes":2000}'
    assert rejected == {"role": "assistant", "content": "<think>hmm</think> I would use an MLP."}
    assert reask["role"] == "user" and first.problem in reask["content"]
    assert (first.sent, second.sent) == (2, 4)
    assert first.params == {"temperature": 0.0, "max_tokens": 8192, "response_format": "json_schema"}
    usage = summarize_run(tmp_path / "run")
    assert (usage.fallbacks, usage.rejected_replies, usage.reasks, usage.failed_calls) == (1, 2, 1, 0)


def test_replay_reproduces_a_run_with_a_fallback(fake_llm, tmp_path):
    fake_llm.script(Reply("nope"), Reply("still nope"), Reply(GOOD))
    llm = stack(fake_llm, tmp_path / "run", max_reasks=1)
    original = [llm.ask(request()), llm.ask(request())]
    assert original == [RULES_PLAN, Plan.model_validate_json(GOOD)]
    fake_llm.stop()

    rerun = make_backend(LLMConfig(), {}, tmp_path / "run2", replay_from=tmp_path / "run")
    assert [rerun.ask(request()), rerun.ask(request())] == original  # no rules, no server: from the record
    first, second = read_calls(tmp_path / "run2")
    assert first.fallback == read_calls(tmp_path / "run")[0].fallback and second.fallback is None


def test_token_budget_spent_falls_back_without_another_request(fake_llm, tmp_path):
    fake_llm.script(Reply("nope", prompt_tokens=120, completion_tokens=40), Reply(GOOD))
    llm = stack(fake_llm, tmp_path, token_budget=150)
    assert llm.ask(request()) == RULES_PLAN
    assert len(fake_llm.requests) == 1
    (record,) = read_calls(tmp_path)
    assert record.fallback.error_type == "LLMBudgetSpent" and "160 of 150 tokens" in record.fallback.reason


def test_refused_key_is_not_papered_over_by_the_rules(fake_llm, tmp_path):
    fake_llm.script(Fail(401, "invalid api key"))
    with pytest.raises(LLMUnavailable, match="HTTP 401"):
        stack(fake_llm, tmp_path).ask(request())
    (record,) = read_calls(tmp_path)
    assert record.error_type == "LLMUnavailable" and record.fallback is None


def test_failed_calls_are_counted_with_their_tokens(fake_llm, tmp_path):
    fake_llm.script(Reply("nope", prompt_tokens=100, completion_tokens=7), Fail(500, "down"), Fail(500, "down"),
                    Fail(500, "down"))
    llm = RecordingBackend(backend(fake_llm, max_attempts=3), tmp_path)
    with pytest.raises(LLMUnavailable):
        llm.ask(request())
    (record,) = read_calls(tmp_path)
    assert record.error_type == "LLMUnavailable"
    assert (record.prompt_tokens, record.completion_tokens, record.attempts) == (100, 7, 4)
    assert [e.outcome for e in record.exchanges] == ["rejected", "failed", "failed", "failed"]
    assert all("HTTP 500" in e.problem for e in record.exchanges[1:])

    fake_llm.script(Reply("nope", prompt_tokens=30), Reply("no", prompt_tokens=40))
    with pytest.raises(LLMInvalidReply):
        RecordingBackend(backend(fake_llm, max_reasks=1), tmp_path).ask(request())
    usage = summarize_run(tmp_path)
    assert (usage.calls, usage.failed_calls, usage.prompt_tokens) == (2, 2, 170)


# ------------------------------------------------------------------ configuration

def test_call_limits_come_from_flags_environment_and_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[llm]\nmodel = "m"\ntimeout = 30\nmax_tokens = 1000\ntoken_budget = 5000\n')
    env = {"CELLFORGE_LLM_TIMEOUT": "45", "CELLFORGE_LLM_MAX_REASKS": "4", "CELLFORGE_LLM_MAX_PARALLEL": "2",
           "CELLFORGE_LLM_RESPONSE_FORMAT": "json_object"}
    config = LLMConfig.resolve({"max_tokens": 2000}, env=env, config_path=path)
    assert (config.timeout, config.max_reasks, config.max_parallel, config.response_format) == (
        45.0, 4, 2, "json_object")
    assert (config.max_tokens, config.token_budget) == (2000, 5000)
