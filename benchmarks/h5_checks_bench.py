"""What the checks on untrusted `.h5ad` cost on a normal file: the HDF5 walk alone, a checked read
against a plain `anndata.read_h5ad`, and an upload's check (backed load and validation) in this process
against the same in a child process (the first one starts the forkserver).

    .venv/bin/python benchmarks/h5_checks_bench.py [--cells 20000] [--genes 2000] [--repeats 5]

Prints one JSON object (seconds: the minimum over the repeats).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad

from service.data import H5Limits, check_isolated, load_dataset, read_h5ad, simulate
from service.data.h5safety import open_checked


def best(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return round(min(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    limits = H5Limits()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "screen.h5ad"
        simulate("knockout", 0, n_cells=args.cells, n_genes=args.genes).write_h5ad(path, compression="gzip")

        def walk() -> None:
            f, _ = open_checked(path, limits)
            f.close()

        def isolated() -> None:
            assert check_isolated(path, limits=limits, timeout_s=600, memory_bytes=8 << 30).outcome == "ok"

        started = time.perf_counter()
        isolated()
        first_check = time.perf_counter() - started
        print(json.dumps({
            "cells": args.cells, "genes": args.genes, "file_mib": round(path.stat().st_size / 2**20, 1),
            "walk_s": best(walk, args.repeats),
            "anndata_read_s": best(lambda: ad.read_h5ad(path), args.repeats),
            "checked_read_s": best(lambda: read_h5ad(path, backed=False), args.repeats),
            "in_process_check_s": best(lambda: load_dataset(path, backed=True, limits=limits), args.repeats),
            "isolated_check_first_s": round(first_check, 3),
            "isolated_check_s": best(isolated, args.repeats),
        }))


if __name__ == "__main__":
    main()
