"""Small synthetic perturbation datasets for the data-layer tests (and anyone else's).

`make_adata(...)` builds a real AnnData with a known layout: counts drawn from a negative binomial
around a gene-specific mean, each perturbation knocking its target gene down and shifting a few
other genes, so detection, profiles, splits and metrics see genuine structure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def make_perturbation_adata(
    perturbations: Sequence[str] = ("G0", "G1", "G2", "G3", "G4", "G5", "G6", "G7", "G8", "G9"),
    *,
    n_genes: int = 60,
    cells_per_condition: int = 12,
    n_control: int = 40,
    control_label: str = "control",
    perturbation_key: str = "perturbation",
    doses: Sequence[float] | None = None,
    dose_key: str = "dose",
    contexts: Sequence[str] | None = None,
    context_key: str = "cell_type",
    batches: int = 2,
    counts: bool = True,
    sparse: bool = True,
    feature_types: dict[str, int] | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """A perturbation AnnData. Perturbation labels may be combos (`"G1+G2"`).

    Every perturbation appears in every context at every dose; controls appear `n_control` times per
    context. `feature_types={"Antibody Capture": 5, "Peaks": 20}` appends those feature blocks after
    the `n_genes` RNA genes and sets `var["feature_types"]`.
    """
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    ctxs = list(contexts) if contexts else [None]
    dose_levels = list(doses) if doses else [None]
    rows: list[dict] = []
    for ctx in ctxs:
        rows += [{perturbation_key: control_label, dose_key: 0.0, context_key: ctx}] * n_control
        for pert in perturbations:
            for dose in dose_levels:
                rows += [{perturbation_key: pert, dose_key: dose, context_key: ctx}] * cells_per_condition
    obs = pd.DataFrame(rows)
    if not doses:
        obs = obs.drop(columns=dose_key)
    if not contexts:
        obs = obs.drop(columns=context_key)
    obs["batch"] = [f"b{i % max(batches, 1)}" for i in range(len(obs))]
    obs.index = [f"cell{i}" for i in range(len(obs))]

    base = rng.gamma(2.0, 1.5, size=n_genes)
    effects = {}
    for pert in sorted(set(obs[perturbation_key]) - {control_label}):  # sorted: same data in every process
        eff = np.ones(n_genes)
        for part in pert.split("+"):
            if part in genes:
                eff[genes.index(part)] = 0.15
            hit = rng.choice(n_genes, size=3, replace=False)
            eff[hit] *= rng.choice([0.4, 2.5], size=3)
        effects[pert] = eff
    ctx_scale = {c: rng.uniform(0.7, 1.4, size=n_genes) for c in ctxs}
    labels = obs[perturbation_key].to_numpy()
    dose_arr = obs[dose_key].to_numpy(float) if doses else np.ones(len(obs))
    ctx_arr = obs[context_key].to_numpy() if contexts else np.array([None] * len(obs))
    mean = np.empty((len(obs), n_genes))
    for i, (lab, d, c) in enumerate(zip(labels, dose_arr, ctx_arr, strict=True)):
        m = base * ctx_scale[c]
        if lab != control_label:
            strength = d / max(dose_arr.max(), 1e-9) if doses else 1.0
            m = m * effects[lab] ** strength
        mean[i] = m
    size = rng.uniform(0.6, 1.6, size=(len(obs), 1))
    X = rng.poisson(mean * size).astype(np.float32)

    var = pd.DataFrame(index=genes)
    if feature_types:
        blocks = [X]
        types = ["Gene Expression"] * n_genes
        names = list(genes)
        for ftype, n in feature_types.items():
            if ftype == "Peaks":
                blocks.append((rng.random((len(obs), n)) < 0.2).astype(np.float32) * rng.integers(1, 4, (len(obs), n)))
                names += [f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(n)]
            else:
                blocks.append(rng.poisson(30.0, size=(len(obs), n)).astype(np.float32))
                names += [f"CD{i}_TotalSeqB" for i in range(n)]
            types += [ftype] * n
        X = np.hstack(blocks).astype(np.float32)
        var = pd.DataFrame({"feature_types": types}, index=names)
    if not counts:
        X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs, var=var)


def write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def make_adata() -> Callable[..., ad.AnnData]:
    """The `make_perturbation_adata` factory."""
    return make_perturbation_adata


@pytest.fixture
def h5ad_path(tmp_path: Path) -> Callable[..., Path]:
    """`h5ad_path(adata, name="data.h5ad")` writes the AnnData under tmp_path and returns the path."""

    def _write(adata: ad.AnnData, name: str = "data.h5ad") -> Path:
        return write_h5ad(adata, tmp_path / name)

    return _write
