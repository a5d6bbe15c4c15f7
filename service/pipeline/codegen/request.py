"""Code generation as an LLM step: the model is shown the plan and the vetted bundle rendered from it, and
writes the bundle that implements the plan, in one of two modes (`CodegenMode`):

- "edits": one reply with what it changes: search/replace edits of vetted files and/or whole files, by
  name. Files it does not name are the vetted ones. A real model writes a few edits (or one new model.py)
  instead of re-typing a 40 KB bundle as JSON strings.
- "files": one question per file (`WRITTEN_FILES`, config.json last), each reply one file (or "keep the
  vetted one"), each with an output cap sized to the file: no reply has to hold the whole bundle.

An edit that does not apply, a module that does not compile, a config.json that is not JSON, or custom
components of the plan (`architecture.custom_components`, outside the design space) left undeclared go
back to the model with the reason. The service's contract tests (test_model.py) are the service's: no
reply may replace or edit them (the model may add its own in test_extra.py). The offline backend changes
nothing (the vetted bundle)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from service.agents import Plan
from service.llm import LLMRequest
from service.pipeline.codegen import BUNDLE_FILES, CONTRACT_TESTS, EXTRA_TESTS, Bundle
from service.pipeline.codegen.manifest import CUSTOM, IMPLEMENTS, check_custom, read_config
from service.pipeline.debugger import DebugPatch, FileEdit, apply_patch

CODEGEN = "codegen"
CODEGEN_FILE = "codegen_file"
CodegenMode = Literal["edits", "files"]
CODEGEN_MODES: tuple[CodegenMode, ...] = ("edits", "files")
_NAMES = (*BUNDLE_FILES, EXTRA_TESTS)
# Asked one by one in this order: the modules first, config.json last so that its `implements` block can
# declare what the modules written before it do. test_model.py is the service's; test_extra.py is optional
# and only written in "edits" mode.
WRITTEN_FILES = tuple(name for name in BUNDLE_FILES if name not in (CONTRACT_TESTS, "config.json")) + ("config.json",)
MIN_FILE_TOKENS = 4096
MAX_FILE_TOKENS = 32768

_CONTRACT = (
    "the generated-code contract (`python train.py --data /data --out OUT --config config.json` writes "
    "predictions.h5ad, val_predictions.h5ad, model.pt, val_metrics.json, train_log.jsonl; test_model.py, the "
    "service's contract tests, must pass: keep the interfaces it calls)"
)
_CONTRACT_TESTS_FIXED = (f"{CONTRACT_TESTS} holds the service's contract tests: it cannot be replaced or edited "
                         f"(add your own tests in {EXTRA_TESTS}).")


def _contract_tests_refused() -> str:
    return f"{CONTRACT_TESTS} cannot be replaced: {_CONTRACT_TESTS_FIXED}"


def _implements_note(plan: Plan) -> str:
    note = (f"Keep config.json's `{IMPLEMENTS}` block true: it declares which plan fields the code implements "
            "and the config keys it reads for them, and the service checks it against the plan.")
    components = plan.architecture.custom_components
    if not components:
        return note
    names = ", ".join(c.name for c in components)
    return note + (
        f" The plan asks for component(s) outside the vetted design space (context.plan.architecture."
        f"custom_components: {names}): implement each of them in the model code (not copied from the vetted "
        f"components: written for this plan), within the contract (e.g. the network that `PerturbationModel."
        f"build_net(in_dim)` returns maps net_input rows to a Δ residual that is zero before training), name "
        f"the class or function that implements each after the component, and list the names in "
        f"`{IMPLEMENTS}.{CUSTOM}`."
    )


class GeneratedBundle(BaseModel):
    files: dict[str, str] = Field(default_factory=dict,
                                  description="whole files, by name, for the files written anew (omit the rest)")
    edits: list[FileEdit] = Field(default_factory=list,
                                  description="search/replace edits of vetted files (each search text once)")

    @field_validator("files")
    @classmethod
    def _known(cls, files: dict[str, str]) -> dict[str, str]:
        extra = [name for name in files if name not in _NAMES]
        if extra:
            raise ValueError(f"unexpected files {extra}; the bundle's files are {list(_NAMES)}")
        return files

    def applied(self, vetted: Bundle) -> Bundle:
        """The bundle to run: the vetted one with these files and edits; `PatchError` when an edit does not
        apply (test_model.py edits included), `ValueError` when config.json is not JSON or the reply gives a
        test_model.py other than the service's (a reply that echoes the whole bundle back, contract tests
        unchanged, is fine)."""
        given = self.files.get(CONTRACT_TESTS)
        if given is not None and given != vetted.files[CONTRACT_TESTS]:
            raise ValueError(_contract_tests_refused())
        bundle = Bundle(files={**vetted.files, **self.files, CONTRACT_TESTS: vetted.files[CONTRACT_TESTS]})
        if self.edits:
            bundle = apply_patch(bundle, DebugPatch(failure_class="codegen", diagnosis="code generation",
                                                    edits=self.edits))
        _, why = read_config(bundle.files)
        if why:
            raise ValueError(why)
        return bundle


def _custom_declared(plan: Plan, bundle: Bundle) -> None:
    problems = check_custom(plan, bundle.files)
    if problems:
        raise ValueError("; ".join(problems))


def codegen_request(plan: Plan, vetted: Bundle) -> LLMRequest[GeneratedBundle]:
    """"edits" mode: the whole bundle's changes in one reply."""
    system = (
        f"You are CellForge's code generator. Implement the plan in context.plan as a training bundle "
        f"({', '.join(BUNDLE_FILES)}) that follows {_CONTRACT}. context.vetted_bundle is the bundle assembled "
        "from vetted components for this plan: reply with only what you change, as search/replace edits of its "
        f"files or whole files by name; files you do not name are used as they are. {_CONTRACT_TESTS_FIXED} "
        f"{_implements_note(plan)}"
    )
    user = "Generate the bundle for context.plan."

    def applies(reply: GeneratedBundle) -> None:
        _custom_declared(plan, reply.applied(vetted))

    return LLMRequest(kind=CODEGEN, system=system, user=user,
                      context={"plan": _plan_json(plan), "vetted_bundle": vetted.files}, schema=GeneratedBundle,
                      check=applies)


