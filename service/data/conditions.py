"""The standard obs columns every split file carries, and the condition key that names a condition.

A condition is one (perturbation, dose, context) triple. Its key is the string
`f"{perturbation}|{dose_str}|{context}"` (docs/contracts.md); every part of CellForge builds it
with `condition_key` / `condition_keys` so the spelling never drifts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

PERTURBATION = "perturbation"
DOSE = "dose"
CONTEXT = "context"
IS_CONTROL = "is_control"
CONDITION = "condition"
BATCH = "batch"
STANDARD_OBS_COLUMNS: tuple[str, ...] = (PERTURBATION, DOSE, CONTEXT, IS_CONTROL, CONDITION)

CONTROL = "control"
NO_CONTEXT = "all"
COMBO_SEPARATOR = "+"


def dose_str(dose: float | None) -> str:
    """`""` for a missing dose, else the shortest float spelling (`0.1`, `10`, `1e-05`)."""
    if dose is None:
        return ""
    dose = float(dose)
    if math.isnan(dose):
        return ""
    return f"{dose:g}"


def condition_key(perturbation: str, dose: float | None, context: str) -> str:
    """The key of one condition: `perturbation|dose|context`."""
    return f"{perturbation}|{dose_str(dose)}|{context}"


def condition_keys(perturbation: Iterable[str], dose: Iterable[float], context: Iterable[str]) -> np.ndarray:
    """Vectorised `condition_key` over aligned arrays (one per cell); returns an object array."""
    pert = pd.Series(np.asarray(list(perturbation), dtype=object))
    ctx = pd.Series(np.asarray(list(context), dtype=object))
    dose_arr = np.asarray(list(dose), dtype=float)
    # Format each distinct dose once: datasets have few dose levels but many cells.
    levels, inverse = np.unique(dose_arr, return_inverse=True)
    dose_text = np.array([dose_str(d) for d in levels], dtype=object)[inverse.ravel()]
    keys = pert.astype(str) + "|" + pd.Series(dose_text) + "|" + ctx.astype(str)
    return keys.to_numpy(dtype=object)


def parse_condition_key(key: str) -> tuple[str, float, str]:
    """Inverse of `condition_key`: `(perturbation, dose or NaN, context)`."""
    parts = key.split("|")
    if len(parts) != 3:
        raise ValueError(f"condition key {key!r} is not of the form 'perturbation|dose|context'")
    pert, dose, ctx = parts
    return pert, (float(dose) if dose else float("nan")), ctx


def combo_genes(perturbation: str) -> list[str]:
    """The components of a perturbation label: `"A+B"` -> `["A", "B"]`, `"A"` -> `["A"]`."""
    return [p for p in perturbation.split(COMBO_SEPARATOR) if p]


def is_combo(perturbation: str) -> bool:
    return len(combo_genes(perturbation)) > 1


# --- what the model-facing parts of a split carry in uns (read by the service and by sandbox bundles) ---

PREDICT_UNS = "predict"  # inputs parts: equal-length lists condition, perturbation, dose, context
TARGETS_UNS = "perturbation_targets"  # equal-length lists perturbation, targets (`;`-joined)


def predict_frame(uns, where: str) -> pd.DataFrame:
    """The conditions an inputs part asks for (`uns["predict"]`) as a typed table; a clear error naming
    `where` when the lists are absent."""
    needed = (CONDITION, PERTURBATION, DOSE, CONTEXT)
    predict = uns.get(PREDICT_UNS)
    if not isinstance(predict, dict) or any(k not in predict for k in needed):
        from .errors import SplitDirectoryError

        raise SplitDirectoryError(f"{where}: uns['{PREDICT_UNS}'] must hold lists {', '.join(needed)}")
    table = pd.DataFrame({k: list(predict[k]) for k in needed})
    return table.astype({CONDITION: str, PERTURBATION: str, CONTEXT: str, DOSE: float})


def targets_of_part(uns) -> dict[str, list[str]]:
    """perturbation -> annotated targets from one part's `uns["perturbation_targets"]` (empty without)."""
    table = uns.get(TARGETS_UNS, {})
    return {str(p): [g for g in str(v).split(";") if g]
            for p, v in zip(table.get(PERTURBATION, []), table.get("targets", []), strict=True)}
