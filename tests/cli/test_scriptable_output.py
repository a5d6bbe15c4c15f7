"""The command line as a script runs it: a subprocess whose stdout is a pipe. With --json stdout is exactly
one JSON document (tables and progress on stderr); without, tables keep their full width; a bad option or
a missing Docker engine fails fast in one clean line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.data import simulate

# Each test runs the CLI in fresh processes (a split, baselines, a design): end to end, so the full suite's.
pytestmark = pytest.mark.slow

CLI = [str(Path(sys.executable).with_name("cellforge"))]
REPO = Path(__file__).resolve().parents[2]
TASK = "Predict expression after knockout of unseen genes"


def cellforge(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def document(proc: subprocess.CompletedProcess[str]) -> dict:
    """stdout parsed as one JSON document: anything else on stdout makes this fail."""
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "screen.h5ad"
    simulate("knockout", 0, n_cells=1500, n_genes=100, n_perturbations=10).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def split(screen, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split") / "split"
    proc = cellforge("data", "split", str(screen), "--out", str(out), "--scheme", "unseen-perturbation", "--json")
    assert proc.returncode == 0, proc.stderr
    assert document(proc)["scheme"] == "unseen-perturbation"
    return out


def test_baselines_json_is_one_document_and_the_table_goes_to_stderr(split):
    proc = cellforge("baselines", "--split", str(split), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = document(proc)
    assert doc["ok"] and "mean_delta" in doc["baselines"] and "pearson_delta" in doc["ceiling"]
    assert "pearson_delta_top20_de" in proc.stderr and "…" not in proc.stderr


def test_tables_off_a_terminal_keep_their_full_width(split):
    proc = cellforge("baselines", "--split", str(split))
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if "baseline" in line and "pearson" in line)
    assert all(m in header for m in ("pearson_delta_pert", "pearson_delta_top20_de", "discrimination_l1"))
    assert len(header) > 80


def test_score_json_is_one_document(split, tmp_path):
    from service.data.baselines import run_baselines

    run_baselines(split)["mean_delta"].write_h5ad(tmp_path / "pred.h5ad")
    proc = cellforge("score", "--split", str(split), "--predictions", str(tmp_path / "pred.h5ad"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = document(proc)
    assert doc["ok"] and doc["which"] == "test" and "verdict" in doc and "mean_delta" in doc["baselines"]
    assert "verdict" in proc.stderr


def test_design_without_docker_fails_fast_with_the_local_hint(screen, tmp_path):
    out = tmp_path / "run"
    proc = cellforge("design", "--data", str(screen), "--task", TASK, "--out", str(out), "--json",
                     env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert proc.returncode == 1
    doc = document(proc)
    assert not doc["ok"] and "Docker engine is not reachable" in doc["message"] and "--sandbox local" in doc["message"]
    assert not out.exists()  # checked before any work


@pytest.mark.parametrize("args, problem", [
    (["--scheme", "unseen-gene"], "Invalid value for '--scheme'"),
    (["--sandbox", "dockr"], "Invalid value for '--sandbox'"),
])
def test_choice_options_refuse_a_typo_cleanly(screen, args, problem):
    proc = cellforge("design", "--data", str(screen), "--task", TASK, *args)
    assert proc.returncode == 2 and problem in proc.stderr and "pydantic.dev" not in proc.stderr


def test_a_bad_value_is_one_line_and_one_document(screen, tmp_path):
    proc = cellforge("design", "--data", str(screen), "--task", TASK, "--out", str(tmp_path / "run"), "--memory",
                     "lots", "--sandbox", "local", "--json")
    assert proc.returncode == 1
    doc = document(proc)
    assert doc["message"] == "memory: expected a size like '512m' or '2g', got 'lots'"
    assert "pydantic.dev" not in proc.stderr
