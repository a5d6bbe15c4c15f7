"""Benchmark of the offline design pipeline; prints one JSON object.

1. Quality: on simulated knockout (unseen perturbations), drug (unseen drugs) and cytokine (unseen cell
   type) data over several seeds, the offline-designed model vs the mean-Δ and linear-ridge baselines
   (linear_pca_ridge; drug_target_ridge for annotated drugs; linear_context_ridge for an unseen context)
   and every other baseline on `pearson_delta_pert` and `mse_top20_de`, the data ceiling beside.
2. Scale: the wall time of one offline design run on 20,000 cells × 2,000 genes (target ≤ 15 min).

    .venv/bin/python benchmarks/design_bench.py [--seeds 0 1 2] [--kinds knockout drug cytokine]
        [--cells 12000] [--genes 500] [--sandbox docker|local] [--skip-scale] [--skip-quality] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from service.data import simulate
from service.pipeline import DesignSettings, run_design

TASKS = {
    "knockout": "Predict expression after CRISPR knockout of unseen genes",
    "drug": "Predict responses of cell lines to unseen drugs at several doses",
    "cytokine": "Predict cytokine stimulation responses in an unseen cell type",
}
METRICS = {"pearson_delta_pert": "higher", "mse_top20_de": "lower"}
REFERENCES = ("mean_delta", "linear_pca_ridge", "drug_target_ridge", "linear_context_ridge")


def _beats(metric: str, model: float, other: float | None) -> bool | None:
    if other is None:
        return None
    # A model that fell back to the baseline matches it up to float noise: that is a tie, not a win.
    margin = 1e-3 * max(1.0, abs(other))
    return model > other + margin if METRICS[metric] == "higher" else model < other - margin


def one_run(kind: str, seed: int, cells: int, genes: int, sandbox: str, work: Path) -> dict:
    data = work / f"{kind}_{seed}.h5ad"
    simulate(kind, seed, n_cells=cells, n_genes=genes).write_h5ad(data)
    started = time.perf_counter()
    result = run_design(DesignSettings(data=data, task=TASKS[kind], out=work / f"run_{kind}_{seed}", seed=seed,
                                       sandbox=sandbox, max_minutes=20))
    seconds = time.perf_counter() - started
    m = result.metrics
    row: dict = {"kind": kind, "seed": seed, "status": result.status, "seconds": round(seconds, 1),
                 "attempts": m.get("attempts"), "n_test_conditions": m.get("n_test_conditions")}
    if "model" not in m:
        return row
    for metric in METRICS:
        row[metric] = {"model": m["model"].get(metric), "ceiling": m["ceiling"].get(metric),
                       **{name: scores.get(metric) for name, scores in m["baselines"].items()}}
        row[f"beats_{metric}"] = {ref: _beats(metric, m["model"][metric], m["baselines"].get(ref, {}).get(metric))
                                  for ref in REFERENCES}
    return row


def summarise(rows: list[dict]) -> dict:
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind and "pearson_delta_pert" in r]
        entry = {"runs": len(mine)}
        for metric in METRICS:
            for name in ("model", *REFERENCES, "ceiling"):
                values = [r[metric][name] for r in mine if r[metric].get(name) is not None]
                if values:
                    entry[f"{metric}.{name}.mean"] = round(statistics.fmean(values), 4)
            for ref in REFERENCES:
                wins = [r[f"beats_{metric}"][ref] for r in mine if r[f"beats_{metric}"][ref] is not None]
                if wins:
                    entry[f"{metric}.wins_vs_{ref}"] = f"{sum(wins)}/{len(wins)}"
        out[kind] = entry
    return out


def scale_run(sandbox: str, work: Path) -> dict:
    data = work / "scale_knockout.h5ad"
    t0 = time.perf_counter()
    simulate("knockout", 0, n_cells=20000, n_genes=2000).write_h5ad(data)
    simulate_s = time.perf_counter() - t0
    phases: dict[str, float] = {}
    last = [time.perf_counter(), "start"]

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
            "target_seconds": 900, "within_target": seconds <= 900, "simulate_seconds": round(simulate_s, 1),
            "seconds_by_phase": phases, "model_pearson_delta_pert": result.metrics.get("model", {}).get(
                "pearson_delta_pert")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--cells", type=int, default=12000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--sandbox", default="docker", choices=["docker", "local"])
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="cellforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for kind in [] if args.skip_quality else args.kinds:
            for seed in args.seeds:
                rows.append(one_run(kind, seed, args.cells, args.genes, args.sandbox, work))
                print(f"{kind} seed {seed}: {rows[-1]['status']} in {rows[-1]['seconds']}s", file=sys.stderr)
        report = {"benchmark": "design", "cells": args.cells, "genes": args.genes, "sandbox": args.sandbox,
                  "summary": summarise(rows), "runs": rows}
        if not args.skip_scale:
            report["scale"] = scale_run(args.sandbox, work)
        print(json.dumps(report, indent=1))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
