"""Patches that land: a patch that does not apply goes back to the model with the reason (a whole-file
replacement as the way out), the service's contract tests cannot be patched, an invalid config.json
is a problem to debug (not a crash), tool output reaches the debugger without terminal escape codes,
and code generation is answered with edits of the vetted bundle. Against the scripted server."""

from __future__ import annotations

import json

import pytest

from fake_llm_server import Reply

from sandbox.events import ExecutionResult, Outcome
from service.llm import LLMConfig, LLMInvalidReply, make_backend, read_calls
from service.pipeline import Bundle, DebugPatch, FileEdit, PatchError, apply_patch, offline_debug, pipeline_handlers
from service.pipeline.codegen import CONTRACT_TESTS, EXTRA_TESTS, CodegenError
from service.pipeline.codegen.request import codegen_request
from service.pipeline.debugger import debug_context, debug_request
from service.pipeline.execute import StepFailure, _failure, _test_runs

TRAIN = "import json\n\ndef main(config):\n    genes = list(cells.var_name)\n    return genes\n"
BUNDLE = Bundle(files={"train.py": TRAIN, "model.py": "WIDTH = 4\n", CONTRACT_TESTS: "def test_contract():\n    pass\n",
                       "config.json": json.dumps({"lr": 0.1, "epochs": 10})})
FAILURE = StepFailure(stage="train", outcome="error", ename="AttributeError",
                      evalue="'AnnData' object has no attribute 'var_name'",
                      traceback=['File "train.py", line 4, in main'], output_tail="")


def _patch(**edit) -> str:
    return json.dumps({"failure_class": "code_error", "diagnosis": "var_name is var_names", "edits": [edit]})


