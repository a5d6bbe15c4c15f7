"""A stack of candidates fitted on validation: non-negative weights summing to one on their predicted Δ
(prediction − context control), one weight per member for every gene, by least squares. Summing to one
keeps the blend an average of the members' responses: free weights shrink it towards the control,
which lowers the squared error over all genes (mostly unchanged ones) at the cost of the few strongly
changed genes that top-20-DE metrics score.

Its validation score must not be the fit's own: each chunk of validation conditions — a cv fold, or a
share of the val fold's groups — is predicted with weights fitted on the other chunks only, and that
cross-fitted prediction is what the evaluator scores. The weights used on the test conditions are fitted
on every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
from scipy.optimize import nnls

from service.pipeline.selection import Selection, as_predictions, stacked_frame, true_delta

MAX_MEMBERS = 5  # more members than validation conditions can weigh would fit noise
N_CHUNKS = 5  # chunks of a single val fold (by group) for the cross-fitting


@dataclass
class Stack:
    weights: dict[str, float]  # fitted on every validation chunk: what the test predictions use
    val_predictions: dict[str, ad.AnnData]  # per fold, cross-fitted (each chunk from the other chunks' weights)
    chunk_weights: list[dict[str, float]]


def chunks(selection: Selection) -> list[list[tuple[int, np.ndarray]]]:
    """Chunks of validation rows: (fold index, row mask) lists. Each cv fold is a chunk; a single val fold
    is cut into up to N_CHUNKS chunks of whole groups (round-robin over its sorted groups)."""
    if len(selection.folds) > 1:
        return [[(i, np.ones(len(f.conditions), dtype=bool))] for i, f in enumerate(selection.folds)]
    groups = np.asarray(selection.folds[0].groups)
    units = sorted(set(groups))
    k = min(N_CHUNKS, len(units))
    return [[(0, np.isin(groups, units[j::k]))] for j in range(k)] if k >= 2 else []


def _fit(design: list[list[np.ndarray]], target: list[np.ndarray]) -> np.ndarray:
    """Least squares over the simplex: non-negative least squares with a heavily weighted row asking the
    weights to sum to one, then renormalised (exactly one)."""
    A = np.concatenate([np.stack([m.ravel() for m in members], axis=1) for members in design])
    b = np.concatenate([t.ravel() for t in target])
    heavy = 1e3 * max(float(np.linalg.norm(A)), 1e-12)
    w = nnls(np.vstack([A, np.full((1, A.shape[1]), heavy)]), np.append(b, heavy))[0]
    return w / w.sum() if w.sum() > 0 else np.full(A.shape[1], 1.0 / A.shape[1])


def fit_stack(selection: Selection, members: dict[str, dict[str, ad.AnnData]]) -> Stack | None:
    """The stack of `members` (name → fold name → val predictions), or None when there are fewer than two
    members or chunks. Members beyond MAX_MEMBERS are for the caller to leave out (by validation score)."""
    names = list(members)
    parts = chunks(selection)
    if len(names) < 2 or len(parts) < 2:
        return None
    deltas = {name: [stacked_frame(fold, members[name][fold.name]) for fold in selection.folds] for name in names}
    truth = [true_delta(fold) for fold in selection.folds]

    def rows(chunk_list) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
        design, target = [], []
        for chunk in chunk_list:
            for fold_i, mask in chunk:
                design.append([deltas[n][fold_i][mask] for n in names])
                target.append(truth[fold_i][mask])
        return design, target

    cross = [np.zeros_like(t) for t in truth]
    chunk_weights = []
    for j, chunk in enumerate(parts):
        w = _fit(*rows([c for i, c in enumerate(parts) if i != j]))
        chunk_weights.append(dict(zip(names, map(float, w), strict=True)))
        for fold_i, mask in chunk:
            cross[fold_i][mask] = sum(wi * deltas[n][fold_i][mask] for wi, n in zip(w, names, strict=True))
    weights = _fit(*rows(parts))
    val_predictions = {fold.name: as_predictions(fold, cross[i]) for i, fold in enumerate(selection.folds)}
    return Stack(dict(zip(names, map(float, weights), strict=True)), val_predictions, chunk_weights)


def blend(weights: dict[str, float], control: np.ndarray, predictions: dict[str, np.ndarray]) -> np.ndarray:
    """control + Σ w·(member − control): the stack's prediction from aligned member predictions."""
    return control + sum(w * (predictions[name] - control) for name, w in weights.items())
