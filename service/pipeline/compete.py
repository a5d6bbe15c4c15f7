"""The competition on validation and the delivery of its winner.

Every applicable baseline, the best designed model and a validation-fitted stack of them (when validation
holds enough held-out groups to weigh it) are candidates, scored alike on the same validation folds. The
delivered predictor is chosen over both headline metrics: among the candidates no worse than the best baseline
on validation's primary metric and (up to validation's noise) on top-20-DE MSE, the one with the best mean
relative gain over the best baseline of each (a tie goes to the simpler: baselines first, then the designed
model, then the stack); so a user never gets something worse on validation than the best baseline on either
metric when any candidate achieves that, and otherwise the one with the best mean relative gain over both. A
baseline or stack winner is delivered with runnable code (`deliver.predictor_files`), which the service then
runs in a sandbox to check that it reproduces the delivered test predictions.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from service.data.evaluate import Evaluator
from service.data.load import read_h5ad
from service.data.splits import MIN_VAL_GROUPS
from service.pipeline.codegen import Bundle
from service.pipeline.deliver import DESIGNED, predictor_files, write_files
from service.pipeline.execute import OUTPUT_FILES, SandboxSettings, run_attempt, save_outcome
from service.pipeline.progress import ProgressCallback, ProgressEvent
from service.pipeline.selection import HEADLINE, LOWER_IS_BETTER, PooledScore, Selection, finite
from service.pipeline.stack import blend, fit_stack

EntryKind = Literal["designed", "baseline", "stack"]
NO_CHANGE = "baseline:control"
MATCH_TOLERANCE = 1e-3  # max |Δ| between the delivered code's test predictions and the delivered ones


@dataclass
class Entry:
    kind: EntryKind
    name: str  # the baseline's name, "designed" or "stack"
    val: PooledScore
    val_predictions: dict[str, ad.AnnData | Path]  # fold name -> predictions
    weights: dict[str, float] = field(default_factory=dict)  # the stack's

    @property
    def key(self) -> str:
        return f"baseline:{self.name}" if self.kind == "baseline" else self.kind

    def score(self, metric: str) -> float | None:
        return self.val.get(metric)


def _references(entries: list[Entry], metrics: tuple[str, ...]) -> dict[str, Entry]:
    """The best baseline on validation for each of `metrics` (those no baseline scores left out)."""
    baselines = [e for e in entries if e.kind == "baseline"]
    return {m: best[0] for m in dict.fromkeys(metrics) if (best := rank_on(baselines, m)[:1])}


def _up(metric: str, score: float, ref: float) -> float:
    """How much better `score` is than `ref` on `metric` (negative: worse)."""
    return ref - score if metric.removeprefix("protein_") in LOWER_IS_BETTER else score - ref


def _gains(entry: Entry, references: dict[str, Entry]) -> list[float] | None:
    """Relative gain of `entry` over the best baseline on each metric (positive = better); None without a
    score on one."""
    out = []
    for metric, best in references.items():
        score, ref = entry.score(metric), best.score(metric)
        if score is None or ref is None:
            return None
        out.append(_up(metric, score, ref) / max(abs(ref), 1e-12))
    return out


def _within_noise(entry: Entry, best: Entry, metric: str) -> bool:
    """Whether `entry` is no worse than `best` on `metric` up to validation's noise: its mean deficit over the
    conditions both score is within one standard error. Conditions of one held-out group (a cell type, a
    gene, a compound) move together, so with enough groups (`MIN_VAL_GROUPS`) the standard error is that of
    the groups' mean differences — the unit the test holds out, as the verdict counts it; counting each
    condition of a group as independent understated the noise (seven cell types held 70 conditions). With
    fewer groups their spread is no estimate, and the paired per-condition differences give it."""
    theirs = {(r.get("fold"), r.get("condition")): v for r in best.val.per_condition if finite(v := r.get(metric))}
    by_group: dict[str, list[float]] = {}
    for r in entry.val.per_condition:
        key = (r.get("fold"), r.get("condition"))
        if finite(v := r.get(metric)) and key in theirs:
            by_group.setdefault(str(r.get("group")), []).append(_up(metric, v, theirs[key]))
    diffs = np.array([np.mean(group) for group in by_group.values()] if len(by_group) >= MIN_VAL_GROUPS
                     else [d for group in by_group.values() for d in group])
    if len(diffs) < 2:
        return False
    return float(diffs.mean()) >= -float(diffs.std(ddof=1)) / np.sqrt(len(diffs))


def _not_worse(entry: Entry, references: dict[str, Entry], primary: str) -> bool:
    """No worse on validation than the best baseline of each headline metric: strictly on the primary metric,
    within validation's noise (`_within_noise`) on the others. A strict second test let a difference of a few
    thousandths in top-20-DE MSE, far inside its noise, hand the run to a baseline the candidate beat on the
    primary metric by a wide margin."""
    gains = _gains(entry, references)
    if gains is None:
        return False
    return all(g >= 0 or (metric != primary and _within_noise(entry, references[metric], metric))
               for g, metric in zip(gains, references, strict=True))


def _standing(entry: Entry, references: dict[str, Entry], primary: str) -> float:
    """`entry`'s mean relative gain over the best baseline of each headline metric. A gain on a metric other
    than the primary that validation's noise cannot tell from none (`_within_noise` both ways) counts as none,
    as `_not_worse` lets such a deficit pass: a deficit within the noise of five held-out cell types handed a
    run to a baseline the candidate beat by a sixth on the primary metric."""
    gains = _gains(entry, references)
    if not gains:
        return -np.inf
    told = [0.0 if metric != primary and best is not entry and _within_noise(entry, best, metric)
            and _within_noise(best, entry, metric) else g
            for g, (metric, best) in zip(gains, references.items(), strict=True)]
    return float(np.mean(told))


def _merit(entry: Entry, references: dict[str, Entry], primary: str) -> tuple[float, float]:
    """How `entry` stands on validation (greater is better): (1, its mean relative gain over the best baseline
    of each headline metric) when it is no worse than those baselines on both (`_not_worse`), above the others,
    (0, that mean gain; `_standing`); (−1, −∞) without a primary score. Among candidates no worse on both,
    ranking by the primary metric alone let a stack that mixed in `control` for a primary gain of a few
    percent win over a designed model better on top-20-DE MSE by a third (knockouts): both metrics are the
    verdict's, so both count, each as its relative gain."""
    if entry.score(primary) is None:
        return (-1.0, -np.inf)
    return (1.0 if _not_worse(entry, references, primary) else 0.0, _standing(entry, references, primary))


