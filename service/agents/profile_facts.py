"""The numbers the agents reason over, taken from the data profile.

Agents see a small, flat, JSON-able set of facts rather than the whole profile: it is what goes into
every request's `context` (so it is recorded and replayed) and what each expert's arguments quote.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.agents.plan import Modality, PerturbationKind, SplitScheme
from service.errors import CellForgeError


class ProfileFactsError(CellForgeError, ValueError):
    """The data profile lacks a number the agents need, or holds an impossible one."""


class ProfileFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    perturbation_kind: PerturbationKind
    modalities: list[Modality] = Field(min_length=1)
    n_cells: int = Field(ge=1)
    n_genes: int = Field(ge=1)
    n_perturbations: int = Field(ge=1, description="distinct non-control perturbation labels")
    n_conditions: int = Field(ge=1, description="distinct non-control (perturbation, dose, context) conditions")
    n_control_cells: int = Field(ge=0)
    cells_per_condition_median: float = Field(ge=0)
    cells_per_condition_min: float = Field(ge=0)
    n_contexts: int = Field(ge=1, description="cell types / lines; 1 when the data has none")
    n_doses: int = Field(ge=0, description="distinct non-zero doses; 0 when the data has no dose")
    n_combos: int = Field(ge=0, description="conditions combining several perturbations (A+B)")
    target_genes_measured_fraction: float | None = Field(
        default=None, ge=0, le=1, description="genetic: share of target genes present among the measured genes"
    )
    de_top20_fraction: float | None = Field(
        default=None, ge=0, le=1, description="share of a condition's |Δ| carried by its top-20 genes (mean)"
    )
    recommended_split: SplitScheme | None = Field(default=None, description="the data layer's recommendation")
    alternative_splits: list[SplitScheme] = Field(default_factory=list, description="other feasible splits")

    @property
    def is_counts(self) -> bool:
        return "rna_counts" in self.modalities


# Names the data layer's profile may use for each fact, most specific first.
_ALIASES: dict[str, tuple[str, ...]] = {
    "perturbation_kind": ("perturbation_kind", "kind"),
    "modalities": ("modalities",),
    "n_cells": ("n_cells",),
    "n_genes": ("n_genes", "n_features"),
    "n_perturbations": ("n_perturbations",),
    "n_conditions": ("n_conditions",),
    "n_control_cells": ("n_control_cells", "n_controls"),
    "cells_per_condition_median": ("cells_per_condition_median", "median_cells_per_condition"),
    "cells_per_condition_min": ("cells_per_condition_min", "min_cells_per_condition"),
    "n_contexts": ("n_contexts",),
    "n_doses": ("n_doses",),
    "n_combos": ("n_combos", "n_combinations"),
    "target_genes_measured_fraction": ("target_genes_measured_fraction", "targets_measured_fraction"),
    "de_top20_fraction": ("de_top20_fraction",),
    "recommended_split": ("recommended_split",),
    "alternative_splits": ("alternative_splits",),
}


def facts_from_profile(profile: Any) -> ProfileFacts:
    """Accept a `ProfileFacts`, the data layer's pydantic profile, or a plain dict."""
    if isinstance(profile, ProfileFacts):
        return profile
    if isinstance(profile, BaseModel):
        raw = profile.model_dump()
    elif isinstance(profile, dict):
        raw = profile
    else:
        raise ProfileFactsError(f"expected a data profile (pydantic model or dict), got {type(profile).__name__}")
    facts: dict[str, Any] = {}
    for name, aliases in _ALIASES.items():
        for alias in aliases:
            if raw.get(alias) is not None:
                facts[name] = raw[alias]
                break
    facts.setdefault("n_contexts", 1)
    facts.setdefault("n_doses", 0)
    facts.setdefault("n_combos", 0)
    try:
        return ProfileFacts.model_validate(facts)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ProfileFactsError(f"data profile unusable for the agents: {problems}") from None
