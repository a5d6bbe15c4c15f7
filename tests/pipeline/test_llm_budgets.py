"""LLM time has its own budget: a run-wide LLM time budget after which the offline rules answer, and the
sandboxes' clock does not count it; the CLI's LLM flags reach the config, and `design --server` refuses
them instead of ignoring them."""

from __future__ import annotations

import json
import time

from pydantic import BaseModel
from typer.testing import CliRunner

from fake_llm_server import Reply

from service.cli import app
from service.llm import LLMConfig, LLMRequest, make_backend, read_calls


class Answer(BaseModel):
    value: int


def _question(n: int) -> LLMRequest[Answer]:
    return LLMRequest(kind="count", system="Count.", user=f"question {n}", context={"n": n}, schema=Answer)


def test_the_runs_llm_time_budget_hands_the_rest_to_the_rules(fake_llm, tmp_path):
    fake_llm.script(Reply('{"value": 1}', delay=0.4), Reply('{"value": 2}'))
    config = LLMConfig(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x",
                       total_minutes=0.3 / 60)
    llm = make_backend(config, {"count": lambda context: Answer(value=-context["n"])}, tmp_path)
    assert llm.ask(_question(1)).value == 1  # the first call may take the whole budget
    assert llm.ask(_question(2)).value == -2  # the budget is spent: the rules answer, no request is sent
    assert len(fake_llm.requests) == 1
    second = read_calls(tmp_path / "llm_calls.jsonl")[1]
    assert second.fallback is not None and second.fallback.error_type == "LLMBudgetSpent"
    assert "LLM time budget (0.3s) is spent" in second.fallback.reason


def test_design_passes_the_llm_limits_to_the_config(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("service.cli.design_cmd._run", lambda settings, config, replay, json_out:
                        seen.update(config=config, settings=settings))
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["design", "--data", str(tmp_path / "d.h5ad"), "--task", "t",
                                      "--llm", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                      "--max-llm-minutes", "7.5", "--llm-timeout", "33", "--llm-attempts", "2",
                                      "--max-tokens", "1024", "--token-budget", "50000", "--max-minutes", "9"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.total_minutes, config.timeout, config.max_attempts, config.max_tokens, config.token_budget) == \
        (7.5, 33.0, 2, 1024, 50000)
    assert seen["settings"].max_minutes == 9


def test_design_on_a_server_refuses_llm_flags_it_cannot_forward(tmp_path):
    result = CliRunner().invoke(app, ["design", "--data", str(tmp_path / "d.h5ad"), "--task", "t", "--server",
                                      "http://127.0.0.1:9", "--api-key", "k", "--llm", "openai", "--model", "m",
                                      "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is False and summary["message"].startswith("--llm, --model: a server runs its jobs with "
                                                                    "its own LLM configuration")


def test_the_sandboxes_clock_does_not_count_the_llms_time(fake_llm, tmp_path):
    from types import SimpleNamespace

    from service.pipeline.run import Search

    fake_llm.script(Reply('{"value": 3}', delay=0.5))
    llm = make_backend(LLMConfig(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x"),
                       {}, tmp_path)
    runner = SimpleNamespace(deadline=1000.0, clock=time.monotonic)  # the search's deadline, on its clock
    search = Search(runner, llm, None, "mse", "unseen-perturbation", {}, None)  # type: ignore[arg-type]
    assert search._ask(_question(1)).value == 3
    assert 1000.5 <= runner.deadline < 1002.0  # the half second the endpoint took is given back
