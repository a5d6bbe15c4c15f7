"""The debugging agent: a failed attempt (traceback, pytest failure, validation failure) → a diagnosis
and a patch to the bundle.

LLM mode: the request carries the failure (traceback, output tail, validation problems), the failing
file(s) and config.json; the reply is a `DebugPatch` of minimal search/replace edits (or whole-file
replacements) and config changes. Offline mode: rules for known failure classes, as config patches.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, model_validator

from service.llm import LLMRequest
from service.pipeline.codegen import BUNDLE_FILES, CONTRACT_TESTS, EXTRA_TESTS, Bundle
from service.pipeline.codegen.manifest import read_config
from service.pipeline.execute import StepFailure
from service.errors import CellForgeError

DEBUG = "debug"
BundleFile = Literal["config.py", "data.py", "components.py", "state.py", "model.py", "train.py", "test_model.py",
                     "test_extra.py", "config.json"]
if set(get_args(BundleFile)) != {*BUNDLE_FILES, EXTRA_TESTS}:  # the Literal spells the names out for the JSON schema
    raise RuntimeError("debugger.BundleFile and codegen.BUNDLE_FILES disagree")
MAX_HISTORY = 8  # earlier attempts shown to the debugger (most recent)


class PatchError(CellForgeError, ValueError):
    """A patch does not apply to the bundle (search text absent or ambiguous, unknown config key, the
    service's contract tests edited)."""


class FileEdit(BaseModel):
    path: BundleFile
    search: str | None = Field(default=None, description="exact text to replace (must occur exactly once)")
    replace: str | None = Field(default=None, description="replacement for `search`")
    content: str | None = Field(default=None, description="the whole new file, instead of search/replace")

    @model_validator(mode="after")
    def _one_form(self) -> FileEdit:
        if (self.content is None) == (self.search is None):
            raise ValueError("an edit gives either `content` or `search` + `replace`")
        if self.search is not None and self.replace is None:
            raise ValueError("`search` needs `replace`")
        return self


class DebugPatch(BaseModel):
    failure_class: str = Field(min_length=1, description="e.g. out_of_memory, divergence, timeout, code_error")
    diagnosis: str = Field(min_length=1)
    edits: list[FileEdit] = Field(default_factory=list)
    config_changes: dict[str, Any] = Field(default_factory=dict, description="top-level config.json keys")
    give_up: bool = Field(default=False, description="true when no fix is known; the run stops")


def failing_files(failure: StepFailure, bundle: Bundle) -> list[str]:
    """Bundle files the traceback or output names; train.py and model.py when none is named."""
    text = "\n".join(failure.traceback) + "\n" + failure.output_tail
    named = [name for name in (*BUNDLE_FILES, EXTRA_TESTS) if name != "config.json" and name in text
             and name in bundle.files]
    return named or ["train.py", "model.py"]


def debug_context(attempt: int, failure: StepFailure | None, problems: list[str], bundle: Bundle,
                  history: list[dict[str, Any]] | None = None, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the debugger reads: the failure, the failing files, config.json (its text instead when it is
    not valid JSON) and the earlier attempts on this draft with their patches and outcomes."""
    files = failing_files(failure, bundle) if failure else ["train.py", "model.py"]
    config, config_error = read_config(bundle.files)
    shown = {name: bundle.files[name] for name in files}
    if config is None and "config.json" in bundle.files:
        shown["config.json"] = bundle.files["config.json"]
    return {
        "attempt": attempt,
        "failure": None if failure is None else {
            "stage": failure.stage, "outcome": failure.outcome, "ename": failure.ename, "evalue": failure.evalue,
            "traceback": failure.traceback, "died_cause": failure.died_cause, "output_tail": failure.output_tail,
        },
        "validation_problems": problems,
        "files": shown,
        "config": config,
        "config_error": config_error,
        "history": (history or [])[-MAX_HISTORY:],
        **({"plan": plan} if plan is not None else {}),
    }


def debug_request(context: dict[str, Any], bundle: Bundle) -> LLMRequest[DebugPatch]:
    """The debugging question. Its check applies the patch to `bundle`: a patch that does not apply goes
    back to the model with the reason (re-asked), not to the sandbox."""
    system = (
        "You are CellForge's debugging agent. A generated training bundle failed: read the traceback, the "
        "test failures or the validation problems in context, find the cause in the failing files and reply "
        "with the smallest patch that fixes it: search/replace edits (the search text copied exactly from "
        "context.files, occurring once) or a whole file as `content`, and/or config.json changes. "
        "context.history lists the earlier attempts on this draft, their diagnoses and patches: do not repeat "
        f"one that failed. {CONTRACT_TESTS} holds the service's contract tests and cannot be changed; add "
        f"tests in {EXTRA_TESTS}. config.json's `implements` block declares the plan fields the code "
        "implements and must keep matching context.plan. Set give_up only when no fix is possible."
    )
    user = f"Attempt {context['attempt']} failed. Diagnose it and patch the bundle."

    def applies(patch: DebugPatch) -> None:
        if not patch.give_up:
            apply_patch(bundle, patch)

    return LLMRequest(kind=DEBUG, system=system, user=user, context=context, schema=DebugPatch, check=applies)


# --- offline rules --------------------------------------------------------------------------------

# The sandbox reports an OOM kill as "out of memory" (the engine's OOMKilled); a kernel killed by SIGKILL
# without that flag ("exited with code -9", "signal 9", exit 137) is almost always the memory limit too.
OUT_OF_MEMORY = re.compile(r"out of memory|\bOOM|MemoryError|exit code 137|code -9\b|signal 9\b|Killed|std::bad_alloc",
                           re.I)
_DIVERGED = re.compile(r"non-finite|\bnan\b|\binf\b|FloatingPointError|diverged", re.I)
_DEVICE = re.compile(r"Expected all tensors to be on the same device|CUDA error|no CUDA GPUs", re.I)
_DTYPE = re.compile(r"expected scalar type|dtype", re.I)


def _text(context: dict[str, Any]) -> str:
    failure = context.get("failure") or {}
    parts = [str(failure.get(k) or "") for k in ("ename", "evalue", "died_cause", "output_tail")]
    return "\n".join(parts + list(failure.get("traceback") or []) + list(context.get("validation_problems") or []))


def offline_debug(context: dict[str, Any]) -> DebugPatch:
    """Known failure classes → config patches; anything else is reported, not guessed at."""
    config = context["config"]
    if config is None:  # no rule rewrites a file; the model's patch (or a human) must
        return DebugPatch(failure_class="config_error", diagnosis=str(context.get("config_error")), give_up=True)
    try:
        return _rules(context, config)
    except (KeyError, TypeError, ValueError) as exc:  # a model's own config.json, without the template's keys
        return DebugPatch(failure_class="unknown", diagnosis=f"the rules cannot read config.json: {exc!r}",
                          give_up=True)


def _rules(context: dict[str, Any], config: dict[str, Any]) -> DebugPatch:
    failure = context.get("failure") or {}
    text = _text(context)
    if failure.get("outcome") == "timeout":
        epochs = max(5, int(config["epochs"]) // 2)
        patience = max(3, int(config["early_stopping_patience"]) // 2)
        return DebugPatch(failure_class="timeout", diagnosis=f"{failure.get('stage')} ran out of time; halving "
                          f"epochs to {epochs} and stopping earlier",
                          config_changes={"epochs": epochs,
                                          "early_stopping_patience": patience})
    if OUT_OF_MEMORY.search(text):
        changes = {"batch_size": max(8, int(config["batch_size"]) // 2),
                   "hidden_width": max(16, int(config["hidden_width"]) // 2),
                   "cell_sample": max(400, int(config["cell_sample"]) // 2)}
        cause = failure.get("died_cause") or failure.get("ename")
        return DebugPatch(failure_class="out_of_memory", diagnosis=f"out of memory ({cause}); smaller batch, "
                          "width and cell sample", config_changes=changes)
    if _DIVERGED.search(text):
        lr = min(float(config["lr"]) * 0.1, 1e-3)
        return DebugPatch(failure_class="divergence", diagnosis=f"training diverged (non-finite loss) at "
                          f"lr={config['lr']}; lowering lr to {lr:g} and clipping gradients at 1.0",
                          config_changes={"lr": lr, "grad_clip": 1.0})
    if _DEVICE.search(text):
        return DebugPatch(failure_class="device", diagnosis="a device error; pinning the run to the CPU",
                          config_changes={"device": "cpu"})
    problems = context.get("validation_problems") or []
    if _DTYPE.search(text):
        return DebugPatch(failure_class="dtype",
                          diagnosis=f"a dtype error with no known config fix: {failure.get('evalue')}",
                          give_up=True)
    what = failure.get("evalue") or (problems[0] if problems else "unknown failure")
    return DebugPatch(failure_class="unknown", diagnosis=f"no rule matches: {what}", give_up=True)


def _not_found(name: str, text: str, search: str, count: int) -> str:
    hint = ""
    if count == 0:
        first = next((line.strip() for line in search.splitlines() if line.strip()), "")
        close = difflib.get_close_matches(first, [line.strip() for line in text.splitlines()], n=1, cutoff=0.6)
        if close:
            hint = f"; the closest line in {name} is {close[0]!r}"
    return (f"{name}: the search text occurs {count} times (expected exactly once): {search[:120]!r}{hint}. "
            f"Copy the search text exactly from context.files (whitespace included), or give the whole file "
            f"as `content` instead")


def apply_patch(bundle: Bundle, patch: DebugPatch) -> Bundle:
    """The bundle after `patch`; `PatchError` saying why when any part of it does not apply."""
    files = dict(bundle.files)
    for edit in patch.edits:
        if edit.path == CONTRACT_TESTS:
            raise PatchError(f"{CONTRACT_TESTS} holds the service's contract tests and cannot be edited or "
                             f"removed; fix the code they test, or add tests in {EXTRA_TESTS}")
        if edit.content is not None:
            files[edit.path] = edit.content
            continue
        assert edit.search is not None and edit.replace is not None  # FileEdit's validator
        if edit.path not in files:
            raise PatchError(f"{edit.path} does not exist yet: give its whole text as `content`")
        count = files[edit.path].count(edit.search)
        if count != 1:
            raise PatchError(_not_found(edit.path, files[edit.path], edit.search, count))
        files[edit.path] = files[edit.path].replace(edit.search, edit.replace)
    if patch.config_changes:
        config, why = read_config(files)
        if config is None:
            raise PatchError(f"{why}: replace config.json whole with an edit giving `content`")
        unknown = [k for k in patch.config_changes if k not in config]
        if unknown:
            raise PatchError(f"config.json has no key(s) {unknown}; known: {sorted(config)}")
        config.update(patch.config_changes)
        files["config.json"] = json.dumps(config, indent=1) + "\n"
    return Bundle(files=files)


def unified_diff(before: Bundle, after: Bundle) -> str:
    out = []
    for name in (*BUNDLE_FILES, EXTRA_TESTS):
        out += difflib.unified_diff(before.files.get(name, "").splitlines(keepends=True),
                                    after.files.get(name, "").splitlines(keepends=True),
                                    fromfile=f"a/{name}", tofile=f"b/{name}")
    return "".join(out)
