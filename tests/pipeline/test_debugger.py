"""The offline debugging agent on real failures: rules, patches, and a fixed run on the second attempt."""

from __future__ import annotations

import json

import pytest

from service.pipeline import Bundle, DebugPatch, FileEdit, PatchError, apply_patch, offline_debug, pipeline_handlers
from service.pipeline.codegen.request import CODEGEN, GeneratedBundle
from service.pipeline import run_design


def _context(config: dict, **failure) -> dict:
    return {"attempt": 1, "failure": {"stage": "train", "outcome": "error", "traceback": [], "output_tail": "",
                                      **failure}, "validation_problems": [], "files": {}, "config": config}


CONFIG = {"lr": 0.5, "grad_clip": None, "batch_size": 128, "hidden_width": 256, "cell_sample": 4000,
          "epochs": 200, "early_stopping_patience": 20, "residual_delta": True, "ridge_lambdas": [0.1, 1.0]}


def test_rules_for_known_failure_classes():
    oom = offline_debug(_context(CONFIG, outcome="died", died_cause="out of memory"))
    assert oom.failure_class == "out_of_memory" and oom.config_changes["batch_size"] == 64
    nan = offline_debug(_context(CONFIG, ename="FloatingPointError", evalue="non-finite training loss at epoch 3"))
    assert nan.failure_class == "divergence" and nan.config_changes == {"lr": 1e-3, "grad_clip": 1.0}
    slow = offline_debug(_context(CONFIG, outcome="timeout"))
    assert slow.failure_class == "timeout" and slow.config_changes["epochs"] == 100
    unknown = offline_debug(_context(CONFIG, ename="KeyError", evalue="'foo'"))
    assert unknown.give_up and "'foo'" in unknown.diagnosis


def test_a_kernel_killed_by_sigkill_is_treated_as_out_of_memory():
    """The sandbox says "out of memory" when the engine flags the OOM kill; without the flag, the kernel
    just exits with -9 (or 137): the same cause for the debugger."""
    for cause in ("python exited with code -9", "signal 9", "exit code 137", "OOMKilled"):
        patch = offline_debug(_context(CONFIG, outcome="died", died_cause=cause))
        assert patch.failure_class == "out_of_memory", cause
    assert offline_debug(_context(CONFIG, outcome="died", died_cause="exit code 1")).failure_class != "out_of_memory"


def test_patches_apply_exactly_or_fail_clearly():
    bundle = Bundle(files={"train.py": "x = 1\ny = 2\n", "model.py": "", "test_model.py": "",
                           "config.json": json.dumps({"lr": 0.1})})
    patched = apply_patch(bundle, DebugPatch(failure_class="code_error", diagnosis="d",
                                             edits=[FileEdit(path="train.py", search="y = 2", replace="y = 3")],
                                             config_changes={"lr": 0.01}))
    assert patched.files["train.py"] == "x = 1\ny = 3\n" and patched.config()["lr"] == 0.01
    with pytest.raises(PatchError, match="occurs 0 times"):
        apply_patch(bundle, DebugPatch(failure_class="c", diagnosis="d",
                                       edits=[FileEdit(path="train.py", search="z = 9", replace="")]))
    with pytest.raises(PatchError, match="no key"):
        apply_patch(bundle, DebugPatch(failure_class="c", diagnosis="d", config_changes={"learning_rate": 1}))


@pytest.mark.slow
def test_injected_divergence_is_fixed_on_the_second_attempt(design_settings, tmp_path):
    def codegen_with_huge_lr(context: dict) -> GeneratedBundle:
        files = dict(context["vetted_bundle"])
        config = json.loads(files["config.json"])
        config["lr"] = 1e9
        files["config.json"] = json.dumps(config, indent=1)
        return GeneratedBundle(files=files)

    handlers = {**pipeline_handlers(), CODEGEN: codegen_with_huge_lr}
    result = run_design(design_settings(tmp_path / "run"), handlers=handlers)
    first = tmp_path / "run" / "attempts" / "01"
    diagnosis = json.loads((first / "diagnosis.json").read_text())
    assert diagnosis["failure_class"] == "divergence"
    assert "non-finite" in json.loads((first / "outcome.json").read_text())["failure"]["output_tail"] + \
        "".join(json.loads((first / "outcome.json").read_text())["failure"]["traceback"])
    assert '"lr": 1e-3' in (first / "patch.diff").read_text() or '"lr": 0.001' in (first / "patch.diff").read_text()
    assert result.status == "validated" and result.metrics["chosen_attempt"] == 2
    second = json.loads((tmp_path / "run" / "search.json").read_text())["nodes"][1]
    assert (second["kind"], second["parent"], second["label"]) == ("debug", 1, "fix: divergence")
    assert json.loads((tmp_path / "run" / "attempts" / "02" / "code" / "config.json").read_text())["lr"] == 1e-3
