"""Generated code on a large screen's sandbox data (the sample limit forced low through its setting): the
parts are samples of their cells, and the condition and control means the model uses are those of
pseudobulk.h5ad, over every training cell, not the sample's."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from generated_code import load_bundle

from sandbox import BackendKind
from service.data import make_split, simulate
from service.data.sandbox_data import MAX_CELLS_ENV, PSEUDOBULK_FILE, SAMPLE_UNS, write_sandbox_data
from service.pipeline.execute import SandboxSettings, run_attempt


@pytest.fixture(scope="module")
def code(knockout_bundle) -> Path:
    return knockout_bundle(epochs=2)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[Path, Path]:
    """(the split, the sandbox data written with a sample limit of a third of the training cells)."""
    root = tmp_path_factory.mktemp("screen")
    simulate("knockout", 0, n_cells=2000, n_genes=80, n_perturbations=20).write_h5ad(root / "data.h5ad")
    make_split(root / "data.h5ad", "unseen-perturbation", 0, root / "split")
    limit = ad.read_h5ad(root / "split" / "train.h5ad", backed="r").n_obs // 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MAX_CELLS_ENV, str(limit))
        data = write_sandbox_data(root / "split", root / "data")
    assert SAMPLE_UNS in ad.read_h5ad(data / "train.h5ad", backed="r").uns and (data / PSEUDOBULK_FILE).is_file()
    return root / "split", data


def _means(adata: ad.AnnData, rows: np.ndarray, labels: np.ndarray, keys: list[str]) -> dict[str, np.ndarray]:
    X = adata.X.toarray()
    return {k: X[rows & (labels == k)].mean(axis=0) for k in keys}


def _full_and_sample(split: Path, data: Path, part: str = "train.h5ad"):
    full, sample = ad.read_h5ad(split / part), ad.read_h5ad(data / part)
    assert sample.n_obs < full.n_obs
    return full, sample


def _control_means(adata: ad.AnnData) -> dict[str, np.ndarray]:
    ctrl = adata.obs["is_control"].astype(bool).to_numpy()
    contexts = adata.obs["context"].astype(str).to_numpy()
    return _means(adata, ctrl, contexts, sorted(set(contexts[ctrl])))


def test_condition_and_control_means_come_from_the_pseudobulks(code, sampled):
    split, data = sampled
    m = load_bundle(code)
    full, sample = _full_and_sample(split, data)
    bulk = m.read_pseudobulk(data)
    assert bulk is not None and m.read_pseudobulk(split) is None  # a split under the limit has none

    controls = m.control_means(sample, bulk)
    want, sampled_controls = _control_means(full), _control_means(sample)
    assert controls.keys() == want.keys()
    for context, mean in controls.items():
        np.testing.assert_allclose(mean, want[context], rtol=1e-5, atol=1e-6)
        assert not np.allclose(mean, sampled_controls[context], rtol=1e-3, atol=1e-4)  # the sample's differ

    conditions = m.ConditionSet.from_cells(sample, controls, bulk)
    names = list(conditions.table["condition"])
    labels = full.obs["condition"].astype(str).to_numpy()
    full_means = _means(full, np.ones(full.n_obs, dtype=bool), labels, names)
    sample_means = _means(sample, np.ones(sample.n_obs, dtype=bool), sample.obs["condition"].astype(str).to_numpy(),
                          names)
    for i, name in enumerate(names):
        np.testing.assert_allclose(conditions.delta[i] + conditions.control[i], full_means[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(conditions.delta + conditions.control, np.stack([sample_means[n] for n in names]),
                           rtol=1e-3, atol=1e-4)

    # A sampled inputs part: its controls are training controls, whose all-cell means the model already has.
    inputs = ad.read_h5ad(data / "test_inputs.h5ad")
    assert SAMPLE_UNS in inputs.uns
    to_predict = m.conditions_to_predict(inputs, controls)
    for row, context in zip(to_predict.control, to_predict.table["context"], strict=True):
        np.testing.assert_allclose(row, want[context], rtol=1e-5, atol=1e-6)
    # Without pseudobulks (a part as it is), the cells' own means, as before.
    whole = m.control_means(sample)
    for context, mean in whole.items():
        np.testing.assert_allclose(mean, sampled_controls[context], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # trains the bundle in a local sandbox (tens of seconds on 2 busy cores)
def test_model_trained_on_the_sample_keeps_the_all_cell_means(code, sampled, tmp_path):
    import torch  # here, not at the top: collecting the suite need not import torch
    split, data = sampled
    outcome = run_attempt(code, data, tmp_path / "attempt", 1, SandboxSettings(backend=BackendKind.LOCAL, cpus=1),
                          300.0, lambda event: None, run_tests=False)
    assert outcome.failure is None, outcome.failure
    saved = torch.load(outcome.out_dir / "model.pt", weights_only=True)
    controls = {str(k): np.asarray(v) for k, v in saved["controls"]["__items__"]}
    full, sample = _full_and_sample(split, data)
    want, sampled_controls = _control_means(full), _control_means(sample)
    assert controls.keys() == want.keys()
    for context, mean in controls.items():
        np.testing.assert_allclose(mean, want[context], rtol=1e-5, atol=1e-6)
        assert not np.allclose(mean, sampled_controls[context], rtol=1e-3, atol=1e-4)
    # Every test condition's prediction stands on its context's all-cell control mean: Δ = prediction − it.
    pred = ad.read_h5ad(outcome.out_dir / "predictions.h5ad")
    m = load_bundle(code)
    model = m.PerturbationModel.load(outcome.out_dir / "model.pt")
    conditions = m.conditions_to_predict(ad.read_h5ad(data / "test_inputs.h5ad"), model.controls)
    np.testing.assert_allclose(pred.X, conditions.control + model.predict_delta(conditions), rtol=1e-5, atol=1e-5)
    for row, context in zip(conditions.control, conditions.table["context"], strict=True):
        np.testing.assert_allclose(row, want[context], rtol=1e-5, atol=1e-6)
