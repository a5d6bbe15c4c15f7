"""Reference predictors that sit beside every model result, and the split reading they share with
the evaluator.

A baseline sees exactly what a model sees: the training cells, the conditions to predict and the
control cells of their contexts (those of `val_inputs.h5ad` / `test_inputs.h5ad`; no truth is ever
read here). `inputs_task` builds the same task from a folder of model files alone (a sandbox's `/data`),
so a delivered baseline bundle runs this very module. A large split's sandbox folder holds a sample of the
cells plus `pseudobulk.h5ad` (every training condition's mean over all of its cells) and
`coexpression_cells.h5ad` (the training cells the co-expression sample draws from the whole part): the task
is then built from those, so the delivered code predicts what the service's own baselines predict. Each
writes predictions in the model format: one row per condition, `obs` with `condition`, `perturbation`, `dose`, `context`, dense `X` = predicted mean
log-normalized profile.

Throughout, Δ of a training condition is its pseudobulk minus the control pseudobulk of its own
context, and a prediction is always "control of the target context + some Δ".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .conditions import CONDITION, CONTEXT, DOSE, IS_CONTROL, PERTURBATION, combo_genes, predict_frame, targets_of_part
from .errors import SplitDirectoryError, preview
from .metrics import group_means

if TYPE_CHECKING:  # splits (pydantic) is not needed to run baselines, so a sandbox bundle can carry this file
    from .splits import Split

Which = Literal["test", "val"]

PCA_RIDGE_K = 10
PCA_RIDGE_LAMBDA = 0.1
CONTEXT_RIDGE_K = 10
# λ of the context ridge, relative to the mean squared norm of the centred context embeddings; the one with
# the least leave-one-context-out error over the training contexts is used (the largest is delta transfer).
CONTEXT_RIDGE_SCALES = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
GENE_SIM_DIM = 20
GENE_SIM_NEIGHBOURS = 5
GENE_SIM_MAX_CELLS = 2000
# A sandbox folder of a large split (`service.data.sandbox_data`): its parts are samples of their cells
# (uns["sample"]); these files carry what the baselines learn from the whole training part.
SAMPLE_UNS = "sample"
PSEUDOBULK_FILE = "pseudobulk.h5ad"  # per training condition (controls too): mean over all its cells, n_cells
COEXPRESSION_FILE = "coexpression_cells.h5ad"  # the training cells of `coexpression_rows`, drawn from all


@dataclass
class TrainingSummary:
    """Pseudobulks of the training split: everything the baselines learn from."""

    conditions: pd.DataFrame  # condition, perturbation, dose, context, n_cells (perturbed only)
    means: np.ndarray  # (conditions × features)
    deltas: np.ndarray  # means − control mean of the condition's context
    control_means: dict[str, np.ndarray]
    perturbed_context_means: dict[str, np.ndarray]  # cell-weighted mean of perturbed cells
    cell_sample: np.ndarray  # a dense subsample of training cells, for gene co-expression


@dataclass
class PredictionTask:
    """What to predict for one split part, and from what."""

    split: Split | None  # None when built from model files alone (`inputs_task`)
    which: Which
    genes: pd.Index
    feature_types: np.ndarray | None  # var["feature_types"] when the data is multimodal
    targets: pd.DataFrame  # condition, perturbation, dose, context: the rows to predict
    controls: ad.AnnData  # control cells of the target contexts
    control_means: dict[str, np.ndarray]
    train: TrainingSummary
    # perturbation -> annotated target genes (uns["perturbation_targets"]); empty without annotations
    annotations: dict[str, list[str]] = field(default_factory=dict)


def require_obs(adata: ad.AnnData, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        raise SplitDirectoryError(
            f"{path}: obs lacks the standard column(s) {preview(missing)}; expected {preview(columns)}"
        )


def condition_table(obs: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct condition (first-seen order) with its identity columns."""
    table = obs.loc[:, [CONDITION, PERTURBATION, DOSE, CONTEXT]].drop_duplicates(CONDITION)
    table = table.astype({CONDITION: str, PERTURBATION: str, CONTEXT: str, DOSE: float})
    return table.reset_index(drop=True)


def context_means(X, contexts: np.ndarray, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mean profile per context of the rows of X (those under the `rows` mask), a chunk at a time."""
    labels = contexts if rows is None else np.where(rows, contexts.astype(object), "")  # "": no group
    groups = np.unique(contexts if rows is None else contexts[rows])
    means = group_means(X, labels, groups)
    return {str(g): means[i] for i, g in enumerate(groups)}


def coexpression_rows(n_obs: int, seed: int = 0) -> np.ndarray:
    """The rows of the training part the co-expression sample holds: a sorted, seeded draw of
    `GENE_SIM_MAX_CELLS` (every row, when fewer)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_obs, size=min(GENE_SIM_MAX_CELLS, n_obs), replace=False))


