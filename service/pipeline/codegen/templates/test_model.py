"""Tests of the generated model on a small synthetic split (shapes, forward pass, one-batch overfit, no NaN, and
model.pt alone reproduces the run's predictions)."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import train
from config import Config
from data import TARGETS_UNS, ConditionSet, control_means, write_h5ad
from model import PerturbationModel, delta_loss

CONFIG = Config.load(Path(__file__).parent / "config.json")
N_GENES = 40
CONTEXTS = ["ctx_a", "ctx_b"]


def _perturbations() -> list[tuple[str, float]]:
    if CONFIG.perturbation_kind == "chemical":
        return [(f"drug_{d}", dose) for d in range(6) for dose in (0.1, 1.0, 10.0)]
    if CONFIG.perturbation_kind == "genetic_combo":
        singles = [f"g{i}" for i in range(8)]
        return [(g, float("nan")) for g in singles] + [(f"g{i}+g{i + 1}", float("nan")) for i in range(0, 8, 2)]
    return [(f"g{i}", float("nan")) for i in range(10)]


def _annotations(items: list[tuple[str, float]]) -> dict[str, list[str]]:
    """Drugs carry target-gene annotations, as a split of annotated drug data does."""
    perts = sorted({pert for pert, _ in items}) if CONFIG.perturbation_kind == "chemical" else []
    return {"perturbation": perts, "targets": [f"g{int(p.split('_')[1])};g{int(p.split('_')[1]) + 7}" for p in perts]}


def _cells(rng, pert: str, dose: float, context: str, n: int, effect: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    X = np.log1p(rng.poisson(np.exp(effect), size=(n, N_GENES))).astype(np.float32)
    dose_str = "" if np.isnan(dose) else f"{dose:g}"
    obs = pd.DataFrame({"perturbation": pert, "dose": dose, "context": context, "is_control": pert == "control",
                        "condition": f"{pert}|{dose_str}|{context}"}, index=range(n))
    return X, obs


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("data")
    base = rng.normal(1.0, 0.3, N_GENES)
    genes = [f"g{i}" for i in range(N_GENES)]
    perts = _perturbations()
    parts = {"train": [], "val": [], "test": []}
    for i, (pert, dose) in enumerate(perts):
        parts["val" if i % 5 == 1 else "test" if i % 5 == 3 else "train"].append((pert, dose))
    blocks = {name: [] for name in parts}
    for context in CONTEXTS:
        for name in ("train", "val", "test"):
            blocks[name].append(_cells(rng, "control", float("nan"), context, 30, base))
    for name, items in parts.items():
        for pert, dose in items:
            effect = base + rng.normal(0, 0.4, N_GENES) * (1.0 if np.isnan(dose) else np.log1p(dose))
            for context in CONTEXTS:
                blocks[name].append(_cells(rng, pert, dose, context, 12, effect))
    X = np.vstack([b[0] for b in blocks["train"]])
    obs = pd.concat([b[1] for b in blocks["train"]], ignore_index=True)
    obs.index = [f"c{i}" for i in range(len(obs))]
    part = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    part.uns[TARGETS_UNS] = _annotations(parts["train"])
    part.uns["split"] = {"scheme": "unseen-perturbation", "group_by": "perturbation"}
    write_h5ad(part, out / "train.h5ad")
    keys = ("condition", "perturbation", "dose", "context")
    for name in ("val", "test"):  # inputs only: controls and what to predict, as the service writes them
        ctrl = [b for b in blocks[name] if b[1]["perturbation"].iloc[0] == "control"]
        X = np.vstack([b[0] for b in ctrl])
        obs = pd.concat([b[1] for b in ctrl], ignore_index=True)
        obs.index = [f"{name}{i}" for i in range(len(obs))]
        rows = [(f"{p}|{'' if np.isnan(d) else f'{d:g}'}|{c}", p, d, c) for p, d in parts[name] for c in CONTEXTS]
        inputs = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
        inputs.uns["predict"] = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
        inputs.uns[TARGETS_UNS] = _annotations(parts[name])
        write_h5ad(inputs, out / f"{name}_inputs.h5ad")
    return out


@pytest.fixture(scope="module")
def fitted(split_dir):
    """The closed-form part fitted on training conditions, with whole perturbations held out to stop on."""
    train_cells = ad.read_h5ad(split_dir / "train.h5ad")
    controls = control_means(train_cells)
    everything = ConditionSet.from_cells(train_cells, controls)
    held, _ = train.stop_rows(everything.table, "perturbation", 0)
    assert held.any() and not held.all()
    tr, va = everything.subset(~held), everything.subset(held)
    model = train.fitted_model(CONFIG, list(train_cells.var_names), controls, train_cells, tr, va, 0)
    model.set_input_scaling(tr)
    return model, tr, va


def test_features_have_one_finite_row_per_condition(fitted):
    model, tr, va = fitted
    for part in (tr, va):
        F = model.features(part)
        assert F.shape[0] == len(part) and np.isfinite(F).all()
        assert model.base.predict(part, F).shape == (len(part), N_GENES)


def test_forward_pass_shape_and_zero_initial_residual(fitted):
    model, tr, _ = fitted
    x = torch.as_tensor(model.net_input(tr), dtype=torch.float32)
    net = model.build_net(x.shape[1])
    out = net(x)
    assert out.shape == (len(tr), N_GENES)
    assert torch.count_nonzero(out) == 0  # before training the model is exactly the closed-form base


def test_one_batch_overfit(fitted):
    model, tr, _ = fitted
    torch.manual_seed(0)
    x = torch.as_tensor(model.net_input(tr), dtype=torch.float32)
    y = torch.as_tensor(tr.delta, dtype=torch.float32)
    net = model.build_net(x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = delta_loss(net(x), y, CONFIG.loss).item()
    for _ in range(150):
        loss = delta_loss(net(x), y, CONFIG.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_training_writes_finite_outputs_and_the_saved_model_predicts_them(split_dir, tmp_path):
    config = CONFIG.replace(epochs=min(CONFIG.epochs, 5))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    train.main(["--data", str(split_dir), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "config.json")])
    for name, inputs in (("predictions.h5ad", "test_inputs.h5ad"), ("val_predictions.h5ad", "val_inputs.h5ad")):
        pred = ad.read_h5ad(tmp_path / "out" / name)
        assert list(pred.obs["condition"]) == list(ad.read_h5ad(split_dir / inputs).uns["predict"]["condition"])
        assert np.isfinite(pred.X).all()
    lines = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert lines and all(np.isfinite(json.loads(line)["train_loss"]) for line in lines)
    saved = PerturbationModel.load(tmp_path / "out" / "model.pt")
    for name, inputs in (("predictions.h5ad", "test_inputs.h5ad"), ("val_predictions.h5ad", "val_inputs.h5ad")):
        np.testing.assert_allclose(saved.predict(ad.read_h5ad(split_dir / inputs)).X,
                                   ad.read_h5ad(tmp_path / "out" / name).X, rtol=1e-5, atol=1e-6)
