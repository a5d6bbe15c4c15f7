"""The verdict: does the designed model beat the best baseline of its own run, on validation and on test?

Stated for the primary metric and for top-20-DE MSE: the best baseline on each split (name, score), the
model's score, the margin (positive = the model is better) and its relative size, whether it beats it,
every baseline that beats it, the spread of the model's per-condition test scores and a paired
bootstrap interval of its per-condition difference to the best test baseline. "validated" only means
trained and checked; `beats_baselines` is this separate, explicit answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from service.pipeline.selection import LOWER_IS_BETTER, better, finite

MIN_TEST_CONDITIONS = 10
# Conditions of one held-out unit (a compound at four doses in three cell lines) move together, so what
# decides is the number of units held out whole, not of conditions.
MIN_TEST_GROUPS = 5
VERDICT_METRICS = ("mse_top20_de",)  # besides the primary metric
BOOTSTRAP = 2000
STATUS_MEANING = {"validated": "a designed model trained and was checked", "failed": "no designed model trained",
                  "scored": "predictions scored"}


def margin(metric: str, model: float, other: float) -> float:
    """model − other, signed so that positive means the model is better."""
    return other - model if metric.removeprefix("protein_") in LOWER_IS_BETTER else model - other


def beats(metric: str, model: float | None, other: float | None) -> bool | None:
    """Better by more than float noise (a model that fell back to a baseline ties it, it does not win)."""
    if not finite(model) or not finite(other):
        return None
    return margin(metric, model, other) > 1e-3 * max(1.0, abs(other))


class Spread(BaseModel):
    """The model's per-condition test scores."""

    n: int
    median: float
    q25: float
    q75: float
    min: float
    max: float


class Paired(BaseModel):
    """Per-condition margin of the model over the best test baseline (positive = model better)."""

    baseline: str
    n: int
    mean: float
    ci95: tuple[float, float] = Field(description="paired bootstrap over conditions")
    win_fraction: float = Field(description="share of conditions where the model is better")


class MetricVerdict(BaseModel):
    metric: str
    higher_is_better: bool
    model_val: float | None = None
    model_test: float | None = None
    best_baseline_val: str | None = None
    best_baseline_val_score: float | None = None
    best_baseline_test: str | None = None
    best_baseline_test_score: float | None = None
    margin_val: float | None = None
    margin_test: float | None = None
    relative_margin_val: float | None = None
    relative_margin_test: float | None = None
    beats_val: bool | None = None
    beats_test: bool | None = None
    # Every baseline the model does not beat (a tie within float noise is no win), best first.
    baselines_beating_model_val: list[str] = Field(default_factory=list)
    baselines_beating_model_test: list[str] = Field(default_factory=list)
    spread_test: Spread | None = None
    paired_test: Paired | None = None


class Verdict(BaseModel):
    status: str = Field(description="validated = a designed model trained and was checked; failed = none did")
    primary_metric: str
    beats_baselines: bool = Field(description="the designed model beats the best baseline on the primary "
                                              "metric on validation and on test (`cellforge score`: on the "
                                              "part it scored)")
    subject: str = "designed model"
    delivered: str | None = Field(None, description="what the run delivers: designed, baseline:<name> or stack")
    delivered_reason: str = ""
    delivered_val: float | None = None
    delivered_test: float | None = None
    # What the user gets against the best baseline (the designed model's own comparison is `metrics`).
    delivered_metrics: dict[str, MetricVerdict] = Field(default_factory=dict)
    validation: str = ""
    n_val_conditions: int = 0
    n_test_conditions: int = 0
    n_test_groups: int | None = Field(None, description="held-out units (perturbations, compounds, cell types, "
                                                         "doses) the test conditions belong to")
    test_group_by: str | None = None
    metrics: dict[str, MetricVerdict] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    summary: str = ""


def _best(metric: str, scores: dict[str, float | None]) -> tuple[str | None, float | None]:
    name, best = None, None
    for n, s in scores.items():
        if finite(s) and (best is None or better(metric, s, best)):
            name, best = n, s
    return name, best