def _dense64(X) -> np.ndarray:
    return (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float64)


def summarise_training(train: ad.AnnData, seed: int = 0) -> TrainingSummary:
    """Pseudobulks of the training cells, read a row chunk at a time (train may be backed: a large
    split's train.h5ad stays on disk) plus a seeded sample of cells for gene co-expression."""
    obs = train.obs
    is_ctrl = obs[IS_CONTROL].to_numpy(dtype=bool)
    X = train.X
    contexts = obs[CONTEXT].astype(str).to_numpy()
    control_means = context_means(X, contexts, is_ctrl) if is_ctrl.any() else {}
    if not control_means:
        raise SplitDirectoryError("train.h5ad: no control cells; every split keeps controls in train")

    perturbed = obs.loc[~is_ctrl]
    table = condition_table(perturbed)
    labels = np.where(is_ctrl, "", obs[CONDITION].astype(str).to_numpy(dtype=object))
    means = group_means(X, labels, table[CONDITION].to_numpy())
    table["n_cells"] = perturbed[CONDITION].astype(str).value_counts().reindex(table[CONDITION]).to_numpy()
    perturbed_ctx = context_means(X, contexts, ~is_ctrl) if (~is_ctrl).any() else {}
    return _summary(table, means, control_means, perturbed_ctx, _dense64(X[coexpression_rows(train.n_obs, seed)]))


def _summary(table: pd.DataFrame, means: np.ndarray, control_means: dict[str, np.ndarray],
             perturbed_ctx: dict[str, np.ndarray], cell_sample: np.ndarray) -> TrainingSummary:
    """The summary of these condition means: Δ against each row's context control (the pooled control for a
    context without controls of its own)."""
    pooled_control: np.ndarray = np.mean(list(control_means.values()), axis=0)
    ctrl_rows = np.stack([control_means.get(c, pooled_control) for c in table[CONTEXT]]) if len(table) else means
    return TrainingSummary(table, means, means - ctrl_rows, control_means, perturbed_ctx, cell_sample)


