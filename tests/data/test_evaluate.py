"""The evaluator on real split directories: metric wiring, ceiling, normalization, validation errors."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import roc_auc_score

from service.data import SplitDirectoryError, make_split
from service.data.evaluate import Evaluator, PredictionsError, evaluate

TOP_METRICS = {"mse", "pearson", "pearson_delta", "pearson_delta_pert", "mse_top20_de",
               "pearson_delta_top20_de", "r2_delta", "direction_acc_top20_de", "discrimination_l1",
               "de_overlap"}


def truth_predictions(split: Path, which: str = "test") -> ad.AnnData:
    """The real pseudobulk of every condition: a perfect model."""
    cells = ad.read_h5ad(split / f"{which}_truth.h5ad")
    cells = cells[~cells.obs["is_control"].to_numpy(bool)]
    rows = cells.obs.drop_duplicates("condition")
    X = np.vstack([np.asarray(cells[cells.obs["condition"] == c].X.mean(axis=0)).ravel()
                   for c in rows["condition"]])
    obs = rows[["condition", "perturbation", "dose", "context"]]
    obs.index = obs["condition"].astype(str).to_numpy()
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=cells.var_names))


@pytest.fixture(scope="module")
def split(make_adata, tmp_path_factory) -> Path:
    """A split written by the real splitter: 4 test and 2 val perturbations of 10. Shared by the module's
    tests, which only read it; a test that edits a split edits its own copy (`own_split`)."""
    adata = make_adata([f"G{i}" for i in range(10)], n_genes=50, cells_per_condition=30, n_control=60)
    root = tmp_path_factory.mktemp("evaluate")
    make_split(adata, "unseen-perturbation", 0, root / "split", test_fraction=0.4, val_fraction=0.2)
    return root / "split"


@pytest.fixture
def own_split(split, tmp_path) -> Path:
    """A private copy of `split`, for a test that edits its files."""
    return Path(shutil.copytree(split, tmp_path / "split"))


def test_perfect_predictions_score_perfectly_and_match_plain_computations(split):
    pred = truth_predictions(split)
    report = evaluate(split, pred)
    assert report.n_conditions == 4
    assert TOP_METRICS <= set(report.summary)
    s = report.summary
    assert s["mse"] == pytest.approx(0.0, abs=1e-10)
    assert s["pearson"] == pytest.approx(1.0)
    assert s["pearson_delta"] == pytest.approx(1.0)
    assert s["r2_delta"] == pytest.approx(1.0)
    assert s["direction_acc_top20_de"] == 1.0
    assert s["discrimination_l1"] == 1.0
    assert 0.5 < s["de_overlap"] <= 1.0
    assert report.ceiling["de_overlap"] == pytest.approx(s["de_overlap"])
    # The ceiling is below a perfect score: half-samples disagree.
    assert 0 < report.ceiling["pearson_delta"] < 1
    assert report.ceiling["mse"] > 0
    assert report.normalized["r2_delta"] == pytest.approx(1.0)


def test_pearson_delta_and_top20_against_independent_computation(split):
    pred = truth_predictions(split)
    rng = np.random.default_rng(3)
    pred.X = pred.X + rng.normal(scale=0.3, size=pred.X.shape)
    report = evaluate(split, pred)

    truth = ad.read_h5ad(split / "test_truth.h5ad")
    ctrl_cells = ad.read_h5ad(split / "test_inputs.h5ad")
    ctrl_dense = ctrl_cells.X.toarray()
    ctrl = ctrl_dense.mean(axis=0)
    train = ad.read_h5ad(split / "train.h5ad")
    perturbed = train[~train.obs["is_control"].to_numpy(bool)]
    centroids = np.vstack([np.asarray(perturbed[perturbed.obs["condition"] == c].X.mean(axis=0)).ravel()
                           for c in perturbed.obs["condition"].unique()])
    ref = centroids.mean(axis=0)
    for row in report.per_condition:
        cells = truth[truth.obs["condition"] == row["condition"]].X.toarray()
        true = cells.mean(axis=0)
        p = pred[row["condition"]].X.ravel()
        assert row["pearson_delta"] == pytest.approx(stats.pearsonr(p - ctrl, true - ctrl)[0], abs=1e-6)
        assert row["pearson_delta_pert"] == pytest.approx(stats.pearsonr(p - ref, true - ref)[0], abs=1e-6)
        t = stats.ttest_ind(cells, ctrl_dense, equal_var=False).statistic
        top = np.argsort(-np.abs(np.nan_to_num(t)), kind="stable")[:20]
        assert row["mse_top20_de"] == pytest.approx(np.mean((p[top] - true[top]) ** 2), rel=1e-5)
        assert row["pearson_delta_top20_de"] == pytest.approx(
            stats.pearsonr(p[top] - ctrl[top], true[top] - ctrl[top])[0], abs=1e-6)
    assert report.summary["pearson_delta"] == pytest.approx(
        np.mean([r["pearson_delta"] for r in report.per_condition]))


def test_ceiling_is_spearman_brown_of_half_split(split):
    ev = Evaluator(split)
    truth = ev.truth
    r = [stats.pearsonr(truth.half_a[i] - truth.control[i], truth.half_b[i] - truth.control[i])[0]
         for i in range(len(truth.targets))]
    expected = np.mean([2 * x / (1 + x) for x in r])
    assert ev.ceiling["pearson_delta"] == pytest.approx(expected)
    assert ev.ceiling["mse"] == pytest.approx(np.mean((truth.half_a - truth.half_b) ** 2) / 4)


def test_mean_baseline_normalizes_to_zero(split):
    from service.data.baselines import run_baselines

    ev = Evaluator(split)
    report = ev.score(run_baselines(ev.task)["mean_delta"])
    for name, value in report.normalized.items():
        assert value == pytest.approx(0.0, abs=1e-9), name
    assert report.mean_baseline == report.summary


def test_normalization_only_where_the_ceiling_beats_the_baseline(ev):
    ev.baseline = {"pearson_delta": 0.5, "mse": 0.2, "r2_delta": 0.2, "pearson": 0.9}
    ev.ceiling = {"pearson_delta": 0.9, "mse": 0.1, "pearson": 0.85}
    got = ev._normalize({"pearson_delta": 0.7, "mse": 0.15, "r2_delta": 0.6, "pearson": 0.95})
    assert got["pearson_delta"] == pytest.approx(0.5)
    assert got["mse"] == pytest.approx(0.5)
    assert got["r2_delta"] == pytest.approx(0.5)  # against the ideal R² of 1
    assert "pearson" not in got  # the baseline already beats the ceiling


def test_val_is_scored_against_val_truth(make_adata, tmp_path):
    """The val conditions come from val_inputs (like test_inputs), their cells from val_truth only."""
    adata = make_adata([f"G{i}" for i in range(20)], n_genes=40, cells_per_condition=12, contexts=["X", "Y"])
    make_split(adata, "unseen-perturbation", 0, tmp_path / "split", val_fraction=0.25)
    split = tmp_path / "split"
    report = evaluate(split, truth_predictions(split, "val"), which="val")
    assert report.which == "val"
    val = json.loads((split / "split.json").read_text())["conditions"]["val"]
    assert len(val) == 10 and {r["condition"] for r in report.per_condition} == set(val)
    assert report.summary["mse"] == pytest.approx(0.0, abs=1e-10)
    (split / "val_truth.h5ad").unlink()  # the inputs alone cannot score
    with pytest.raises(SplitDirectoryError, match="val_truth.h5ad: missing"):
        Evaluator(split, "val")


def test_multimodal_protein_and_atac_metrics(make_adata, tmp_path):
    adata = make_adata([f"G{i}" for i in range(6)], n_genes=30, cells_per_condition=30, n_control=60,
                       feature_types={"Antibody Capture": 6, "Peaks": 40})
    # Each perturbation opens 8 peaks of its own, so there are truly differentially accessible peaks.
    rng = np.random.default_rng(0)
    X = adata.X.toarray()
    peaks = np.flatnonzero(adata.var["feature_types"] == "Peaks")
    for pert in adata.obs["perturbation"].unique():
        if pert != "control":
            cells = np.flatnonzero(adata.obs["perturbation"] == pert)
            opened = rng.choice(peaks, size=8, replace=False)
            X[np.ix_(cells, opened)] = rng.poisson(4.0, size=(len(cells), 8)) + 1
    adata.X = sp.csr_matrix(X)
    split = tmp_path / "split"
    make_split(adata, "unseen-perturbation", 0, split, test_fraction=0.5)
    ev = Evaluator(split)
    report = ev.score(truth_predictions(split))
    assert report.summary["protein_mse"] == pytest.approx(0.0, abs=1e-10)
    assert "protein_pearson_delta" in report.ceiling
    # The true pseudobulk ranks the opened peaks first.
    assert report.summary["atac_roc_auc"] > 0.95 and report.summary["atac_pr_auc"] > 0.8
    cols = ev.groups[-1][1]
    for r, sig, p in zip(report.per_condition, ev.truth.de_significant[:, cols],
                         ev.truth.mean[:, cols] - ev.truth.control[:, cols], strict=True):
        assert r["atac_roc_auc"] == pytest.approx(roc_auc_score(sig, np.abs(p)))
    # Gene metrics use the RNA block only.
    assert ev.groups[0][1].tolist() == list(range(30))


# --- validation -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_evaluator(split) -> Evaluator:
    return Evaluator(split)


@pytest.fixture
def ev(built_evaluator) -> Evaluator:
    """The module's evaluator, built once; a shallow copy per test, so one that sets its baseline or
    ceiling sets its own."""
    return copy.copy(built_evaluator)


def test_missing_condition_is_named(ev, split):
    pred = truth_predictions(split)
    gone = pred.obs["condition"].iloc[-1]
    with pytest.raises(PredictionsError, match=rf"miss 1 test condition.*{re.escape(gone)}"):
        ev.score(pred[pred.obs["condition"] != gone].copy())


def test_unknown_extra_condition_is_named(ev, split):
    pred = truth_predictions(split)
    extra = pred[:1].copy()
    extra.obs.index = ["X|1|all"]
    extra.obs["condition"] = "X|1|all"
    with pytest.raises(PredictionsError, match=r"not test conditions.*X\|1\|all"):
        ev.score(ad.concat([pred, extra]))


def test_wrong_genes_are_named(ev, split):
    pred = truth_predictions(split)
    renamed = list(pred.var_names)
    lost = renamed[1]
    renamed[1] = "Z1"
    pred.var_names = renamed
    with pytest.raises(PredictionsError, match=rf"missing '{lost}'; unexpected 'Z1'"):
        ev.score(pred)
    with pytest.raises(PredictionsError, match=r"genes differ"):
        ev.score(truth_predictions(split)[:, :-1].copy())


def test_nan_is_rejected_with_its_condition(ev, split):
    pred = truth_predictions(split)
    pred.X[2, 5] = np.nan
    pred.X[2, 6] = np.inf
    bad = pred.obs["condition"].iloc[2]
    with pytest.raises(PredictionsError, match=rf"2 NaN/inf value\(s\).*{re.escape(bad)}"):
        ev.score(pred)


def test_missing_condition_column_and_duplicates(ev, split):
    pred = truth_predictions(split)
    with pytest.raises(PredictionsError, match="no 'condition' column"):
        ev.score(ad.AnnData(X=pred.X, var=pred.var))
    with pytest.raises(PredictionsError, match="repeat the condition"):
        ev.score(ad.concat([pred, pred[:1]]))


def test_predictions_without_x_are_rejected(ev, split):
    pred = truth_predictions(split)
    with pytest.raises(PredictionsError, match=r"no X; expected a dense \(4, 50\)"):
        ev.score(ad.AnnData(obs=pred.obs, var=pred.var))


def test_bad_file_is_a_predictions_error(ev, tmp_path):
    with pytest.raises(PredictionsError, match="not found"):
        ev.score(tmp_path / "nope.h5ad")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(PredictionsError, match="not a readable AnnData"):
        ev.score(tmp_path / "junk.h5ad")


def test_gene_order_is_aligned(ev, split):
    pred = truth_predictions(split)
    shuffled = pred[::-1, ::-1].copy()
    assert ev.score(shuffled).summary["mse"] == pytest.approx(0.0, abs=1e-10)


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_score_prints_table_and_json(split, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    path = tmp_path / "pred.h5ad"
    truth_predictions(split).write_h5ad(path)
    result = CliRunner().invoke(app, ["score", "--split", str(split), "--predictions", str(path), "--json",
                                      "--per-condition"])
    assert result.exit_code == 0, result.output
    assert "pearson_delta" in result.output and "ceiling" in result.output
    first = truth_predictions(split).obs["condition"].iloc[0]
    assert first in result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["summary"]["mse"] == pytest.approx(0.0, abs=1e-10)
    assert len(report["per_condition"]) == report["n_conditions"] == 4


def test_cli_score_states_the_verdict_against_the_best_baseline_first(split, tmp_path):
    """The mean-Δ baseline's own predictions tie it and lose to the better baselines: the verdict says so,
    names the best baseline with its score and warns that 4 test conditions cannot decide."""
    from typer.testing import CliRunner

    from service.cli import app
    from service.data.baselines import run_baselines

    path = tmp_path / "pred.h5ad"
    run_baselines(split)["mean_delta"].write_h5ad(path)
    result = CliRunner().invoke(app, ["score", "--split", str(split), "--predictions", str(path), "--json"])
    assert result.exit_code == 0, result.output
    # --json: the verdict and tables for a person on stderr, one JSON document on stdout
    assert result.stderr.lstrip().startswith("verdict:") and "does NOT beat the best baseline" in result.stderr
    report = json.loads(result.stdout)
    verdict = report["verdict"]
    p = verdict["metrics"]["pearson_delta_pert"]
    best = max(report["baselines"], key=lambda n: report["baselines"][n].get("pearson_delta_pert", -9))
    assert verdict["beats_baselines"] is False and p["beats_test"] is False
    assert p["best_baseline_test"] == best
    assert p["best_baseline_test_score"] == report["baselines"][best]["pearson_delta_pert"]
    assert "mean_delta" in p["baselines_beating_model_test"]  # a tie is no win
    assert p["margin_test"] == pytest.approx(report["summary"]["pearson_delta_pert"] - p["best_baseline_test_score"])
    assert set(verdict["metrics"]) == {"pearson_delta_pert", "mse_top20_de"}
    assert any("fewer than 10" in w for w in verdict["warnings"])


def test_cli_score_reports_a_bad_prediction_as_one_json_error(split, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    path = tmp_path / "pred.h5ad"
    truth_predictions(split)[1:].copy().write_h5ad(path)
    result = CliRunner().invoke(app, ["score", "--split", str(split), "--predictions", str(path), "--json"])
    assert result.exit_code == 1
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["ok"] is False and last["error"] == "PredictionsError" and "miss 1 test condition" in last["message"]


def test_split_without_val_conditions_says_so(make_adata, tmp_path):
    from service.data import SplitDirectoryError

    adata = make_adata([f"G{i}" for i in range(4)], n_genes=20, cells_per_condition=10, n_control=20)
    make_split(adata, "unseen-perturbation", 0, tmp_path / "split", val_fraction=0.0)
    with pytest.raises(SplitDirectoryError, match="no val conditions"):
        Evaluator(tmp_path / "split", "val")  # too few to hold out: cross-validation folds replace val


def test_truth_lacking_a_condition_is_a_split_error(own_split):
    from service.data import SplitDirectoryError

    split = own_split
    truth = ad.read_h5ad(split / "test_truth.h5ad")
    gone = truth.obs["condition"].astype(str).iloc[0]
    truth[truth.obs["condition"] != gone].copy().write_h5ad(split / "test_truth.h5ad")
    expected = rf"test_truth.h5ad: no cells for the condition\(s\) '{re.escape(gone)}'"
    with pytest.raises(SplitDirectoryError, match=expected):
        Evaluator(split)
