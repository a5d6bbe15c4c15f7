"""LLM mode through the real `openai` client against the scripted OpenAI-compatible server: the first code
reply carries a real bug, the debugging request carries its traceback, the server's fix validates the run;
the improve step shows the model the code, the validation table and the history and runs its typed change;
429 and 500 answers are retried; the key never reaches the run directory."""

from __future__ import annotations

import json
import re

import pytest

from fake_llm_server import Fail, Reply

from service.agents import handlers
from service.agents.llm_kinds import CRITIC_SCORES, EXPERT_CRITIQUE, EXPERT_PROPOSAL, TASK_ANALYSIS
from service.llm import LLMConfig, read_calls
from service.pipeline import run_design

KEY = "sk-test-secret-4f9c2d"
BUG = "genes = list(train_cells.var_names)"
BUGGY = "genes = list(train_cells.var_name)"  # AttributeError: AnnData has no attribute var_name
_KINDS = {"TaskAnalysis": TASK_ANALYSIS, "ExpertProposal": EXPERT_PROPOSAL, "Critique": EXPERT_CRITIQUE,
          "CriticScores": CRITIC_SCORES}


class ScriptedModel:
    """Answers like a model reading the chat: the agents' questions with the rule-based experts' replies,
    the code request with the vetted bundle plus one real bug, the debug request with the fix."""

    def __init__(self) -> None:
        self.rules = handlers()
        self.debug_prompts: list[str] = []
        self.improve_contexts: list[dict] = []

    def __call__(self, body: dict) -> str:
        schema = re.search(r"JSON schema \((\w+)\)", body["messages"][0]["content"]).group(1)
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        context = json.loads(user.split("Context (JSON):\n", 1)[1])
        if schema == "GeneratedBundle":
            files = dict(context["vetted_bundle"])
            assert BUG in files["train.py"]
            files["train.py"] = files["train.py"].replace(BUG, BUGGY)
            return json.dumps({"files": files})
        if schema == "Change":
            self.improve_contexts.append(context)
            return json.dumps({"label": "halve the learning rate", "rationale": "the stopping loss rose early",
                               "config_changes": {"lr": context["config"]["lr"] / 2}})
        if schema == "DebugPatch":
            self.debug_prompts.append(user)
            return json.dumps({"failure_class": "code_error",
                               "diagnosis": "AnnData has no attribute var_name; it is var_names",
                               "edits": [{"path": "train.py", "search": BUGGY, "replace": BUG}]})
        return json.dumps(self.rules[_KINDS[schema]](context).model_dump(mode="json"))


@pytest.mark.slow
def test_llm_mode_debugs_a_real_bug_and_retries_server_errors(fake_llm, design_settings, tmp_path):
    model = ScriptedModel()
    fake_llm.script(Fail(429, retry_after="0"), *[Reply(model) for _ in range(20)], Fail(500),
                    *[Reply(model) for _ in range(60)])
    config = LLMConfig(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key=KEY)
    result = run_design(design_settings(tmp_path / "run", max_nodes=1, max_minutes=15), config)

    # The first attempt failed on the bug; the debug request carried its traceback and the failing file.
    first = tmp_path / "run" / "attempts" / "01"
    failure = json.loads((first / "outcome.json").read_text())["failure"]
    assert "AttributeError" in failure["output_tail"] + "".join(failure["traceback"])
    assert len(model.debug_prompts) == 1
    prompt = model.debug_prompts[0]
    assert "AttributeError" in prompt and "var_name" in prompt and '"train.py"' in prompt
    diff = (first / "patch.diff").read_text().splitlines()
    assert any(line.startswith("-") and BUGGY in line for line in diff)
    assert any(line.startswith("+") and BUG in line for line in diff)

    # The fix validated the run on the second attempt.
    assert result.status == "validated"
    assert BUG in (tmp_path / "run" / "attempts" / "02" / "code" / "train.py").read_text()

    # The improve step: the model saw the fixed code, the validation table and the history; its change ran.
    assert len(model.improve_contexts) == 1
    seen = model.improve_contexts[0]
    assert seen["parent"] == 2 and BUG in seen["files"]["train.py"]
    assert seen["validation"]["primary_metric"] in seen["validation"]["model"]
    assert "mean_delta" in seen["validation"]["baselines"] and "beaten_by" in seen["validation"]
    assert [h["kind"] for h in seen["history"]] == ["draft", "debug"]
    third = json.loads((tmp_path / "run" / "search.json").read_text())["nodes"][2]
    assert (third["kind"], third["parent"], third["label"]) == ("improve", 2, "halve the learning rate")
    config = json.loads((tmp_path / "run" / "attempts" / "03" / "code" / "config.json").read_text())
    assert config["lr"] == seen["config"]["lr"] / 2 and third["status"] in ("kept", "discarded")

    # 429 and 500 were retried inside the calls that met them.
    calls = read_calls(tmp_path / "run" / "llm_calls.jsonl")
    assert sum(c.attempts - 1 for c in calls) >= 2 and all(c.error is None for c in calls)
    assert {c.kind for c in calls} >= {"codegen", "debug", "task_analysis", "improve"}

    # The key went to the endpoint only: never into the run directory.
    assert fake_llm.requests[0].headers["authorization"] == f"Bearer {KEY}"
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".html", ".log", ".py", ".diff", ".txt"):
            assert KEY not in path.read_text(errors="ignore"), path