def summarise_pseudobulk(bulk: ad.AnnData, cell_sample: np.ndarray) -> TrainingSummary:
    """What `summarise_training` gives on the whole training part, from its pseudobulks (`PSEUDOBULK_FILE`: one
    row per training condition, controls included, with `n_cells`) and its co-expression sample: the means
    of a context's cells are the cell-weighted means of its conditions' rows."""
    require_obs(bulk, Path(PSEUDOBULK_FILE), (CONDITION, PERTURBATION, DOSE, CONTEXT, IS_CONTROL, "n_cells"))
    obs = bulk.obs
    X = _dense64(bulk.X)
    is_ctrl = obs[IS_CONTROL].to_numpy(dtype=bool)
    n = obs["n_cells"].to_numpy(dtype=np.float64)
    contexts = obs[CONTEXT].astype(str).to_numpy()

    def weighted(rows: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for context in np.unique(contexts[rows]):
            mask = rows & (contexts == context)
            out[str(context)] = (X[mask] * n[mask, None]).sum(axis=0) / n[mask].sum()
        return out

    control_means = weighted(is_ctrl)
    if not control_means:
        raise SplitDirectoryError(f"{PSEUDOBULK_FILE}: no control rows; every split keeps controls in train")
    table = condition_table(obs.loc[~is_ctrl])  # one row per condition already: the rows of X[~is_ctrl]
    table["n_cells"] = n[~is_ctrl].astype(np.int64)
    return _summary(table, X[~is_ctrl], control_means, weighted(~is_ctrl), cell_sample)


def _in_memory(adata: ad.AnnData) -> ad.AnnData:
    return adata.to_memory() if adata.isbacked or adata.is_view else adata


def build_task(train: ad.AnnData, inputs: ad.AnnData, which: Which, genes: pd.Index, folder: Path,
               annotations: dict[str, list[str]], split: Split | None = None,
               summary: TrainingSummary | None = None) -> PredictionTask:
    """The task of predicting the conditions listed in `inputs` (val_inputs or test_inputs) from `train`
    (from `summary`, when given: the whole training part's, of which `train` is a sample)."""
    require_obs(train, folder / "train.h5ad", (CONDITION, PERTURBATION, DOSE, CONTEXT, IS_CONTROL))
    name = f"{which}_inputs.h5ad"
    if list(genes) != list(train.var_names):
        raise SplitDirectoryError(f"{folder / 'split.json'}: 'genes' differ from the var_names of train.h5ad")
    require_obs(inputs, folder / name, (CONTEXT, IS_CONTROL))
    is_ctrl = inputs.obs[IS_CONTROL].to_numpy(dtype=bool)
    # An inputs part holds control cells only, and may stay backed; a hand-made one is subset in memory.
    controls = inputs if is_ctrl.all() else _in_memory(inputs[is_ctrl])
    if list(controls.var_names) != list(genes):
        controls = _in_memory(controls[:, genes])
    targets = predict_frame(inputs.uns, str(folder / name))
    if targets.empty:
        raise SplitDirectoryError(f"{folder}: the split has no {which} conditions to predict")
    control_means = context_means(controls.X, controls.obs[CONTEXT].astype(str).to_numpy())
    if summary is not None and SAMPLE_UNS in inputs.uns:
        # A sampled inputs part holds a sample of its contexts' control cells, which are training cells (every
        # split keeps its controls in train): their means over every cell are the summary's.
        control_means.update({c: summary.control_means[c] for c in control_means if c in summary.control_means})
    missing = sorted(set(targets[CONTEXT]) - set(control_means))
    if missing:
        raise SplitDirectoryError(f"{folder}: no control cells for the {which} context(s) {preview(missing)}")
    feature_types = (train.var["feature_types"].astype(str).to_numpy()
                     if "feature_types" in train.var.columns else None)
    return PredictionTask(split, which, genes, feature_types, targets, controls, control_means,
                          summary if summary is not None else summarise_training(train), annotations)


def _check_which(which: str) -> None:
    if which not in ("test", "val"):
        raise ValueError(f"which must be 'test' or 'val', not {which!r}")


def load_task(split_dir: str | Path | Split, which: Which = "test") -> PredictionTask:
    """Read a split directory into what baselines and the evaluator need (never a truth part)."""
    from .splits import Split, load_split, perturbation_targets

    _check_which(which)
    split = split_dir if isinstance(split_dir, Split) else load_split(split_dir)
    return build_task(split.train, split.inputs(which), which, pd.Index(split.info.genes, dtype=object),
                      split.path, perturbation_targets(split), split)


def inputs_task(data_dir: str | Path, which: Which = "test") -> PredictionTask:
    """The same task from a folder holding only train.h5ad, val_inputs.h5ad and test_inputs.h5ad (what a
    sandbox sees at /data); genes are train's, annotations those the parts carry."""
    _check_which(which)
    folder = Path(data_dir)
    parts = {}
    for name in ("train", "val_inputs", "test_inputs"):
        if not (folder / f"{name}.h5ad").is_file():
            raise SplitDirectoryError(f"{folder / name}.h5ad is missing: expected train.h5ad, val_inputs.h5ad and "
                                      "test_inputs.h5ad")
        parts[name] = ad.read_h5ad(folder / f"{name}.h5ad")
    annotations: dict[str, list[str]] = {}
    for part in parts.values():
        annotations.update(targets_of_part(part.uns))
    train = parts["train"]
    return build_task(train, parts[f"{which}_inputs"], which, pd.Index(train.var_names.astype(str), dtype=object),
                      folder, annotations, summary=_whole_training(folder, train))


def _whole_training(folder: Path, train: ad.AnnData) -> TrainingSummary | None:
    """The whole training part's summary when the folder is a large split's sandbox data (its pseudobulks,
    and its co-expression cells when there; else those drawn from the part at hand), else None."""
    if not (folder / PSEUDOBULK_FILE).is_file():
        return None
    bulk = ad.read_h5ad(folder / PSEUDOBULK_FILE)
    if list(bulk.var_names.astype(str)) != list(train.var_names.astype(str)):
        raise SplitDirectoryError(f"{folder / PSEUDOBULK_FILE}: its genes differ from train.h5ad's")
    if (folder / COEXPRESSION_FILE).is_file():
        cells = _dense64(ad.read_h5ad(folder / COEXPRESSION_FILE).X)
    else:
        cells = _dense64(train.X[coexpression_rows(train.n_obs)])
    return summarise_pseudobulk(bulk, cells)


# --- Δ look-ups shared by several baselines -------------------------------------------------------


def _same_dose(doses: pd.Series, dose: float) -> np.ndarray:
    d = doses.to_numpy(dtype=float)
    return (np.isnan(d) & np.isnan(dose)) | np.isclose(d, dose, equal_nan=False)


def mean_training_delta(train: TrainingSummary, context: str, dose: float) -> np.ndarray:
    """Mean Δ over training conditions, preferring the same context and the same dose."""
    t = train.conditions
    same_ctx = (t[CONTEXT] == context).to_numpy()
    same_dose = _same_dose(t[DOSE], dose)
    for mask in (same_ctx & same_dose, same_ctx, same_dose, np.ones(len(t), dtype=bool)):
        if mask.any():
            return train.deltas[mask].mean(axis=0)
    return np.zeros(train.deltas.shape[1])


def seen_delta(train: TrainingSummary, perturbation: str, dose: float, context: str,
               other_contexts_only: bool = False, absolute: bool = False) -> np.ndarray | None:
    """Training Δ of one perturbation (its mean profile when `absolute`): same dose and context, else the
    mean over other contexts at the same dose, else over any dose; None when it was never seen in training."""
    t = train.conditions
    same_pert = (t[PERTURBATION] == perturbation).to_numpy()
    same_ctx = (t[CONTEXT] == context).to_numpy()
    same_dose = _same_dose(t[DOSE], dose)
    chain = [same_pert & ~same_ctx & same_dose, same_pert & ~same_ctx]
    if not other_contexts_only:
        chain = [same_pert & same_ctx & same_dose, *chain, same_pert]
    values = train.means if absolute else train.deltas
    for mask in chain:
        if mask.any():
            return values[mask].mean(axis=0)
    return None


def _as_predictions(task: PredictionTask, rows: list[np.ndarray]) -> ad.AnnData:
    obs = task.targets.loc[:, [CONDITION, PERTURBATION, DOSE, CONTEXT]].copy()
    obs.index = obs[CONDITION].to_numpy()
    X = np.vstack(rows).astype(np.float32) if rows else np.zeros((0, len(task.genes)), np.float32)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=task.genes.astype(str)))


