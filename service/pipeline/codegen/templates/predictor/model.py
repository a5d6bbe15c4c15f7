"""A delivered predictor that is not a trained network: {description}.

config.json holds `weights`: member name -> weight on the member's predicted Δ (prediction − the
control of the condition's context). One baseline with weight 1 is that baseline; several members are
the stack CellForge fitted on validation. Baselines run CellForge's own code (`cellforge_baselines/`,
the very module the service scores them with); the member `designed` is the designed bundle in
`designed/`, trained by its own train.py.
"""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellforge_baselines.baselines import BASELINES, PredictionTask

HERE = Path(__file__).resolve().parent
DESIGNED = "designed"


def train_designed(data: Path, out: Path) -> Path:
    """Train the designed member with its own train.py; its outputs land in `out`."""
    subprocess.run([sys.executable, "train.py", "--data", str(data), "--out", str(out), "--config", "config.json"],
                   cwd=HERE / DESIGNED, check=True)
    return out


def control_rows(task: PredictionTask) -> np.ndarray:
    return np.stack([task.control_means[c] for c in task.targets["context"]])


def member_rows(task: PredictionTask, name: str, designed_out: Path | None) -> np.ndarray:
    """A member's predictions of the task's conditions, rows in task order, columns in gene order."""
    if name != DESIGNED:
        return np.asarray(BASELINES[name][0](task).X, dtype=np.float64)
    pred = ad.read_h5ad(designed_out / ("val_predictions.h5ad" if task.which == "val" else "predictions.h5ad"))
    rows = pd.Index(pred.obs["condition"].astype(str)).get_indexer(task.targets["condition"])
    cols = pd.Index(pred.var_names.astype(str)).get_indexer(task.genes.astype(str))
    if (rows < 0).any() or (cols < 0).any():
        raise ValueError(f"the designed member's {task.which} predictions miss conditions or genes")
    X = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
    return X[np.ix_(rows, cols)].astype(np.float64)


def predict(task: PredictionTask, weights: dict[str, float], designed_out: Path | None = None) -> ad.AnnData:
    """control + Σ weight·(member − control), in the predictions format."""
    control = control_rows(task)
    X = control + sum(w * (member_rows(task, name, designed_out) - control) for name, w in weights.items())
    obs = task.targets.loc[:, ["condition", "perturbation", "dose", "context"]].copy()
    obs.index = obs["condition"].to_numpy()
    return ad.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=task.genes.astype(str)))
