"""Selection on validation, owned by the service: the folds a candidate is scored on, and pooled scores.

A split either holds a validation fold (`holdout`: whole groups held out as the test holds them out) or,
when that fold would be too small to decide, lists grouped cross-validation folds over its training
conditions (`cv`). Either way every candidate — a designed model, a baseline, a stack of them — is
scored the same way: its out-of-fold predictions of each fold by that fold's evaluator, the
per-condition scores pooled over folds. The truth of a fold stays in its split folder here; a sandbox
gets only the fold's model files (`Fold.data`), so no predictor ever sees the truth it is scored on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard

import anndata as ad
import numpy as np
import pandas as pd

from service.data.baselines import BASELINES, applicable_baselines
from service.data.evaluate import EvaluationReport, Evaluator
from service.data.conditions import parse_condition_key
from service.data.splits import Split, condition_groups, load_split, write_fold
from service.pipeline.progress import ProgressCallback, ProgressEvent
from service.pipeline.rundir import RunDir, link_model_files

LOWER_IS_BETTER = ("mse", "mse_top20_de")  # discrimination_l1: 1 = own prediction closest, higher is better
HEADLINE = ("pearson_delta_pert", "mse_top20_de")  # what verdicts and tables always show


def better(metric: str, a: float, b: float) -> bool:
    """Whether score `a` is strictly better than `b` on `metric`."""
    return a < b if metric.removeprefix("protein_") in LOWER_IS_BETTER else a > b


def finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Fold:
    """One validation fold: its split folder (with truth, service side), the model files a sandbox sees,
    its evaluator and the validation predictions of every applicable baseline."""

    name: str
    split: Split
    data: Path
    evaluator: Evaluator
    groups: list[str]  # the held-out group of each val condition, in the evaluator's order
    baselines: dict[str, ad.AnnData] = field(default_factory=dict)

    @property
    def conditions(self) -> list[str]:
        return list(self.evaluator.truth.targets["condition"])


@dataclass
class PooledScore:
    """Scores of one candidate over every fold: per-condition rows pooled, then averaged."""

    summary: dict[str, float]
    per_condition: list[dict[str, Any]]
    n_conditions: int
    per_fold: dict[str, dict[str, float]]

    def get(self, metric: str) -> float | None:
        value = self.summary.get(metric)
        return value if finite(value) else None

    def to_json(self, per_condition: bool = False) -> dict[str, Any]:
        out = {"summary": self.summary, "n_conditions": self.n_conditions, "per_fold": self.per_fold}
        if per_condition:
            out["per_condition"] = self.per_condition
        return out


def pool(reports: dict[str, EvaluationReport], groups: dict[str, list[str]]) -> PooledScore:
    """Per-condition rows of every fold (each with its fold and held-out group: `groups[fold]` in the
    evaluator's order), pooled, then averaged."""
    rows = [{**row, "fold": name, "group": group} for name, report in reports.items()
            for row, group in zip(report.per_condition, groups[name], strict=True)]
    metrics = sorted({k for r in reports.values() for k in r.summary})
    summary = {}
    for m in metrics:
        values = np.array([r[m] for r in rows if finite(r.get(m))], dtype=float)
        if values.size:
            summary[m] = float(values.mean())
    return PooledScore(summary, rows, len(rows), {name: dict(r.summary) for name, r in reports.items()})


@dataclass
class Selection:
    """How candidates are compared: `holdout` (one fold, the split's val) or `cv` (K folds over train)."""

    mode: Literal["holdout", "cv"]
    group_by: str
    folds: list[Fold]
    main_data: Path  # the whole split's model files: a run on them gives the test predictions
    baselines: list[str]  # baselines applicable on every fold: those that can compete
    warnings: list[str] = field(default_factory=list)  # where validation cannot mirror the test fully

    def score(self, predictions: dict[str, ad.AnnData | Path]) -> PooledScore:
        """Pooled score of one prediction set per fold (a `PredictionsError` names what is wrong)."""
        return self.pool({f.name: f.evaluator.score(predictions[f.name]) for f in self.folds})

    def pool(self, reports: dict[str, EvaluationReport]) -> PooledScore:
        return pool(reports, {f.name: f.groups for f in self.folds})

    def baseline_score(self, name: str) -> PooledScore:
        return self.score({f.name: f.baselines[name] for f in self.folds})

    @property
    def n_conditions(self) -> int:
        return sum(len(f.conditions) for f in self.folds)

    @property
    def n_groups(self) -> int:
        """The held-out groups (cell types, genes, compounds) validation holds over all its folds."""
        return len({g for f in self.folds for g in f.groups})

    def describe(self) -> str:
        if self.mode == "holdout":
            return f"held-out validation: {self.n_conditions} conditions in whole {self.group_by} groups"
        return (f"{len(self.folds)}-fold cross-validation over whole {self.group_by} groups of the training "
                f"conditions ({self.n_conditions} conditions)")

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "group_by": self.group_by, "folds": [f.name for f in self.folds],
                "n_conditions": self.n_conditions, "baselines": self.baselines, "description": self.describe()}


