"""Code generation as an LLM step: the model is shown the plan and the vetted bundle rendered from it,
and answers with what it changes: search/replace edits of vetted files and/or whole files, by name.
Files it does not name are the vetted ones. A real model writes a few edits (or one new model.py)
instead of re-typing a 40 KB bundle as JSON strings; an edit that does not apply, or a config.json that
is not JSON, goes back to it with the reason. The offline backend changes nothing."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from service.llm import LLMRequest
from service.pipeline.codegen import BUNDLE_FILES, EXTRA_TESTS, Bundle
from service.pipeline.codegen.manifest import IMPLEMENTS, read_config
from service.pipeline.debugger import DebugPatch, FileEdit, apply_patch

CODEGEN = "codegen"
_NAMES = (*BUNDLE_FILES, EXTRA_TESTS)


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
        apply, `ValueError` when config.json is not JSON."""
        bundle = Bundle(files={**vetted.files, **self.files})
        if self.edits:
            # Edits of test_model.py are refused as in a debug patch. (A whole test_model.py is taken: it is
            # then this draft's contract, which no later patch may touch.)
            bundle = apply_patch(bundle, DebugPatch(failure_class="codegen", diagnosis="code generation",
                                                    edits=self.edits))
        _, why = read_config(bundle.files)
        if why:
            raise ValueError(why)
        return bundle


def codegen_request(plan_json: dict[str, Any], vetted: Bundle) -> LLMRequest[GeneratedBundle]:
    system = (
        "You are CellForge's code generator. Implement the plan in context.plan as a training bundle "
        f"({', '.join(BUNDLE_FILES)}) that follows the generated-code contract "
        "(`python train.py --data /data --out OUT --config config.json` "
        "writes predictions.h5ad, val_predictions.h5ad, model.pt, val_metrics.json, train_log.jsonl; "
        "test_model.py, the service's contract tests, must pass). context.vetted_bundle is the bundle "
        "assembled from vetted components for this plan: reply with only what you change, as search/replace "
        "edits of its files or whole files by name; files you do not name are used as they are. Keep "
        f"config.json's `{IMPLEMENTS}` block true: it declares which plan fields the code implements and "
        "the config keys it reads for them, and the service checks it against the plan."
    )
    user = "Generate the bundle for context.plan."

    def applies(reply: GeneratedBundle) -> None:
        reply.applied(vetted)

    return LLMRequest(kind=CODEGEN, system=system, user=user,
                      context={"plan": plan_json, "vetted_bundle": vetted.files}, schema=GeneratedBundle,
                      check=applies)


def offline_codegen(context: dict[str, Any]) -> GeneratedBundle:
    return GeneratedBundle()
