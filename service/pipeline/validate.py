"""Validation of a sandbox run's outputs by the service: files, training log, prediction format (the
evaluator's own checks) and the validation score. Never the test score.

"Validated" means trained and checked. Whether the model beats the baselines is the verdict's business
(`verdict.py`): a model that trains and scores badly is validated, and the verdict says it loses."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from service.data.evaluate import EvaluationReport, Evaluator, PredictionsError
from service.pipeline.execute import OUTPUT_FILES


@dataclass
class RunCheck:
    """The outputs of one sandbox run: what is wrong with them, and the val score when there is one."""

    problems: list[str]
    report: EvaluationReport | None = None


@dataclass
class Validation:
    """A search node's validation: every run checked, the val scores pooled over the folds."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    primary_metric: str = ""
    val_score: float | None = None
    mean_baseline_score: float | None = None
    val_summary: dict[str, float] = field(default_factory=dict)
    n_conditions: int = 0

    @property
    def trained(self) -> bool:
        return self.ok


def log_problems(path: Path) -> list[str]:
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


def check_run(out_dir: Path, fold_eval: Evaluator | None, test_eval: Evaluator) -> RunCheck:
    """Check one run's outputs; `fold_eval` scores its val predictions (None: a run whose val has no
    conditions, the whole-split run of a cross-validated search)."""
    problems = [f"missing output {name}" for name in OUTPUT_FILES if not (out_dir / name).is_file()]
    if problems:
        return RunCheck(problems)
    problems += log_problems(out_dir / "train_log.jsonl")
    try:
        test_eval.align(out_dir / "predictions.h5ad")  # format only: the test score is not looked at here
    except PredictionsError as exc:
        problems.append(f"predictions.h5ad in the wrong format: {exc}")
    if fold_eval is None:
        return RunCheck(problems)
    try:
        report = fold_eval.score(out_dir / "val_predictions.h5ad")
    except PredictionsError as exc:
        problems.append(f"val_predictions.h5ad in the wrong format: {exc}")
        return RunCheck(problems)
    return RunCheck(problems, report)