def _fold(name: str, split: Split, data: Path) -> Fold:
    evaluator = Evaluator(split, "val")
    groups = condition_groups(evaluator.truth.targets, split.info.group_by)
    return Fold(name, split, data, evaluator, groups)


def prepare_selection(rd: RunDir, on_progress: ProgressCallback | None = None) -> Selection:
    """The folds of the run's split: the val fold, or one folder per cv fold (`folds/<k>/split` with its
    truth, `folds/<k>/sandbox_data` with the model files only), with every applicable baseline's
    validation predictions (computed here: baselines are cheap and run in the service)."""
    emit = on_progress or (lambda event: None)
    split = load_split(rd.split)
    main = rd.prepare_sandbox_data()
    if split.info.validation == "holdout":
        folds = [_fold("val", split, main)]
    else:
        folds = []
        for k in range(len(split.info.folds)):
            emit(ProgressEvent("split", f"writing cross-validation fold {k + 1}/{len(split.info.folds)}"))
            root = rd.folds / f"fold{k + 1}"
            fold_split = write_fold(split, k, root / "split")
            folds.append(_fold(f"fold{k + 1}", fold_split, link_model_files(fold_split.path, root / "sandbox_data")))
    per_fold = []
    for fold in folds:
        names = applicable_baselines(fold.evaluator.task)
        fold.baselines = {n: BASELINES[n][0](fold.evaluator.task) for n in names}
        per_fold.append(names)
    common = [n for n in per_fold[0] if all(n in names for names in per_fold)]
    return Selection(split.info.validation, split.info.group_by, folds, main, common,
                     _fold_warnings(split, folds))


def _training_groups(conditions: pd.DataFrame, group_by: str) -> int:
    return len(set(condition_groups(conditions, group_by)))


def _fold_warnings(split: Split, folds: list[Fold]) -> list[str]:
    """A fold whose training data holds a single group (e.g. one cell type) cannot show transfer learned
    across groups, which the whole split's model can use: its validation is a weak guide."""
    if split.info.validation != "cv":
        return []
    group_by = split.info.group_by
    fewest = min(_training_groups(f.evaluator.task.train.conditions, group_by) for f in folds)
    if fewest >= 2:
        return []
    keys = [parse_condition_key(c) for c in split.info.conditions["train"]]
    whole = _training_groups(pd.DataFrame(keys, columns=["perturbation", "dose", "context"]), group_by)
    return [f"a cross-validation fold trains on a single {group_by} while the test model trains on {whole}: "
            f"validation cannot show what is learned across {group_by}s, so selection on it is a weak guide"]


def stacked_frame(fold: Fold, prediction: ad.AnnData | Path) -> np.ndarray:
    """A fold's predictions as Δ (prediction − context control), rows in the evaluator's order."""
    return fold.evaluator.align(prediction) - fold.evaluator.truth.control


def true_delta(fold: Fold) -> np.ndarray:
    return fold.evaluator.truth.mean - fold.evaluator.truth.control


def as_predictions(fold: Fold, delta: np.ndarray) -> ad.AnnData:
    """Δ rows (evaluator order) back into the predictions format, on top of each condition's control."""
    targets = fold.evaluator.truth.targets
    obs = targets.loc[:, ["condition", "perturbation", "dose", "context"]].copy()
    obs.index = obs["condition"].astype(str).to_numpy()
    X = (fold.evaluator.truth.control + delta).astype(np.float32)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=fold.evaluator.task.genes.astype(str)))