def _relative(m: float | None, reference: float | None) -> float | None:
    return None if m is None or not finite(reference) or abs(reference) < 1e-12 else m / abs(reference)


def spread(values: list[float | None]) -> Spread | None:
    v = np.array([x for x in values if finite(x)], dtype=float)
    if not v.size:
        return None
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return Spread(n=int(v.size), median=float(med), q25=float(q25), q75=float(q75), min=float(v.min()),
                  max=float(v.max()))


def paired(metric: str, baseline: str, model_rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]],
           seed: int = 0) -> Paired | None:
    theirs = {r["condition"]: r.get(metric) for r in baseline_rows}
    diffs = np.array([margin(metric, mine, other) for r in model_rows
                      if finite(mine := r.get(metric)) and finite(other := theirs.get(r["condition"]))],
                     dtype=np.float64)
    if not diffs.size:
        return None
    rng = np.random.default_rng(seed)
    boots = diffs[rng.integers(0, diffs.size, size=(BOOTSTRAP, diffs.size))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return Paired(baseline=baseline, n=int(diffs.size), mean=float(diffs.mean()), ci95=(float(lo), float(hi)),
                  win_fraction=float((diffs > 0).mean()))


def metric_verdict(metric: str, model_val: float | None, model_test: float | None,
                   baselines_val: dict[str, float | None], baselines_test: dict[str, float | None],
                   model_rows: list[dict[str, Any]] | None = None,
                   baseline_rows: dict[str, list[dict[str, Any]]] | None = None) -> MetricVerdict:
    out = MetricVerdict(metric=metric, higher_is_better=metric.removeprefix("protein_") not in LOWER_IS_BETTER,
                        model_val=model_val if finite(model_val) else None,
                        model_test=model_test if finite(model_test) else None)
    for split, scores, model in (("val", baselines_val, out.model_val), ("test", baselines_test, out.model_test)):
        name, best = _best(metric, scores)
        setattr(out, f"best_baseline_{split}", name)
        setattr(out, f"best_baseline_{split}_score", best)
        if model is None or best is None:
            continue
        m = margin(metric, model, best)
        setattr(out, f"margin_{split}", m)
        setattr(out, f"relative_margin_{split}", _relative(m, best))
        setattr(out, f"beats_{split}", beats(metric, model, best))
        beating = {n: s for n, s in scores.items() if finite(s) and not beats(metric, model, s)}
        setattr(out, f"baselines_beating_model_{split}",
                sorted(beating, key=lambda n: -margin(metric, beating[n], model)))
    if model_rows:
        out.spread_test = spread([r.get(metric) for r in model_rows])
        if out.best_baseline_test and baseline_rows and out.best_baseline_test in baseline_rows:
            out.paired_test = paired(metric, out.best_baseline_test, model_rows, baseline_rows[out.best_baseline_test])
    return out


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _sides(m: MetricVerdict | None) -> list[str]:
    return [f"{split} {_fmt(mg, True)} vs {name}" for split, mg, name in
            (("validation", m.margin_val, m.best_baseline_val), ("test", m.margin_test, m.best_baseline_test))
            if mg is not None] if m else []


def _against(m: MetricVerdict, split: str) -> str | None:
    """'0.4960 vs best baseline gene_similarity 0.4644 (+0.0316, better)' on one split, or None."""
    mine, name, best = (getattr(m, f"model_{split}"), getattr(m, f"best_baseline_{split}"),
                        getattr(m, f"best_baseline_{split}_score"))
    if mine is None or best is None:
        return None
    word = "better" if beats(m.metric, mine, best) else "worse" if beats(m.metric, best, mine) else "tie"
    return f"{mine:.4f} vs best baseline {name} {best:.4f} ({margin(m.metric, mine, best):+.4f}, {word})"


def delivered_sentence(v: Verdict) -> str:
    """How what the run delivers compares with the best baseline, on validation and on test."""
    d = v.delivered_metrics.get(v.primary_metric)
    sides = [f"{label} {text}" for label, text in
             (("validation", d and _against(d, "val")), ("test", d and _against(d, "test"))) if text]
    scored = f" on {v.primary_metric}: {'; '.join(sides)}" if sides else ""
    return f"Delivered {v.delivered} ({v.delivered_reason}){scored}."


def beats_best(m: MetricVerdict, one_split: bool = False) -> bool:
    """Whether the model beats the best baseline on this metric: on validation and on test (a design run), or
    on the one split scored (`one_split`: `cellforge score`). `beats_baselines` is this on the primary metric."""
    return bool((m.beats_val or m.beats_test) if one_split else (m.beats_val and m.beats_test))


def _judged(v: Verdict, m: MetricVerdict, obj: str) -> str:
    """'BEATS {obj}' only where `beats_best`; a win on one split of two is named with its split, so it reads as
    neither a win nor a plain loss."""
    if m.beats_val and m.beats_test is False:
        return f"beats {obj} on validation but NOT on test"
    if m.beats_val is False and m.beats_test:
        return f"does NOT beat {obj} on validation, only on test"
    return f"BEATS {obj}" if beats_best(m, one_split=v.status == "scored") else f"does NOT beat {obj}"


def _other_metrics(v: Verdict) -> str:
    """The headline's clause for each verdict metric besides the primary one."""
    return "".join(f"; on {m.metric} it {_judged(v, m, 'it')} ({', '.join(sides)})" for m in v.metrics.values()
                   if m.metric != v.primary_metric and (sides := _sides(m)))


def headline(v: Verdict) -> str:
    """Plain sentences: does the model beat the best baseline, and what is delivered and how it compares."""
    p = v.metrics.get(v.primary_metric)
    sides = _sides(p)
    if v.status == "failed" or p is None or not sides:
        lead = "No designed model trained" if v.status == "failed" else "The model has no score to compare"
    elif not v.beats_baselines and p.beats_val and p.beats_test is None:
        lead = (f"{v.subject[:1].upper()}{v.subject[1:]}: beats the best baseline on {v.primary_metric} on "
                f"validation ({', '.join(sides)}) but has no test score")
    else:
        judged = _judged(v, p, f"the best baseline on {v.primary_metric}")
        lead = f"{v.subject[:1].upper()}{v.subject[1:]}: {judged} ({', '.join(sides)}){_other_metrics(v)}"
    return f"{lead}. {delivered_sentence(v)}" if v.delivered else f"{lead}."


def verdict_lines(v: Verdict) -> list[str]:
    """The verdict as plain lines, for the CLI and the report."""
    lines = [v.summary or headline(v)]
    for m in v.metrics.values():
        arrow = "higher is better" if m.higher_is_better else "lower is better"
        sides = [f"{split}: model {_fmt(model)} vs best baseline {name} {_fmt(best)}, margin {_fmt(mg, True)} "
                 f"({_pct(rel)}), beats {_yes(b)}"
                 for split, model, name, best, mg, rel, b in (
                     ("val", m.model_val, m.best_baseline_val, m.best_baseline_val_score, m.margin_val,
                      m.relative_margin_val, m.beats_val),
                     ("test", m.model_test, m.best_baseline_test, m.best_baseline_test_score, m.margin_test,
                      m.relative_margin_test, m.beats_test)) if model is not None]
        lines.append(f"{m.metric} ({arrow}): " + ("; ".join(sides) or "no model score"))
        beating = [f"{split} {', '.join(names)}" for split, names in
                   (("val", m.baselines_beating_model_val), ("test", m.baselines_beating_model_test)) if names]
        if beating:
            lines.append(f"  baselines the model does not beat: {'; '.join(beating)}")
        if m.spread_test:
            s = m.spread_test
            lines.append(f"  per-condition test {m.metric}: median {s.median:.4f}, IQR {s.q25:.4f}–{s.q75:.4f}, "
                         f"range {s.min:.4f}–{s.max:.4f} (n={s.n})")
        if m.paired_test:
            d = m.paired_test
            lines.append(f"  vs {d.baseline} per condition: mean margin {d.mean:+.4f}, 95% CI "
                         f"[{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}], model better on {d.win_fraction:.0%}")
    for m in v.delivered_metrics.values():
        sides = [f"{label} {text}" for label, text in (("val", _against(m, "val")), ("test", _against(m, "test")))
                 if text]
        lines.append(f"delivered {v.delivered}, {m.metric}: " + ("; ".join(sides) or "no score"))
    lines += [f"warning: {w}" for w in v.warnings]
    return lines


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _yes(b: bool | None) -> str:
    return "n/a" if b is None else ("yes" if b else "NO")


def build_verdict(*, status: str, primary: str, delivered: str, delivered_reason: str,
                  model_val: dict[str, float] | None, model_test: dict[str, float] | None,
                  baselines_val: dict[str, dict[str, float]], baselines_test: dict[str, dict[str, float]],
                  model_rows: list[dict[str, Any]] | None, baseline_rows: dict[str, list[dict[str, Any]]],
                  delivered_val: dict[str, float] | None, delivered_test: dict[str, float] | None,
                  validation: str,
                  n_val_conditions: int, n_test_conditions: int,
                  not_competing: Sequence[str] = (), test_groups: tuple[str, int] | None = None) -> Verdict:
    """The designed model (model_*) and what is delivered (delivered_*: all metrics of its validation and test
    scores) against the best baseline on each split. `test_groups`: (unit, number) of the units the test
    conditions are held out in."""
    def against(val: dict[str, float] | None, test: dict[str, float] | None,
                rows: list[dict[str, Any]] | None = None) -> dict[str, MetricVerdict]:
        return {metric: metric_verdict(
            metric, (val or {}).get(metric), (test or {}).get(metric),
            {n: s.get(metric) for n, s in baselines_val.items()}, {n: s.get(metric) for n, s in baselines_test.items()},
            rows, baseline_rows if rows else None)
            for metric in dict.fromkeys((primary, *VERDICT_METRICS))}

    metrics = against(model_val, model_test, model_rows)
    p = metrics[primary]
    verdict = Verdict(status=status, primary_metric=primary, beats_baselines=beats_best(p),
                      delivered=delivered, delivered_reason=delivered_reason,
                      delivered_val=(delivered_val or {}).get(primary),
                      delivered_test=(delivered_test or {}).get(primary),
                      delivered_metrics=against(delivered_val, delivered_test), validation=validation,
                      n_val_conditions=n_val_conditions, n_test_conditions=n_test_conditions, metrics=metrics,
                      test_group_by=test_groups[0] if test_groups else None,
                      n_test_groups=test_groups[1] if test_groups else None)
    w = verdict.warnings
    if n_test_conditions < MIN_TEST_CONDITIONS:
        w.append(f"the test split holds {n_test_conditions} condition(s), fewer than {MIN_TEST_CONDITIONS}: too "
                 "few to decide; read the per-condition spread")
    elif test_groups is not None and test_groups[1] < MIN_TEST_GROUPS:
        unit, n = test_groups
        w.append(f"the test split's {n_test_conditions} conditions belong to {n} held-out {unit} group(s), fewer "
                 f"than {MIN_TEST_GROUPS}: conditions of one {unit} move together, so this test cannot decide "
                 "between predictors; read the per-condition spread")
    if p.beats_val and p.beats_test is False:
        w.append(f"the model beats {p.best_baseline_val} on validation but not the best baseline on test: the "
                 "validation gain did not carry over")
    if p.beats_val is False and p.beats_test:
        w.append("the model beats the best baseline on test but not on validation; selection could not see it")
    if not_competing:
        w.append(f"baseline(s) {', '.join(not_competing)} have no validation score (not applicable on the "
                 "validation folds) and could not compete; they are compared on test only")
    verdict.summary = headline(verdict)
    return verdict
