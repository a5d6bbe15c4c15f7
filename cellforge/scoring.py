"""`cellforge.score` and `cellforge.baselines`: the service's evaluator and baselines on a split directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anndata as ad
import pandas as pd

from .predictions import CONDITION_COLUMN

if TYPE_CHECKING:
    from service.data.evaluate import EvaluationReport

Which = Literal["test", "val"]


def _standard(predictions: ad.AnnData | str | Path) -> ad.AnnData | Path:
    """Predictions in the evaluator's format; a design run's `predictions` (user column names) taken back."""
    if isinstance(predictions, ad.AnnData) and "condition" not in predictions.obs \
            and CONDITION_COLUMN in predictions.obs:
        standard = predictions.copy()
        standard.obs["condition"] = standard.obs[CONDITION_COLUMN].astype(str)
        return standard
    return predictions if isinstance(predictions, ad.AnnData) else Path(predictions)


def score(split: str | Path, predictions: ad.AnnData | str | Path, which: Which = "test") -> EvaluationReport:
    """Score predictions (one row per condition, an AnnData or an .h5ad) against the real cells of a split
    directory: `summary` (mean per metric), `per_condition`, `normalized` (vs the mean baseline), `ceiling`."""
    from service.data.evaluate import Evaluator

    return Evaluator(Path(split), which).score(_standard(predictions))


def baselines(split: str | Path, which: Which = "test") -> pd.DataFrame:
    """Every applicable baseline scored on a split directory, and the data ceiling: one row each, metrics
    as columns."""
    from service.data.baselines import run_baselines
    from service.data.evaluate import Evaluator

    evaluator = Evaluator(Path(split), which)
    rows = {name: evaluator.score(p).summary for name, p in run_baselines(evaluator.task).items()}
    rows["data ceiling"] = evaluator.ceiling
    return pd.DataFrame.from_dict(rows, orient="index")
