"""Baselines on constructed split directories whose pseudobulks are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from service.data import condition_key, make_split, simulate
from service.data.baselines import (
    PCA_RIDGE_K,
    PCA_RIDGE_LAMBDA,
    GeneNeighbours,
    applicable_baselines,
    delta_transfer_baseline,
    drug_target_ridge_baseline,
    linear_context_ridge_baseline,
    linear_pca_ridge_baseline,
    load_task,
    run_baselines,
)
from service.data.evaluate import Evaluator
from constructed_split import GENES, write_constructed_split, write_split_json


@pytest.fixture
def genetic(tmp_path):
    """Context 'K' with singles G1..G3 and combo G1+G2 in train; test: combo G1+G3, unseen G4,
    unseen-target 'OR5' (not a measured gene); context 'L' holds only controls and G1 (test)."""
    rng = np.random.default_rng(1)
    nan = float("nan")
    ctrl_k, ctrl_l = rng.uniform(3, 5, 12), rng.uniform(3, 5, 12)
    delta = {g: rng.normal(0, 1, 12) for g in ("G1", "G2", "G3", "G4", "OR5")}
    means = {("control", nan, "K"): ctrl_k, ("control", nan, "L"): ctrl_l}
    for g in ("G1", "G2", "G3", "G4", "OR5"):
        means[(g, nan, "K")] = ctrl_k + delta[g]
    means[("G1+G2", nan, "K")] = ctrl_k + delta["G1"] + delta["G2"] + 0.3
    means[("G1+G3", nan, "K")] = ctrl_k + delta["G1"] + delta["G3"]
    means[("G1", nan, "L")] = ctrl_l + 0.5 * delta["G1"]
    test = [("G1+G3", nan, "K"), ("G4", nan, "K"), ("OR5", nan, "K"), ("G1", nan, "L")]
    split = write_constructed_split(tmp_path / "split", means, test)
    return split, ctrl_k, ctrl_l, delta


def row(adata: ad.AnnData, pert: str, ctx: str) -> np.ndarray:
    return adata[condition_key(pert, float("nan"), ctx)].X.ravel().astype(np.float64)


def test_known_answers_for_genetic_baselines(genetic):
    split, ctrl_k, ctrl_l, delta = genetic
    preds = run_baselines(split)
    assert set(preds) == {"control", "mean_delta", "context_mean", "additive", "linear_pca_ridge",
                          "delta_transfer", "state_transfer", "gene_similarity"}
    train_deltas = [delta["G1"], delta["G2"], delta["G3"], delta["G1"] + delta["G2"] + 0.3]
    mean_delta = np.mean(train_deltas, axis=0)
    tol = dict(rtol=1e-5, atol=1e-5)

    np.testing.assert_allclose(row(preds["control"], "G4", "K"), ctrl_k, **tol)
    np.testing.assert_allclose(row(preds["control"], "G1", "L"), ctrl_l, **tol)
    np.testing.assert_allclose(row(preds["mean_delta"], "G4", "K"), ctrl_k + mean_delta, **tol)
    np.testing.assert_allclose(row(preds["additive"], "G1+G3", "K"), ctrl_k + delta["G1"] + delta["G3"], **tol)
    np.testing.assert_allclose(row(preds["additive"], "G4", "K"), ctrl_k + mean_delta, **tol)
    # Context L has no training Δ of its own: transfer G1's Δ measured in K onto L's control.
    np.testing.assert_allclose(row(preds["delta_transfer"], "G1", "L"), ctrl_l + delta["G1"], **tol)
    # ...or its end state there: G1's mean profile in K, whatever L's control.
    np.testing.assert_allclose(row(preds["state_transfer"], "G1", "L"), ctrl_k + delta["G1"], **tol)
    # A perturbation never seen in another context: the control + the context's mean training Δ.
    np.testing.assert_allclose(row(preds["state_transfer"], "G4", "K"), ctrl_k + mean_delta, **tol)
    np.testing.assert_allclose(row(preds["context_mean"], "G4", "K"), ctrl_k + mean_delta, **tol)


def test_linear_pca_ridge_follows_the_published_closed_form(genetic):
    split, ctrl_k, _, _ = genetic
    task = load_task(split)
    Y = task.train.deltas.T
    b = Y.mean(axis=1, keepdims=True)
    k = min(PCA_RIDGE_K, Y.shape[1] - 1)
    U = np.linalg.svd(Y - b, full_matrices=False)[0][:, :k]
    pos = {g: i for i, g in enumerate(GENES)}
    P = np.stack([U[[pos[g] for g in p.split("+")]].sum(axis=0) for p in task.train.conditions["perturbation"]])
    lam = PCA_RIDGE_LAMBDA * np.eye(k)
    W = np.linalg.inv(U.T @ U + lam) @ U.T @ (Y - b) @ P @ np.linalg.inv(P.T @ P + lam)
    pred = linear_pca_ridge_baseline(task)
    np.testing.assert_allclose(row(pred, "G4", "K"), ctrl_k + b[:, 0] + U @ W @ U[pos["G4"]], rtol=1e-5, atol=1e-5)
    # A target that is not a measured gene has no embedding: the mean training Δ.
    np.testing.assert_allclose(row(pred, "OR5", "K"), ctrl_k + b[:, 0], rtol=1e-5, atol=1e-5)


def test_linear_context_ridge_applies_to_unseen_contexts_only(tmp_path):
    """A cytokine split holding out a cell type gets it; a knockout split holding out perturbations
    (every target context has training conditions) does not."""
    make_split(simulate("cytokine", 0, n_cells=1500, n_genes=200), "unseen-context", 0, tmp_path / "ctx")
    ev = Evaluator(tmp_path / "ctx", de_min_cells=3)
    assert "linear_context_ridge" in applicable_baselines(ev.task)
    pred = run_baselines(ev.task)["linear_context_ridge"]
    assert np.isfinite(pred.X).all() and ev.score(pred).n_conditions == len(ev.task.targets)
    make_split(simulate("knockout", 0, n_cells=1500, n_genes=200), "unseen-perturbation", 0, tmp_path / "ko")
    assert "linear_context_ridge" not in applicable_baselines(load_task(tmp_path / "ko"))


def test_linear_context_ridge_recovers_a_delta_linear_in_the_control_state(tmp_path):
    """Contexts A..D (train) and E (held out) have controls base + s·U for a 2-d state s, and each
    perturbation's Δ is a + s·V: linear in the control centroid. The ridge over context embeddings
    recovers E's Δ up to the slight shrinkage of λ; averaging over the training contexts does not.
    P3 was never seen: the pooled fit, here the average of P1's and P2's Δ in E."""
    rng = np.random.default_rng(4)
    nan = float("nan")
    base, U = rng.uniform(3, 5, 12), rng.normal(0, 1, (2, 12))
    state = {"A": (0.0, 0.0), "B": (2.0, 0.0), "C": (0.0, 2.0), "D": (2.0, 2.0), "E": (3.0, -1.0)}
    ctrl = {c: base + np.array(s) @ U for c, s in state.items()}
    effect = {p: (rng.normal(0, 1, 12), rng.normal(0, 1, (2, 12))) for p in ("P1", "P2", "P3")}
    delta = {(p, c): a + np.array(state[c]) @ V for p, (a, V) in effect.items() for c in state}
    means = {("control", nan, c): ctrl[c] for c in state}
    means |= {(p, nan, c): ctrl[c] + delta[(p, c)] for p, c in delta if p != "P3" or c == "E"}
    test = [("P1", nan, "E"), ("P2", nan, "E"), ("P3", nan, "E")]
    task = load_task(write_constructed_split(tmp_path / "split", means, test))
    assert "linear_context_ridge" in applicable_baselines(task)
    pred, transfer = linear_context_ridge_baseline(task), delta_transfer_baseline(task)
    for p in ("P1", "P2"):
        np.testing.assert_allclose(row(pred, p, "E"), ctrl["E"] + delta[(p, "E")], atol=0.02)
        assert np.abs(row(transfer, p, "E") - ctrl["E"] - delta[(p, "E")]).max() > 1.0
    pooled = ctrl["E"] + (delta[("P1", "E")] + delta[("P2", "E")]) / 2
    np.testing.assert_allclose(row(pred, "P3", "E"), pooled, atol=0.05)


def test_linear_context_ridge_tunes_lambda_to_transfer_when_the_state_says_nothing(tmp_path):
    """Contexts A..E (train) and F (held out) with unrelated control states and Δ = a_p + a deviation of each
    (perturbation, context) that no state explains: leave-one-context-out picks the largest λ, so the ridge
    predicts F as delta transfer does (the perturbation's mean Δ over the training contexts)."""
    rng = np.random.default_rng(6)
    nan = float("nan")
    contexts = ["A", "B", "C", "D", "E", "F"]
    ctrl = {c: rng.uniform(3, 5, 12) for c in contexts}
    effect = {p: rng.normal(0, 1, 12) for p in ("P1", "P2", "P3")}
    means = {("control", nan, c): ctrl[c] for c in contexts}
    means |= {(p, nan, c): ctrl[c] + a + 0.5 * rng.normal(0, 1, 12) for p, a in effect.items() for c in contexts}
    test = [(p, nan, "F") for p in effect]
    task = load_task(write_constructed_split(tmp_path / "split", means, test))
    pred, transfer = linear_context_ridge_baseline(task), delta_transfer_baseline(task)
    for p in effect:
        np.testing.assert_allclose(row(pred, p, "F"), row(transfer, p, "F"), atol=0.05)


def test_predictions_format_is_what_the_evaluator_takes(genetic):
    split, *_ = genetic
    ev = Evaluator(split, de_min_cells=3)
    for name, pred in run_baselines(ev.task).items():
        assert list(pred.obs.columns) == ["condition", "perturbation", "dose", "context"], name
        assert list(pred.var_names) == GENES
        assert pred.X.dtype == np.float32 and isinstance(pred.X, np.ndarray)
        assert list(pred.obs["condition"]) == list(ev.task.targets["condition"])
        assert np.isfinite(pred.X).all()
        report = ev.score(pred)
        assert report.n_conditions == 4 and "mse" in report.summary
        assert ("pearson_delta" in report.summary) == (name != "control")


def test_gene_similarity_leans_on_the_most_coexpressed_gene(tmp_path):
    """G4 is co-expressed with G1 across the training cells: G1 is its first neighbour, and the
    prediction is the control plus the neighbours' weighted training Δs."""
    rng = np.random.default_rng(5)
    n_cells = 200
    latent = rng.normal(size=(n_cells, 4))
    loadings = rng.normal(size=(4, 12))
    X = 4 + latent @ loadings + 0.05 * rng.normal(size=(n_cells, 12))
    X[:, 4] = X[:, 1] + 0.01 * rng.normal(size=n_cells)
    nan = float("nan")
    deltas = {f"G{i}": rng.normal(0, 0.3, 12) for i in (1, 2, 3, 5, 6, 7, 8, 9, 10, 11)}
    groups = ["control", *deltas]
    pert = np.array([groups[i % len(groups)] for i in range(n_cells)])
    for g, d in deltas.items():
        X[pert == g] += d
    obs = pd.DataFrame({"perturbation": np.concatenate([pert, ["G4"] * 4]), "dose": nan, "context": "all"})
    obs["is_control"] = obs["perturbation"] == "control"
    obs["condition"] = [condition_key(p, nan, "all") for p in obs["perturbation"]]
    obs.index = [f"c{i}" for i in range(len(obs))]
    cells = ad.AnnData(X=np.vstack([X, X[:4]]).astype(np.float32), obs=obs, var=pd.DataFrame(index=GENES))
    split = tmp_path / "split"
    split.mkdir()
    is_test = (obs["perturbation"] == "G4").to_numpy()
    cells[~is_test].copy().write_h5ad(split / "train.h5ad")
    for name in ("val_inputs", "val_truth"):
        cells[:0].copy().write_h5ad(split / f"{name}.h5ad")
    cells[is_test].copy().write_h5ad(split / "test_truth.h5ad")
    inputs = cells[obs["is_control"].to_numpy()].copy()
    inputs.uns["predict"] = {"condition": ["G4||all"], "perturbation": ["G4"], "dose": [nan], "context": ["all"]}
    inputs.write_h5ad(split / "test_inputs.h5ad")
    write_split_json(split, obs, np.where(is_test, "test", "train"))

    task = load_task(split)
    near = GeneNeighbours.from_task(task).of("G4")
    assert near[0][0] == "G1" and len(near) == 5
    assert near[0][1] == max(w for _, w in near)
    assert sum(w for _, w in near) == pytest.approx(1.0)
    assert GeneNeighbours.from_task(task).of("NOT_A_GENE") == []

    pred = run_baselines(task)["gene_similarity"]
    train = task.train.conditions.set_index("perturbation")
    expected = task.control_means["all"] + sum(w * task.train.deltas[train.index.get_loc(g)] for g, w in near)
    np.testing.assert_allclose(pred.X[0], expected, rtol=1e-5, atol=1e-5)


def test_drug_baselines_use_the_dose(tmp_path):
    """D1, D2 at doses 1/10/100 and D3 at 1/100 in train; predict D3 at 10 (between its trained
    doses), D3 at 1000 (beyond them) and the unseen drug D4 at 10."""
    rng = np.random.default_rng(2)
    ctrl = rng.uniform(3, 5, 12)
    means = {("control", float("nan"), "all"): ctrl}
    d = {(drug, dose): rng.normal(0, 1, 12) for drug in ("D1", "D2", "D3", "D4") for dose in (1.0, 10.0, 100.0, 1000.0)}
    train = [(drug, dose) for drug in ("D1", "D2") for dose in (1.0, 10.0, 100.0)] + [("D3", 1.0), ("D3", 100.0)]
    test = [("D3", 10.0, "all"), ("D3", 1000.0, "all"), ("D4", 10.0, "all")]
    for drug, dose in train + [(t[0], t[1]) for t in test]:
        means[(drug, dose, "all")] = ctrl + d[(drug, dose)]
    split = write_constructed_split(tmp_path / "split", means, test)
    preds = run_baselines(split)
    assert set(preds) == {"control", "mean_delta", "context_mean", "dose_interpolation"}

    def got(name: str, drug: str, dose: float) -> np.ndarray:
        return preds[name][condition_key(drug, dose, "all")].X.ravel()

    tol = dict(rtol=1e-5, atol=1e-5)
    # mean_delta: the average training drug at the same dose.
    np.testing.assert_allclose(got("mean_delta", "D4", 10.0), ctrl + (d[("D1", 10.0)] + d[("D2", 10.0)]) / 2, **tol)
    # dose_interpolation: 10 is halfway between 1 and 100 in log-dose; 1000 takes the nearest (100).
    np.testing.assert_allclose(got("dose_interpolation", "D3", 10.0),
                               ctrl + (d[("D3", 1.0)] + d[("D3", 100.0)]) / 2, **tol)
    np.testing.assert_allclose(got("dose_interpolation", "D3", 1000.0), ctrl + d[("D3", 100.0)], **tol)
    np.testing.assert_allclose(got("dose_interpolation", "D4", 10.0), got("mean_delta", "D4", 10.0), **tol)


def test_cli_baselines_writes_and_scores_every_applicable_baseline(genetic, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    split, *_ = genetic
    out = tmp_path / "preds"
    result = CliRunner().invoke(app, ["baselines", "--split", str(split), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["baselines"]) == {"control", "mean_delta", "context_mean", "additive", "linear_pca_ridge",
                                        "delta_transfer", "state_transfer", "gene_similarity"}
    assert report["baselines"]["mean_delta"]["normalized"]["pearson_delta"] == pytest.approx(0.0, abs=1e-9)
    for name, path in report["written"].items():
        assert ad.read_h5ad(path).n_obs == 4, name


def test_control_baseline_has_no_delta_correlation(genetic):
    """Predicting no change has no Δ to correlate (not a correlation of float32 rounding noise)."""
    split, *_ = genetic
    ev = Evaluator(split, de_min_cells=3)
    report = ev.score(run_baselines(ev.task)["control"])
    assert "pearson_delta" not in report.summary
    assert report.summary["direction_acc_top20_de"] == 0.0


def annotate_split(split: Path, targets: dict[str, str]) -> None:
    """Give a constructed split drug-target annotations, as `make_split` writes them for annotated data."""
    for name in ("train", "val_inputs", "test_inputs"):
        part = ad.read_h5ad(split / f"{name}.h5ad")
        perts = part.uns["predict"]["perturbation"] if name != "train" else part.obs["perturbation"].unique()
        named = [p for p in perts if p in targets]
        part.uns["perturbation_targets"] = {"perturbation": named, "targets": [targets[p] for p in named]}
        part.write_h5ad(split / f"{name}.h5ad")
    info = json.loads((split / "split.json").read_text())
    (split / "split.json").write_text(json.dumps({**info, "annotation_key": "targets"}))


@pytest.fixture
def annotated_drugs(tmp_path):
    """Drugs D1..D4 at doses 1 and 10 in train, each hitting measured genes; test: D5 (targets G1;G6)
    and D6 (target OR5, not a measured gene) at both doses."""
    rng = np.random.default_rng(3)
    ctrl = rng.uniform(3, 5, 12)
    targets = {"D1": "G1;G2", "D2": "G3", "D3": "G2;G4;G5", "D4": "G6", "D5": "G1;G6", "D6": "OR5"}
    means = {("control", float("nan"), "all"): ctrl}
    for drug in targets:
        for dose in (1.0, 10.0):
            means[(drug, dose, "all")] = ctrl + rng.normal(0, 1, 12) * np.log1p(dose)
    test = [(drug, dose, "all") for drug in ("D5", "D6") for dose in (1.0, 10.0)]
    split = write_constructed_split(tmp_path / "split", means, test)
    annotate_split(split, targets)
    return split, ctrl, targets


def test_drug_target_ridge_is_mean_delta_plus_the_targets_pca_ridge_per_dose(annotated_drugs):
    split, ctrl, targets = annotated_drugs
    task = load_task(split)
    assert task.annotations["D5"] == ["G1", "G6"] and "drug_target_ridge" in applicable_baselines(task)
    pred = drug_target_ridge_baseline(task)
    mean = {dose: np.mean([task.train.deltas[i] for i, d in enumerate(task.train.conditions["dose"]) if d == dose],
                          axis=0) for dose in (1.0, 10.0)}
    pos = {g: i for i, g in enumerate(GENES)}
    for dose in (1.0, 10.0):
        own = (task.train.conditions["dose"] == dose).to_numpy()
        Y = (task.train.deltas[own] - mean[dose]).T  # residual of the mean-Δ baseline, genes × drugs
        b = Y.mean(axis=1, keepdims=True)
        k = min(PCA_RIDGE_K, Y.shape[1] - 1)
        U = np.linalg.svd(Y - b, full_matrices=False)[0][:, :k]

        def emb(drug: str) -> np.ndarray:
            return U[[pos[g] for g in targets[drug].split(";")]].sum(axis=0)  # noqa: B023 - used in this iteration

        P = np.stack([emb(d) for d in task.train.conditions.loc[own, "perturbation"]])
        lam = PCA_RIDGE_LAMBDA * np.eye(k)
        W = np.linalg.inv(U.T @ U + lam) @ U.T @ (Y - b) @ P @ np.linalg.inv(P.T @ P + lam)
        got = pred[condition_key("D5", dose, "all")].X.ravel()
        np.testing.assert_allclose(got, ctrl + mean[dose] + b[:, 0] + U @ W @ emb("D5"), rtol=1e-4, atol=1e-4)
        # No measured target: nothing to place the drug by, so the mean-Δ prediction (plus the mean residual).
        np.testing.assert_allclose(pred[condition_key("D6", dose, "all")].X.ravel(), ctrl + mean[dose] + b[:, 0],
                                   rtol=1e-4, atol=1e-4)


def test_drug_target_ridge_applies_only_with_annotations(annotated_drugs, tmp_path):
    split, *_ = annotated_drugs
    ev = Evaluator(split, de_min_cells=3)
    preds = run_baselines(ev.task)
    assert "drug_target_ridge" in preds
    pred = preds["drug_target_ridge"]
    assert list(pred.obs["condition"]) == list(ev.task.targets["condition"]) and np.isfinite(pred.X).all()
    assert ev.score(pred).n_conditions == 4
    info = json.loads((split / "split.json").read_text())
    (split / "split.json").write_text(json.dumps({**info, "annotation_key": None}))
    assert "drug_target_ridge" not in run_baselines(split)
