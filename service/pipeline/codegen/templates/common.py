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

    def subset(self, rows: np.ndarray) -> "ConditionSet":
        out = ConditionSet.__new__(ConditionSet)
        out.table = self.table.iloc[rows].reset_index(drop=True)
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


def gene_coexpression(cells: np.ndarray, dim: int) -> np.ndarray:
    """Each gene's loadings on the top `dim` principal components of the cells, scaled by each component's
    spread and normalised to unit length: the cosine of two genes' rows approximates their correlation."""
    centred = cells - cells.mean(axis=0)
    k = max(1, min(dim, centred.shape[0] - 1, centred.shape[1] - 1))
    values, vectors = np.linalg.eigh(centred.T @ centred / max(len(cells) - 1, 1))
    top = np.argsort(values)[::-1][:k]
    embedding = vectors[:, top] * np.sqrt(np.maximum(values[top], 0.0))
    return embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)


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


def loss_weights(delta: np.ndarray, loss_cfg: dict) -> np.ndarray:
    """Per-entry weights of the plan's loss: each condition's top-DE genes (by |Δ|) weighted up."""
    weights = np.ones_like(delta)
    if loss_cfg.get("de_weighting") == "top_de" and delta.size:
        top = np.argsort(-np.abs(delta), axis=1)[:, : int(loss_cfg["de_top_k"])]
        np.put_along_axis(weights, top, float(loss_cfg["de_weight"]), axis=1)
    return weights


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