def _predict_each(task: PredictionTask, delta_of: Callable[[pd.Series], np.ndarray | float]) -> ad.AnnData:
    rows = [task.control_means[row[CONTEXT]] + delta_of(row) for _, row in task.targets.iterrows()]
    return _as_predictions(task, rows)


# --- the baselines --------------------------------------------------------------------------------


def control_baseline(task: PredictionTask) -> ad.AnnData:
    """No change: the control pseudobulk of the condition's context."""
    return _predict_each(task, lambda row: 0.0)


def mean_delta_baseline(task: PredictionTask) -> ad.AnnData:
    """Context control + the mean training Δ. The mean is over training conditions of the same
    context at the same dose (for drugs: the average drug at that dose), falling back to the same
    context at any dose, the same dose in any context, then all training conditions. This is the
    reference every score is normalized against."""
    return _predict_each(task, lambda row: mean_training_delta(task.train, row[CONTEXT], row[DOSE]))


def context_mean_baseline(task: PredictionTask) -> ad.AnnData:
    """The mean of all perturbed training cells of the same context (cell-weighted, ignoring which
    perturbation); all perturbed training cells when the context has none."""
    train = task.train
    pooled = (np.mean(list(train.perturbed_context_means.values()), axis=0)
              if train.perturbed_context_means else None)

    def predict(row: pd.Series) -> np.ndarray:
        mean = train.perturbed_context_means.get(row[CONTEXT], pooled)
        return task.control_means[row[CONTEXT]] if mean is None else mean

    return _as_predictions(task, [predict(row) for _, row in task.targets.iterrows()])


def additive_baseline(task: PredictionTask) -> ad.AnnData:
    """Combinations A+B: context control + ΔA + ΔB, each single's Δ from training (same context and
    dose when seen there, else other contexts). A component never seen alone contributes the mean
    training Δ; a single is predicted by its own training Δ (or the mean Δ when unseen)."""
    def delta(row: pd.Series) -> np.ndarray:
        total = np.zeros(len(task.genes))
        for part in combo_genes(row[PERTURBATION]):
            d = seen_delta(task.train, part, row[DOSE], row[CONTEXT])
            total += mean_training_delta(task.train, row[CONTEXT], row[DOSE]) if d is None else d
        return total

    return _predict_each(task, delta)


def _dose_curve(train: TrainingSummary, perturbation: str, context: str) -> tuple[np.ndarray, np.ndarray]:
    """(doses, Δs) of one perturbation in training, sorted by dose: from the same context when it
    was dosed there, else averaged per dose over the other contexts."""
    t = train.conditions
    same = (t[PERTURBATION] == perturbation).to_numpy() & t[DOSE].notna().to_numpy()
    here = same & (t[CONTEXT] == context).to_numpy()
    rows = np.flatnonzero(here if here.any() else same)
    doses = t[DOSE].to_numpy(dtype=float)[rows]
    levels = np.unique(doses)
    deltas = [train.deltas[rows[doses == d]].mean(axis=0) for d in levels]
    return levels, np.stack(deltas) if deltas else np.empty((0, train.deltas.shape[1]))


