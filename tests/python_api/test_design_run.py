"""`cellforge.design` end to end on an in-memory AnnData named as a lab names it, in real Docker sandboxes;
then `cellforge replay --json` of that run as a script runs it (a subprocess, stdout a pipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import cellforge
from service.data import simulate

TASK = "Predict expression after CRISPR knockout of unseen genes"
CLI = [str(Path(sys.executable).with_name("cellforge"))]

pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.fixture(scope="module")
def run(docker_image, tmp_path_factory) -> cellforge.DesignRun:
    adata = simulate("knockout", 0, n_cells=6000, n_genes=300, n_perturbations=40)
    adata.obs = adata.obs.rename(columns={"perturbation": "sgRNA_target", "cell_type": "cell_line_fine"})
    adata.obs["cell_line_fine"] = adata.obs["cell_line_fine"].astype("category")
    events: list = []
    result = cellforge.design(adata, TASK, out=tmp_path_factory.mktemp("runs") / "api", on_progress=events.append,
                              perturbation_key="sgRNA_target", context_key="cell_line_fine", image=docker_image,
                              memory="2g", cpus=1, max_minutes=15, max_attempts=3, max_nodes=0, val_fraction=0.25)
    result.events = events  # type: ignore[attr-defined]
    return result


def test_design_on_an_anndata_returns_a_run_in_the_users_terms(run):
    assert run.status == "validated", run.verdict
    assert (run.run_dir / "input.h5ad").is_file() and Path(run.report).is_file()
    assert any(e.epoch is not None for e in run.events)
    pred = run.predictions
    assert list(pred.obs.columns) == ["sgRNA_target", "cell_line_fine", "cellforge_condition"]
    assert pred.n_obs == run.record["n_test_conditions"]
    provenance = pred.uns[cellforge.PROVENANCE_KEY]
    assert provenance["split"]["context_key"] == "cell_line_fine" and provenance["task"] == TASK
    assert provenance["verdict"]["delivered"] == run.record["delivered"]["key"]
    assert isinstance(run.metrics, pd.DataFrame) and "designed model" in run.metrics.index
    assert run.metrics.loc["designed model", "pearson_delta_pert"] == pytest.approx(
        run.record["model"]["pearson_delta_pert"])
    settings = json.loads((run.run_dir / "run.json").read_text())["settings"]
    assert (settings["memory"], settings["cpus"], settings["context_key"]) == ("2g", 1.0, "cell_line_fine")


def test_replay_json_is_one_document_and_logs_every_epoch(run, tmp_path):
    out = tmp_path / "replay"
    proc = subprocess.run([*CLI, "replay", str(run.run_dir), "--out", str(out), "--json"], capture_output=True,
                          text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["run_dir"] == str(out) and doc["status"] == run.status
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("train [node") and " epoch " in line]
    assert epochs and all("train loss" in line and "stopping loss" in line for line in epochs)
    assert "test split: model vs baselines" in proc.stderr  # the table, on stderr
