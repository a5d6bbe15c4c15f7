"""Scores from Arc Institute's `cell-eval` (the Virtual Cell Challenge metrics) beside our own evaluator.

cell-eval compares *cells*: a real and a predicted AnnData, each holding every perturbation's cells and
the control's, scored context by context (one cell line at a time, as the challenge does). CellForge
predictions are one mean profile per condition, so they are mapped to cells as follows, per context:

- real: the truth cells of each test condition and the context's control cells, each group a seeded
  subsample of at most `MAX_CELLS` cells (DE cost grows with cells);
- predicted: for each condition as many cells as its real group holds (at most the context's control
  cells), made from the context's control cells: each gene's spread around the control mean, moved to
  the predicted mean, and shrunk for a gene whose lowest cell would fall below 0 (cell-eval requires
  log-normalised values ≥ 0); predictions below 0 are clipped to 0 first. The predicted control cells
  are the real ones.

So a condition's predicted pseudobulk is exactly the prediction (clipped at 0), and cell-eval's
pseudobulk metrics (`mae`, `mse`, `pearson_delta`, `discrimination_score_l1`) score the very profile
our evaluator scores; its DE metrics (`overlap_at_N`, `precision_at_N`) run its own Wilcoxon test
(pdex) on those cells. Condition labels: the perturbation's name when it is unique in its context
(so the target gene is left out of `discrimination_score_l1`, as in ours), else the condition key.
Discrimination ranks a condition among the conditions of its own context (ours: among all).

`vcc_score` is cell-eval's `score_agg_metrics` over its VCC profile (`mae`, `discrimination_score_l1`,
`overlap_at_N`) against the `context_mean` baseline (the mean of the training perturbed cells of the
context: the challenge's baseline); 0 = no better than it, 1 = perfect.
"""

from __future__ import annotations

import contextlib
import functools
import io
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from pydantic import BaseModel

from . import metrics as M
from .baselines import PredictionTask, context_mean_baseline
from .conditions import CONDITION, CONTEXT, PERTURBATION
from .errors import DataError

VCC_METRICS = ("mae", "discrimination_score_l1", "overlap_at_N")
CORE_METRICS = ("pearson_delta", "mse", "mae", "mse_delta", "mae_delta", "discrimination_score_l1",
                "overlap_at_N", "precision_at_N")
LOWER_IS_BETTER = frozenset({"mse", "mae", "mse_delta", "mae_delta"})
GLOSSARY = {
    "vcc_score": "cell-eval's Virtual Cell Challenge score: mae, discrimination_score_l1 and overlap_at_N, each "
                 "scaled from the context_mean baseline (0) to perfect (1), averaged",
    "pearson_delta": "cell-eval: Pearson correlation of predicted and true pseudobulk change from control",
    "mse": "cell-eval: mean squared error of the pseudobulk profile",
    "mae": "cell-eval: mean absolute error of the pseudobulk profile",
    "mse_delta": "cell-eval: mean squared error of the change from control",
    "mae_delta": "cell-eval: mean absolute error of the change from control",
    "discrimination_score_l1": "cell-eval: 1 − normalised rank of the true profile among all true profiles by L1 "
                               "distance to the prediction (target gene left out); 1 = closest",
    "overlap_at_N": "cell-eval: share of the true DE genes (pdex Wilcoxon, FDR 5%) found among the prediction's "
                    "top DE genes of the same number",
    "precision_at_N": "cell-eval: share of the prediction's DE genes that are true DE genes",
}
MAX_CELLS = 300
CONTROL = "__cellforge_control__"


class CellEvalError(DataError):
    """cell-eval refused or failed on the data (e.g. values outside the log1p range it accepts)."""


class CellEvalReport(BaseModel):
    """cell-eval's metrics (names as cell-eval spells them), mean over conditions and per condition."""

    version: str
    profile: str = "vcc"
    summary: dict[str, float]
    vcc_score: float | None = None
    per_condition: dict[str, dict[str, float | None]]  # condition -> metric -> value


