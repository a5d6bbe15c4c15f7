import numpy as np
import pandas as pd

from config import Config
from data import ConditionSet, target_positions


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

    Whether the data can weigh the members at all is itself checked out of fold (nested): with the folds,
    the whole stack's weights are refitted without each fold and scored on it, and so is each single recipe
    (`singles`: a baseline's recipe, e.g. the mean Δ plus one ridge, at its best scale); the candidate with the
    least loss on the folds it did not see is kept, or the caller's default unless another beats it by more
    than one standard error of the per-fold differences (`per_fold`: each candidate's loss on each fold). A
    handful of training perturbations thus cannot talk the stack into weights that do not carry over, and the
    model is never knowingly worse than the best recipe."""

    PENALTY = 1e-3
    NUDGES = (0.0, -0.01, 0.01, -0.03, 0.03, -0.1, 0.1)
    SCALES = np.concatenate([np.linspace(0.0, 2.0, 41), 1.0 + np.array(NUDGES[1:])])

    def __init__(self, loss_cfg: dict):
        self.loss = loss_cfg
        self.per_fold: dict[str, np.ndarray] | None = None  # the nested check's loss of each candidate per fold
        self.pearson = float(loss_cfg.get("pearson_weight", 0.0)) if loss_cfg.get("kind") == "mse_pearson_delta" \
            else 0.0

    @property
    def nested(self) -> dict[str, float] | None:
        """Each candidate's out-of-fold loss over all folds (None without a nested check)."""
        return None if self.per_fold is None else {k: float(v.sum()) for k, v in self.per_fold.items()}

    def row_losses(self, pred: np.ndarray, true: np.ndarray, reference: np.ndarray, pinned=None,
                   scale: float | None = None, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each condition's share of the loss (they sum to it) and the loss's gradient with respect to
        `pred`; `pinned` = (mask, values): entries a prior sets whatever the members say (a knocked-down
        gene's own level); `scale` and `count`: the squared-error normaliser and the number of conditions the
        Pearson term averages over, by default those of these conditions (a fold's shares of the loss over
        all conditions need the totals')."""
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
            count = count or len(pred)
            rows = rows + self.pearson * (1.0 - r[:, 0]) / count
            gradient -= self.pearson / count * (b / (na * nb) - r * a / na ** 2)
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
        # Pearson sees only the direction of (prediction − centroid): near the centroid a slight shrink toward
        # the control (or stretch away from it) flips it at almost no squared-error cost, a step no gradient
        # sees; both sides are tried.
        return min([best * (1.0 + step) for step in self.NUDGES], key=lambda w: loss(w)[0])

    def fit(self, members: dict[str, np.ndarray], true: np.ndarray, reference: np.ndarray, pinned=None,
            folds: list[np.ndarray] | None = None, singles: dict[str, dict[str, float]] | None = None,
            default: str | None = None) -> dict:
        """Weights over `members` (name -> out-of-fold Δ predictions of the training conditions). `singles`:
        the single recipes the stack must beat out of fold, each a fixed combination of members (default:
        each member alone). `default`: the candidate (a single's name or "stack") kept unless another beats it
        out of fold by more than one standard error of their per-fold differences (the one-standard-error rule):
        with few folds the least loss among many candidates is partly luck; without it the least loss wins."""
        names: list[str] = []
        for name, oof in members.items():
            if not any(np.allclose(oof, members[kept], atol=1e-9) for kept in names):
                names.append(name)
        X = np.stack([members[n] for n in names])
        weights = dict(zip(names, self._weights(X, true, reference, pinned)))
        self.per_fold, self.chosen = None, "stack"
        singles = singles if singles is not None else {n: {n: 1.0} for n in members}
        if folds is not None and len(folds) >= 3:
            total = max(float(np.sum(loss_weights(true, self.loss) * true ** 2)), 1e-12)
            pin = lambda rows: None if pinned is None else (pinned[0][rows], pinned[1][rows])  # noqa: E731
            per_fold: dict[str, np.ndarray] = {"stack": np.zeros(len(folds))}
            for f, held in enumerate(folds):
                rest = np.setdiff1d(np.arange(len(true)), held)
                w = self._weights(X[:, rest], true[rest], reference[rest], pin(rest))
                per_fold["stack"][f] = float(self.row_losses(np.tensordot(w, X[:, held], axes=1), true[held],
                                                             reference[held], pin(held), total, len(true))[0].sum())
            for label, recipe in singles.items():
                single = sum(c * members[n] for n, c in recipe.items())
                # Each condition's loss at every scale; a fold's scale is the best on the other conditions.
                grid = np.stack([self.row_losses(k * single, true, reference, pinned, total)[0] for k in self.SCALES])
                per_fold[label] = np.array([grid[np.argmin(np.delete(grid, held, axis=1).sum(axis=1)), held].sum()
                                            for held in folds])
            self.per_fold = per_fold
            self.chosen = min(per_fold, key=lambda k: per_fold[k].sum())
            if default is not None and self.chosen != default:
                gain = per_fold[default] - per_fold[self.chosen]
                if gain.mean() <= gain.std(ddof=1) / np.sqrt(len(gain)):
                    self.chosen = default
            if self.chosen != "stack":
                recipe = singles[self.chosen]
                single = sum(c * members[n] for n, c in recipe.items())
                grid = [float(self.row_losses(k * single, true, reference, pinned, total)[0].sum()) for k in self.SCALES]
                scale = float(self.SCALES[int(np.argmin(grid))])
                weights = {n: scale * recipe.get(n, 0.0) for n in members}
        self.weights = {n: float(weights.get(n, 0.0)) for n in members}
        self.loss_value = self.objective(self.combine(members), true, reference, pinned)
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
