"""cell-eval beside our evaluator on a real split: the quantities both define agree, the rest rank predictions
the same way, and `cellforge score` carries cell-eval's VCC profile."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.data import make_split
from service.data.baselines import context_mean_baseline
from service.data.celleval import CORE_METRICS, VCC_METRICS
from service.data.evaluate import Evaluator

from .test_evaluate import truth_predictions

# cell-eval's DE test runs per context and per prediction (seconds each); the first process after an install
# also compiles pdex's numba kernels (a minute on a loaded machine; cached on disk from then on).
pytestmark = pytest.mark.slow

# A fresh interpreter scores the split once and counts how its DE kernels were got: loaded from the disk
# cache, or compiled.
SCORE_IN_A_FRESH_PROCESS = """
import json, sys
from numba.core.dispatcher import Dispatcher
from service.data.celleval import _KERNEL_MODULES
from service.data.evaluate import Evaluator
from tests.data.test_evaluate import truth_predictions

Evaluator(sys.argv[1], "test").cell_eval(truth_predictions(__import__("pathlib").Path(sys.argv[1])))
kernels = [k for m in _KERNEL_MODULES for k in vars(sys.modules[m]).values() if isinstance(k, Dispatcher)]
print(json.dumps({"hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                  "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels)}))
"""


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    from .conftest import make_perturbation_adata

    adata = make_perturbation_adata([f"G{i}" for i in range(12)], n_genes=40, cells_per_condition=40,
                                    n_control=80, contexts=("A", "B"))
    out = tmp_path_factory.mktemp("celleval") / "split"
    make_split(adata, "unseen-perturbation", 0, out, test_fraction=0.4, val_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def evaluator(split) -> Evaluator:
    return Evaluator(split, "test")


def _noisy(truth: ad.AnnData, scale: float, seed: int = 0) -> ad.AnnData:
    noisy = truth.copy()
    noisy.X = np.maximum(np.asarray(truth.X) + np.random.default_rng(seed).normal(0, scale, truth.shape), 0.0)
    return noisy


def test_shared_quantities_agree_per_condition(split, evaluator):
    pred = _noisy(truth_predictions(split), 0.3)
    ours = {r["condition"]: r for r in evaluator.score(pred).per_condition}
    theirs = evaluator.cell_eval(pred)
    assert set(theirs.summary) == set(CORE_METRICS) and theirs.version.startswith("0.8")
    assert set(theirs.per_condition) == set(ours)
    X, control = evaluator.align(pred), evaluator.truth.control
    for i, condition in enumerate(evaluator.truth.targets["condition"]):
        mine, cell = ours[condition], theirs.per_condition[condition]
        assert cell["mse"] == pytest.approx(mine["mse"], rel=1e-4)
        assert cell["pearson_delta"] == pytest.approx(mine["pearson_delta"], abs=1e-4)
        # MAE and the Δ errors: ours has no such metric; the same arrays give them in plain numpy.
        true = evaluator.truth.mean[i]
        assert cell["mae"] == pytest.approx(np.abs(X[i] - true).mean(), rel=1e-4)
        assert cell["mse_delta"] == pytest.approx(((X[i] - control[i]) - (true - control[i])).__pow__(2).mean(), rel=1e-4)


def test_real_de_genes_agree_with_our_rank_test(split, evaluator):
    """Both call significant genes by a Wilcoxon test with BH at 5% on the same real cells."""
    evaluator.cell_eval(truth_predictions(split))
    scorer = evaluator._cell_eval
    assert scorer is not None
    agree = []
    for ctx in scorer.contexts.values():
        de = pl.read_csv(ctx.real_de).to_pandas()
        sig = de[de["fdr"] < 0.05] if "fdr" in de else de[de["p_value_adj"] < 0.05]
        for row, label in zip(ctx.rows, ctx.labels, strict=True):
            theirs = set(sig.loc[sig["target"].astype(str) == label, "feature"].astype(str))
            ours = set(pd.Index(scorer.genes)[evaluator.truth.de_significant[row]])
            agree.append(len(theirs & ours) / max(1, len(theirs | ours)))
    assert np.mean(agree) > 0.8, agree


def test_both_rank_better_predictions_higher(split, evaluator):
    truth = truth_predictions(split)
    good, bad = _noisy(truth, 0.05), context_mean_baseline(evaluator.task)
    ours = {n: evaluator.score(p).summary for n, p in (("good", good), ("bad", bad))}
    theirs = {n: evaluator.cell_eval(p) for n, p in (("good", good), ("bad", bad))}
    assert ours["good"]["de_overlap"] > ours["bad"]["de_overlap"]
    assert theirs["good"].summary["overlap_at_N"] > theirs["bad"].summary["overlap_at_N"]
    assert ours["good"]["discrimination_l1"] > ours["bad"]["discrimination_l1"]
    assert theirs["good"].summary["discrimination_score_l1"] > theirs["bad"].summary["discrimination_score_l1"]
    # The VCC score is cell-eval's own normalisation against the context_mean baseline: that baseline scores 0.
    assert theirs["bad"].vcc_score == pytest.approx(0.0, abs=1e-9)
    assert 0.3 < theirs["good"].vcc_score <= 1.0


def test_cli_score_prints_cell_eval_and_puts_it_in_json(split, tmp_path):
    pred = tmp_path / "pred.h5ad"
    _noisy(truth_predictions(split), 0.2).write_h5ad(pred)
    result = CliRunner().invoke(app, ["score", "--split", str(split), "--predictions", str(pred), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout.strip().splitlines()[-1])
    cell = document["cell_eval"]
    assert set(VCC_METRICS) <= set(cell["summary"]) and cell["vcc_score"] is not None
    assert len(cell["per_condition"]) == document["n_conditions"]
    assert "cell-eval" in result.output and "vcc_score" in result.output


def test_a_later_process_loads_the_de_kernels_instead_of_compiling_them(split, evaluator):
    evaluator.cell_eval(truth_predictions(split))  # this process compiled (or loaded) and cached them
    done = subprocess.run([sys.executable, "-c", SCORE_IN_A_FRESH_PROCESS, str(split)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["hits"] > 0 and counts["misses"] == 0, counts


def test_one_test_condition_scores_without_a_warning(tmp_path):
    """One stimulus in an unseen cell type: the test holds one condition, whose discrimination score is 1.0 for
    any prediction, so cell-eval's normalisation against the baseline divides 0 by 0. The score stays finite
    and nothing is warned on the user's terminal (a RuntimeWarning raised here fails the scoring)."""
    from .conftest import make_perturbation_adata

    adata = make_perturbation_adata(["STIM"], n_genes=40, cells_per_condition=40, n_control=80,
                                    contexts=("A", "B", "C"))
    make_split(adata, "unseen-context", 0, tmp_path / "split", context="A")
    one = Evaluator(tmp_path / "split", "test")
    assert len(one.truth.targets) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = one.cell_eval(truth_predictions(tmp_path / "split"))
    assert report.summary["discrimination_score_l1"] == 1.0
    assert report.vcc_score is None or np.isfinite(report.vcc_score)
