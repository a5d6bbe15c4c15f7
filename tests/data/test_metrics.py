"""Each metric against an independent plain computation (scipy.stats, sklearn.metrics, scanpy)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import average_precision_score, mean_squared_error, r2_score

from service.data import metrics as M


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_group_mean_var_matches_numpy_per_group(rng):
    dense = rng.poisson(1.0, size=(90, 15)).astype(np.float32)
    labels = rng.choice(["a", "b", "c", "unused-by-groups"], size=90)
    groups = np.array(["c", "a", "b"])
    mean, var, n = M.group_mean_var(sp.csr_matrix(dense), labels, groups)
    for i, g in enumerate(groups):
        block = dense[labels == g].astype(np.float64)
        assert n[i] == len(block)
        np.testing.assert_allclose(mean[i], block.mean(axis=0), rtol=1e-10)
        np.testing.assert_allclose(var[i], block.var(axis=0, ddof=1), rtol=1e-8, atol=1e-10)


def test_rowwise_pearson_mse_r2_match_scipy_and_sklearn(rng):
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(6, 40))
    b[1] = a[1] * 2 + 0.1 * b[1]
    r = M.rowwise_pearson(a, b)
    mse = M.rowwise_mse(a, b)
    r2 = M.rowwise_r2(b, a)
    for i in range(6):
        assert r[i] == pytest.approx(stats.pearsonr(a[i], b[i])[0], abs=1e-12)
        assert mse[i] == pytest.approx(mean_squared_error(b[i], a[i]), abs=1e-12)
        assert r2[i] == pytest.approx(r2_score(b[i], a[i]), abs=1e-12)


def test_pearson_and_r2_of_a_constant_row_are_nan(rng):
    a = rng.normal(size=(2, 10))
    const = np.ones((2, 10))
    assert np.isnan(M.rowwise_pearson(a, const)).all()
    assert np.isnan(M.rowwise_r2(const, a)).all()


def test_welch_t_and_top20_match_scanpy_rank_genes_groups(rng):
    n_genes = 60
    ctrl = rng.poisson(2.0, size=(50, n_genes)).astype(np.float32)
    shift = np.ones(n_genes)
    shift[:25] = rng.uniform(0.2, 3.0, size=25)
    pert = rng.poisson(2.0 * shift, size=(35, n_genes)).astype(np.float32)
    X = np.log1p(np.vstack([ctrl, pert]))
    adata = ad.AnnData(X=X, obs=pd.DataFrame({"g": ["ctrl"] * 50 + ["A"] * 35}, index=[f"c{i}" for i in range(85)]))
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.obs["g"] = adata.obs["g"].astype("category")
    sc.tl.rank_genes_groups(adata, "g", groups=["A"], reference="ctrl", method="t-test", n_genes=n_genes)
    names = np.array([row[0] for row in adata.uns["rank_genes_groups"]["names"]])
    scores = np.array([row[0] for row in adata.uns["rank_genes_groups"]["scores"]], dtype=np.float64)

    labels = np.array(adata.obs["g"].astype(str))
    mean, var, n = M.group_mean_var(sp.csr_matrix(X), labels, np.array(["A", "ctrl"]))
    t = M.welch_t(mean[:1], var[:1], n[:1, None], mean[1:], var[1:], n[1:, None])[0]
    by_name = pd.Series(t, index=adata.var_names)
    np.testing.assert_allclose(by_name[names].to_numpy(), scores, rtol=1e-4, atol=1e-4)
    top = M.top_k_by_abs(t[None, :], 20)[0]
    assert set(adata.var_names[top]) == set(names[np.argsort(-np.abs(scores), kind="stable")][:20])


def test_direction_accuracy_counts_matching_signs(rng):
    p, t = rng.normal(size=(4, 20)), rng.normal(size=(4, 20))
    expected = [np.mean([np.sign(x) == np.sign(y) for x, y in zip(p[i], t[i], strict=True)]) for i in range(4)]
    np.testing.assert_allclose(M.direction_accuracy(p, t), expected)
    # Predicting no change (up to float32 rounding) gets no direction right.
    assert M.direction_accuracy(np.full((1, 20), 1e-7), t[:1])[0] == 0.0


def test_discrimination_l1_against_a_plain_rank_loop(rng):
    n, g = 7, 30
    true = rng.normal(size=(n, g))
    pred = true + rng.normal(scale=1.2, size=(n, g))
    excluded = [np.array([i]) for i in range(n)]  # condition i targets gene i
    got = M.discrimination_l1(pred, true, excluded)
    for i in range(n):
        keep = np.ones(g, dtype=bool)
        keep[i] = False
        d = [np.abs(pred[j][keep] - true[i][keep]).sum() for j in range(n)]
        closer = sum(d[j] < d[i] for j in range(n) if j != i)
        assert got[i] == pytest.approx(1 - closer / (n - 1))
    assert M.discrimination_l1(true, true, excluded) == pytest.approx(np.ones(n))
    assert np.isnan(M.discrimination_l1(true[:1], true[:1], excluded[:1])).all()


def test_discrimination_ignores_the_target_gene():
    # Prediction 0 is right only at its target gene 0; elsewhere prediction 1 is closer to truth 0.
    true = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    pred = np.array([[10.0, 0.0, 3.0], [0.0, 0.0, 1.0]])
    with_target = M.discrimination_l1(pred, true, [np.array([], dtype=int)] * 2)
    without_target = M.discrimination_l1(pred, true, [np.array([0]), np.array([1])])
    assert with_target[0] == 1.0
    assert without_target[0] == 0.0


def test_spearman_brown():
    np.testing.assert_allclose(M.spearman_brown(np.array([0.5, 1.0, 0.0])), [2 / 3, 1.0, 0.0])


def _bh(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p)
    m = len(p)
    adj = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        running = min(running, p[order[rank - 1]] * m / rank)
        adj[order[rank - 1]] = running
    return adj


def test_wilcoxon_bh_matches_per_gene_mannwhitneyu(rng):
    ctrl = rng.poisson(3.0, size=(40, 25)).astype(float)
    lam = np.full(25, 3.0)
    lam[:6] = 9.0
    group = rng.poisson(lam, size=(30, 25)).astype(float)
    got = M.wilcoxon_significant(group, ctrl, alpha=0.05)
    p = np.array([stats.mannwhitneyu(group[:, j], ctrl[:, j], alternative="two-sided",
                                     method="asymptotic").pvalue for j in range(25)])
    np.testing.assert_array_equal(got, _bh(p) < 0.05)
    assert got[:6].all()


def test_de_overlap_is_share_of_true_set_in_predicted_top():
    sig = np.array([True, True, False, False, True, False])
    pred_delta = np.array([5.0, -0.1, -4.0, 0.0, 3.0, 0.2])  # top-3 |Δ|: 0, 2, 4
    assert M.de_overlap(sig, pred_delta) == pytest.approx(2 / 3)
    assert np.isnan(M.de_overlap(np.zeros(6, dtype=bool), pred_delta))
    assert M.de_overlap(sig, np.zeros(6)) == 0.0


def test_peak_aucs_match_mann_whitney_and_average_precision(rng):
    labels = rng.random(80) < 0.3
    delta = rng.normal(size=80) + labels * 1.5 * rng.choice([-1, 1], size=80)
    roc, pr = M.peak_aucs(labels, delta)
    score = np.abs(delta)
    u = stats.mannwhitneyu(score[labels], score[~labels]).statistic
    assert roc == pytest.approx(u / (labels.sum() * (~labels).sum()))
    order = np.argsort(-score)
    hits = np.cumsum(labels[order])
    precision_at_hits = hits[labels[order]] / (np.flatnonzero(labels[order]) + 1)
    assert pr == pytest.approx(precision_at_hits.mean())
    assert pr == pytest.approx(average_precision_score(labels, score))
    assert all(np.isnan(M.peak_aucs(np.ones(5, dtype=bool), delta[:5])))
