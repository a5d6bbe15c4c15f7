"""A run's predictions in the user's terms: their obs column names and category labels, with provenance.

The pipeline works in standard columns (`perturbation`, `dose`, `context`, condition keys such as
`G0092||B_cell`); a scientist reads their own (`gene`, `cell_type`, their category order). The standard
condition key is kept as `cellforge_condition`, so `cellforge.score` takes these predictions back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .version import __version__

PROVENANCE_KEY = "cellforge"  # uns[PROVENANCE_KEY]: version, run id, task, plan, split, verdict
CONDITION_COLUMN = "cellforge_condition"


def run_id(run_dir: Path) -> str:
    """A stable id of one run: its record (settings, LLM, replay source) and where it lives."""
    record = (run_dir / "run.json").read_bytes()
    return hashlib.sha256(record + str(run_dir.resolve()).encode()).hexdigest()[:16]


def _h5_value(value: Any) -> Any:
    """`value` as .h5ad `uns` can hold it: no None, lists of one scalar type (else JSON text)."""
    if isinstance(value, dict):
        return {str(k): _h5_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, str) for v in value):
            return list(value)
        if value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return np.asarray(value, dtype=float)
        return json.dumps(value, default=str)
    return value


def provenance(run_dir: Path) -> dict[str, Any]:
    """What made these predictions: version, run id, task, plan summary, split, verdict, delivered predictor."""
    record = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    split = json.loads((run_dir / "split" / "split.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    architecture = plan.get("architecture", {})
    verdict = metrics.get("verdict") or {}
    delivered = metrics.get("delivered") or {}
    return _h5_value({
        "version": __version__,
        "run_id": run_id(run_dir),
        "run_dir": str(run_dir.resolve()),
        "task": record["settings"]["task"],
        "data": record["settings"]["data"],
        "seed": record["settings"]["seed"],
        "llm": record.get("llm", {}).get("backend"),
        "status": metrics.get("status"),
        "plan": {"summary": plan.get("summary") or ", ".join(f"{k} {v}" for k, v in architecture.items()
                                                                if isinstance(v, str | int | float)),
                 "primary_metric": metrics.get("primary_metric"), **{k: v for k, v in architecture.items()
                                                                      if isinstance(v, str | int | float)}},
        "split": {"scheme": split["scheme"], "seed": split["seed"], "validation": split.get("validation"),
                  "held_out_context": split.get("held_out_context"), "n_test_conditions": len(split["conditions"]["test"]),
                  "perturbation_key": split["perturbation_key"], "context_key": split.get("context_key"),
                  "dose_key": split.get("dose_key")},
        "verdict": {"summary": verdict.get("summary"), "beats_baselines": verdict.get("beats_baselines"),
                    "delivered": delivered.get("key"), "delivered_kind": delivered.get("kind"),
                    "reason": delivered.get("reason")},
    })


def _as_user_column(values: np.ndarray, original: pd.Series) -> pd.Series | np.ndarray:
    """Values in the dtype of the user's column: their categories (and order) when it is categorical."""
    if isinstance(original.dtype, pd.CategoricalDtype):
        return pd.Categorical(values, categories=original.cat.categories, ordered=original.cat.ordered)
    return values


def user_predictions(predictions: ad.AnnData, data: ad.AnnData | str | Path, run_dir: Path) -> ad.AnnData:
    """`predictions` (standard columns) with obs in the user's column names and labels, read from `data`
    as the run's split read it, and `uns["cellforge"]` holding the provenance."""
    from service.data import load_dataset
    from service.data.conditions import CONDITION
    from service.data.load import POOLED

    split = json.loads((run_dir / "split" / "split.json").read_text())
    keys = {"perturbation": split["perturbation_key"], "dose": split.get("dose_key"),
            "context": split.get("context_key")}
    dataset = load_dataset(data, perturbation_key=keys["perturbation"], control=split["control_label"],
                           dose_key=keys["dose"], context_key=keys["context"] or POOLED, check=False,
                           backed=None if isinstance(data, ad.AnnData) else True)
    try:
        raw = dataset.adata.obs
        table = pd.DataFrame({CONDITION: dataset.obs[CONDITION].to_numpy()}, index=raw.index)
        for role, key in keys.items():
            if key is not None:
                table[role] = raw[key].to_numpy()
        first = table.drop_duplicates(CONDITION).set_index(CONDITION)
        wanted = predictions.obs[CONDITION].astype(str).to_numpy()
        unknown = sorted(set(wanted) - set(first.index))
        if unknown:
            raise ValueError(f"predictions name conditions the data does not hold: {unknown[:5]}")
        rows = first.loc[wanted]
        obs = pd.DataFrame(index=pd.Index(_row_names(rows), dtype=str))
        for role, key in keys.items():
            if key is not None:
                obs[key] = _as_user_column(rows[role].to_numpy(), raw[key])
    finally:
        if dataset.adata.isbacked:
            dataset.adata.file.close()
    obs[CONDITION_COLUMN] = wanted
    out = ad.AnnData(X=np.asarray(predictions.X), obs=obs, var=predictions.var.copy())
    out.uns[PROVENANCE_KEY] = provenance(run_dir)
    return out


def _row_names(rows: pd.DataFrame) -> list[str]:
    """Readable, unique row names from the user's labels (`KLF1_B_cell`), not condition keys."""
    names = ["_".join(str(v) for v in row if not pd.isna(v)) for row in rows.itertuples(index=False)]
    return list(ad.utils.make_index_unique(pd.Index(names)))
