"""Split directories built from condition means that are known exactly: each condition's cells average to its
mean, so every pseudobulk, baseline and closed-form fit on them can be checked against a hand computation."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from service.data import SplitInfo, condition_key

GENES = [f"G{i}" for i in range(12)]
Cond = tuple[str, float, str]  # perturbation, dose, context


def write_split_json(out: Path, obs: pd.DataFrame, part: np.ndarray) -> None:
    conditions = {p: sorted(set(obs["condition"][part == p])) for p in ("train", "val", "test")}
    info = SplitInfo(scheme="unseen-perturbation", seed=0, source="constructed", perturbation_key="perturbation",
                     control_label="control", control_labels=["control"], dose_key=None, context_key=None,
                     kind="genetic", modalities=["rna_lognorm"], conditions=conditions,
                     n_cells={p: int((part == p).sum()) for p in conditions}, genes=GENES)
    (out / "split.json").write_text(info.model_dump_json())


def cells_with_mean(mean: np.ndarray, rng: np.random.Generator, n: int = 6) -> np.ndarray:
    """n cells whose average is exactly `mean` (symmetric offsets), so pseudobulks are known."""
    half = rng.uniform(0.1, 0.5, size=(n // 2, len(mean)))
    return mean + np.vstack([half, -half])


def write_constructed_split(out: Path, means: dict[Cond, np.ndarray], test: list[Cond],
                            val: list[Cond] = ()) -> Path:
    """Controls are the conditions named 'control'; everything not in test/val is training."""
    rng = np.random.default_rng(0)
    blocks, rows = [], []
    for (pert, dose, ctx), mean in means.items():
        block = cells_with_mean(mean, rng)
        blocks.append(block)
        part = "test" if (pert, dose, ctx) in test else "val" if (pert, dose, ctx) in val else "train"
        rows += [{"perturbation": pert, "dose": dose, "context": ctx, "is_control": pert == "control",
                  "condition": condition_key(pert, dose, ctx), "part": part}] * len(block)
    obs = pd.DataFrame(rows, index=[f"c{i}" for i in range(len(rows))])
    cells = ad.AnnData(X=sp.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=obs.drop(columns="part"),
                       var=pd.DataFrame(index=GENES))
    part = obs["part"].to_numpy()
    out.mkdir(parents=True)
    cells[part == "train"].copy().write_h5ad(out / "train.h5ad")
    for which, listed in (("val", list(val)), ("test", test)):
        cells[part == which].copy().write_h5ad(out / f"{which}_truth.h5ad")
        contexts = {c for _, _, c in listed}
        inputs = cells[obs["is_control"].to_numpy() & obs["context"].isin(contexts).to_numpy()].copy()
        inputs.uns["predict"] = {"condition": [condition_key(*c) for c in listed],
                                 "perturbation": [c[0] for c in listed], "dose": [c[1] for c in listed],
                                 "context": [c[2] for c in listed]}
        inputs.write_h5ad(out / f"{which}_inputs.h5ad")
    write_split_json(out, obs, part)
    return out
