import json
import math

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

CONTROL = "control"
TARGETS_UNS = "perturbation_targets"  # the split's per-perturbation annotation table (targets)


def pick_device(config: dict) -> torch.device:
    """CUDA when present (and not pinned to cpu by the config), else cpu."""
    if config.get("device", "auto") != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def write_h5ad(adata, path) -> None:
    """Write with plain string storage: text columns as categoricals and object-dtype names, which every
    anndata version writes and reads (pandas ≥ 3 would otherwise hand it nullable string arrays)."""
    for frame in (adata.obs, adata.var):
        for column in frame.columns:
            if frame[column].dtype.kind in "OSU" or str(frame[column].dtype).startswith("str"):
                frame[column] = pd.Categorical(frame[column].astype(object))
    adata.obs_names = pd.Index([str(x) for x in adata.obs_names], dtype=object)
    adata.var_names = pd.Index([str(x) for x in adata.var_names], dtype=object)
    adata.write_h5ad(path)


def group_means(X, labels: np.ndarray, order: list[str]) -> np.ndarray:
    """Mean row of X per label in `order`, without densifying X (sparse indicator product)."""
    index = {c: i for i, c in enumerate(order)}
    rows = np.array([index.get(str(lab), -1) for lab in labels])
    keep = np.flatnonzero(rows >= 0)
    indicator = sp.csr_matrix((np.ones(len(keep)), (rows[keep], keep)), shape=(len(order), len(labels)))
    counts = np.asarray(indicator.sum(axis=1)).ravel()
    return dense(indicator @ X) / np.maximum(counts, 1)[:, None]


def dose_of(value) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out


def condition_table(obs: pd.DataFrame) -> pd.DataFrame:
    """One row per perturbed condition: condition, perturbation, dose, context."""
    perturbed = obs.loc[~obs["is_control"].astype(bool)]
    table = perturbed.loc[:, ["condition", "perturbation", "dose", "context"]].drop_duplicates("condition")
    table = table.astype({"condition": str, "perturbation": str, "context": str, "dose": float})
    return table.sort_values("condition").reset_index(drop=True)


def annotate(table: pd.DataFrame, uns) -> pd.DataFrame:
    """Add a `targets` column (`;`-joined annotated target genes, empty when unknown) from a split part's
    uns["perturbation_targets"] (equal-length lists `perturbation`, `targets`); no annotations: empty strings."""
    listed = uns.get(TARGETS_UNS, {})
    known = {str(p): str(t) for p, t in zip(listed.get("perturbation", []), listed.get("targets", []))}
    return table.assign(targets=[known.get(p, "") for p in table["perturbation"]])


def target_positions(table: pd.DataFrame, pos: dict[str, int]) -> list[list[int]]:
    """Positions (in `pos`) of each row's annotated target genes that are measured (`targets` column)."""
    column = table["targets"] if "targets" in table.columns else [""] * len(table)
    return [[pos[g] for g in str(value).split(";") if g in pos] for value in column]


def control_means(adata) -> dict[str, np.ndarray]:
    ctrl = adata.obs["is_control"].astype(bool).to_numpy()
    contexts = adata.obs["context"].astype(str).to_numpy()[ctrl]
    order = sorted(set(contexts))
    means = group_means(adata.X[ctrl], contexts, order)
    return {c: means[i] for i, c in enumerate(order)}


class ConditionSet:
    """Conditions of one split part: identity table, the control profile of each row, Δ when known."""

    def __init__(self, table: pd.DataFrame, controls: dict[str, np.ndarray], means: np.ndarray | None = None):
        self.table = table.reset_index(drop=True)
        pooled = np.mean(list(controls.values()), axis=0)
        self.control = np.stack([controls.get(c, pooled) for c in self.table["context"]]) if len(self.table) \
            else np.zeros((0, len(pooled)))
        self.delta = None if means is None else means - self.control

    def __len__(self) -> int:
        return len(self.table)

    def take(self, rows: np.ndarray) -> "ConditionSet":
        """The conditions selected by a boolean mask, with their controls and Δ."""
        out = ConditionSet.__new__(ConditionSet)
        out.table = self.table[rows].reset_index(drop=True)
        out.control = self.control[rows]
        out.delta = None if self.delta is None else self.delta[rows]
        return out

    @classmethod
    def from_cells(cls, adata, controls: dict[str, np.ndarray]) -> "ConditionSet":
        table = annotate(condition_table(adata.obs), adata.uns)
        means = group_means(adata.X, adata.obs["condition"].astype(str).to_numpy(), list(table["condition"]))
        return cls(table, controls, means)


def context_onehot(contexts: list[str], vocabulary: list[str]) -> np.ndarray:
    out = np.zeros((len(contexts), len(vocabulary)))
    pos = {c: i for i, c in enumerate(vocabulary)}
    for row, context in enumerate(contexts):
        if context in pos:
            out[row, pos[context]] = 1.0
    return out


def ridge(F: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    """W minimising |F W − Y|² + λ|W|² in closed form."""
    return np.linalg.solve(F.T @ F + lam * np.eye(F.shape[1]), F.T @ Y)


def same_dose_as(table: pd.DataFrame, dose: float) -> np.ndarray:
    """Rows of `table` at `dose` (both undosed counts as the same)."""
    doses = table["dose"].to_numpy(dtype=float)
    return (np.isnan(doses) & np.isnan(dose)) | np.isclose(doses, dose)


def mean_delta_by(table: pd.DataFrame, delta: np.ndarray, context: str, dose: float) -> np.ndarray:
    """Mean training Δ preferring the same context and dose (the mean-Δ baseline's rule)."""
    same_dose = same_dose_as(table, dose)
    same_ctx = (table["context"] == context).to_numpy()
    for mask in (same_ctx & same_dose, same_ctx, same_dose, np.ones(len(table), dtype=bool)):
        if mask.any():
            return delta[mask].mean(axis=0)
    return np.zeros(delta.shape[1])


def centroid_delta(train: ConditionSet, conditions: ConditionSet) -> np.ndarray:
    """Per row of `conditions`, the mean training Δ of its context (of all contexts for an unseen one):
    the perturbed centroid that the evaluator's Pearson Δ is measured against."""
    out = np.zeros((len(conditions), train.delta.shape[1]))
    contexts = train.table["context"].to_numpy()
    for row, context in enumerate(conditions.table["context"]):
        same = contexts == context
        out[row] = train.delta[same].mean(axis=0) if same.any() else train.delta.mean(axis=0)
    return out


def response_residuals(table: pd.DataFrame, delta: np.ndarray) -> np.ndarray:
    """Δ minus the mean Δ of its context and dose: what is specific to each perturbation, whose principal
    directions embed genes (the mean-Δ offsets are the base's job, and would otherwise lead them)."""
    return delta - np.stack([mean_delta_by(table, delta, r.context, r.dose) for r in table.itertuples()])