def dose_interpolation_baseline(task: PredictionTask) -> ad.AnnData:
    """Unseen dose of a known drug: the drug's training Δs at the neighbouring doses, interpolated
    linearly in log-dose (linear dose when a dose is ≤ 0); outside the trained range the nearest
    dose's Δ (no extrapolation). A drug never dosed in training gets the mean Δ of the other drugs
    at the same dose (`mean_delta`)."""
    def delta(row: pd.Series) -> np.ndarray:
        doses, deltas = _dose_curve(task.train, row[PERTURBATION], row[CONTEXT])
        if not len(doses) or np.isnan(row[DOSE]):
            return mean_training_delta(task.train, row[CONTEXT], row[DOSE])
        scale = np.log10 if doses.min() > 0 and row[DOSE] > 0 else (lambda x: x)
        x, xs = scale(row[DOSE]), scale(doses)
        if x <= xs[0]:
            return deltas[0]
        if x >= xs[-1]:
            return deltas[-1]
        hi = int(np.searchsorted(xs, x))
        w = (x - xs[hi - 1]) / (xs[hi] - xs[hi - 1])
        return (1 - w) * deltas[hi - 1] + w * deltas[hi]

    return _predict_each(task, delta)


def _dose_applies(task: PredictionTask) -> bool:
    t = task.train.conditions
    dosed = set(t.loc[t[DOSE].notna(), PERTURBATION])
    pairs = zip(task.targets[PERTURBATION], task.targets[DOSE], strict=True)
    return any(p in dosed and not np.isnan(d) for p, d in pairs)


def delta_transfer_baseline(task: PredictionTask) -> ad.AnnData:
    """Unseen context: the perturbation's Δ measured in the other training contexts (same dose when
    available) added to the held-out context's control; the mean training Δ when the perturbation
    was never seen elsewhere."""
    def delta(row: pd.Series) -> np.ndarray:
        d = seen_delta(task.train, row[PERTURBATION], row[DOSE], row[CONTEXT], other_contexts_only=True)
        return mean_training_delta(task.train, row[CONTEXT], row[DOSE]) if d is None else d

    return _predict_each(task, delta)


def state_transfer_baseline(task: PredictionTask) -> ad.AnnData:
    """Unseen context: the perturbation's mean profile measured in the other training contexts (same dose
    when available) — not its Δ: right where a perturbation drives cells to a shared state whatever their
    control state (the response is then that state minus the context's control); delta transfer's
    prediction when the perturbation was never seen elsewhere. With `delta_transfer` it spans the
    responses between "same change" and "same end state", which a validation stack weighs."""
    def predict(row: pd.Series) -> np.ndarray:
        state = seen_delta(task.train, row[PERTURBATION], row[DOSE], row[CONTEXT], other_contexts_only=True,
                           absolute=True)
        if state is None:
            return task.control_means[row[CONTEXT]] + mean_training_delta(task.train, row[CONTEXT], row[DOSE])
        return state

    return _as_predictions(task, [predict(row) for _, row in task.targets.iterrows()])


def _context_embedding(task: PredictionTask) -> dict[str, np.ndarray]:
    """Each context's control centroid (training and target contexts), centred on their mean and
    projected on the top K = min(10, contexts − 1) principal directions of the centred centroids."""
    centroids = {**task.train.control_means, **task.control_means}
    names = sorted(centroids)
    C = np.stack([centroids[c] for c in names])
    C = C - C.mean(axis=0)
    k = max(1, min(CONTEXT_RIDGE_K, len(names) - 1))
    Z = C @ np.linalg.svd(C, full_matrices=False)[2][:k].T
    return dict(zip(names, Z, strict=True))


def _context_ridge_rows(t: pd.DataFrame, perturbation: str, dose: float, pool: np.ndarray) -> np.ndarray:
    """Training rows (within `pool`) a context ridge for (perturbation, dose) is fitted on: the same
    perturbation at the same dose when available, else at any dose; every pooled row when unseen."""
    same = pool & (t[PERTURBATION] == perturbation).to_numpy()
    rows = same & _same_dose(t[DOSE], dose)
    return rows if rows.any() else same if same.any() else pool


