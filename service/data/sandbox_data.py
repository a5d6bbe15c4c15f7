"""What a sandbox's /data holds: the model files of a split (training cells, val/test inputs; never a truth
file). Up to `SANDBOX_MAX_CELLS` training cells they are the split's own files (hard links); above it the
generated code gets a bounded, seeded sample of the training cells as `train.h5ad` (every condition kept,
each in proportion to its size and with at least `MIN_CELLS_PER_CONDITION` cells where it has them) and
`pseudobulk.h5ad`, the mean profile of every training condition over all of its cells, so its memory stays
inside the sandbox's limit whatever the size of the screen. `train.h5ad`'s `uns["sample"]` says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .conditions import CONDITION, CONTEXT, DOSE, IS_CONTROL, PERTURBATION
from .load import read_h5ad
from .metrics import group_means
from .partwrite import Part, write_parts
from .splits import MODEL_FILES

SANDBOX_MAX_CELLS = 100_000  # ~0.6 GB of CSR at 2,000 genes: well inside the sandbox's 4 GB by default
MIN_CELLS_PER_CONDITION = 50
PSEUDOBULK_FILE = "pseudobulk.h5ad"
SAMPLE_UNS = "sample"


def sample_cells(conditions: np.ndarray, max_cells: int, seed: int) -> np.ndarray:
    """A sorted, seeded sample of at most about `max_cells` row indices, stratified by condition: each
    keeps its share of `max_cells`, and at least `MIN_CELLS_PER_CONDITION` cells (all, when fewer)."""
    codes, _ = pd.factorize(np.asarray(conditions, dtype=object), sort=True)
    sizes = np.bincount(codes)
    quota = np.minimum(sizes, np.maximum(np.floor(sizes * max_cells / max(len(codes), 1)), MIN_CELLS_PER_CONDITION))
    # Rank of each cell inside its condition under a seeded random order; the first `quota` are kept.
    keys = np.random.default_rng(seed).random(len(codes))
    order = np.lexsort((keys, codes))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - starts[codes[order]]
    return np.flatnonzero(rank < quota[codes])


def pseudobulk(train: ad.AnnData) -> ad.AnnData:
    """One row per training condition (controls too): its mean profile over every cell and its cell count."""
    obs = train.obs
    table = obs.loc[:, [CONDITION, PERTURBATION, DOSE, CONTEXT, IS_CONTROL]].drop_duplicates(CONDITION)
    table = table.astype({CONDITION: str, PERTURBATION: str, CONTEXT: str, DOSE: float, IS_CONTROL: bool})
    table = table.sort_values(CONDITION).set_index(CONDITION, drop=False)
    labels = obs[CONDITION].astype(str).to_numpy()
    table["n_cells"] = pd.Series(labels).value_counts().reindex(table.index).to_numpy()
    means = group_means(train.X, labels, table.index.to_numpy())
    table.index = table.index.astype(str)
    return ad.AnnData(X=means.astype(np.float32), obs=table, var=pd.DataFrame(index=train.var_names.copy()))


def write_sandbox_data(split_dir: Path, target: Path, max_cells: int = SANDBOX_MAX_CELLS, seed: int = 0) -> Path:
    """Fill `target` (emptied first) with what a sandbox mounts at /data for the split in `split_dir`."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    train = read_h5ad(split_dir / "train.h5ad")
    try:
        sampled = train.n_obs > max_cells
        for name in MODEL_FILES:
            if sampled and name == "train.h5ad":
                continue
            try:
                os.link(split_dir / name, target / name)
            except OSError:
                shutil.copy2(split_dir / name, target / name)
        if sampled:
            keep = np.zeros(train.n_obs, dtype=bool)
            keep[sample_cells(train.obs[CONDITION].astype(str).to_numpy(), max_cells, seed)] = True
            uns = dict(train.uns)
            uns[SAMPLE_UNS] = {"n_cells": int(train.n_obs), "n_sampled": int(keep.sum()), "seed": seed,
                               "max_cells": max_cells, "min_cells_per_condition": MIN_CELLS_PER_CONDITION,
                               "pseudobulk": PSEUDOBULK_FILE}
            write_parts(train.X, {target / "train.h5ad": Part(keep, train.obs.loc[keep].copy(), train.var.copy(),
                                                              uns)})
            pseudobulk(train).write_h5ad(target / PSEUDOBULK_FILE)
    finally:
        if train.isbacked:
            train.file.close()
    return target
