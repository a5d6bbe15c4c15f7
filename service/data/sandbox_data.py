"""What a sandbox's /data holds: the model files of a split (training cells, val/test inputs; never a truth
file). A file of up to `SANDBOX_MAX_CELLS` cells is the split's own (a hard link); a larger one becomes a
bounded, seeded sample of its cells (every condition kept, each in proportion to its size and with at least
`MIN_CELLS_PER_CONDITION` cells where it has them; its `uns["sample"]` says so), and `pseudobulk.h5ad` is
added: the mean profile (float64, as the service computes it) and cell count of every training condition
(controls included) over all of its cells; with a sampled train part, `coexpression_cells.h5ad` too: the
training cells the baselines' gene co-expression sample draws from the whole part. So the generated code's
memory stays inside the sandbox's limit whatever the size of the screen, and a delivered baseline or stack
bundle (`baselines.inputs_task`) predicts exactly what the service's baselines predict.

The sample is drawn with the split's seed (split.json), so a split and its sandbox data are reproduced
together. `CELLFORGE_SANDBOX_MAX_CELLS` (environment) sets the limit, e.g. lower to try the sampled path
on small data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .baselines import COEXPRESSION_FILE, PSEUDOBULK_FILE, SAMPLE_UNS, coexpression_rows
from .conditions import CONDITION, CONTEXT, DOSE, IS_CONTROL, PERTURBATION
from .load import read_h5ad
from .metrics import group_means
from .partwrite import Part, write_parts
from .splits import MODEL_FILES

SANDBOX_MAX_CELLS = 100_000  # ~0.6 GB of CSR at 2,000 genes: well inside the sandbox's 4 GB by default
MIN_CELLS_PER_CONDITION = 50
MAX_CELLS_ENV = "CELLFORGE_SANDBOX_MAX_CELLS"


def max_cells_setting(env: dict[str, str] | None = None) -> int:
    """The sample limit: `CELLFORGE_SANDBOX_MAX_CELLS` when set (a positive integer), else `SANDBOX_MAX_CELLS`."""
    value = (os.environ if env is None else env).get(MAX_CELLS_ENV, "").strip()
    if not value:
        return SANDBOX_MAX_CELLS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{MAX_CELLS_ENV}={value!r}: expected a positive number of cells")
    return limit


def split_seed(split_dir: Path) -> int:
    """The seed split.json records (0 for a folder without one, e.g. model files copied by hand)."""
    try:
        return int(json.loads((split_dir / "split.json").read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


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
    return ad.AnnData(X=means.astype(np.float64), obs=table, var=pd.DataFrame(index=train.var_names.copy()))


def write_sandbox_data(split_dir: Path, target: Path, max_cells: int | None = None, seed: int | None = None) -> Path:
    """Fill `target` (emptied first) with what a sandbox mounts at /data for the split in `split_dir`: each
    model file as it is (a hard link) up to `max_cells` cells (default: `max_cells_setting()`), else a sample
    of its cells drawn with `seed` (default: the split's seed), the inputs parts included (they hold control
    cells only, and their means are among the pseudobulks, all of them training cells)."""
    max_cells = max_cells_setting() if max_cells is None else max_cells
    seed = split_seed(split_dir) if seed is None else seed
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    sampled = False
    for name in MODEL_FILES:
        part = read_h5ad(split_dir / name)
        try:
            if part.n_obs <= max_cells:
                try:
                    os.link(split_dir / name, target / name)
                except OSError:
                    shutil.copy2(split_dir / name, target / name)
                continue
            keep = np.zeros(part.n_obs, dtype=bool)
            keep[sample_cells(part.obs[CONDITION].astype(str).to_numpy(), max_cells, seed)] = True
            uns = dict(part.uns)
            uns[SAMPLE_UNS] = {"n_cells": int(part.n_obs), "n_sampled": int(keep.sum()), "seed": seed,
                               "max_cells": max_cells, "min_cells_per_condition": MIN_CELLS_PER_CONDITION,
                               "pseudobulk": PSEUDOBULK_FILE}
            write_parts(part.X, {target / name: Part(keep, part.obs.loc[keep].copy(), part.var.copy(), uns)})
            if name == "train.h5ad":
                pseudobulk(part).write_h5ad(target / PSEUDOBULK_FILE)
                rows = coexpression_rows(part.n_obs)
                ad.AnnData(X=part.X[rows], obs=pd.DataFrame(index=part.obs_names[rows].astype(str)),
                           var=pd.DataFrame(index=part.var_names.astype(str))).write_h5ad(target / COEXPRESSION_FILE)
            sampled = True
        finally:
            if part.isbacked:
                part.file.close()
    if sampled and not (target / PSEUDOBULK_FILE).exists():  # inputs sampled, train not: its means all the same
        train = read_h5ad(split_dir / "train.h5ad")
        pseudobulk(train).write_h5ad(target / PSEUDOBULK_FILE)
        if train.isbacked:
            train.file.close()
    return target