def _context_ridge(Z: np.ndarray, Y: np.ndarray, z: np.ndarray, lam: float) -> np.ndarray:
    """b + (z − z̄) W with W by ridge (λ) over the rows (Z, Y) and the intercept b = Ȳ unpenalized."""
    z_mean, b = Z.mean(axis=0), Y.mean(axis=0)
    Zc = Z - z_mean
    return b + (z - z_mean) @ np.linalg.solve(Zc.T @ Zc + lam * np.eye(Zc.shape[1]), Zc.T @ (Y - b))


def linear_context_ridge_baseline(task: PredictionTask) -> ad.AnnData:
    """Unseen context: Δ of a perturbation as a linear function of the context's control state,
    fitted across the training contexts; an unseen context is placed by its control profile. A
    context is embedded by `_context_embedding` (z); per target, Δ ≈ b + (z − z̄) W over the
    perturbation's training conditions (same dose when available, else any dose; all training
    conditions when the perturbation was never seen), W by ridge in closed form with the intercept b
    unpenalized. λ is tuned, as a fair baseline is: among `CONTEXT_RIDGE_SCALES` × the mean squared
    norm of the centred context embeddings, the one with the least leave-one-context-out squared error
    over the training conditions (each predicted from the other contexts alone); a large λ gives b, the
    perturbation's mean Δ over the training contexts (delta transfer), when the control state says
    nothing. With a single training context this is the mean Δ of those conditions."""
    train, t = task.train, task.train.conditions
    if not len(t):
        return _predict_each(task, lambda row: np.zeros(len(task.genes)))
    z = _context_embedding(task)
    centre = np.zeros_like(next(iter(z.values())))  # for a training context without controls of its own
    Z = np.stack([z.get(c, centre) for c in t[CONTEXT]])
    contexts = t[CONTEXT].to_numpy()
    spread = max(float(np.mean(np.sum((Z - Z.mean(axis=0)) ** 2, axis=1))), 1e-12)
    errors = np.zeros(len(CONTEXT_RIDGE_SCALES))
    for i, (_, row) in enumerate(t.iterrows()):
        others = contexts != contexts[i]
        if not others.any():
            continue
        rows = _context_ridge_rows(t, row[PERTURBATION], row[DOSE], others)
        for k, scale in enumerate(CONTEXT_RIDGE_SCALES):
            pred = _context_ridge(Z[rows], train.deltas[rows], Z[i], scale * spread)
            errors[k] += float(np.sum((pred - train.deltas[i]) ** 2))
    lam = CONTEXT_RIDGE_SCALES[int(np.argmin(errors))] * spread  # ties: the first, least shrunk

    def delta(row: pd.Series) -> np.ndarray:
        rows = _context_ridge_rows(t, row[PERTURBATION], row[DOSE], np.ones(len(t), dtype=bool))
        return _context_ridge(Z[rows], train.deltas[rows], z[row[CONTEXT]], lam)

    return _predict_each(task, delta)


def _target_embedding(genes: list[str], gene_pos: dict[str, int], emb: np.ndarray) -> np.ndarray | None:
    idx = [gene_pos[g] for g in genes if g in gene_pos]
    return emb[idx].sum(axis=0) if idx else None


def _fit_pca_ridge(Y: np.ndarray, perturbations: pd.Series, gene_pos: dict[str, int],
                   targets_of: Callable[[str], list[str]] = combo_genes) -> Callable[[str], np.ndarray]:
    """Closed-form fit of Y (genes × conditions) ≈ b + G W Pᵀ, a perturbation embedded by the summed
    rows of G of its target genes (`targets_of`); returns perturbation → predicted Δ."""
    b = Y.mean(axis=1, keepdims=True)
    k = max(1, min(PCA_RIDGE_K, Y.shape[1] - 1, Y.shape[0]))
    G = np.linalg.svd(Y - b, full_matrices=False)[0][:, :k] if Y.shape[1] >= 2 else np.zeros((Y.shape[0], k))
    rows = [_target_embedding(targets_of(p), gene_pos, G) for p in perturbations]
    fit = [i for i, r in enumerate(rows) if r is not None]
    W = np.zeros((k, k))
    if fit:
        P = np.stack([r for r in rows if r is not None])  # conditions × K (the `fit` rows)
        lam = PCA_RIDGE_LAMBDA * np.eye(k)
        left = np.linalg.solve(G.T @ G + lam, G.T @ (Y[:, fit] - b))
        W = np.linalg.solve((P.T @ P + lam).T, (left @ P).T).T

    def predict(perturbation: str) -> np.ndarray:
        emb = _target_embedding(targets_of(perturbation), gene_pos, G)
        return b[:, 0] + (G @ W @ emb if emb is not None else 0.0)

    return predict


