"""The generated train.py's cell sample (the cells the closed-form fit and the expression input read): the row
indices are drawn first and only those rows are read, so a large training part is never copied whole; the
cells drawn are those the former view-based draw (`cell_sample(train[keep], ...)`) took for the same seed."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from generated_code import load_bundle

from service.pipeline import render_bundle

N_CELLS, N_GENES, SAMPLE = 40_000, 300, 500


@pytest.fixture(scope="module")
def m(knockout_plan, tmp_path_factory):
    return load_bundle(render_bundle(knockout_plan).write(tmp_path_factory.mktemp("code")))


@pytest.fixture(scope="module")
def cells() -> tuple[ad.AnnData, np.ndarray]:
    """A training part in memory (CSR, as read_part reads it) and the mask of the cells of the fitted
    conditions (controls and two thirds of the perturbations, as `fitted_model` keeps them)."""
    rng = np.random.default_rng(0)
    X = sp.random(N_CELLS, N_GENES, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    perturbation = rng.choice([f"g{i}" for i in range(30)] + ["control"] * 6, size=N_CELLS)
    context = rng.choice(["A", "B"], size=N_CELLS)
    obs = pd.DataFrame({"perturbation": perturbation, "context": context, "is_control": perturbation == "control",
                        "condition": [f"{p}||{c}" for p, c in zip(perturbation, context, strict=True)]},
                       index=[f"c{i}" for i in range(N_CELLS)])
    train = ad.AnnData(X=X, obs=obs)
    fitted = {f"g{i}" for i in range(20)}
    keep = train.obs["is_control"].to_numpy() | train.obs["perturbation"].isin(fitted).to_numpy()
    return train, keep


def test_the_sample_is_the_one_the_view_gave(m, cells):
    train, keep = cells
    for seed in (0, 7):
        got = m.cell_sample(train, SAMPLE, seed, rows=np.flatnonzero(keep))
        before = m.cell_sample(train[keep], SAMPLE, seed)  # the former call: a view of the kept cells
        assert got[0].shape == (SAMPLE, N_GENES)
        for new, old in zip(got, before, strict=True):
            np.testing.assert_array_equal(new, old)
        assert got[2].sum() == SAMPLE // 2  # controls: half the sample
    other = m.cell_sample(train, SAMPLE, 1, rows=np.flatnonzero(keep))[0]
    assert not np.array_equal(other, got[0])  # another seed, other cells


def _peak(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_only_the_sampled_rows_are_materialised(m, cells):
    train, keep = cells
    kept = train.X[keep]
    kept_bytes = kept.data.nbytes + kept.indices.nbytes + kept.indptr.nbytes
    sample_bytes = SAMPLE * N_GENES * 8  # the dense float64 sample it returns
    rows = np.flatnonzero(keep)
    peak = _peak(lambda: m.cell_sample(train, SAMPLE, 0, rows=rows))
    assert peak < sample_bytes + 0.2 * kept_bytes, (peak, sample_bytes, kept_bytes)
    # The view-based draw this replaces copies every kept cell's row first: the measure tells them apart.
    assert _peak(lambda: m.cell_sample(train[keep], SAMPLE, 0)) > 0.9 * kept_bytes