def _version() -> str:
    from importlib.metadata import version

    return version("cell-eval")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pdex draws a tqdm bar per DE run and polars warns about its string cache: noise on our stderr.
    (tqdm reads TQDM_DISABLE once, at import, so the bars are caught where they are written.)"""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


# pdex and numba-mwu (cell-eval's DE test) compile their numba kernels without `cache=True`: about ten seconds
# of compiling in every process that scores. Cached on disk (beside their sources, or under NUMBA_CACHE_DIR
# where those are read-only), a later process loads them in a fraction of a second.
_KERNEL_MODULES = ("numba_mwu._core", "numba_mwu._batch", "numba_mwu._sparse", "pdex._math")


@functools.cache  # once per process
def _cache_kernels() -> None:
    import importlib

    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    for name in _KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # another pdex/numba-mwu layout: its kernels compile as they always did
            continue
        for kernel in vars(module).values():
            if isinstance(kernel, Dispatcher) and isinstance(getattr(kernel, "_cache", None), NullCache):
                kernel.enable_caching()


def _subsample(idx: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, size=cap, replace=False)) if len(idx) > cap else idx


class _Context:
    """One context's real cells (built once) and the control cells predictions are made from."""

    def __init__(self, rows: np.ndarray, labels: list[str], real: ad.AnnData, controls: np.ndarray,
                 sizes: np.ndarray):
        self.rows, self.labels, self.real, self.controls, self.sizes = rows, labels, real, controls, sizes
        self.real_de: str | None = None  # cell-eval's CSV of the real DE, reused for every prediction

    def predicted(self, pred: np.ndarray, genes: pd.Index) -> ad.AnnData:
        blocks, labels = [self.controls], [CONTROL] * len(self.controls)
        for row, label, size in zip(self.rows, self.labels, self.sizes, strict=True):
            target = np.maximum(pred[row], 0.0)
            cells = self.controls[:size]
            base = cells.mean(axis=0)
            spread = cells - base
            # Shrink the spread only where the lowest cell would go below 0: the mean stays the target.
            room = base - cells.min(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                shrink = np.where(room > target, target / np.where(room > 0, room, 1.0), 1.0)
            blocks.append(np.maximum(target + spread * shrink, 0.0))
            labels += [label] * size
        return _anndata(np.vstack(blocks), labels, genes)


def _anndata(X: np.ndarray, labels: list[str], genes: pd.Index) -> ad.AnnData:
    obs = pd.DataFrame({"target": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes.astype(str)))


class CellEvalScorer:
    """Reads a split part's real cells once; scores any number of (conditions × genes) predictions."""

    def __init__(self, task: PredictionTask, truth_cells: ad.AnnData, columns: np.ndarray,
                 max_cells: int = MAX_CELLS, seed: int = 0, threads: int = 1):
        self.task, self.columns, self.threads = task, columns, threads
        self.genes = pd.Index(task.genes[columns].astype(str))
        self._tmp = tempfile.TemporaryDirectory(prefix="cellforge-celleval-")
        rng = np.random.default_rng(seed)
        targets = task.targets
        labels = truth_cells.obs[CONDITION].astype(str).to_numpy()
        ctrl_ctx = task.controls.obs[CONTEXT].astype(str).to_numpy()
        self.contexts: dict[str, _Context] = {}
        for context in dict.fromkeys(targets[CONTEXT].astype(str)):
            rows = np.flatnonzero(targets[CONTEXT].astype(str).to_numpy() == context)
            perts = targets[PERTURBATION].astype(str).to_numpy()[rows]
            unique = len(set(perts)) == len(perts) and CONTROL not in perts
            names = list(perts) if unique else list(targets[CONDITION].astype(str).to_numpy()[rows])
            ctrl = M.as_dense(task.controls.X[_subsample(np.flatnonzero(ctrl_ctx == context), max_cells, rng)])
            ctrl = ctrl[:, columns]
            blocks, cell_labels, sizes = [ctrl], [CONTROL] * len(ctrl), []
            for row, name in zip(rows, names, strict=True):
                idx = _subsample(np.flatnonzero(labels == targets[CONDITION].iloc[row]), max_cells, rng)
                blocks.append(M.as_dense(truth_cells.X[idx])[:, columns])
                cell_labels += [name] * len(idx)
                sizes.append(min(len(idx), len(ctrl)))
            self.contexts[context] = _Context(rows, names, _anndata(np.vstack(blocks), cell_labels, self.genes),
                                              ctrl, np.array(sizes))
        self._base: dict[str, float] | None = None

    def _scores(self, pred: np.ndarray) -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
        per: dict[str, dict[str, float | None]] = {}
        for context, ctx in self.contexts.items():
            frame = self._run(context, ctx, pred)
            for row, label in zip(ctx.rows, ctx.labels, strict=True):
                cond = str(self.task.targets[CONDITION].iloc[row])
                per[cond] = {m: (float(frame.at[label, m]) if m in frame.columns and np.isfinite(frame.at[label, m])
                                 else None) for m in CORE_METRICS}
        summary = {}
        for m in CORE_METRICS:
            values = [x for v in per.values() if (x := v[m]) is not None]
            if values:
                summary[m] = float(np.mean(values))
        return summary, per

    def _run(self, context: str, ctx: _Context, pred: np.ndarray) -> pd.DataFrame:
        from cell_eval import MetricPipeline, MetricsEvaluator

        _cache_kernels()
        outdir = Path(self._tmp.name) / f"ctx{list(self.contexts).index(context)}"
        with _quiet():
            evaluator = MetricsEvaluator(
                adata_pred=ctx.predicted(pred, self.genes), adata_real=ctx.real.copy(), de_real=ctx.real_de,
                control_pert=CONTROL, pert_col="target", num_threads=self.threads, outdir=str(outdir))
            if ctx.real_de is None:
                ctx.real_de = str(outdir / "real_de.csv")
            pipeline = MetricPipeline(profile=None)
            pipeline.add_metrics(list(CORE_METRICS))
            pipeline.compute_de_metrics(evaluator.de_comparison)
            pipeline.compute_anndata_metrics(evaluator.anndata_pair)
            return pipeline.get_results().to_pandas().set_index("perturbation")

    def score(self, pred: np.ndarray) -> CellEvalReport:
        """cell-eval's scores of `pred` (conditions × all split features, in the split's order)."""
        try:
            summary, per = self._scores(np.asarray(pred, dtype=np.float64)[:, self.columns])
            vcc = self._vcc(summary)
        except Exception as exc:  # cell-eval, pdex and polars raise plain ValueError/RuntimeError/polars errors
            raise CellEvalError(f"cell-eval could not score these predictions: {type(exc).__name__}: "
                                f"{str(exc)[:300]}") from exc
        return CellEvalReport(version=_version(), summary=summary, per_condition=per, vcc_score=vcc)

    def _vcc(self, summary: dict[str, float]) -> float | None:
        import polars as pl
        from cell_eval import score_agg_metrics

        if self._base is None:
            base = context_mean_baseline(self.task)
            order = pd.Index(base.obs[CONDITION].astype(str)).get_indexer(self.task.targets[CONDITION])
            self._base = self._scores(M.as_dense(base.X)[order][:, self.columns])[0]
        if not all(m in summary and m in self._base for m in VCC_METRICS):
            return None

        def frame(values: dict[str, float]) -> Any:
            return pl.DataFrame({"statistic": ["mean"], **{m: [values[m]] for m in VCC_METRICS}})

        # A baseline at a metric's ceiling (one test condition: discrimination 1.0) leaves cell-eval's
        # normalisation 0/0; that score is undefined, not a warning on the user's terminal.
        with np.errstate(invalid="ignore", divide="ignore"):
            result = score_agg_metrics(frame(summary), frame(self._base))
        score = float(result.filter(pl.col("metric") == "avg_score")["from_baseline"][0])
        return score if np.isfinite(score) else None


def cell_eval_block(score: Callable[[Any], CellEvalReport], predictions: dict[str, Any]) -> tuple[
        dict[str, Any], dict[str, CellEvalReport]]:
    """metrics.json's `cell_eval`: every named prediction set scored by `score` (`Evaluator.cell_eval`), with
    the time it took. A `CellEvalError` is recorded as `error`: the run's own scores still stand."""
    started = time.monotonic()
    reports: dict[str, CellEvalReport] = {}
    try:
        for name, pred in predictions.items():
            reports[name] = score(pred)
    except CellEvalError as exc:
        return {"error": str(exc)}, reports
    return {"version": _version(), "profile": "vcc", "seconds": round(time.monotonic() - started, 1),
            "scores": {n: {**r.summary, "vcc_score": r.vcc_score} for n, r in reports.items()}}, reports
