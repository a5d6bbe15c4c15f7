"""Baselines built from a large split's sandbox data (a sample of the cells, the training pseudobulks and the
co-expression cells; the sample limit forced low) predict what the service's baselines predict from the whole
split: so a delivered baseline or stack bundle reproduces the service's own predictions at scale."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from sandbox import BackendKind
from service.data import make_split, simulate
from service.data.baselines import (BASELINES, COEXPRESSION_FILE, PSEUDOBULK_FILE, SAMPLE_UNS, applicable_baselines,
                                    inputs_task, load_task)
from service.data.sandbox_data import write_sandbox_data


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[Path, Path]:
    """(the split, its sandbox data with a third of the training cells: fewer than the co-expression sample's)."""
    root = tmp_path_factory.mktemp("screen")
    simulate("knockout", 0, n_cells=6000, n_genes=80, n_perturbations=20).write_h5ad(root / "data.h5ad")
    make_split(root / "data.h5ad", "unseen-perturbation", 0, root / "split")
    limit = ad.read_h5ad(root / "split" / "train.h5ad", backed="r").n_obs // 3
    data = write_sandbox_data(root / "split", root / "data", max_cells=limit)
    assert SAMPLE_UNS in ad.read_h5ad(data / "train.h5ad", backed="r").uns
    assert SAMPLE_UNS in ad.read_h5ad(data / "test_inputs.h5ad", backed="r").uns  # the inputs are sampled too
    assert (data / PSEUDOBULK_FILE).is_file() and (data / COEXPRESSION_FILE).is_file()
    return root / "split", data


def _predictions(task, names) -> dict[str, np.ndarray]:
    return {name: np.asarray(BASELINES[name][0](task).X, dtype=np.float64) for name in names}


def test_the_sandbox_task_predicts_what_the_service_predicts(sampled, tmp_path):
    split, data = sampled
    service, sandbox = load_task(split, "test"), inputs_task(data, "test")
    names = applicable_baselines(service)
    assert "gene_similarity" in names and "mean_delta" in names  # co-expression and training means both read
    assert applicable_baselines(sandbox) == names
    want = _predictions(service, names)
    for name, got in _predictions(sandbox, names).items():
        np.testing.assert_allclose(got, want[name], rtol=1e-6, atol=1e-6, err_msg=name)

    # The sample's own cells (the former path, or a folder without these files) give other predictions.
    bare = tmp_path / "bare"
    shutil.copytree(data, bare)
    (bare / PSEUDOBULK_FILE).unlink()
    (bare / COEXPRESSION_FILE).unlink()
    sample_only = _predictions(inputs_task(bare, "test"), names)
    for name in ("mean_delta", "gene_similarity", "control"):
        assert np.abs(sample_only[name] - want[name]).max() > 1e-4, name


@pytest.mark.slow  # runs the delivered bundle in a local sandbox (pytest and train.py; ~30 s on 2 busy cores)
def test_a_delivered_stack_reproduces_the_services_predictions_on_sampled_data(sampled, tmp_path):
    from service.pipeline.deliver import predictor_files, write_files
    from service.pipeline.execute import SandboxSettings, run_attempt

    split, data = sampled
    weights = {"gene_similarity": 0.6, "mean_delta": 0.3, "control": 0.1}
    code = write_files(predictor_files(weights, "stack", "a test stack"), tmp_path / "code")
    outcome = run_attempt(code, data, tmp_path / "attempt", 0, SandboxSettings(backend=BackendKind.LOCAL, cpus=1),
                          300.0, lambda event: None)
    assert outcome.failure is None, outcome.failure
    task = load_task(split, "test")
    members = _predictions(task, weights)
    control = np.stack([task.control_means[c] for c in task.targets["context"]])
    want = control + sum(w * (members[name] - control) for name, w in weights.items())
    got = ad.read_h5ad(outcome.out_dir / "predictions.h5ad")
    assert list(got.obs["condition"].astype(str)) == list(task.targets["condition"])
    np.testing.assert_allclose(np.asarray(got.X, dtype=np.float64), want, rtol=1e-5, atol=1e-5)
