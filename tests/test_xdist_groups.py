"""Under `pytest -n N` a test file runs whole on one worker, and the Ray files together on one
(tests/conftest.py): otherwise each worker builds a file's module-scoped servers, design runs and clusters
again, and the suite takes far longer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest

ROOT = Path(__file__).resolve().parent.parent


def test_the_ray_files_are_one_unit_and_every_other_file_its_own():
    config = SimpleNamespace(getvalue=lambda name: "loadfile")
    scheduler = conftest.pytest_xdist_make_scheduler(config, None)
    ray_files = [path for paths in conftest._GROUPS.values() for path in paths]
    assert {scheduler._split_scope(f"{path}::test_x[1]") for path in ray_files} == {"ray"}
    assert scheduler._split_scope("tests/data/test_metrics.py::test_x") == "tests/data/test_metrics.py"
    # Another --dist mode is xdist's own.
    assert conftest.pytest_xdist_make_scheduler(SimpleNamespace(getvalue=lambda name: "load"), None) is None


@pytest.mark.slow  # a pytest run of its own, with two workers (about 20 s)
def test_each_file_runs_whole_on_one_worker():
    files = ["tests/data/test_metrics.py", "tests/pipeline/test_bases.py", "tests/data/test_splits.py"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CI"))}
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    workers = defaultdict(set)
    for worker, path in re.findall(r"^\[(gw\d+)\].* PASSED (tests/[^:]+)::", run.stdout, re.M):
        workers[path].add(worker)
    assert set(workers) == set(files), run.stdout[-3000:]
    assert all(len(w) == 1 for w in workers.values()), dict(workers)
