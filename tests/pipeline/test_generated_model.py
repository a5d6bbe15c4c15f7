"""The generated model a scientist keeps: its typed config refuses keys it does not know, and model.pt alone
(the bundle's code, no training data) reproduces a run's predictions in a fresh interpreter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from generated_code import load_bundle

from sandbox import BackendKind
from service.data import make_split, simulate
from service.data.splits import MODEL_FILES
from service.pipeline.execute import SandboxSettings, run_attempt
from service.pipeline.validate import log_problems

# A fresh interpreter that has the bundle's code, model.pt and the inputs parts, and nothing else.
PREDICT = """
import sys
import anndata as ad
from model import PerturbationModel

model = PerturbationModel.load(sys.argv[1])
for which in ("val", "test"):
    model.predict(ad.read_h5ad(f"{sys.argv[2]}/{which}_inputs.h5ad")).write_h5ad(f"{sys.argv[3]}/{which}.h5ad")
print("train" in sys.modules, "components" in sys.modules)
"""


@pytest.fixture(scope="module")
def knockout_code(knockout_plan, knockout_bundle) -> Path:
    assert knockout_plan.architecture.base_predictor == "linear_ridge" and knockout_plan.architecture.residual_delta
    return knockout_bundle(epochs=3)


@pytest.fixture(scope="module")
def trained(knockout_code, tmp_path_factory) -> tuple[Path, Path]:
    """The bundle trained in a local sandbox on a small knockout split: (the sandbox's data, its outputs)."""
    root = tmp_path_factory.mktemp("run")
    simulate("knockout", 0, n_cells=1500, n_genes=80, n_perturbations=20).write_h5ad(root / "data.h5ad")
    data, outcome = _train_locally(knockout_code, root, "unseen-perturbation")
    return data, outcome.out_dir


def _train_locally(code: Path, root: Path, scheme: str):
    """`root / "data.h5ad"` split by `scheme`, and the bundle at `code` trained on the split's model files in a
    local sandbox: (the sandbox's data folder, the attempt's outcome)."""
    make_split(root / "data.h5ad", scheme, 0, root / "split")
    data = root / "data"
    data.mkdir()
    for name in MODEL_FILES:
        shutil.copy(root / "split" / name, data / name)
    outcome = run_attempt(code, data, root / "attempt", 1, SandboxSettings(backend=BackendKind.LOCAL, cpus=1),
                          300.0, lambda event: None, run_tests=False)
    assert outcome.failure is None, outcome.failure
    return data, outcome


def test_config_refuses_unknown_and_missing_keys(knockout_code):
    m = load_bundle(knockout_code)
    values = json.loads((knockout_code / "config.json").read_text())
    with pytest.raises(m.ConfigError, match=r"unknown keys \['max_minute'\], missing keys \['lr'\]"):
        m.Config.from_dict({**{k: v for k, v in values.items() if k != "lr"}, "max_minute": 3})
    with pytest.raises(m.ConfigError, match="epochs must be an integer"):
        m.Config.from_dict({**values, "epochs": "ten"})
    # config.json's `implements` block is the service's declaration, not a hyperparameter: Config skips it.
    assert m.Config.from_dict(values).to_dict() == {k: v for k, v in values.items() if k != "implements"}


@pytest.mark.slow  # trains (a minute on 2 busy cores) and starts a fresh interpreter
def test_model_pt_alone_reproduces_the_runs_predictions_in_a_fresh_process(trained, knockout_code, tmp_path):
    data, out = trained
    inputs = tmp_path / "inputs"  # no train.h5ad: a prediction needs model.pt and the inputs only
    inputs.mkdir()
    for name in ("val_inputs.h5ad", "test_inputs.h5ad"):
        shutil.copy(data / name, inputs / name)
    done = subprocess.run([sys.executable, "-c", PREDICT, str(out / "model.pt"), str(inputs), str(tmp_path)],
                          cwd=knockout_code, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True"]  # the training script is not needed to predict
    for which, name in (("val", "val_predictions.h5ad"), ("test", "predictions.h5ad")):
        run, again = ad.read_h5ad(out / name), ad.read_h5ad(tmp_path / f"{which}.h5ad")
        assert len(run) or which == "val"  # a cross-validated split has no val conditions
        assert list(again.obs["condition"]) == list(run.obs["condition"])
        assert list(again.var_names) == list(run.var_names)
        np.testing.assert_allclose(again.X, run.X, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_model_pt_holds_every_fitted_part_as_plain_data(trained):
    """weights_only loading (no pickled code) and the fitted matrices are there: the gene embedding, the
    base's chosen λs and stack weights, the input scaling, the network."""
    import torch  # here, not at the top: collecting the suite need not import torch
    saved = torch.load(trained[1] / "model.pt", weights_only=True)
    fitted = {k: v for k, v in saved["fitted"]["__items__"]}
    encoder = dict(fitted["encoder"]["attrs"])
    assert isinstance(encoder["G"], torch.Tensor) and encoder["G"].dtype == torch.float64
    base = fitted["base"]["attrs"]
    assert {k for k, _ in base["lam"]["__items__"]} >= {"pooled_ridge", "grouped_ridge", "pca_ridge"}
    assert isinstance(fitted["x_mean"], torch.Tensor) and isinstance(fitted["x_scale"], torch.Tensor)
    assert saved["net"]["state"]["head.weight"].shape[0] == len(saved["genes"])


@pytest.mark.slow  # a design discussion, then train.py in a local sandbox (half a minute)
def test_no_network_is_trained_when_every_condition_asked_for_lies_in_an_unseen_cell_type(tmp_path):
    """An unseen-cell-type split: the residual is applied only to contexts seen in training, so train.py
    trains no network (no epoch in its log, none in model.pt) and its predictions are the closed-form
    base's, which model.pt alone reproduces (with seven training cell types: the stack and its fitted shrink)."""
    from service.agents import analyse_task, run_discussion
    from service.data import profile_dataset
    from service.llm import OfflineBackend
    from service.pipeline import pipeline_handlers, render_bundle

    import torch  # here, not at the top: collecting the suite need not import torch

    simulate("stimulation", 0, n_cells=2400, n_genes=80).write_h5ad(tmp_path / "data.h5ad")
    llm = OfflineBackend(pipeline_handlers())
    profile = profile_dataset(tmp_path / "data.h5ad")
    task = "Predict stimulation responses in an unseen cell type"
    plan = run_discussion(analyse_task(profile, task, llm), profile, llm, tmp_path / "discussion").plan
    assert plan.evaluation.split_scheme == "unseen-context" and plan.architecture.residual_delta
    code = render_bundle(plan).write(tmp_path / "code")
    data, outcome = _train_locally(code, tmp_path, "unseen-context")
    assert "residual network not trained" in (tmp_path / "attempt" / "train.log").read_text()
    # The log holds the closed-form base's line alone, which the service's validation accepts.
    lines = [json.loads(line) for line in (outcome.out_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["phase"] == "base" and np.isfinite(lines[0]["train_loss"])
    assert log_problems(outcome.out_dir / "train_log.jsonl") == []
    assert torch.load(outcome.out_dir / "model.pt", weights_only=True)["net"] is None
    m = load_bundle(code)
    model = m.PerturbationModel.load(outcome.out_dir / "model.pt")
    test_inputs = ad.read_h5ad(data / "test_inputs.h5ad")
    conditions = m.conditions_to_predict(test_inputs, model.controls)
    assert not set(conditions.table["context"]) & set(model.contexts)
    assert model.base.shrink[0] > 0  # the shrink is in play, so the comparison below covers its round trip
    np.testing.assert_allclose(model.predict(test_inputs).X, ad.read_h5ad(outcome.out_dir / "predictions.h5ad").X,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # a design discussion, then train.py twice in a local sandbox
def test_a_validation_fold_trains_the_recipe_of_the_runs_test_model(tmp_path):
    """Four cell types, one held out: the test model trains on three (the ridges' average) and each
    cross-validation fold on two; the fold's files say the run's test model trains on three, so train.py in the
    sandbox fits that recipe there too (at fixed settings), not the two-context recipe the run never delivers."""
    from service.agents import analyse_task, run_discussion
    from service.data import load_split, profile_dataset
    from service.data.splits import write_fold
    from service.llm import OfflineBackend
    from service.pipeline import pipeline_handlers, render_bundle
    from service.pipeline.rundir import link_model_files

    simulate("stimulation", 0, n_cells=2400, n_genes=80, n_cell_types=4).write_h5ad(tmp_path / "data.h5ad")
    llm = OfflineBackend(pipeline_handlers())
    profile = profile_dataset(tmp_path / "data.h5ad")
    plan = run_discussion(analyse_task(profile, "Predict stimulation responses in an unseen cell type", llm),
                          profile, llm, tmp_path / "discussion").plan
    code = render_bundle(plan).write(tmp_path / "code")
    _, whole = _train_locally(code, tmp_path, "unseen-context")
    split = load_split(tmp_path / "split")
    assert split.info.validation == "cv" and len(split.info.folds) == 3
    fold = write_fold(split, 0, tmp_path / "fold")
    assert fold.train.uns["split"]["run_contexts"] == 3
    data = link_model_files(fold.path, tmp_path / "fold_data")  # the model files only, as a sandbox gets them
    outcome = run_attempt(code, data, tmp_path / "fold_attempt", 1,
                          SandboxSettings(backend=BackendKind.LOCAL, cpus=1), 300.0, lambda event: None,
                          run_tests=False)
    assert outcome.failure is None, outcome.failure
    kept = {name: json.loads((out / "val_metrics.json").read_text())["base"]["kept"]
            for name, out in (("whole", whole.out_dir), ("fold", outcome.out_dir))}
    assert kept == {"whole": "ridges", "fold": "ridges (fixed)"}


def test_a_closed_form_only_model_logs_its_base_and_passes_validation(knockout_plan, tmp_path):
    """The search's "closed-form base only" change (no residual network): training writes the base's line
    to train_log.jsonl, so the service's validation does not call the run broken for an empty log."""
    from service.pipeline import render_bundle

    plan = knockout_plan.model_copy(deep=True)
    plan.architecture.residual_delta = False
    code = render_bundle(plan).write(tmp_path / "code")
    simulate("knockout", 0, n_cells=1500, n_genes=80, n_perturbations=20).write_h5ad(tmp_path / "data.h5ad")
    _, outcome = _train_locally(code, tmp_path, "unseen-perturbation")
    log = outcome.out_dir / "train_log.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["phase"] for line in lines] == ["base"] and np.isfinite(lines[0]["train_loss"])
    assert log_problems(log) == []
