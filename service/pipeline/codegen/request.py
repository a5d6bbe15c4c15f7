"""Code generation as an LLM step: the model is shown the plan and the vetted bundle rendered from it,
and answers with the bundle to run. The offline backend answers with the vetted bundle itself."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from service.llm import LLMRequest
from service.pipeline.codegen import BUNDLE_FILES, Bundle

CODEGEN = "codegen"


class GeneratedBundle(Bundle):
    @field_validator("files")
    @classmethod
    def _complete(cls, files: dict[str, str]) -> dict[str, str]:
        missing = [name for name in BUNDLE_FILES if name not in files]
        if missing:
            raise ValueError(f"the bundle lacks {missing}; it must hold exactly {list(BUNDLE_FILES)}")
        extra = [name for name in files if name not in BUNDLE_FILES]
        if extra:
            raise ValueError(f"unexpected files {extra}; the bundle holds exactly {list(BUNDLE_FILES)}")
        return files


def codegen_request(plan_json: dict[str, Any], vetted: Bundle) -> LLMRequest[GeneratedBundle]:
    system = (
        "You are CellForge's code generator. Write the training bundle for the plan in context.plan: "
        f"{', '.join(BUNDLE_FILES)}, following the generated-code contract "
        "(`python train.py --data /data --out OUT --config config.json` writes predictions.h5ad, "
        "val_predictions.h5ad, model.pt, val_metrics.json, train_log.jsonl). context.vetted_bundle is the "
        "bundle assembled from vetted components for this plan; keep its interfaces."
    )
    user = "Generate the bundle for context.plan."
    return LLMRequest(kind=CODEGEN, system=system, user=user,
                      context={"plan": plan_json, "vetted_bundle": vetted.files}, schema=GeneratedBundle)


def offline_codegen(context: dict[str, Any]) -> GeneratedBundle:
    return GeneratedBundle(files=dict(context["vetted_bundle"]))