class Stack:
    """Non-negative weights over member predictions of Δ, fitted on grouped out-of-fold predictions of the
    training conditions with the plan's loss: the squared error (top-DE genes weighted up), taken relative
    to the weighted mean square of the true Δ so that it is on one scale for every dataset, plus
    pearson_weight × (1 − Pearson of Δ − the perturbed centroid) when the plan asks for it, as the evaluator
    scores it. No weight sums to one: all small shrinks toward no change (the control), which the Pearson
    term rewards when most perturbations move less than the average one; the weighted error anchors the
    magnitude. Members whose out-of-fold predictions repeat another's are left out (their weights could not
    be told apart).

    Whether the data can weigh the members at all is itself checked out of fold: with the folds, the weights
    are refitted without each fold and scored on it, for the whole stack and for its simplest member alone
    (the baseline recipe it starts from, at its best scale); the whole stack is kept only when it scores
    better there, so a handful of training perturbations cannot talk it into weights that do not carry over
    to perturbations it has not seen."""

    PENALTY = 1e-3

    def __init__(self, loss_cfg: dict, simplest: str):
        self.loss = loss_cfg
        self.simplest = simplest
        self.pearson = float(loss_cfg.get("pearson_weight", 0.0)) if loss_cfg.get("kind") == "mse_pearson_delta" \
            else 0.0

    def row_losses(self, pred: np.ndarray, true: np.ndarray, reference: np.ndarray, pinned=None,
                   scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each condition's share of the loss (they sum to it) and the loss's gradient with respect to
        `pred`; `pinned` = (mask, values): entries a prior sets whatever the members say (a knocked-down
        gene's own level); `scale`: the squared-error normaliser, by default that of these conditions."""
        if pinned is not None:
            pred = np.where(pinned[0], pinned[1], pred)
        weights = loss_weights(true, self.loss)
        scale = scale or max(float(np.sum(weights * true ** 2)), 1e-12)
        rows = np.sum(weights * (pred - true) ** 2, axis=1) / scale
        gradient = 2.0 * weights * (pred - true) / scale
        if self.pearson:
            a, b = pred - reference, true - reference
            a = a - a.mean(axis=1, keepdims=True)
            b = b - b.mean(axis=1, keepdims=True)
            na = np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
            nb = np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
            r = (a * b).sum(axis=1, keepdims=True) / (na * nb)
            rows = rows + self.pearson * (1.0 - r[:, 0]) / len(pred)
            gradient -= self.pearson / len(pred) * (b / (na * nb) - r * a / na ** 2)
        if pinned is not None:
            gradient = np.where(pinned[0], 0.0, gradient)
        return rows, gradient

    def objective(self, pred: np.ndarray, true: np.ndarray, reference: np.ndarray, pinned=None) -> float:
        return float(self.row_losses(pred, true, reference, pinned)[0].sum())

    def _weights(self, X: np.ndarray, true: np.ndarray, reference: np.ndarray, pinned) -> np.ndarray:
        """Weights minimising the loss plus PENALTY·|w|²: members predict Δ on one scale, so weights are of
        order one, and the penalty only stops a member that is nearly null on these conditions (or nearly
        another's copy) from taking a weight that explodes on others."""
        from scipy.optimize import minimize, nnls

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            rows, gradient = self.row_losses(np.tensordot(w, X, axes=1), true, reference, pinned)
            return (float(rows.sum()) + self.PENALTY * float(w @ w),
                    np.tensordot(X, gradient, axes=([1, 2], [0, 1])) + 2.0 * self.PENALTY * w)

        root = np.sqrt(loss_weights(true, self.loss)) * (1.0 if pinned is None else ~pinned[0])
        scale = max(float(np.sum(root ** 2 * true ** 2)), 1e-12)
        design = np.vstack([np.stack([(root * x).ravel() for x in X], axis=1),
                            np.sqrt(self.PENALTY * scale) * np.eye(len(X))])
        starts = [nnls(design, np.concatenate([(root * true).ravel(), np.zeros(len(X))]))[0]]
        if not self.pearson:
            return starts[0]
        for i, x in enumerate(X):  # each member alone at its best scale
            alone = float(np.sum(root ** 2 * x * true) / max(np.sum(root ** 2 * x * x), 1e-12))
            starts.append(np.eye(len(X))[i] * min(max(alone, 0.0), 10.0))
        best = min(starts, key=lambda w: loss(w)[0])
        for start in (starts[0], best):
            result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * len(X))
            if result.fun < loss(best)[0]:
                best = result.x
        return best

    def fit(self, members: dict[str, np.ndarray], true: np.ndarray, reference: np.ndarray, pinned=None,
            folds: list[np.ndarray] | None = None) -> dict[str, float]:
        names: list[str] = [self.simplest]
        for name, oof in members.items():
            if not any(np.allclose(oof, members[kept], atol=1e-9) for kept in names):
                names.append(name)
        X = np.stack([members[n] for n in names])
        weights = self._weights(X, true, reference, pinned)
        self.nested = None
        if folds is not None and len(folds) >= 3 and len(names) > 1:
            scale = max(float(np.sum(loss_weights(true, self.loss) * true ** 2)), 1e-12)
            losses = np.zeros((2, len(folds)))
            for f, held in enumerate(folds):
                rest = np.setdiff1d(np.arange(len(true)), held)
                pin = lambda rows: None if pinned is None else (pinned[0][rows], pinned[1][rows])  # noqa: E731
                for c, used in enumerate((X, X[:1])):
                    w = self._weights(used[:, rest], true[rest], reference[rest], pin(rest))
                    pred = np.tensordot(w, used[:, held], axes=1)
                    losses[c, f] = self.row_losses(pred, true[held], reference[held], pin(held), scale)[0].sum()
            self.nested = {"stack": float(losses[0].sum()), self.simplest: float(losses[1].sum())}
            if losses[0].sum() >= losses[1].sum():
                weights = np.zeros(len(names))
                weights[0] = self._weights(X[:1], true, reference, pinned)[0]
        self.weights = {n: float(w) for n, w in zip(names, weights)}
        self.weights.update({n: 0.0 for n in members if n not in self.weights})
        self.loss_value = self.objective(np.tensordot(weights, X, axes=1), true, reference, pinned)
        self.member_loss = {n: self.objective(members[n], true, reference, pinned) for n in members}
        return self.weights

    def combine(self, members: dict[str, np.ndarray]) -> np.ndarray:
        out = np.zeros_like(next(iter(members.values())), dtype=float)
        for name, weight in self.weights.items():
            if weight > 0:
                out = out + weight * members[name]
        return out


class SelfEffect:
    """A knocked-down gene's own expression falls: a knockdown leaves a fraction κ of the gene's linear-scale
    expression, so its log-normalized level x becomes log1p(κ·expm1(x)), a Δ of log1p(κ·expm1(x)) − x: nearly
    proportional to x for a weakly expressed gene, nearly log κ for a strongly expressed one. κ is fitted by
    least squares over the training knockouts whose target is measured, and sets the target's predicted Δ of
    any knockdown, an unseen gene's too; no gene-embedding model gets that entry right for an unseen target."""

    def __init__(self, genes: list[str]):
        self.pos = {g: i for i, g in enumerate(genes)}
        self.kept = 1.0

    @property
    def fraction(self) -> float:
        """The share of a knocked-down gene's expression that the knockdown removes."""
        return 1.0 - self.kept

    def targets(self, table: pd.DataFrame) -> list[list[int]]:
        return [[self.pos[g] for g in str(p).split("+") if g in self.pos] for p in table["perturbation"]]

    @staticmethod
    def curve(level: np.ndarray, kept: float) -> np.ndarray:
        level = np.maximum(level, 0.0)
        return np.log1p(kept * np.expm1(level)) - level

    def fit(self, train: ConditionSet) -> "SelfEffect":
        from scipy.optimize import minimize_scalar

        pairs = [(train.control[row, i], train.delta[row, i]) for row, idx in enumerate(self.targets(train.table))
                 for i in idx]
        if pairs:
            level, delta = np.array(pairs).T
            self.kept = float(minimize_scalar(lambda k: np.sum((self.curve(level, k) - delta) ** 2),
                                              bounds=(1e-4, 1.0), method="bounded").x)
        return self

    def pinned(self, conditions: ConditionSet) -> tuple[np.ndarray, np.ndarray]:
        """(mask, values): the target entries of each condition and the Δ the knockdown gives them."""
        mask = np.zeros((len(conditions), conditions.control.shape[1]), dtype=bool)
        for row, idx in enumerate(self.targets(conditions.table)):
            mask[row, idx] = True
        return mask, np.where(mask, self.curve(conditions.control, self.kept), 0.0)

    def apply(self, conditions: ConditionSet, delta: np.ndarray) -> np.ndarray:
        mask, values = self.pinned(conditions)
        return np.where(mask, values, delta)
