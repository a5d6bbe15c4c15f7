"""Data-layer benchmark (issue 3): simulate a knockout screen, then time the service's own work on it.

    .venv/bin/python benchmarks/data_bench.py [--cells 50000] [--genes 5000] [--seed 0]

For each `--cell-types` value (default: a single-cell-line screen, then three cell types) simulates
`--cells` × `--genes` knockout data and writes it to a scratch .h5ad. A fresh child process (so its
peak RSS is the pipeline's own) then profiles the file, cuts the unseen-perturbation split, runs
every applicable baseline and scores each with the evaluator, sampling its RSS as it goes.
Prints one JSON object: per case, timings, peak RSS against the dataset's in-memory size (CSR
data + indices + indptr), every baseline's Pearson Δ, and whether the linear PCA-ridge baseline
beats the mean-Δ baseline. Targets: pipeline within 5 minutes, peak RSS at most 3× the dataset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

TARGET_SECONDS = 300.0
TARGET_MEMORY_RATIO = 3.0


class PeakRss:
    """Samples this process's resident memory in a thread; `peak` is the largest value seen (bytes)."""

    def __init__(self, interval: float = 0.05) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def pipeline(path: str, split_dir: str, seed: int, result: mp.Queue) -> None:
    """Profile + split + baselines + scoring of one file, in a fresh process."""
    from service.data import Evaluator, make_split, profile_dataset, run_baselines

    times: dict[str, float] = {}
    peaks: dict[str, int] = {}
    start_rss = psutil.Process().memory_info().rss

    def phase(name: str, work: Callable[[], Any]) -> Any:
        with PeakRss() as rss:
            t = time.perf_counter()
            value = work()
            times[f"{name}_s"] = time.perf_counter() - t
        peaks[name] = rss.peak
        return value

    profile = phase("profile", lambda: profile_dataset(path))
    info = phase("split", lambda: make_split(path, "unseen-perturbation", seed, split_dir))
    predictions = phase("baselines", lambda: run_baselines(split_dir, "test"))

    def score() -> dict:
        evaluator = Evaluator(split_dir, "test")
        return {name: evaluator.score(pred) for name, pred in predictions.items()}

    reports = phase("scoring", score)
    result.put(
        {
            "times": times,
            "peak_rss": max(peaks.values()),
            "phase_peak_rss": peaks,
            "start_rss": start_rss,
            "kind": profile.perturbation_kind,
            "conditions": {k: len(v) for k, v in info.conditions.items()},
            "pearson_delta": {n: r.summary.get("pearson_delta") for n, r in reports.items()},
            "ceiling_pearson_delta": next(iter(reports.values())).ceiling.get("pearson_delta"),
        }
    )


def run_case(cells: int, genes: int, seed: int, cell_types: int) -> dict:
    """Simulate one knockout dataset and measure the pipeline on it (in a fresh child process)."""
    from service.data import simulate

    with tempfile.TemporaryDirectory(prefix="cellforge-data-bench-") as tmp:
        path = os.path.join(tmp, "knockout.h5ad")
        with PeakRss() as sim_rss:
            t = time.perf_counter()
            adata = simulate("knockout", seed, n_cells=cells, n_genes=genes, n_cell_types=cell_types)
            simulate_s = time.perf_counter() - t
        x = adata.X
        dataset_bytes = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
        adata.write_h5ad(path)
        del adata, x

        ctx = mp.get_context("spawn")
        queue: mp.Queue = ctx.Queue()
        child = ctx.Process(target=pipeline, args=(path, str(Path(tmp) / "split"), seed, queue))
        t = time.perf_counter()
        child.start()
        out = queue.get()
        child.join()
        pipeline_s = time.perf_counter() - t

    scores = out["pearson_delta"]
    ridge, mean = scores.get("linear_pca_ridge"), scores.get("mean_delta")
    return {
        "cell_types": cell_types,
        "simulate_s": round(simulate_s, 2),
        "simulate_peak_rss_mb": round(sim_rss.peak / 2**20, 1),
        "dataset_mb": round(dataset_bytes / 2**20, 1),
        "detected_kind": out["kind"],
        "conditions": out["conditions"],
        "pipeline_s": round(pipeline_s, 2),
        **{k: round(v, 2) for k, v in out["times"].items()},
        "pipeline_peak_rss_mb": round(out["peak_rss"] / 2**20, 1),
        "phase_peak_rss_mb": {k: round(v / 2**20, 1) for k, v in out["phase_peak_rss"].items()},
        "pipeline_start_rss_mb": round(out["start_rss"] / 2**20, 1),
        "peak_over_dataset": round(out["peak_rss"] / dataset_bytes, 2),
        "peak_above_start_over_dataset": round((out["peak_rss"] - out["start_rss"]) / dataset_bytes, 2),
        "pearson_delta": {k: (round(v, 4) if v is not None else None) for k, v in scores.items()},
        "ceiling_pearson_delta": round(out["ceiling_pearson_delta"], 4),
        "ridge_beats_mean": bool(ridge is not None and mean is not None and ridge > mean),
        "within_time_target": pipeline_s <= TARGET_SECONDS,
        "within_memory_target": out["peak_rss"] <= TARGET_MEMORY_RATIO * dataset_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell-types", type=int, nargs="+", default=[1, 3],
                        help="one case per value: a single-line screen and a multi-context one")
    args = parser.parse_args()

    cases = [run_case(args.cells, args.genes, args.seed, n) for n in args.cell_types]
    print(
        json.dumps(
            {
                "benchmark": "data",
                "cells": args.cells,
                "genes": args.genes,
                "seed": args.seed,
                "cases": cases,
                "within_time_target": all(c["within_time_target"] for c in cases),
                "within_memory_target": all(c["within_memory_target"] for c in cases),
                "ridge_beats_mean": {str(c["cell_types"]): c["ridge_beats_mean"] for c in cases},
            }
        )
    )


if __name__ == "__main__":
    main()