def merit_against(baselines: list[Entry], primary: str) -> Callable[[PooledScore], tuple[float, float]]:
    """`rank`'s standing of a designed candidate's validation scores among `baselines` (their best on each
    headline metric taken once): the search judges its nodes by it, so it keeps what the delivery would
    deliver."""
    references = _references(baselines, (primary, *HEADLINE))
    return lambda score: _merit(Entry("designed", "designed", score, {}), references, primary)


def rank(entries: list[Entry], primary: str) -> list[Entry]:
    """Best first on validation by `_merit`: the entries no worse than the best baseline on the primary
    metric *and* on top-20-DE MSE, then the others, each group by its mean relative gain over the best
    baseline of each metric, `control` after the others; entries without a primary score last. Ties keep the
    given order (baselines before the designed model before the stack: the simpler wins)."""
    references = _references(entries, (primary, *HEADLINE))
    merits = {id(e): _merit(e, references, primary) for e in entries}
    # `control` predicts no response at all; its primary score is the Systema reference's (−mean training Δ
    # against the truth's deviation from it), not a skill that carries over to the test conditions, so
    # alone it is delivered only when it is no worse than the best baseline on both metrics.
    def order(e: Entry) -> tuple[float, float]:
        tier, value = merits[id(e)]
        return (-0.5 if e.key == NO_CHANGE and tier == 0.0 else tier, value)

    return sorted(entries, key=order, reverse=True)  # stable: ties keep the given order


def with_stack(selection: Selection, entries: list[Entry], primary: str) -> list[Entry]:
    """The entries plus the stack of the leaders (when two or more can be stacked): the best baseline on each
    headline metric, every designed entry, and `control` (no change), whose weight is how far validation
    says the responses should shrink. Few members keep the cross-fitted weights stable on the few
    conditions validation holds; the other baselines seldom add what the leaders lack. No stack where
    `fit_stack` cannot weigh one (fewer than `MIN_VAL_GROUPS` held-out groups)."""
    scored = [e for e in entries if finite(e.score(primary))]
    baselines = [e for e in scored if e.kind == "baseline"]
    leaders = {e.name for m in dict.fromkeys((primary, *HEADLINE)) for e in rank_on(baselines, m)[:1]}
    members = [e for e in scored if e.kind != "baseline" or e.name in leaders or e.name == "control"]
    stack = fit_stack(selection, {e.name: e.val_predictions for e in members}, primary,
                      [e.name for e in members if e.kind == "baseline"])
    if stack is None:
        return entries
    weights = {n: w for n, w in stack.weights.items() if w > 0}
    return [*entries, Entry("stack", "stack", selection.score(stack.val_predictions), stack.val_predictions,
                            weights=weights)]


