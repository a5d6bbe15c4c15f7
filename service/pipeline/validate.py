"""Validation of an attempt's outputs by the service: files, training log, prediction format (the
evaluator's own checks) and the validation score against the mean baseline. Never the test score."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from service.data.evaluate import Evaluator, PredictionsError
from service.pipeline.execute import OUTPUT_FILES

LOWER_IS_BETTER = ("mse", "mse_top20_de", "discrimination_l1")


@dataclass
class Validation:
    ok: bool
    problems: list[str] = field(default_factory=list)
    primary_metric: str = ""
    val_score: float | None = None
    mean_baseline_score: float | None = None
    val_summary: dict[str, float] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        """Outputs complete and well-formed (whether or not they beat the mean baseline)."""
        return not [p for p in self.problems if not p.startswith("validation score")]


def better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def _log_problems(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return [f"{path.name} is empty: expected one JSON line per epoch"]
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return [f"{path.name} line {number} is not JSON: {line[:80]!r}"]
        loss = entry.get("train_loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return [f"{path.name} line {number}: train_loss is {loss!r} (NaN loss: training diverged)"]
    return []


def validate_outputs(out_dir: Path, val_eval: Evaluator, test_eval: Evaluator, primary_metric: str) -> Validation:
    problems = [f"missing output {name}" for name in OUTPUT_FILES if not (out_dir / name).is_file()]
    if problems:
        return Validation(False, problems, primary_metric)
    problems += _log_problems(out_dir / "train_log.jsonl")
    try:
        test_eval.align(out_dir / "predictions.h5ad")  # format only: the test score is not looked at here
    except PredictionsError as exc:
        problems.append(f"predictions.h5ad in the wrong format: {exc}")
    try:
        report = val_eval.score(out_dir / "val_predictions.h5ad")
    except PredictionsError as exc:
        problems.append(f"val_predictions.h5ad in the wrong format: {exc}")
        return Validation(False, problems, primary_metric)
    score = report.summary.get(primary_metric, float("nan"))
    reference = report.mean_baseline.get(primary_metric, float("nan"))
    if not math.isfinite(score):
        problems.append(f"validation {primary_metric} is {score}")
    elif math.isfinite(reference) and not better(primary_metric, score, reference):
        problems.append(f"validation score {primary_metric}={score:.4f} is no better than the mean baseline's "
                        f"{reference:.4f}")
    return Validation(not problems, problems, primary_metric, score, reference, dict(report.summary))