def offline_codegen(context: dict[str, Any]) -> GeneratedBundle:
    return GeneratedBundle()


# --- "files" mode -----------------------------------------------------------------------------------


class GeneratedFile(BaseModel):
    """One file of the bundle: the whole text, or `keep` for the vetted file as it is."""

    keep: bool = Field(default=False, description="true: use the vetted file (context.vetted_file) unchanged")
    content: str | None = Field(default=None, description="the whole file, when written anew (no `keep`)")

    @model_validator(mode="after")
    def _one_form(self) -> GeneratedFile:
        if self.keep == (self.content is not None):
            raise ValueError("give either `keep: true` or the whole file as `content`")
        return self


def file_tokens(vetted_text: str) -> int:
    """The output cap of one file's reply: room for about twice the vetted file (~4 characters a token),
    within [MIN_FILE_TOKENS, MAX_FILE_TOKENS]; a reply cut by it is continued by the backend."""
    return max(MIN_FILE_TOKENS, min(MAX_FILE_TOKENS, len(vetted_text) // 2))


def _check_file(name: str, text: str) -> None:
    """A module must compile, config.json must be a JSON object: said to the model, not found in a sandbox."""
    if name.endswith(".py"):
        try:
            compile(text, name, "exec")
        except SyntaxError as exc:
            raise ValueError(f"{name} does not compile: {exc.msg} (line {exc.lineno}): "
                             f"{(exc.text or '').strip()!r}") from None
    elif name == "config.json":
        _, why = read_config({name: text})
        if why:
            raise ValueError(why)


def file_request(plan: Plan, vetted: Bundle, name: str, written: dict[str, str]) -> LLMRequest[GeneratedFile]:
    """"files" mode: the question for one file. `written` holds the files already answered (the vetted text
    when kept); the ones that changed are shown so the new file can call them."""
    if name not in WRITTEN_FILES:
        raise ValueError(f"{name} is not written by code generation; the files are {list(WRITTEN_FILES)}")
    changed = {n: text for n, text in written.items() if text != vetted.files.get(n)}
    context: dict[str, Any] = {
        "plan": _plan_json(plan), "file": name, "vetted_file": vetted.files[name],
        "written_so_far": changed, "kept_as_vetted": [n for n in written if n not in changed],
        "still_to_write": [n for n in WRITTEN_FILES if n not in written and n != name],
    }
    if name.endswith(".py"):
        context["contract_tests"] = vetted.files[CONTRACT_TESTS]
    else:  # config.json: the modules it configures
        context["modules"] = {n: t for n, t in {**vetted.files, **written}.items()
                              if n.endswith(".py") and n != CONTRACT_TESTS}
    system = (
        f"You are CellForge's code generator. You write the training bundle ({', '.join(BUNDLE_FILES)}) that "
        f"implements the plan in context.plan, one file per reply, following {_CONTRACT}. This reply is "
        f"{name} alone: the whole file as `content`, or `keep: true` to use context.vetted_file (assembled "
        "from vetted components for this plan) unchanged. context.written_so_far holds the files already "
        "written anew; the files in context.kept_as_vetted and context.still_to_write are (so far) the vetted "
        f"ones. {_CONTRACT_TESTS_FIXED} {_implements_note(plan)}"
    )
    user = f"Write {name} for context.plan."

    def check(reply: GeneratedFile) -> None:
        text = vetted.files[name] if reply.keep else reply.content
        assert text is not None  # GeneratedFile's validator
        _check_file(name, text)
        if name == "config.json":  # the last file: the bundle is complete
            _custom_declared(plan, Bundle(files={**vetted.files, **written, name: text}))

    return LLMRequest(kind=CODEGEN_FILE, system=system, user=user, context=context, schema=GeneratedFile,
                      key=name, check=check, max_tokens=file_tokens(vetted.files[name]))


def generate_by_files(ask: Callable[[LLMRequest[GeneratedFile]], GeneratedFile], plan: Plan,
                      vetted: Bundle) -> Bundle:
    """The bundle written one file at a time through `ask`; the contract tests are the vetted ones."""
    written: dict[str, str] = {}
    for name in WRITTEN_FILES:
        reply = ask(file_request(plan, vetted, name, written))
        text = vetted.files[name] if reply.keep else reply.content
        assert text is not None
        written[name] = text
    return Bundle(files={**vetted.files, **written, CONTRACT_TESTS: vetted.files[CONTRACT_TESTS]})


def offline_codegen_file(context: dict[str, Any]) -> GeneratedFile:
    return GeneratedFile(keep=True)


def _plan_json(plan: Plan) -> dict[str, Any]:
    return json.loads(plan.model_dump_json())