def linear_pca_ridge_baseline(task: PredictionTask) -> ad.AnnData:
    """Linear model of Ahlmann-Eltze et al. (2025) on training Δs: Y (genes × conditions) ≈ b + G W Pᵀ
    with G = the top-K (K=10) principal directions of the centred training Δ matrix (gene embedding),
    P = the rows of G of each condition's target gene(s) (summed for combos), W by ridge (λ=0.1) in
    closed form. An unseen perturbation is predicted from its target gene's row of G; a target that
    is not a measured gene gets b, the mean training Δ. Like the paper (one fit per cell line), the
    model is fitted per context when that context has training conditions of its own, else pooled."""
    train = task.train
    gene_pos = {str(g): i for i, g in enumerate(task.genes)}
    if not len(train.conditions):
        return _predict_each(task, lambda row: np.zeros(len(task.genes)))
    contexts = train.conditions[CONTEXT].to_numpy()
    fits: dict[str | None, Callable[[str], np.ndarray]] = {
        None: _fit_pca_ridge(train.deltas.T, train.conditions[PERTURBATION], gene_pos)}
    for ctx in set(task.targets[CONTEXT]):
        own = contexts == ctx
        if own.sum() >= 2 and own.sum() < len(contexts):
            fits[ctx] = _fit_pca_ridge(train.deltas[own].T, train.conditions.loc[own, PERTURBATION], gene_pos)

    def delta(row: pd.Series) -> np.ndarray:
        return fits.get(row[CONTEXT], fits[None])(row[PERTURBATION])

    return _predict_each(task, delta)


def drug_target_ridge_baseline(task: PredictionTask) -> ad.AnnData:
    """The PCA-ridge above for annotated drugs: a drug is embedded by the summed rows of G of its
    annotated target genes, fitted per dose level on the training Δ minus the mean-Δ baseline's
    prediction (mean Δ of the same context and dose), so it is mean-Δ plus what the targets explain.
    A dose absent from training uses one fit pooled over doses; a drug with no measured annotated
    target gets the mean-Δ prediction."""
    train = task.train
    gene_pos = {str(g): i for i, g in enumerate(task.genes)}
    if not len(train.conditions):
        return _predict_each(task, lambda row: np.zeros(len(task.genes)))
    t = train.conditions
    offsets = np.stack([mean_training_delta(train, r[CONTEXT], r[DOSE]) for _, r in t.iterrows()])
    residual = train.deltas - offsets

    def targets_of(perturbation: str) -> list[str]:
        return task.annotations.get(perturbation, [])

    fits: dict[float | None, Callable[[str], np.ndarray]] = {
        None: _fit_pca_ridge(residual.T, t[PERTURBATION], gene_pos, targets_of)}
    for dose in set(task.targets[DOSE].astype(float)):
        own = _same_dose(t[DOSE], dose)
        if own.sum() >= 2:
            fits[dose] = _fit_pca_ridge(residual[own].T, t.loc[own, PERTURBATION], gene_pos, targets_of)

    def delta(row: pd.Series) -> np.ndarray:
        fit = next((f for d, f in fits.items() if d is not None and _same_dose(pd.Series([d]), row[DOSE])[0]),
                   fits[None])
        return mean_training_delta(train, row[CONTEXT], row[DOSE]) + fit(row[PERTURBATION])

    return _predict_each(task, delta)


def _annotations_apply(task: PredictionTask) -> bool:
    genes = set(map(str, task.genes))
    return any(g in genes for p in task.targets[PERTURBATION] for g in task.annotations.get(p, []))


