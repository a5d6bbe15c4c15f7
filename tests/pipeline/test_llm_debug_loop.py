"""The debug loop in LLM mode, through the real `openai` client against the scripted server, in Docker:
a generated bundle with three bugs (a `//` comment in config.json, an AttributeError in train.py, a loss
other than the plan's) is repaired attempt by attempt, a patch whose search text does not match goes
back to the model with the reason, each debug request carries the earlier attempts and patches; and a
patch that never applies ends the debugging, not the run: metrics.json, the report and the CLI say so."""

from __future__ import annotations

import json
import re

import pytest
import typer

from fake_llm_server import Reply

from scripted_experts import KIND_OF_SCHEMA, RuleModel
from service.cli.design_cmd import _finish
from service.llm import LLMConfig, read_calls
from service.pipeline import run_design

BUG = "genes = list(train_cells.var_names)"
BUGGY = "genes = list(train_cells.var_name)"
COMMENT = "// written by the model\n"


def _other(kind: str) -> str:
    return "mse" if kind == "mse_pearson_delta" else "mse_pearson_delta"


class BuggyCoder(RuleModel):
    """The agents' questions as the rules answer them; code with three bugs; fixes, one per attempt, the
    first one with search text that does not match."""

    def __init__(self, patches_apply: bool = True) -> None:
        super().__init__()
        self.patches_apply = patches_apply
        self.debug_requests: list[list[dict]] = []

    def __call__(self, body: dict) -> str:
        system = body["messages"][0]["content"]
        schema = re.search(r"JSON schema \((\w+)\)", system).group(1)
        if schema in KIND_OF_SCHEMA:
            return super().__call__(body)
        context = json.loads(body["messages"][1]["content"].split("Context (JSON):\n", 1)[1])
        if schema == "GeneratedBundle":
            files = dict(context["vetted_bundle"])
            files["train.py"] = files["train.py"].replace(BUG, BUGGY)
            config = json.loads(files["config.json"])
            config["loss"]["kind"] = _other(config["loss"]["kind"])
            files["config.json"] = "{\n" + COMMENT + json.dumps(config, indent=1)[2:]
            return json.dumps({"files": files})
        assert schema == "DebugPatch", schema
        self.debug_requests.append(body["messages"])
        if not self.patches_apply:
            return json.dumps({"failure_class": "code_error", "diagnosis": "guessing",
                               "edits": [{"path": "train.py", "search": "var_name )", "replace": "var_names)"}]})
        if context["config"] is None:  # bug 1: config.json is not JSON
            text = context["files"]["config.json"]
            if len(body["messages"]) == 2:  # first try: the comment retyped from memory
                return json.dumps({"failure_class": "config_error", "diagnosis": "JSON has no comments",
                                   "edits": [{"path": "config.json", "search": "# written by the model\n",
                                              "replace": ""}]})
            return json.dumps({"failure_class": "config_error", "diagnosis": "JSON has no comments",
                               "edits": [{"path": "config.json", "content": text.replace(COMMENT, "")}]})
        if any("loss.kind" in p for p in context["validation_problems"]):  # bug 3: not the plan's loss
            return json.dumps({"failure_class": "plan_mismatch", "diagnosis": "the loss is not the plan's",
                               "config_changes": {"loss": context["plan"]["loss"]}})
        return json.dumps({"failure_class": "code_error", "diagnosis": "AnnData has var_names",  # bug 2
                           "edits": [{"path": "train.py", "search": BUGGY, "replace": BUG}]})


@pytest.mark.slow
def test_a_three_bug_bundle_is_repaired_with_the_history_in_every_request(fake_llm, design_settings, tmp_path):
    model = BuggyCoder()
    fake_llm.script(*[Reply(model) for _ in range(80)])
    config = LLMConfig(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x")
    result = run_design(design_settings(tmp_path / "run", max_attempts=5, max_minutes=12), config)
    run = tmp_path / "run"

    assert result.status == "validated" and result.metrics["chosen_attempt"] == 4
    nodes = json.loads((run / "search.json").read_text())["nodes"]
    assert [n["label"] for n in nodes] == ["draft", "fix: config_error", "fix: code_error", "fix: plan_mismatch"]
    assert "JSONDecodeError" in json.loads((run / "attempts" / "01" / "outcome.json").read_text())["failure"][
        "output_tail"]
    assert "loss.kind" in nodes[2]["failure"] and nodes[2]["val"]["problems"]  # ran, then failed the plan check

    # Bug 1 took a re-ask: the first patch's search text was not in config.json; the model was told why.
    first, reask = model.debug_requests[0], model.debug_requests[1]
    assert len(first) == 2 and "config.json: the search text occurs 0 times" in reask[-1]["content"]
    call = [c for c in read_calls(run / "llm_calls.jsonl") if c.kind == "debug"][0]
    assert [e.outcome for e in call.exchanges] == ["rejected", "accepted"]

    # Each request carries the attempts before it, with their patches.
    contexts = [json.loads(m[1]["content"].split("Context (JSON):\n", 1)[1]) for m in model.debug_requests]
    history = contexts[-1]["history"]
    assert [h["attempt"] for h in history] == [1, 2, 3]
    assert [h["patch"]["failure_class"] for h in history[:2]] == ["config_error", "code_error"]
    assert all(h["patch"]["applied"] for h in history[:2]) and "patch" not in history[2]

    # What ran is what the plan says, and the report shows it.
    plan = json.loads((run / "plan.json").read_text())
    code = json.loads((run / "code" / "config.json").read_text())
    assert code["loss"]["kind"] == plan["loss"]["kind"]
    report = (run / "report.html").read_text()
    assert "What ran" in report and f"<td>loss.kind</td><td>{plan['loss']['kind']}</td><td>" \
                                   f"{plan['loss']['kind']}</td>" in report


@pytest.mark.slow
def test_a_patch_that_never_applies_ends_the_debugging_not_the_run(fake_llm, design_settings, tmp_path, capsys):
    model = BuggyCoder(patches_apply=False)
    fake_llm.script(*[Reply(model) for _ in range(60)])
    config = LLMConfig(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x",
                       max_reasks=1, fallback=False)
    events = []
    result = run_design(design_settings(tmp_path / "run", max_attempts=3), config, on_progress=events.append)
    run = tmp_path / "run"

    assert result.status == "failed" and len(model.debug_requests) == 2  # asked, re-asked, then stopped
    node = json.loads((run / "search.json").read_text())["nodes"][0]
    assert node["patch_error"].startswith("patch did not apply: ") and "occurs 0 times" in node["patch_error"]
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    assert "patch did not apply" in (run / "report.html").read_text()
    assert any(e.phase == "debug" and e.message.startswith("patch did not apply") for e in events)
    with pytest.raises(typer.Exit):  # the run failed: exit status 1
        _finish(result, json_out=False)
    assert "attempt 1: patch did not apply" in capsys.readouterr().out
