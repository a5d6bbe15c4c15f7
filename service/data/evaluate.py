"""The evaluator: scores predictions of a split's test (or val) conditions against the real cells
(`test_truth.h5ad` / `val_truth.h5ad`, which only the service reads).

Per condition, then averaged over conditions (NaN-aware: a metric undefined for a condition is left
out of its average and reported as null in the per-condition table). Pseudobulk = mean
log-normalized profile. Besides the model's scores the report carries

- `ceiling`: the data ceiling. The real cells of each condition are split at random into two
  halves; correlations between the halves' profiles are Spearman–Brown corrected (2r/(1+r)) to
  the reliability of the full sample, and MSEs between halves are divided by 4 (the expected
  squared error of a perfect predictor against a mean of n cells is σ²/n, while two half means
  differ by 4σ²/n). For `de_overlap` the ceiling is the overlap the true pseudobulk itself
  reaches (its |Δ| ranking need not match the rank test's significant set).
- `normalized`: (model − mean_baseline) / (target − mean_baseline), where the mean baseline is
  `mean_delta` and the target is the ceiling where one is reported, else the metric's ideal value
  (1 for R², accuracies, discrimination, overlaps and AUCs). 0 = no better than the mean baseline,
  1 = at the ceiling; lower-is-better MSEs map the same way. A metric whose ceiling is not better
  than the mean baseline (small samples) is left out rather than normalized by a meaningless gap.

Features: with `var["feature_types"]` (10x convention) the main metrics use `Gene Expression`
features, proteins (`Antibody Capture`) get the same metrics prefixed `protein_`, and peaks get
`atac_roc_auc` / `atac_pr_auc` (true differentially accessible peaks, Wilcoxon + BH, ranked by the
predicted |Δ|). Without the column every feature is a gene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from pydantic import BaseModel

from . import metrics as M
from .baselines import PredictionTask, Which, load_task, mean_delta_baseline, require_obs
from .celleval import CellEvalReport, CellEvalScorer
from .conditions import CONDITION, CONTEXT, DOSE, IS_CONTROL, PERTURBATION, combo_genes
from .errors import DataError, SplitDirectoryError, preview
from .load import read_h5ad
from .splits import Split

DE_MIN_CELLS = 20  # both groups need this many cells for the Wilcoxon-based DE overlap / peak AUCs
DE_MAX_CELLS = 300  # cells per group fed to the rank test (seeded subsample), to bound its cost
CEILING_MIN_CELLS = 4  # two cells per half at least

CORRELATIONS = ("pearson", "pearson_delta", "pearson_delta_pert", "pearson_delta_top20_de")
ERRORS = ("mse", "mse_top20_de")
IDEAL = {"r2_delta": 1.0, "direction_acc_top20_de": 1.0, "discrimination_l1": 1.0,
         "de_overlap": 1.0, "atac_roc_auc": 1.0, "atac_pr_auc": 1.0}
PROTEIN_PREFIX = "protein_"


class PredictionsError(DataError):
    """Predictions do not match the conditions or genes of the split (or hold non-finite values)."""


class EvaluationReport(BaseModel):
    which: str
    n_conditions: int
    summary: dict[str, float]
    per_condition: list[dict[str, Any]]
    normalized: dict[str, float]
    ceiling: dict[str, float]
    mean_baseline: dict[str, float]


@dataclass
class Truth:
    """Everything about the real cells that scoring needs, computed once per split part."""

    targets: pd.DataFrame
    n_cells: np.ndarray
    mean: np.ndarray  # conditions × features
    control: np.ndarray  # control mean of each condition's context
    reference: np.ndarray  # Systema reference: mean of training perturbed centroids
    t_stat: np.ndarray  # Welch t, condition vs control
    de_tested: np.ndarray  # bool per condition: both groups had ≥ DE_MIN_CELLS
    de_significant: np.ndarray  # bool conditions × features (Wilcoxon + BH)
    half_a: np.ndarray
    half_b: np.ndarray
    target_columns: list[np.ndarray]  # feature positions of each condition's target gene(s)


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=cap, replace=False)) if n > cap else np.arange(n)


def _read_truth(task: PredictionTask) -> ad.AnnData:
    assert task.split is not None, "scoring reads the truth of a split directory (load_task)"
    path = task.split.path / f"{task.which}_truth.h5ad"
    cells = task.split.truth(task.which)
    require_obs(cells, path, (CONDITION, CONTEXT, IS_CONTROL))
    perturbed = ~cells.obs[IS_CONTROL].to_numpy(dtype=bool)
    missing = sorted(set(task.targets[CONDITION]) - set(cells.obs.loc[perturbed, CONDITION].astype(str)))
    if missing:
        raise SplitDirectoryError(f"{path}: no cells for the condition(s) {preview(missing)}")
    if list(cells.var_names) != list(task.genes):  # a hand-made truth part: reordered in memory
        cells = cells.to_memory() if cells.isbacked else cells
        cells = cells[:, task.genes]
    return cells


def _systema_reference(task: PredictionTask) -> np.ndarray:
    """Per target context, the mean of the training perturbed centroids of that context; for a
    context unseen in training, its control plus the mean training Δ over all contexts."""
    train = task.train
    rows = []
    for _, row in task.targets.iterrows():
        same = (train.conditions[CONTEXT] == row[CONTEXT]).to_numpy()
        if same.any():
            rows.append(train.means[same].mean(axis=0))
        elif len(train.deltas):
            rows.append(task.control_means[row[CONTEXT]] + train.deltas.mean(axis=0))
        else:
            rows.append(task.control_means[row[CONTEXT]])
    return np.vstack(rows)


def build_truth(task: PredictionTask, de_min_cells: int = DE_MIN_CELLS, seed: int = 0) -> Truth:
    cells = _read_truth(task)
    targets = task.targets
    conditions = targets[CONDITION].to_numpy()
    # Control cells (none in a split's truth part) carry no label, so every pass over X skips them.
    labels = np.where(cells.obs[IS_CONTROL].to_numpy(dtype=bool), "",
                      cells.obs[CONDITION].astype(str).to_numpy()).astype(str)
    X = cells.X  # may be backed: group sums read it a row chunk at a time
    mean, var, n = M.group_mean_var(X, labels, conditions)

    ctrl_labels = task.controls.obs[CONTEXT].astype(str).to_numpy()
    contexts = np.unique(ctrl_labels)
    c_mean, c_var, c_n = M.group_mean_var(task.controls.X, ctrl_labels, contexts)
    ctx_row = {c: i for i, c in enumerate(contexts)}
    ci = np.array([ctx_row[c] for c in targets[CONTEXT]])
    t_stat = M.welch_t(mean, var, n[:, None], c_mean[ci], c_var[ci], c_n[ci][:, None])

    rng = np.random.default_rng(seed)
    # Halves: a random half of each condition's cells, by labelling cell i as (condition, parity).
    order = rng.permutation(len(labels))
    half = np.empty(len(labels), dtype=np.int64)
    half[order] = pd.Series(labels[order]).groupby(labels[order]).cumcount().to_numpy() % 2
    halves = np.char.add(labels.astype(str), np.where(half == 0, "#a", "#b"))
    half_mean = M.group_means(X, halves, np.concatenate([np.char.add(conditions.astype(str), "#a"),
                                                         np.char.add(conditions.astype(str), "#b")]))
    enough = n >= CEILING_MIN_CELLS
    half_a = np.where(enough[:, None], half_mean[: len(conditions)], np.nan)
    half_b = np.where(enough[:, None], half_mean[len(conditions):], np.nan)

    de_tested = np.zeros(len(conditions), dtype=bool)
    de_significant = np.zeros(mean.shape, dtype=bool)
    ctrl_blocks: dict[str, np.ndarray] = {}
    for i, cond in enumerate(conditions):
        context = targets[CONTEXT].iloc[i]
        if n[i] < de_min_cells or c_n[ci[i]] < de_min_cells:
            continue
        if context not in ctrl_blocks:
            idx = np.flatnonzero(ctrl_labels == context)
            ctrl_blocks[context] = M.as_dense(task.controls.X[idx[_subsample(len(idx), DE_MAX_CELLS, rng)]])
        idx = np.flatnonzero(labels == cond)
        group = M.as_dense(X[idx[_subsample(len(idx), DE_MAX_CELLS, rng)]])
        de_significant[i] = M.wilcoxon_significant(group, ctrl_blocks[context])
        de_tested[i] = True

    gene_pos = {str(g): j for j, g in enumerate(task.genes)}
    target_columns = [np.array([gene_pos[g] for g in combo_genes(p) if g in gene_pos], dtype=np.int64)
                      for p in targets[PERTURBATION]]
    return Truth(targets, n, mean, c_mean[ci], _systema_reference(task), t_stat, de_tested, de_significant,
                 half_a, half_b, target_columns)


def score_rows(pred: np.ndarray, true: np.ndarray, truth: Truth, cols: np.ndarray,
               full: bool = True) -> dict[str, np.ndarray]:
    """Per-condition metrics of `pred` against `true` on the feature columns `cols`.

    `full=False` skips the metrics that compare conditions with each other or need the DE test
    (used for the half-vs-half ceiling)."""
    p, t = pred[:, cols], true[:, cols]
    c, r = truth.control[:, cols], truth.reference[:, cols]
    # Float32 predictions of "no change" differ from the control by rounding noise; correlating
    # that noise with the true Δ would be meaningless, so such changes count as exactly zero.
    pd_, td = p - c, t - c
    pd_[np.abs(pd_) < M.NO_CHANGE] = 0.0
    top = M.top_k_by_abs(truth.t_stat[:, cols])
    out = {
        "mse": M.rowwise_mse(p, t),
        "pearson": M.rowwise_pearson(p, t),
        "pearson_delta": M.rowwise_pearson(pd_, td),
        "pearson_delta_pert": M.rowwise_pearson(p - r, t - r),
        "mse_top20_de": M.rowwise_mse(M.take_rows(p, top), M.take_rows(t, top)),
        "pearson_delta_top20_de": M.rowwise_pearson(M.take_rows(pd_, top), M.take_rows(td, top)),
        "r2_delta": M.rowwise_r2(td, pd_),
        "direction_acc_top20_de": M.direction_accuracy(M.take_rows(pd_, top), M.take_rows(td, top)),
    }
    if full:
        local = {int(j): k for k, j in enumerate(cols)}
        excluded = [np.array([local[j] for j in tc if j in local], dtype=np.int64)
                    for tc in truth.target_columns]
        out["discrimination_l1"] = M.discrimination_l1(p, t, excluded)
        sig = truth.de_significant[:, cols]
        out["de_overlap"] = np.array([M.de_overlap(sig[i], pd_[i]) if truth.de_tested[i] else np.nan
                                      for i in range(len(p))])
    return out


def peak_scores(pred: np.ndarray, truth: Truth, cols: np.ndarray) -> dict[str, np.ndarray]:
    pd_ = pred[:, cols] - truth.control[:, cols]
    sig = truth.de_significant[:, cols]
    aucs = np.array([M.peak_aucs(sig[i], pd_[i]) if truth.de_tested[i] else (np.nan, np.nan)
                     for i in range(len(pred))]).reshape(-1, 2)
    return {"atac_roc_auc": aucs[:, 0], "atac_pr_auc": aucs[:, 1]}


def _nanmeans(values: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        if np.isfinite(v).any():
            out[name] = float(np.nanmean(v))
    return out


class Evaluator:
    """Reads a split part once; scores any number of prediction sets against it."""

    def __init__(self, split_dir: str | Path | Split, which: Which = "test", de_min_cells: int = DE_MIN_CELLS,
                 seed: int = 0):
        self.task = load_task(split_dir, which)
        self.truth = build_truth(self.task, de_min_cells=de_min_cells, seed=seed)
        self.groups = self._feature_groups()
        self.ceiling = self._ceiling()
        self.baseline = _nanmeans(self.score_matrix(mean_delta_baseline(self.task).X))
        self._cell_eval: CellEvalScorer | None = None

    def _feature_groups(self) -> list[tuple[str, np.ndarray]]:
        ft = self.task.feature_types
        everything = np.arange(len(self.task.genes))
        if ft is None:
            return [("", everything)]
        rna = np.flatnonzero(ft == "Gene Expression")
        groups = [("", rna if len(rna) else everything)]
        protein, peaks = np.flatnonzero(ft == "Antibody Capture"), np.flatnonzero(ft == "Peaks")
        if len(protein):
            groups.append((PROTEIN_PREFIX, protein))
        if len(peaks):
            groups.append(("atac", peaks))
        return groups

    def score_matrix(self, pred: np.ndarray, true: np.ndarray | None = None,
                     full: bool = True) -> dict[str, np.ndarray]:
        """metric -> one score per condition of `pred` (conditions × features, in the truth's order) against
        `true` (the truth's means by default); `full=False` skips the metrics that need the DE test or compare
        conditions with each other. What `score` summarises; the stack scores its blends with it."""
        pred = np.asarray(pred, dtype=np.float64)
        true = self.truth.mean if true is None else true
        out: dict[str, np.ndarray] = {}
        for prefix, cols in self.groups:
            if prefix == "atac":
                if full:
                    out.update(peak_scores(pred, self.truth, cols))
            else:
                out.update({prefix + k: v for k, v in score_rows(pred, true, self.truth, cols, full).items()})
        return out

    def _ceiling(self) -> dict[str, float]:
        halves = self.score_matrix(self.truth.half_a, self.truth.half_b, full=False)
        ceiling = {}
        for prefix, _ in self.groups:
            for name in CORRELATIONS:
                if prefix + name in halves:
                    ceiling[prefix + name] = M.spearman_brown(halves[prefix + name])
            for name in ERRORS:
                if prefix + name in halves:
                    ceiling[prefix + name] = halves[prefix + name] / 4.0
        # No half-split for the overlap: the oracle (the true pseudobulk ranking its own |Δ|)
        # is what a perfect pseudobulk prediction can reach.
        oracle = self.score_matrix(self.truth.mean)
        for prefix, _ in self.groups:
            if prefix + "de_overlap" in oracle:
                ceiling[prefix + "de_overlap"] = oracle[prefix + "de_overlap"]
        return _nanmeans(ceiling)

    def align(self, predictions: str | Path | ad.AnnData) -> np.ndarray:
        """The predictions as a dense (conditions × genes) array in the split's order, or a
        `PredictionsError` naming what does not match."""
        if not isinstance(predictions, ad.AnnData):
            path = Path(predictions)
            if not path.is_file():
                raise PredictionsError(f"{path}: predictions file not found")
            try:  # written by generated code: the checked opener, like any file nobody vouches for
                predictions = read_h5ad(path, backed=False)
            except DataError as exc:
                raise PredictionsError(f"{path}: not a readable AnnData file ({exc})") from exc
        if CONDITION not in predictions.obs.columns:
            raise PredictionsError(f"predictions obs has no '{CONDITION}' column; expected one row per "
                                   f"condition keyed 'perturbation|dose|context'")
        given = predictions.obs[CONDITION].astype(str)
        dup = given[given.duplicated()].unique()
        if len(dup):
            raise PredictionsError(f"predictions repeat the condition(s) {preview(dup)}; one row each")
        expected = list(self.truth.targets[CONDITION])
        missing = [c for c in expected if c not in set(given)]
        if missing:
            raise PredictionsError(f"predictions miss {len(missing)} {self.task.which} condition(s): "
                                   f"{preview(missing)}")
        extra = sorted(set(given) - set(expected))
        if extra:
            raise PredictionsError(f"predictions hold {len(extra)} condition(s) that are not "
                                   f"{self.task.which} conditions of this split: {preview(extra)}")
        genes = pd.Index(predictions.var_names.astype(str))
        if genes.has_duplicates:
            raise PredictionsError(f"predictions repeat the gene(s) {preview(genes[genes.duplicated()].unique())}")
        want = pd.Index(self.task.genes.astype(str))
        if set(genes) != set(want):
            lack, more = want.difference(genes), genes.difference(want)
            raise PredictionsError(
                f"predictions genes differ from the split's {len(want)} genes: missing {preview(lack)}; "
                f"unexpected {preview(more)}")
        X = predictions.X
        # AnnData itself keeps X at (n_obs, n_vars); what can still be wrong is no X at all.
        if X is None:
            raise PredictionsError(f"predictions have no X; expected a dense ({len(given)}, {len(genes)}) "
                                   "= conditions × genes matrix of predicted mean profiles")
        dense = M.as_dense(X)
        bad = ~np.isfinite(dense)
        if bad.any():
            rows = given.to_numpy()[bad.any(axis=1)]
            raise PredictionsError(f"predictions hold {int(bad.sum())} NaN/inf value(s), in condition(s) "
                                   f"{preview(rows)}")
        row_pos = pd.Index(given).get_indexer(expected)
        col_pos = genes.get_indexer(want)
        return dense[np.ix_(row_pos, col_pos)]

    def score(self, predictions: str | Path | ad.AnnData) -> EvaluationReport:
        per = self.score_matrix(self.align(predictions))
        targets = self.truth.targets
        table = []
        for i in range(len(targets)):
            row: dict[str, Any] = {
                CONDITION: targets[CONDITION].iloc[i], PERTURBATION: targets[PERTURBATION].iloc[i],
                DOSE: None if np.isnan(targets[DOSE].iloc[i]) else float(targets[DOSE].iloc[i]),
                CONTEXT: targets[CONTEXT].iloc[i], "n_cells": int(self.truth.n_cells[i]),
            }
            row.update({k: (float(v[i]) if np.isfinite(v[i]) else None) for k, v in per.items()})
            table.append(row)
        summary = _nanmeans(per)
        return EvaluationReport(which=self.task.which, n_conditions=len(targets), summary=summary,
                                per_condition=table, normalized=self._normalize(summary),
                                ceiling=self.ceiling, mean_baseline=self.baseline)

    def cell_eval(self, predictions: str | Path | ad.AnnData) -> CellEvalReport:
        """cell-eval's scores of the same predictions, on the RNA features (see `celleval.py`); its real
        cells and their DE test are built on first use and reused."""
        if self._cell_eval is None:
            self._cell_eval = CellEvalScorer(self.task, _read_truth(self.task), self.groups[0][1])
        return self._cell_eval.score(self.align(predictions))

    def _normalize(self, summary: dict[str, float]) -> dict[str, float]:
        """(model − base) / (target − base), only where the target is better than the mean baseline:
        when noise puts the baseline at or past the ceiling, the ratio would flip sign or explode."""
        out = {}
        for name, value in summary.items():
            plain = name.removeprefix(PROTEIN_PREFIX)
            base = self.baseline.get(name)
            target = self.ceiling.get(name, IDEAL.get(plain))
            if base is None or target is None:
                continue
            gap = (base - target) if plain in ERRORS else (target - base)
            if gap > 1e-12:
                out[name] = (value - base) / (target - base)
        return out


def evaluate(split_dir: str | Path | Split, predictions: str | Path | ad.AnnData, which: Which = "test",
             de_min_cells: int = DE_MIN_CELLS) -> EvaluationReport:
    """Score predictions of the `which` conditions of a split directory (see module docstring)."""
    return Evaluator(split_dir, which, de_min_cells=de_min_cells).score(predictions)