@dataclass
class GeneNeighbours:
    """Co-expression neighbours among the training-perturbed genes. Each gene is embedded by its
    loadings on the top 20 principal components of (a sample of) training cells, scaled by the
    component's spread, so cosine similarity approximates the genes' correlation."""

    embedding: np.ndarray  # genes × components, unit rows
    gene_pos: dict[str, int]
    candidates: list[str]  # genes perturbed alone in training

    @classmethod
    def from_task(cls, task: PredictionTask) -> GeneNeighbours:
        from sklearn.decomposition import PCA  # here, not at the top: see metrics.py

        cells = task.train.cell_sample
        n_comp = max(1, min(GENE_SIM_DIM, cells.shape[0] - 1, cells.shape[1] - 1))
        pca = PCA(n_components=n_comp, svd_solver="randomized", random_state=0).fit(cells)
        emb = pca.components_.T * np.sqrt(pca.explained_variance_)[None, :]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        gene_pos = {str(g): i for i, g in enumerate(task.genes)}
        singles = sorted({p for p in task.train.conditions[PERTURBATION]
                          if len(combo_genes(p)) == 1 and p in gene_pos})
        return cls(emb, gene_pos, singles)

    def of(self, gene: str) -> list[tuple[str, float]]:
        """The 5 most similar candidates with weights ∝ positive similarity (uniform when none is
        positive), summing to 1; empty when `gene` is not measured or nothing was perturbed."""
        if gene not in self.gene_pos or not self.candidates:
            return []
        sims = self.embedding[[self.gene_pos[c] for c in self.candidates]] @ self.embedding[self.gene_pos[gene]]
        order = np.argsort(-sims, kind="stable")[:GENE_SIM_NEIGHBOURS]
        w = np.clip(sims[order], 0.0, None)
        w = w / w.sum() if w.sum() > 0 else np.full(len(order), 1.0 / len(order))
        return [(self.candidates[j], float(weight)) for j, weight in zip(order, w, strict=True)]


def gene_similarity_baseline(task: PredictionTask) -> ad.AnnData:
    """kNN on co-expression gene embeddings (`GeneNeighbours`): a target gene is predicted by the
    weighted training Δs of its 5 most similar training-perturbed genes, summed over the targets of
    a combo; targets that are not measured genes get the mean training Δ."""
    neighbours = GeneNeighbours.from_task(task)

    def delta(row: pd.Series) -> np.ndarray:
        total = np.zeros(len(task.genes))
        for part in combo_genes(row[PERTURBATION]):
            near = neighbours.of(part)
            if not near:
                total += mean_training_delta(task.train, row[CONTEXT], row[DOSE])
            for name, weight in near:
                d = seen_delta(task.train, name, row[DOSE], row[CONTEXT])
                total += weight * (d if d is not None else 0.0)
        return total

    return _predict_each(task, delta)


def _targets_are_genes(task: PredictionTask) -> bool:
    genes = set(map(str, task.genes))
    return any(all(g in genes for g in combo_genes(p)) for p in task.targets[PERTURBATION])


def _context_transfer_applies(task: PredictionTask) -> bool:
    trained = set(task.train.conditions[CONTEXT])
    return len(trained) >= 2 and bool(set(task.targets[CONTEXT]) - trained)


def _transfer_applies(task: PredictionTask) -> bool:
    t = task.train.conditions
    return any(((t[PERTURBATION] == row[PERTURBATION]) & (t[CONTEXT] != row[CONTEXT])).any()
               for _, row in task.targets.iterrows())


BASELINES: dict[str, tuple[Callable[[PredictionTask], ad.AnnData], Callable[[PredictionTask], bool]]] = {
    "control": (control_baseline, lambda task: True),
    "mean_delta": (mean_delta_baseline, lambda task: True),
    "context_mean": (context_mean_baseline, lambda task: True),
    "additive": (additive_baseline,
                 lambda task: any(len(combo_genes(p)) > 1 for p in task.targets[PERTURBATION])),
    "linear_pca_ridge": (linear_pca_ridge_baseline, _targets_are_genes),
    "delta_transfer": (delta_transfer_baseline, _transfer_applies),
    "state_transfer": (state_transfer_baseline, _transfer_applies),
    "linear_context_ridge": (linear_context_ridge_baseline, _context_transfer_applies),
    "dose_interpolation": (dose_interpolation_baseline, _dose_applies),
    "gene_similarity": (gene_similarity_baseline, _targets_are_genes),
    "drug_target_ridge": (drug_target_ridge_baseline, _annotations_apply),
}


def applicable_baselines(task: PredictionTask) -> list[str]:
    """Names of the baselines that make sense for this task: combos for `additive`, perturbations
    that are measured genes for the gene-embedding ones, seen-elsewhere ones for `delta_transfer` and
    `state_transfer`,
    a target context without training conditions (training spanning 2+ contexts) for
    `linear_context_ridge`, drugs dosed in training for `dose_interpolation`, annotated targets that
    are measured genes for `drug_target_ridge`."""
    return [name for name, (_, applies) in BASELINES.items() if applies(task)]


def run_baselines(split_dir: str | Path | Split | PredictionTask, which: Which = "test") -> dict[str, ad.AnnData]:
    """Predictions of every applicable baseline, in the model predictions format."""
    task = split_dir if isinstance(split_dir, PredictionTask) else load_task(split_dir, which)
    return {name: BASELINES[name][0](task) for name in applicable_baselines(task)}
