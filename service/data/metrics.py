"""Metric functions of the evaluator, vectorised over conditions (rows) and features (columns).

Every function here is pure numpy/scipy on dense pseudobulk arrays, on small dense cell blocks, or
(the group sums) on cells read a row chunk at a time;
loading, alignment and averaging live in `evaluate.py`. A row whose metric is undefined (constant
vector, no significant genes, one class only) gets NaN, and the evaluator averages with `nanmean`.
"""

from __future__ import annotations

# scipy.stats and scikit-learn are imported where they are used: this module travels in every sandbox bundle
# (cellforge_baselines), whose runs never score, and at the top they made importing the bundle's baselines
# take 3.0-3.5 s instead of 1.3-1.6 s on a 2-core machine, at each sandbox run.
import numpy as np
import scipy.sparse as sp

from .chunks import row_chunks

TOP_DE = 20


def _group_codes(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row: the index of its label in `groups`, -1 for a label outside them."""
    index = {g: i for i, g in enumerate(groups)}
    return np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)


def group_indicator(labels: np.ndarray, groups: np.ndarray) -> sp.csr_matrix:
    """Row-normalised (groups × cells) indicator, so `ind @ X` is the per-group mean."""
    rows = _group_codes(labels, groups)
    keep = rows >= 0
    counts = np.bincount(rows[keep], minlength=len(groups)).astype(np.float64)
    weights = 1.0 / np.maximum(counts, 1.0)
    cols = np.flatnonzero(keep)
    return sp.csr_matrix(
        (weights[rows[keep]], (rows[keep], cols)), shape=(len(groups), len(labels))
    )


def as_dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if sp.issparse(m) else m, dtype=np.float64)


def group_sums(X, labels: np.ndarray, groups: np.ndarray, squares: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Per-group sums of the rows of X (sparse or dense, in memory or backed), their sums of squares
    when asked, and the row counts; one row chunk at a time, so X is never whole in memory."""
    codes = _group_codes(labels, groups)
    n = np.bincount(codes[codes >= 0], minlength=len(groups)).astype(np.float64)
    total = np.zeros((len(groups), X.shape[1]))
    total_sq = np.zeros_like(total) if squares else None
    for start, block in row_chunks(X):
        rows = codes[start:start + block.shape[0]]
        cells = np.flatnonzero(rows >= 0)
        ind = sp.csr_matrix((np.ones(len(cells)), (rows[cells], cells)), shape=(len(groups), len(rows)))
        total += as_dense(ind @ block)
        if total_sq is not None:
            sq = block.multiply(block) if sp.issparse(block) else np.square(np.asarray(block, dtype=np.float64))
            total_sq += as_dense(ind @ sq)
    return total, total_sq, n


def group_means(X, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(groups × features) mean of the rows of X (sparse or dense, in memory or backed) carrying each label."""
    total, _, n = group_sums(X, labels, groups)
    return total / np.maximum(n, 1.0)[:, None]


def group_mean_var(
    X, labels: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group mean, unbiased variance (ddof=1, as scanpy) and cell count, without densifying X."""
    total, total_sq, n = group_sums(X, labels, groups, squares=True)
    assert total_sq is not None
    mean = total / np.maximum(n, 1.0)[:, None]
    mean_sq = total_sq / np.maximum(n, 1.0)[:, None]
    var = np.maximum(mean_sq - mean**2, 0.0) * (n / np.maximum(n - 1.0, 1.0))[:, None]
    return mean, var, n


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b` (NaN for constant rows)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / denom
    return np.where(denom > 0, np.clip(r, -1.0, 1.0), np.nan)


def rowwise_mse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.mean((pred - true) ** 2, axis=1)


def rowwise_r2(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per row, as `sklearn.metrics.r2_score(true_row, pred_row)`."""
    ss_res = ((true - pred) ** 2).sum(axis=1)
    ss_tot = ((true - true.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


def welch_t(
    mean1: np.ndarray, var1: np.ndarray, n1: np.ndarray, mean2: np.ndarray, var2: np.ndarray, n2: np.ndarray
) -> np.ndarray:
    """Welch t statistic group 1 vs group 2 per feature; NaN (constant features) becomes 0 as in scanpy."""
    from scipy import stats

    with np.errstate(invalid="ignore", divide="ignore"):
        t, _ = stats.ttest_ind_from_stats(
            mean1, np.sqrt(var1), n1, mean2, np.sqrt(var2), n2, equal_var=False
        )
    return np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def top_k_by_abs(t: np.ndarray, k: int = TOP_DE) -> np.ndarray:
    """Column indices of the k largest |t| per row, strongest first (stable for ties)."""
    k = min(k, t.shape[1])
    return np.argsort(-np.abs(t), axis=1, kind="stable")[:, :k]


def take_rows(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values, idx, axis=1)


NO_CHANGE = 1e-5  # |Δ| below this is "no change": float32 predictions carry rounding noise of ~1e-6


def direction_accuracy(pred_delta: np.ndarray, true_delta: np.ndarray) -> np.ndarray:
    """Fraction of features per row where the predicted change has the sign of the true change;
    a predicted change below `NO_CHANGE` in size has no direction and counts as a miss."""
    moved = np.abs(pred_delta) >= NO_CHANGE
    return np.mean(moved & (np.sign(pred_delta) == np.sign(true_delta)), axis=1)


def discrimination_l1(pred: np.ndarray, true: np.ndarray, excluded: list[np.ndarray]) -> np.ndarray:
    """How well each true profile picks out its own prediction among all predictions, in [0, 1].

    For condition i, L1 distances from the true profile i to every predicted profile j are computed
    without the features in `excluded[i]` (the perturbation's target genes, which would make the
    task trivial). Score = 1 - (#j≠i strictly closer than prediction i + ½·#ties) / (n - 1): 1 means
    the own prediction is the closest, 0.5 is chance, 0 the farthest. NaN with a single condition.
    """
    n = pred.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    from scipy.spatial.distance import cdist

    dist = cdist(true, pred, metric="cityblock")
    for i, cols in enumerate(excluded):
        if len(cols):
            dist[i] -= np.abs(pred[:, cols] - true[i, cols]).sum(axis=1)
    own = np.diag(dist)[:, None]
    others = ~np.eye(n, dtype=bool)
    closer = ((dist < own) & others).sum(axis=1)
    ties = (np.isclose(dist, own, rtol=1e-12, atol=1e-12) & others).sum(axis=1)
    return 1.0 - (closer + 0.5 * ties) / (n - 1)


def spearman_brown(r: np.ndarray) -> np.ndarray:
    """Reliability of the full sample from the correlation r of its two halves: 2r / (1 + r)."""
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > -1.0, 2.0 * r / (1.0 + r), np.nan)


def wilcoxon_significant(group: np.ndarray, reference: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Features differing between two dense cell blocks: two-sided Wilcoxon rank-sum (Mann–Whitney U,
    normal approximation with tie correction), Benjamini–Hochberg at `alpha`. Returns a bool mask."""
    from scipy import stats

    # Ranking runs along the last axis; features × cells in C order makes it contiguous (~3x faster).
    group_t, reference_t = np.ascontiguousarray(group.T), np.ascontiguousarray(reference.T)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = stats.mannwhitneyu(group_t, reference_t, axis=1, alternative="two-sided", method="asymptotic").pvalue
    # Features constant in both groups have no evidence of change.
    p = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)
    return stats.false_discovery_control(p, method="bh") < alpha


def de_overlap(true_significant: np.ndarray, pred_delta: np.ndarray) -> float:
    """Share of the truly significant features that the prediction ranks among its |Δ|-top as many.

    A pseudobulk prediction has no cells to test, so its significant set is taken as the
    `|true set|` features with the largest nonzero predicted |Δ|; NaN when nothing is truly significant.
    """
    k = int(true_significant.sum())
    if k == 0:
        return float("nan")
    predicted = np.argsort(-np.abs(pred_delta), kind="stable")[:k]
    predicted = predicted[pred_delta[predicted] != 0]  # predicting no change calls nothing
    return float(true_significant[predicted].sum() / k)


def peak_aucs(true_significant: np.ndarray, pred_delta: np.ndarray) -> tuple[float, float]:
    """ROC-AUC and PR-AUC (average precision) of |predicted Δ| for the truly changed peaks."""
    if true_significant.all() or not true_significant.any():
        return float("nan"), float("nan")
    from sklearn.metrics import average_precision_score, roc_auc_score

    score = np.abs(pred_delta)
    return (
        float(roc_auc_score(true_significant, score)),
        float(average_precision_score(true_significant, score)),
    )