def _backend(fake_llm, tmp_path, **config):
    values = dict(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x", max_attempts=1)
    return make_backend(LLMConfig(**{**values, **config}), pipeline_handlers(), tmp_path)


def test_a_patch_that_does_not_apply_goes_back_to_the_model_with_the_reason(fake_llm, tmp_path):
    # What real models do: the search text retyped from memory (here without the indentation).
    fake_llm.script(Reply(_patch(path="train.py", search="genes = list(cells.var_name )", replace="x")),
                    Reply(_patch(path="train.py", search="    genes = list(cells.var_name)",
                                 replace="    genes = list(cells.var_names)")))
    llm = _backend(fake_llm, tmp_path)
    patch = llm.ask(debug_request(debug_context(1, FAILURE, [], BUNDLE), BUNDLE))
    assert "cells.var_names" in apply_patch(BUNDLE, patch).files["train.py"]
    reask = fake_llm.requests[1].messages[-1]["content"]
    assert "train.py: the search text occurs 0 times" in reask
    assert "the closest line in train.py is 'genes = list(cells.var_name)'" in reask
    assert "whole file as `content`" in reask
    call = read_calls(tmp_path / "llm_calls.jsonl")[0]
    assert [e.outcome for e in call.exchanges] == ["rejected", "accepted"] and call.fallback is None


def test_the_whole_file_is_the_way_out_when_search_text_keeps_missing(fake_llm, tmp_path):
    fixed = TRAIN.replace("var_name)", "var_names)")
    fake_llm.script(Reply(_patch(path="train.py", search="var_name )", replace="x")),
                    Reply(_patch(path="train.py", content=fixed)))
    patch = _backend(fake_llm, tmp_path).ask(debug_request(debug_context(1, FAILURE, [], BUNDLE), BUNDLE))
    assert apply_patch(BUNDLE, patch).files["train.py"] == fixed


def test_a_patch_still_not_applying_after_the_reasks_is_an_invalid_reply_not_a_sandbox_run(fake_llm, tmp_path):
    bad = Reply(_patch(path="train.py", search="nothing like it", replace="x"))
    fake_llm.script(bad, bad)
    llm = _backend(fake_llm, tmp_path, max_reasks=1, fallback=False)
    with pytest.raises(LLMInvalidReply, match="occurs 0 times"):
        llm.ask(debug_request(debug_context(1, FAILURE, [], BUNDLE), BUNDLE))


def test_the_contract_tests_cannot_be_edited_or_removed_but_tests_may_be_added():
    for edit in (FileEdit(path=CONTRACT_TESTS, content=""),
                 FileEdit(path=CONTRACT_TESTS, search="pass", replace="return")):
        with pytest.raises(PatchError, match="contract tests and cannot be edited"):
            apply_patch(BUNDLE, DebugPatch(failure_class="c", diagnosis="d", edits=[edit]))
    added = apply_patch(BUNDLE, DebugPatch(failure_class="c", diagnosis="d", edits=[
        FileEdit(path=EXTRA_TESTS, content="def test_mine():\n    assert 1\n")]))
    assert added.files[CONTRACT_TESTS] == BUNDLE.files[CONTRACT_TESTS] and EXTRA_TESTS in added.files
    with pytest.raises(PatchError, match="does not exist yet"):
        apply_patch(BUNDLE, DebugPatch(failure_class="c", diagnosis="d", edits=[
            FileEdit(path=EXTRA_TESTS, search="a", replace="b")]))


def test_the_contract_tests_run_alone_before_the_models_own(tmp_path):
    (tmp_path / CONTRACT_TESTS).write_text("")
    assert [c[-1] for c in _test_runs(tmp_path)] == [CONTRACT_TESTS]
    (tmp_path / EXTRA_TESTS).write_text("")
    runs = _test_runs(tmp_path)
    assert [c[-1] for c in runs] == [CONTRACT_TESTS, EXTRA_TESTS] and all("--color=no" in c for c in runs)


def test_an_invalid_config_json_is_a_problem_to_debug_not_a_crash():
    broken = Bundle(files={**BUNDLE.files, "config.json": '{\n  // learning rate\n  "lr": 0.1\n}\n'})
    with pytest.raises(CodegenError, match="not valid JSON"):
        broken.config()
    context = debug_context(1, FAILURE, [], broken)
    assert context["config"] is None and "line 2" in context["config_error"]
    assert context["files"]["config.json"] == broken.files["config.json"]  # the model sees the text to fix
    ruled = offline_debug(context)
    assert ruled.give_up and "not valid JSON" in ruled.diagnosis
    with pytest.raises(PatchError, match="not valid JSON.*replace config.json whole"):
        apply_patch(broken, DebugPatch(failure_class="c", diagnosis="d", config_changes={"lr": 0.01}))
    fixed = apply_patch(broken, DebugPatch(failure_class="config_error", diagnosis="JSON has no comments",
                                           edits=[FileEdit(path="config.json", content='{"lr": 0.1}')]))
    assert fixed.config() == {"lr": 0.1}


def test_tool_output_reaches_the_debugger_without_escape_codes():
    coloured = "\x1b[31mE   AttributeError: 'AnnData' object has no attribute 'var_name'\x1b[0m\n\x1b[1m1 failed\x1b[0m"
    res = ExecutionResult(outcome=Outcome.ERROR, stdout=coloured, ename="AttributeError",
                          evalue="\x1b[31mno var_name\x1b[0m", traceback=["\x1b[0;31mAttributeError\x1b[0m: no"])
    failure = _failure("pytest", res)
    assert "\x1b" not in failure.output_tail + failure.evalue + "".join(failure.traceback)
    assert "E   AttributeError: 'AnnData' object has no attribute 'var_name'\n1 failed" in failure.output_tail
    assert failure.traceback == ["AttributeError: no"]


def test_code_generation_answers_with_edits_of_the_vetted_bundle_and_is_reasked_when_they_miss(fake_llm, tmp_path,
                                                                                             knockout_plan):
    vetted = Bundle(files={**BUNDLE.files, "train.py": TRAIN.replace("var_name)", "var_names)")})
    fake_llm.script(
        Reply(json.dumps({"edits": [{"path": "model.py", "search": "WIDTH = 8", "replace": "WIDTH = 16"}]})),
        Reply(json.dumps({"files": {"config.json": '{"lr": 0.1, // faster\n "epochs": 10}'}})),
        Reply(json.dumps({"edits": [{"path": "model.py", "search": "WIDTH = 4", "replace": "WIDTH = 16"}],
                          "files": {EXTRA_TESTS: "def test_width():\n    assert True\n"}})))
    generated = _backend(fake_llm, tmp_path, max_reasks=2).ask(codegen_request(knockout_plan, vetted))
    bundle = generated.applied(vetted)
    assert bundle.files["model.py"] == "WIDTH = 16\n" and EXTRA_TESTS in bundle.files
    assert {n: bundle.files[n] for n in vetted.files if n != "model.py"} == \
        {n: t for n, t in vetted.files.items() if n != "model.py"}  # what the model did not name is the vetted file
    assert "model.py: the search text occurs 0 times" in fake_llm.requests[1].messages[-1]["content"]
    assert "config.json is not valid JSON" in fake_llm.requests[2].messages[-1]["content"]


def test_a_failed_command_is_summarised_by_the_exception_its_output_names():
    from service.pipeline.execute import StepFailure

    output = "collected 4 items\nE   AttributeError: 'AnnData' object has no attribute 'var_name'\n1 failed in 2s"
    failure = StepFailure(stage="pytest", outcome="error", ename="CommandFailed",
                          evalue="python exited with code 1", output_tail=output)
    assert failure.summary() == ("pytest failed (error): CommandFailed: python exited with code 1 — "
                                 "AttributeError: 'AnnData' object has no attribute 'var_name'")
    quiet = StepFailure(stage="pytest", outcome="error", ename="CommandFailed", evalue="python exited with code 1",
                        output_tail="1 failed in 2s")
    assert quiet.summary() == "pytest failed (error): CommandFailed: python exited with code 1"
