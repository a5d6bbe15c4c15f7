"""Data phases of a design, one at a time (issue 17): where the time and memory of simulate + design go,
without Docker or an LLM. Each phase runs in its own process (so its peak RSS is its own) on the files the
previous phases wrote:

    .venv/bin/python benchmarks/data_phases_bench.py --cells 100000 [--genes 2000] [--seed 0] [--profile DIR]

simulate (`simulate_to_file`), profile (`profile_dataset`), split (`make_split`), selection
(`prepare_selection`: the sandbox's /data, the val evaluator and the val baselines), test (`run_baselines` on
test and the test evaluator's scores), celleval (cell-eval on one baseline's predictions) and report (the
report's Δ plots from the test truth and inputs). Prints one JSON object: per phase wall seconds, peak RSS
(MB) and, inside a phase, the seconds of its steps. `--profile DIR` writes a cProfile of each phase there
(`DIR/<phase>.prof`; read with `python -m pstats`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("simulate", "profile", "split", "selection", "test", "celleval", "report")


def _phase(name: str, work: Path, cells: int, genes: int, seed: int) -> dict[str, float]:
    """Run one phase in this process; the seconds of its steps."""
    from service.pipeline.rundir import RunDir

    data, rd = work / "data.h5ad", RunDir(work / "run").create()
    steps: dict[str, float] = {}
    t = time.perf_counter()

    def step(label: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[label] = round(now - t, 2)
        t = now

    if name == "simulate":
        from service.data import simulate_to_file

        simulate_to_file(data, "knockout", seed, n_cells=cells, n_genes=genes)
    elif name == "profile":
        from service.data import profile_dataset

        profile_dataset(data)
    elif name == "split":
        from service.data import make_split

        make_split(data, "unseen-perturbation", seed, rd.split)
    elif name == "selection":
        from service.pipeline.selection import prepare_selection

        selection = prepare_selection(rd)
        step("prepare")
        for baseline in selection.baselines:
            selection.baseline_score(baseline)
        step("val scores")
    elif name in ("test", "celleval"):
        from service.data.baselines import run_baselines
        from service.data.evaluate import Evaluator

        evaluator = Evaluator(rd.split, "test")
        predictions = run_baselines(evaluator.task, "test")  # as the design does: the evaluator's task
        step("baselines")
        if name == "test":
            for pred in predictions.values():
                evaluator.score(pred)
            step("scores")
            predictions["mean_delta"].write_h5ad(rd.predictions)
        else:
            evaluator.cell_eval(predictions["mean_delta"])
            step("cell-eval")
    elif name == "report":
        from service.pipeline.report import _delta_plots

        metrics = json.loads((work / "rows.json").read_text())
        _delta_plots(rd, metrics, "pearson_delta")
    return steps


def _rows_for_report(work: Path) -> None:
    """Per-condition rows the report picks its plotted conditions from (the test baseline's, scored here)."""
    from service.data.evaluate import Evaluator

    rows = Evaluator(work / "run" / "split", "test").score(work / "run" / "predictions.h5ad").per_condition
    (work / "rows.json").write_text(json.dumps(rows, default=float))


def run_phase(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", name, "--work", str(work), "--cells", str(args.cells),
           "--genes", str(args.genes), "--seed", str(args.seed)]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"phase": name, "rc": proc.returncode, "stderr_tail": err[-1500:]}
    result = json.loads(out.strip().splitlines()[-1])
    return {"phase": name, "wall_s": round(wall, 1), **result}


def child(args: argparse.Namespace) -> None:
    import resource

    work = Path(args.work)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    if args.phase == "report" and not (work / "rows.json").exists():
        _rows_for_report(work)
    steps = _phase(args.phase, work, args.cells, args.genes, args.seed)
    if profiler is not None:
        profiler.disable()
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(Path(args.profile) / f"{args.phase}.prof")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds beside wall: on a shared machine wall time is inflated by the load, CPU time much less so.
    print(json.dumps({"peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "steps": steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--profile", type=Path, default=None, help="write DIR/<phase>.prof (cProfile)")
    parser.add_argument("--work", type=Path, default=None, help="keep data and run here (default: a temp dir)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase
    args = parser.parse_args()
    if args.phase:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="cellforge-phases-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.phases:
            rows.append(run_phase(name, work, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if "rc" in rows[-1]:
                break
        size = (work / "data.h5ad").stat().st_size if (work / "data.h5ad").exists() else 0
    print(json.dumps({"benchmark": "data_phases", "cells": args.cells, "genes": args.genes, "seed": args.seed,
                      "file_mb": round(size / 2**20, 1), "load": os.getloadavg()[0], "phases": rows}))


if __name__ == "__main__":
    main()
