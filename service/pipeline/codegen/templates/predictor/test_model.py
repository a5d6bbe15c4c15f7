"""Tests of the delivered predictor on a small synthetic data folder: every baseline member runs, the
blend has one finite row per condition, and a single member with weight 1 is that member."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import train
from cellforge_baselines.baselines import inputs_task
from model import DESIGNED, member_rows, predict

CONFIG = json.loads((Path(__file__).parent / "config.json").read_text())
BASELINE_MEMBERS = {k: v for k, v in CONFIG["weights"].items() if k != DESIGNED}
GENES = [f"g{i}" for i in range(30)]


def _cells(rng, pert: str, context: str, n: int, shift: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    X = np.log1p(rng.poisson(np.exp(1.0 + shift), size=(n, len(GENES)))).astype(np.float32)
    obs = pd.DataFrame({"perturbation": pert, "dose": np.nan, "context": context, "is_control": pert == "control",
                        "condition": f"{pert}||{context}"}, index=range(n))
    return X, obs


def _part(blocks, prefix: str) -> ad.AnnData:
    obs = pd.concat([b[1] for b in blocks], ignore_index=True)
    obs.index = [f"{prefix}{i}" for i in range(len(obs))]
    return ad.AnnData(X=np.vstack([b[0] for b in blocks]), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two training cell types with 8 knockouts; val: two unseen knockouts; test: an unseen cell type."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("data")
    effects = {f"g{i}": rng.normal(0, 0.3, len(GENES)) for i in range(12)}
    controls = {c: _cells(rng, "control", c, 30, np.zeros(len(GENES))) for c in ("A", "B", "C")}
    train_blocks = [controls["A"], controls["B"], controls["C"]]
    train_blocks += [_cells(rng, p, c, 10, effects[p]) for p in list(effects)[:8] for c in ("A", "B")]
    _part(train_blocks, "t").write_h5ad(out / "train.h5ad")
    for name, contexts, perts in (("val", ("A", "B"), ["g8", "g9"]), ("test", ("C",), ["g0", "g10"])):
        inputs = _part([controls[c] for c in contexts], name)
        rows = [(f"{p}||{c}", p, float("nan"), c) for p in perts for c in contexts]
        inputs.uns["predict"] = {k: [r[i] for r in rows] for i, k in
                                 enumerate(("condition", "perturbation", "dose", "context"))}
        inputs.write_h5ad(out / f"{name}_inputs.h5ad")
    return out


def test_each_baseline_member_predicts_finite_rows(data):
    for which in ("val", "test"):
        task = inputs_task(data, which)
        for name in BASELINE_MEMBERS:
            rows = member_rows(task, name, None)
            assert rows.shape == (len(task.targets), len(GENES)) and np.isfinite(rows).all(), name


def test_one_member_with_weight_one_is_that_member(data):
    task = inputs_task(data, "test")
    for name in BASELINE_MEMBERS:
        np.testing.assert_allclose(predict(task, {name: 1.0}).X, member_rows(task, name, None), rtol=1e-5, atol=1e-5)


def test_training_writes_the_outputs(data, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "weights": BASELINE_MEMBERS or {"mean_delta": 1.0}}))
    train.main(["--data", str(data), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "config.json")])
    for name, n in (("val_predictions.h5ad", 4), ("predictions.h5ad", 2)):
        pred = ad.read_h5ad(tmp_path / "out" / name)
        assert pred.n_obs == n and np.isfinite(pred.X).all()
