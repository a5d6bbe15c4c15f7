"""Candidate plans for `--candidates K`: the discussion's plan, then documented one-step variants of it
(each a valid Plan), in a fixed order so a run is reproducible. The best candidate is kept by its
validation score; the test split is never looked at to choose."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from service.agents import Loss, Plan


def _update(plan: Plan, section: str, **values) -> Plan:
    part = getattr(plan, section).model_copy(update=values)
    return Plan.model_validate({**plan.model_dump(), section: part.model_dump()})


def _other_embedding_source(plan: Plan) -> Plan | None:
    source = plan.architecture.gene_embedding_source
    if source is None:
        return None
    return _update(plan, "architecture", gene_embedding_source="coexpression" if source == "pca" else "pca")


def _other_dose_encoding(plan: Plan) -> Plan | None:
    encoding = plan.architecture.dose_encoding
    if encoding is None:
        return None
    return _update(plan, "architecture", dose_encoding="log_mlp" if encoding == "log_hill" else "log_hill")


def _wider_deeper(plan: Plan) -> Plan | None:
    a = plan.architecture
    return _update(plan, "architecture", hidden_width=min(4096, a.hidden_width * 2), depth=min(8, a.depth + 1))


def _plain_mse(plan: Plan) -> Plan | None:
    if plan.loss.kind == "mse":
        return _update(plan, "loss", kind="mse_pearson_delta", pearson_weight=Loss.DEFAULT_PEARSON_WEIGHT)
    return _update(plan, "loss", kind="mse", pearson_weight=0.0)


def _base_only(plan: Plan) -> Plan | None:
    if not plan.architecture.residual_delta or plan.architecture.base_predictor == "none":
        return None
    return _update(plan, "architecture", residual_delta=False)


def _slower(plan: Plan) -> Plan | None:
    return _update(plan, "training", lr=plan.training.lr * 0.3)


VARIANTS: tuple[tuple[str, Callable[[Plan], Plan | None]], ...] = (
    ("other gene embedding source", _other_embedding_source),
    ("other dose encoding", _other_dose_encoding),
    ("wider and deeper residual network", _wider_deeper),
    ("other loss", _plain_mse),
    ("closed-form base only", _base_only),
    ("lower learning rate", _slower),
)


def candidate_plans(plan: Plan, k: int) -> list[tuple[str, Plan]]:
    """Up to `k` (label, plan) pairs; the first is the discussion's plan."""
    out = [("discussion plan", plan)]
    for label, make in VARIANTS:
        if len(out) >= k:
            break
        try:
            variant = make(plan)
        except ValidationError:
            continue
        if variant is not None and variant != plan:
            out.append((label, variant))
    return out
