"""The chunked data path gives what the whole-matrix path gives: a chunk of 7 cells (many chunks, a
backed dataset and backed split parts) against one chunk holding every cell in memory."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import service.data.chunks as chunks
import service.data.load as load
from service.data import Evaluator, load_split, make_split, profile_dataset, run_baselines, simulate, simulate_to_file
from service.data.conditions import CONDITION
from service.data.sandbox_data import (MAX_CELLS_ENV, PSEUDOBULK_FILE, SAMPLE_UNS, SANDBOX_MAX_CELLS, max_cells_setting,
                                       sample_cells, write_sandbox_data)
from service.data.splits import PARTS
from service.data.metrics import group_means

SMALL = 7  # cells per chunk: dozens of chunks on the test data


def _run(path: Path, out: Path, monkeypatch, small: bool) -> dict:
    """Profile, split (HVG and TF-IDF peaks from training cells), baselines and scores of the test part."""
    monkeypatch.setattr(chunks, "ROW_CHUNK", SMALL if small else 10**9)
    # Small: the dataset and every split part are opened backed (X read from disk a chunk at a time).
    monkeypatch.setattr(load, "BACKED_ABOVE_BYTES", 0 if small else 1 << 40)
    profile = profile_dataset(path)
    assert profile.backed is small
    info = make_split(path, "unseen-perturbation", 3, out, n_genes=40, atac="tfidf")
    split = load_split(out)
    assert split.train.isbacked is small
    predictions = run_baselines(split, "test")
    evaluator = Evaluator(split, "test")
    reports = {name: evaluator.score(pred) for name, pred in predictions.items()}
    return {"profile": profile, "info": info, "predictions": predictions, "reports": reports}


@pytest.fixture
def multimodal(make_adata, h5ad_path) -> Path:
    adata = make_adata([f"G{i}" for i in range(12)], n_genes=60, contexts=["A", "B"], cells_per_condition=15,
                       feature_types={"Antibody Capture": 5, "Peaks": 20}, seed=4)
    return h5ad_path(adata)


@pytest.mark.slow
def test_chunked_path_gives_the_profile_split_baselines_and_metrics_of_one_chunk(multimodal, tmp_path, monkeypatch):
    whole = _run(multimodal, tmp_path / "whole", monkeypatch, small=False)
    chunked = _run(multimodal, tmp_path / "chunked", monkeypatch, small=True)

    a, b = whole["profile"].model_dump(), chunked["profile"].model_dump()
    for key in ("library_size", "genes_detected", "delta_norm", "sparsity", "above_noise_fraction",
                "de_top20_fraction", "target_knockdown_fraction"):
        assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-6, abs=1e-9), key
    a.pop("backed"), b.pop("backed")
    assert a == b

    assert whole["info"].model_dump() == chunked["info"].model_dump()  # same genes (HVG), conditions, counts
    for name in PARTS:
        x, y = (ad.read_h5ad(tmp_path / run / f"{name}.h5ad") for run in ("whole", "chunked"))
        assert x.obs.equals(y.obs) and x.var.equals(y.var), name
        np.testing.assert_allclose(x.X.toarray(), y.X.toarray(), rtol=1e-6, atol=1e-6, err_msg=name)
        assert x.uns.keys() == y.uns.keys()

    assert whole["predictions"].keys() == chunked["predictions"].keys() and len(whole["predictions"]) >= 3
    for name, pred in whole["predictions"].items():
        np.testing.assert_allclose(pred.X, chunked["predictions"][name].X, rtol=1e-5, atol=1e-6, err_msg=name)
        s, t = whole["reports"][name], chunked["reports"][name]
        assert s.summary.keys() == t.summary.keys()
        for metric, value in s.summary.items():
            assert value == pytest.approx(t.summary[metric], rel=1e-5, abs=1e-6, nan_ok=True), (name, metric)
        assert s.ceiling == pytest.approx(t.ceiling, rel=1e-5, abs=1e-6, nan_ok=True)


def test_group_means_over_chunks_match_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, (101, 9)).astype(np.float32)
    labels = rng.choice(["a", "b", "c", "d"], 101)
    monkeypatch.setattr(chunks, "ROW_CHUNK", 5)
    means = group_means(X, labels, np.array(["a", "c", "z"]))
    np.testing.assert_allclose(means[0], X[labels == "a"].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(means[1], X[labels == "c"].mean(axis=0), rtol=1e-6)
    assert not means[2].any()  # a group without rows


def test_simulation_written_chunk_by_chunk_is_the_simulation_in_memory(tmp_path):
    path = tmp_path / "sim.h5ad"
    written = simulate_to_file(path, "knockout", 5, n_cells=5000, n_genes=120)
    ref = simulate("knockout", 5, n_cells=5000, n_genes=120)
    back = ad.read_h5ad(path)
    assert written.X is None and back.obs.equals(ref.obs) and back.var.equals(ref.var)
    assert back.X.shape == ref.X.shape and (back.X != ref.X).nnz == 0
    np.testing.assert_array_equal(back.uns["simulation"]["delta"], ref.uns["simulation"]["delta"])


def test_sandbox_gets_a_bounded_seeded_sample_and_the_pseudobulks_of_a_large_train(make_adata, h5ad_path, tmp_path):
    split_dir = tmp_path / "split"
    make_split(h5ad_path(make_adata(cells_per_condition=30, n_control=200)), "unseen-perturbation", 0, split_dir)
    train = ad.read_h5ad(split_dir / "train.h5ad")

    small = write_sandbox_data(split_dir, tmp_path / "all")  # under the limit: the split's own files
    assert sorted(p.name for p in small.iterdir()) == ["test_inputs.h5ad", "train.h5ad", "val_inputs.h5ad"]
    assert (small / "train.h5ad").stat().st_ino == (split_dir / "train.h5ad").stat().st_ino

    limit = train.n_obs // 3
    data = write_sandbox_data(split_dir, tmp_path / "sampled", max_cells=limit)
    again = write_sandbox_data(split_dir, tmp_path / "again", max_cells=limit)
    sample = ad.read_h5ad(data / "train.h5ad")
    assert list(sample.obs_names) == list(ad.read_h5ad(again / "train.h5ad").obs_names)  # reproducible
    assert sample.n_obs < train.n_obs and sample.uns[SAMPLE_UNS]["n_cells"] == train.n_obs
    assert set(sample.obs[CONDITION]) == set(train.obs[CONDITION])  # every condition kept
    np.testing.assert_array_equal(sample.X.toarray(), train[sample.obs_names].X.toarray())
    assert {"val_inputs.h5ad", "test_inputs.h5ad", PSEUDOBULK_FILE} <= {p.name for p in data.iterdir()}
    inputs, full_inputs = ad.read_h5ad(data / "test_inputs.h5ad"), ad.read_h5ad(split_dir / "test_inputs.h5ad")
    assert full_inputs.n_obs > limit >= inputs.n_obs - 50  # inputs over the limit are sampled too
    assert list(inputs.uns["predict"][CONDITION]) == list(full_inputs.uns["predict"][CONDITION])
    bulk = ad.read_h5ad(data / PSEUDOBULK_FILE)
    cond = bulk.obs_names[0]
    np.testing.assert_allclose(bulk.X[0], train[train.obs[CONDITION] == cond].X.toarray().mean(axis=0), rtol=1e-5)
    assert int(bulk.obs["n_cells"].iloc[0]) == int((train.obs[CONDITION] == cond).sum())


def test_sample_is_stratified_and_bounded():
    conditions = np.repeat(["big", "mid", "tiny"], [9000, 900, 20])
    picked = sample_cells(conditions, 1000, seed=1)
    counts = dict(zip(*np.unique(conditions[picked], return_counts=True), strict=True))
    assert counts == {"big": 907, "mid": 90, "tiny": 20}  # shares of 1000, at least 50 (or all) each
    assert np.array_equal(picked, sample_cells(conditions, 1000, seed=1))
    assert not np.array_equal(picked, sample_cells(conditions, 1000, seed=2))


def test_sandbox_sample_is_drawn_with_the_splits_seed(make_adata, h5ad_path, tmp_path, monkeypatch):
    data = h5ad_path(make_adata(cells_per_condition=30, n_control=200))
    names = {}
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):
        split_dir = tmp_path / run / "split"
        make_split(data, "unseen-perturbation", seed, split_dir)
        limit = ad.read_h5ad(split_dir / "train.h5ad", backed="r").n_obs // 3
        monkeypatch.setenv(MAX_CELLS_ENV, str(limit))  # the limit from the environment, as a deployment sets it
        sample = ad.read_h5ad(write_sandbox_data(split_dir, tmp_path / run / "data") / "train.h5ad")
        assert sample.uns[SAMPLE_UNS]["seed"] == seed and sample.uns[SAMPLE_UNS]["max_cells"] == limit
        names[run] = list(sample.obs_names)
        if run == "a":  # the split's seed, not a fixed one: another seed on the same split samples other cells
            other = write_sandbox_data(split_dir, tmp_path / run / "other", seed=seed + 1)
            assert list(ad.read_h5ad(other / "train.h5ad").obs_names) != names[run]
    assert names["a"] == names["b"]  # same data, same seed: the same split and the same sample
    assert names["a"] != names["c"]


def test_sample_limit_setting_refuses_what_is_not_a_positive_count():
    assert max_cells_setting({}) == SANDBOX_MAX_CELLS
    assert max_cells_setting({MAX_CELLS_ENV: " 250 "}) == 250
    for bad in ("0", "-3", "lots", "1e5"):
        with pytest.raises(ValueError, match=MAX_CELLS_ENV):
            max_cells_setting({MAX_CELLS_ENV: bad})
