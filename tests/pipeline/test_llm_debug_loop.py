"""The debug loop in LLM mode, through the real `openai` client against the scripted server, in Docker:
a generated bundle with three bugs is repaired — a `//` comment in config.json (sent back by the code
generation check), an AttributeError in train.py (the first patch's search text does not match and goes
back to the model with the reason), a loss other than the plan's (the plan check after the run) — and
each debug request carries the earlier attempts and patches; a patch that never applies ends the
debugging, not the run: metrics.json, the report and the CLI say so."""

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
    """The agents' questions as the rules answer them; code with three bugs; each fix on request, the
    first try of each with a mistake a real model makes."""

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
        first_try = len(body["messages"]) == 2
        if schema == "GeneratedBundle":
            config = json.loads(context["vetted_bundle"]["config.json"])
            config["loss"]["kind"] = _other(config["loss"]["kind"])  # bug 3
            text = json.dumps(config, indent=1)
            if first_try and self.patches_apply:  # bug 1: JSON with a comment
                text = "{\n" + COMMENT + text[2:]
            return json.dumps({"edits": [{"path": "train.py", "search": BUG, "replace": BUGGY}],  # bug 2
                               "files": {"config.json": text}})
        assert schema == "DebugPatch", schema
        self.debug_requests.append(body["messages"])
        if not self.patches_apply or first_try and not context["validation_problems"]:
            return json.dumps({"failure_class": "code_error", "diagnosis": "AnnData has var_names",
                               "edits": [{"path": "train.py", "search": "var_name )", "replace": "var_names)"}]})
        if any("loss.kind" in p for p in context["validation_problems"]):
            return json.dumps({"failure_class": "plan_mismatch", "diagnosis": "the loss is not the plan's",
                               "config_changes": {"loss": context["plan"]["loss"]}})
        return json.dumps({"failure_class": "code_error", "diagnosis": "AnnData has var_names",
                           "edits": [{"path": "train.py", "search": BUGGY, "replace": BUG}]})


@pytest.mark.slow
@pytest.mark.timeout(600)  # three sandbox runs, two of them full trainings
def test_a_three_bug_bundle_is_repaired_with_the_history_in_every_request(fake_llm, design_settings, tmp_path):
    model = BuggyCoder()
    fake_llm.script(*[Reply(model) for _ in range(80)])
    config = LLMConfig(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x")
    result = run_design(design_settings(tmp_path / "run", max_attempts=4, max_minutes=20), config)
    run = tmp_path / "run"

    assert result.status == "validated" and result.metrics["chosen_attempt"] == 3
    nodes = json.loads((run / "search.json").read_text())["nodes"]
    assert [n["label"] for n in nodes] == ["discussion plan", "fix: code_error", "fix: plan_mismatch"]
    assert "AttributeError" in nodes[0]["failure"]
    assert "loss.kind" in nodes[1]["failure"] and nodes[1]["val"]["problems"]  # ran, then failed the plan check

    # Bug 1: the code generation check sent the config.json back; bug 2: the first patch's search text
    # was not in train.py. Each time the model was told why.
    calls = read_calls(run / "llm_calls.jsonl")
    codegen = next(c for c in calls if c.kind == "codegen")
    assert [e.outcome for e in codegen.exchanges] == ["rejected", "accepted"]
    assert "config.json is not valid JSON (line 2" in codegen.exchanges[0].problem
    debug = next(c for c in calls if c.kind == "debug")
    assert [e.outcome for e in debug.exchanges] == ["rejected", "accepted"]
    assert "train.py: the search text occurs 0 times" in model.debug_requests[1][-1]["content"]

    # Each request carries the attempts before it, with their patches.
    contexts = [json.loads(m[1]["content"].split("Context (JSON):\n", 1)[1]) for m in model.debug_requests]
    assert contexts[0]["history"] == [{"attempt": 1, "kind": "draft", "label": "discussion plan",
                                       "failure": nodes[0]["failure"]}]
    history = contexts[-1]["history"]
    assert [h["attempt"] for h in history] == [1, 2]
    assert history[0]["patch"]["failure_class"] == "code_error" and history[0]["patch"]["applied"]
    assert "patch" not in history[1]

    # What ran is what the plan says, and the report shows it (the chosen attempt's code: the delivered code
    # is a baseline's when a baseline wins validation).
    plan = json.loads((run / "plan.json").read_text())
    code = json.loads((run / "attempts" / "03" / "code" / "config.json").read_text())
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