def rank_on(entries: list[Entry], metric: str) -> list[Entry]:
    """Best first on one validation metric (entries without it left out); ties keep the given order."""
    sign = 1.0 if metric.removeprefix("protein_") in LOWER_IS_BETTER else -1.0
    scored = [(sign * s, e) for e in entries if finite(s := e.score(metric))]
    return [e for _, e in sorted(scored, key=lambda pair: pair[0])]


@dataclass
class Delivery:
    entry: Entry
    reason: str
    test_predictions: ad.AnnData | Path
    code_check: dict[str, Any] = field(default_factory=dict)


def concat_predictions(predictions: dict[str, ad.AnnData | Path]) -> ad.AnnData:
    """One predictions file of every validation fold (out-of-fold: folds hold disjoint conditions)."""
    # Files come from generated code: the checked opener.
    parts = [p if isinstance(p, ad.AnnData) else read_h5ad(p, backed=False) for p in predictions.values()]
    out = ad.concat(parts, join="outer") if len(parts) > 1 else parts[0].copy()
    for column in ("condition", "perturbation", "context"):
        if column in out.obs:
            out.obs[column] = out.obs[column].astype(str)
    return out


def stack_test_predictions(weights: dict[str, float], test_eval: Evaluator,
                           members: dict[str, ad.AnnData | Path]) -> ad.AnnData:
    aligned = {name: test_eval.align(members[name]) for name in weights}
    control = test_eval.truth.control
    X = blend(weights, control, aligned)
    targets = test_eval.truth.targets
    obs = targets.loc[:, ["condition", "perturbation", "dose", "context"]].copy()
    obs.index = obs["condition"].astype(str).to_numpy()
    return ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=test_eval.task.genes.astype(str)))


def verify_code(code: Path, data: Path, where: Path, expected: ad.AnnData, test_eval: Evaluator,
                sandbox: SandboxSettings, time_left: float, on_progress: ProgressCallback) -> dict[str, Any]:
    """Run the delivered bundle in a sandbox on the whole split's model files; does it reproduce the
    delivered test predictions?"""
    on_progress(ProgressEvent("deliver", "running the delivered code in a sandbox"))
    outcome = run_attempt(code, data, where, 0, sandbox, time_left, on_progress)
    save_outcome(where, outcome)
    if outcome.failure is not None:
        return {"ran": False, "failure": outcome.failure.summary(), "seconds": round(outcome.seconds, 1)}
    missing = [n for n in OUTPUT_FILES if not (outcome.out_dir / n).is_file()]
    if missing:
        return {"ran": False, "failure": f"missing output(s) {missing}", "seconds": round(outcome.seconds, 1)}
    try:
        diff = float(np.abs(test_eval.align(outcome.out_dir / "predictions.h5ad") - test_eval.align(expected)).max())
    except Exception as exc:  # a PredictionsError or an unreadable file: the code does not reproduce
        return {"ran": True, "matches": False, "failure": str(exc), "seconds": round(outcome.seconds, 1)}
    return {"ran": True, "matches": diff <= MATCH_TOLERANCE, "max_abs_diff": diff, "seconds": round(outcome.seconds, 1),
            "out": str(outcome.out_dir)}


def install_outputs(out_dir: Path, root: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (out_dir / name).is_file():
            shutil.copy2(out_dir / name, root / name)


def predictor_bundle_files(entry: Entry, designed: Bundle | None) -> dict[str, str]:
    if entry.kind == "baseline":
        return predictor_files({entry.name: 1.0}, "baseline", f"the {entry.name} baseline")
    names = ", ".join(f"{n} ×{w:.3f}" for n, w in entry.weights.items() if w > 0)
    return predictor_files({n: w for n, w in entry.weights.items() if w > 0}, "stack",
                           f"a validation-fitted stack of {names}",
                           designed if DESIGNED in entry.weights else None)


def write_predictor_code(entry: Entry, designed: Bundle | None, code: Path) -> Path:
    if code.exists():
        shutil.rmtree(code)
    return write_files(predictor_bundle_files(entry, designed), code)
