"""Benchmark of the offline design pipeline against the best baseline of each run; prints one JSON object.

1. Quality: simulated knockout (unseen genes), drug (25 compounds, unseen ones at 4 doses), cytokine (3 cell
   types) and stimulation (8 cell types whose responses follow their control states), each cell type held out
   in turn, data over several seeds, plus the README demo (`cellforge demo`'s data). What each run delivers (the
   designed model, a baseline or the stack of baselines, whichever won validation) is scored on held-out
   conditions, the designed model's own score beside it when its whole-split run finished, against the best of all applicable baselines of that run, per metric: the primary
   metric (`pearson_delta_pert`, Pearson Δ against the perturbed centroid) and `mse_top20_de`. Per run: win,
   tie or loss against that best baseline, and the relative improvement on the primary metric; per kind and
   overall: wins per seed, the mean relative improvement, the design wall time.
   Targets: never below the best baseline on either metric, ≥ 10% better on the primary metric on average,
   ≤ 15 min per design run on 2 CPU cores.
   `--compete-only` skips the design (no sandbox): the same splits, the baselines and their validation stack
   compete alone, which measures the selection and stacking rules apart from the designed model.
2. Scale: the wall time of one offline design run on 20,000 cells × 2,000 genes (target ≤ 15 min).

    .venv/bin/python benchmarks/design_bench.py [--seeds 0 1 2] [--kinds knockout combo drug cytokine stimulation]
        [--contexts T_cell ...] [--cell-types N] [--cells 12000] [--genes 500] [--sandbox docker|local] [--skip-demo]
        [--skip-scale] [--skip-quality] [--compete-only] [--max-nodes N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from service.cli.design_cmd import DEMO_CELLS, DEMO_GENES, DEMO_TASK
from service.data import make_split, simulate
from service.data.baselines import run_baselines
from service.data.evaluate import Evaluator
from service.pipeline import DesignSettings, run_design
from service.pipeline.compete import Entry, rank, stack_test_predictions, with_stack
from service.pipeline.rundir import RunDir
from service.pipeline.selection import Selection, prepare_selection

SCHEMES = {"knockout": "unseen-perturbation", "combo": "combo", "drug": "unseen-drug", "cytokine": "unseen-context",
           "stimulation": "unseen-context"}  # what the task analysis picks for TASKS
TASKS = {
    "knockout": "Predict expression after CRISPR knockout of unseen genes",
    "combo": "Predict expression after double CRISPR knockouts of unseen gene pairs",
    "drug": "Predict responses of cell lines to unseen drugs at several doses",
    "cytokine": "Predict cytokine stimulation responses in an unseen cell type",
    "stimulation": "Predict stimulation responses in an unseen cell type",
}
# Enough held-out units for a verdict (≥ 5 test compounds: a split holds out a fifth of them); the default
# simulation has 10 compounds at 12,000 cells.
PERTURBATIONS = {"drug": 25}
DEMO_SEED = 0  # `cellforge demo`'s default seed
PRIMARY = "pearson_delta_pert"
METRICS = {PRIMARY: "higher", "mse_top20_de": "lower"}
TARGET_SECONDS = 900
TARGET_GAIN = 0.10


def verdict(metric: str, model: float, best: float) -> str:
    """win / tie / loss of the model against the best baseline; equal up to float noise is a tie (a model
    that fell back to that baseline's recipe matches it)."""
    margin = 1e-3 * max(1.0, abs(best))
    better = model - best if METRICS[metric] == "higher" else best - model
    return "win" if better > margin else "loss" if better < -margin else "tie"


def gain(metric: str, model: float, best: float) -> float:
    """Relative improvement over the best baseline (positive = better), by the best baseline's size."""
    better = model - best if METRICS[metric] == "higher" else best - model
    return better / max(abs(best), 1e-12)


def score_run(kind: str, seed: int, context: str | None, seconds: float, result) -> dict:
    m = result.metrics
    row: dict = {"kind": kind, "seed": seed, "context": context, "status": result.status, "seconds": round(seconds, 1),
                 "attempts": m.get("attempts"), "n_test_conditions": m.get("n_test_conditions"),
                 "n_test_groups": (m.get("verdict") or {}).get("n_test_groups")}
    delivered = m.get("delivered") or {}
    if not delivered.get("test"):
        return row
    # What the user gets (the designed model, a baseline or the stack, chosen on validation) is what is
    # judged; the designed model's own test score is kept beside it when its whole-split run finished.
    row["delivered"] = f"{delivered.get('kind')}:{delivered.get('name')}"
    designed = m.get("model") or {}
    for metric, direction in METRICS.items():
        scores: dict[str, float] = {name: s[metric] for name, s in m["baselines"].items() if s.get(metric) is not None}
        pick = max if direction == "higher" else min
        best = pick(scores, key=lambda name: scores[name])
        got, own = delivered["test"][metric], designed.get(metric)
        row[metric] = {"delivered": got, "designed": own, "best_baseline": best, "best": scores[best],
                       "ceiling": m["ceiling"].get(metric), "verdict": verdict(metric, got, scores[best]),
                       "designed_verdict": None if own is None else verdict(metric, own, scores[best]),
                       "gain": gain(metric, got, scores[best]), "baselines": scores}
    return row


def design(kind: str, seed: int, data: Path, task: str, work: Path, sandbox: str, context: str | None = None,
           max_nodes: int | None = None) -> dict:
    label = f"{kind}_{seed}" + (f"_{context}" if context else "")
    started = time.perf_counter()
    nodes = {} if max_nodes is None else {"max_nodes": max_nodes}
    result = run_design(DesignSettings(data=data, task=task, out=work / f"run_{label}", seed=seed, sandbox=sandbox,
                                       max_minutes=20, held_out_context=context, **nodes))
    row = score_run(kind, seed, context, time.perf_counter() - started, result)
    print(f"{label}: {result.status} in {row['seconds']}s " + " ".join(
        f"{k}={row[k]['delivered']:.3f} ({row['delivered']}) vs {row[k]['best_baseline']} {row[k]['best']:.3f} ({row[k]['verdict']})"
        for k in METRICS if k in row), file=sys.stderr, flush=True)
    return row


@dataclass
class Competed:
    """What `score_run` reads of a design result, from the competition of baselines and their stack alone."""

    metrics: dict
    status: str = "competed"


def split_and_baselines(rd: RunDir, kind: str, seed: int, data: Path,
                        context: str | None) -> tuple[Selection, list[Entry]]:
    """The run's split and validation folds as `run_design` makes them, and every applicable baseline as a
    candidate scored on them."""
    make_split(data, SCHEMES[kind], seed, rd.split, context=context)
    selection = prepare_selection(rd)
    return selection, [Entry("baseline", n, selection.baseline_score(n), {f.name: f.baselines[n] for f in selection.folds})
                       for n in selection.baselines]


def compete(kind: str, seed: int, data: Path, work: Path, context: str | None = None) -> dict:
    """The run's split and validation as `run_design` makes them; baselines and their stack compete."""
    label = f"{kind}_{seed}" + (f"_{context}" if context else "")
    started = time.perf_counter()
    rd = RunDir(work / f"compete_{label}").create()
    selection, entries = split_and_baselines(rd, kind, seed, data, context)
    winner = rank(with_stack(selection, entries, PRIMARY), PRIMARY)[0]
    test_eval = Evaluator(rd.split, "test")
    test = run_baselines(rd.split, "test")
    predictions = test[winner.name] if winner.kind == "baseline" else stack_test_predictions(winner.weights,
                                                                                           test_eval, test)
    report = test_eval.score(predictions)
    metrics = {"delivered": {"kind": winner.kind, "name": winner.name, "test": report.summary,
                             "weights": winner.weights, "val": winner.val.summary},
               "baselines": {n: test_eval.score(p).summary for n, p in test.items()}, "ceiling": report.ceiling,
               "n_test_conditions": report.n_conditions}
    row = score_run(kind, seed, context, time.perf_counter() - started, Competed(metrics))
    row["weights"] = winner.weights or None
    print(f"{label}: " + " ".join(
        f"{k}={row[k]['delivered']:.3f} ({row['delivered']}) vs {row[k]['best_baseline']} {row[k]['best']:.3f} ({row[k]['verdict']})"
        for k in METRICS), file=sys.stderr, flush=True)
    return row


def quality_runs(kinds: list[str], seeds: list[int], contexts: list[str] | None, cells: int, genes: int,
                 sandbox: str, work: Path, compete_only: bool = False, max_nodes: int | None = None,
                 cell_types: int | None = None) -> list[dict]:
    rows = []
    for kind in kinds:
        for seed in seeds:
            data = work / f"{kind}_{seed}.h5ad"
            adata = simulate(kind, seed, n_cells=cells, n_genes=genes, n_perturbations=PERTURBATIONS.get(kind),
                             n_cell_types=cell_types)
            adata.write_h5ad(data)
            rows += [compete(kind, seed, data, work, context) if compete_only
                     else design(kind, seed, data, TASKS[kind], work, sandbox, context, max_nodes)
                     for context in held_out(kind, adata, contexts)]
    return rows


def held_out(kind: str, adata, contexts: list[str] | None) -> list[str | None]:
    """The test contexts of one dataset: each cell type in turn for an unseen-cell-type task (one held-out
    type decides nothing), else the split's own choice."""
    if SCHEMES[kind] != "unseen-context":
        return [None]
    return [c for c in adata.uns["simulation"]["cell_types"] if contexts is None or c in contexts]


def demo_run(sandbox: str, work: Path) -> dict:
    data = work / "demo_knockout.h5ad"
    simulate("knockout", DEMO_SEED, n_cells=DEMO_CELLS, n_genes=DEMO_GENES).write_h5ad(data)
    return design("demo", DEMO_SEED, data, DEMO_TASK, work, sandbox)


def counts(verdicts: list[str]) -> dict[str, int]:
    return {v: verdicts.count(v) for v in ("win", "tie", "loss")}


def _tally(rows: list[dict], metric: str, key: str = "verdict") -> dict:
    return counts([r[metric][key] for r in rows if r[metric][key] is not None])


def summarise(rows: list[dict]) -> dict:
    scored = [r for r in rows if PRIMARY in r]
    groups = {kind: [r for r in scored if r["kind"] == kind] for kind in dict.fromkeys(r["kind"] for r in scored)}
    out: dict = {}
    for kind, mine in [*groups.items(), *([("all", scored)] if scored else [])]:
        entry: dict = {"runs": len(mine), "failed": sum(r["kind"] == kind for r in rows if PRIMARY not in r)
                       if kind != "all" else len(rows) - len(scored)}
        for metric in METRICS:
            entry[metric] = {
                "delivered_mean": round(statistics.fmean(r[metric]["delivered"] for r in mine), 4),
                "best_baseline_mean": round(statistics.fmean(r[metric]["best"] for r in mine), 4),
                "ceiling_mean": round(statistics.fmean(r[metric]["ceiling"] for r in mine
                                                       if r[metric]["ceiling"] is not None), 4),
                "verdicts": _tally(mine, metric),
                "designed_model_verdicts": _tally(mine, metric, "designed_verdict"),
                "mean_relative_gain": round(statistics.fmean(r[metric]["gain"] for r in mine), 4),
                "best_baselines": sorted({r[metric]["best_baseline"] for r in mine}),
            }
            by_seed: dict[str, list[str]] = {}
            for r in mine:
                by_seed.setdefault(str(r["seed"]), []).append(r[metric]["verdict"])
            entry[metric]["wins_by_seed"] = {s: f"{v.count('win')}/{len(v)}" for s, v in by_seed.items()}
        entry["delivered"] = {d: sum(r["delivered"] == d for r in mine) for d in sorted({r["delivered"] for r in mine})}
        entry["design_seconds_max"] = max(r["seconds"] for r in mine)
        entry["design_seconds_mean"] = round(statistics.fmean(r["seconds"] for r in mine), 1)
        out[kind] = entry
    if scored:
        everything = out["all"]
        out["targets"] = {
            "never_below_best_baseline": all(everything[m]["verdicts"]["loss"] == 0 for m in METRICS),
            "primary_gain_at_least_10pct": everything[PRIMARY]["mean_relative_gain"] >= TARGET_GAIN,
            "design_within_15_min": everything["design_seconds_max"] <= TARGET_SECONDS,
        }
    return out


def scale_run(sandbox: str, work: Path) -> dict:
    data = work / "scale_knockout.h5ad"
    t0 = time.perf_counter()
    simulate("knockout", 0, n_cells=20000, n_genes=2000).write_h5ad(data)
    simulate_s = time.perf_counter() - t0
    phases: dict[str, float] = {}
    last: list = [time.perf_counter(), "start"]

    def on_progress(event) -> None:
        now = time.perf_counter()
        if event.phase != last[1]:
            phases[last[1]] = round(phases.get(last[1], 0.0) + now - last[0], 1)
            last[:] = [now, event.phase]

    started = time.perf_counter()
    result = run_design(DesignSettings(data=data, task=TASKS["knockout"], out=work / "run_scale", sandbox=sandbox,
                                       max_minutes=30), on_progress=on_progress)
    seconds = time.perf_counter() - started
    phases.pop("start", None)
    return {"cells": 20000, "genes": 2000, "status": result.status, "design_seconds": round(seconds, 1),
            "target_seconds": TARGET_SECONDS, "within_target": seconds <= TARGET_SECONDS,
            "simulate_seconds": round(simulate_s, 1), "seconds_by_phase": phases,
            "delivered_pearson_delta_pert": (result.metrics.get("delivered") or {}).get("test", {}).get(PRIMARY)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--contexts", nargs="+", default=None, help="stimulation: the cell types to hold out (all)")
    parser.add_argument("--cell-types", type=int, default=None,
                        help="cell types simulated (default: the simulator's, 8 for stimulation, else 3)")
    parser.add_argument("--cells", type=int, default=12000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--sandbox", default="docker", choices=["docker", "local"])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--compete-only", action="store_true",
                        help="no design: baselines and their validation stack compete on the same splits")
    parser.add_argument("--max-nodes", type=int, default=None,
                        help="improve steps after the draft (default: the design's own; 0: the draft alone)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="cellforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = [] if args.skip_quality else quality_runs(args.kinds, args.seeds, args.contexts, args.cells,
                                                         args.genes, args.sandbox, work, args.compete_only,
                                                         args.max_nodes, args.cell_types)
        if not (args.skip_demo or args.compete_only):
            rows.append(demo_run(args.sandbox, work))
        report = {"benchmark": "design", "cells": args.cells, "cell_types": args.cell_types, "genes": args.genes,
                  "sandbox": args.sandbox, "seeds": args.seeds, "max_nodes": args.max_nodes,
                  "summary": summarise(rows), "runs": rows}
        if not args.skip_scale:
            report["scale"] = scale_run(args.sandbox, work)
        print(json.dumps(report, indent=1))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
