"""A design job end to end through the API (offline agents, Docker sandbox), then the regression runs
built on it: re-score its stored predictions, replay it with its recorded LLM calls, run its test suite."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.data import simulate
from service.client.remote import run_design
from service.jobs import compare_metrics

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TASK = "Predict expression after CRISPR knockout of unseen genes"


@pytest.fixture(scope="module")
def design_job(server, alice, tmp_path_factory):
    """One design run the way `cellforge design --server` does it (upload, submit, follow, download)."""
    folder = tmp_path_factory.mktemp("design")
    simulate("knockout", 0, n_cells=3000, n_genes=100).write_h5ad(folder / "knockout.h5ad")
    events = []
    job = run_design(server.grpc_target, alice.key, folder / "knockout.h5ad", TASK, transport="grpc",
                     on_event=events.append, download_to=folder / "outputs", max_attempts=2, max_minutes=8,
                     max_nodes=0)
    return job, events, folder / "outputs"


def test_design_job_streams_its_progress_and_succeeds(design_job):
    job, events, outputs = design_job
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["status"] in ("validated", "below_baseline")
    assert "pearson_delta" in job["result"]["metrics"]["model"]
    phases = [e["data"]["phase"] for e in events if e["kind"] == "progress"]
    for phase in ("profile", "analysis", "discussion", "split", "codegen", "sandbox", "train", "evaluate", "done"):
        assert phase in phases
    assert any(e["data"].get("round") for e in events if e["kind"] == "progress")
    epochs = [e["data"] for e in events if e["kind"] == "progress" and "epoch" in e["data"]]
    assert epochs and all("train_loss" in e and "val_loss" in e for e in epochs)
    # No server path reaches the tenant.
    assert "/jobs/" not in json.dumps(events)
    assert sorted(p.name for p in outputs.iterdir()) == sorted(job["artifacts"])


def test_design_job_events_and_result_carry_no_server_paths_or_tenant_ids(server, design_job):
    job, events, _ = design_job
    shown = json.dumps([events, job])
    assert events and str(server.data_dir) not in shown
    assert not re.search(r"\btn_[0-9a-f]{12}\b", shown)


def test_design_artifacts_download(server, alice, design_job, transport):
    job, _, _ = design_job
    assert {"code.zip", "model.pt", "predictions.h5ad", "report.html", "metrics.json"} <= set(job["artifacts"])
    with server.client(alice, transport) as c:
        bundle = zipfile.ZipFile(io.BytesIO(c.get_artifact(job["id"], "code.zip")))
        metrics = json.loads(c.get_artifact(job["id"], "metrics.json"))
    assert {"model.py", "train.py", "test_model.py", "config.json"} <= set(bundle.namelist())
    assert metrics["model"] == job["result"]["metrics"]["model"]


def test_rescore_replay_and_pytest_regressions_pass_on_the_stored_run(server, alice, design_job):
    job, _, _ = design_job
    with server.client(alice) as c:
        runs = {kind: c.submit_regression(kind=kind, job_id=job["id"]) for kind in ("rescore", "replay", "pytest")}
        done = {kind: c.wait(run["id"], timeout=300) for kind, run in runs.items()}
    for kind, run in done.items():
        assert run["status"] == "succeeded", (kind, run["error"])
        assert run["result"]["passed"] is True, (kind, run["result"])
    # predictions.h5ad is the delivered predictor's (designed model, baseline or stack): every metric recorded
    # for it is compared (the control baseline, for one, has no pearson_delta).
    compared = {d["metric"] for d in done["rescore"]["result"]["differences"]}
    assert "mse" in compared and compared == set(job["result"]["metrics"]["delivered"]["test"])
    assert all(d["difference"] == 0 for d in done["rescore"]["result"]["differences"] if d["difference"] is not None)
    assert done["replay"]["result"]["failed_metrics"] == []
    assert done["pytest"]["result"]["summary"]["failed"] == 0 and done["pytest"]["result"]["summary"]["total"] > 0


def test_metric_comparison_reports_each_difference_under_its_tolerance():
    recorded = {"mse": 0.20, "pearson_delta": 0.50, "de_overlap": float("nan")}
    now = {"mse": 0.2004, "pearson_delta": 0.40, "de_overlap": float("nan")}
    verdict = compare_metrics(recorded, now, {"mse": 1e-3}, default=1e-6)
    assert verdict["passed"] is False
    assert verdict["failed_metrics"] == ["pearson_delta"]
    rows = {d["metric"]: d for d in verdict["differences"]}
    assert rows["mse"]["ok"] and rows["mse"]["tolerance"] == 1e-3
    assert rows["pearson_delta"]["difference"] == pytest.approx(0.10)
    assert rows["de_overlap"]["ok"]  # absent on both sides is no regression
    assert compare_metrics({"mse": 0.2}, {}, {}, 1e-6)["failed_metrics"] == ["mse"]


def test_cli_design_targets_a_remote_server(server, alice, tmp_path):
    data = tmp_path / "small.h5ad"
    simulate("knockout", 1, n_cells=2000, n_genes=80).write_h5ad(data)
    cellforge = str(Path(sys.executable).parent / "cellforge")
    done = subprocess.run([cellforge, "design", "--data", str(data), "--task", TASK, "--out", str(tmp_path / "run"),
                           "--server", server.url, "--max-attempts", "2", "--max-nodes", "0", "--json"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CELLFORGE_API_KEY": alice.key})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and "pearson_delta" in summary["model"]
    assert {"predictions.h5ad", "metrics.json", "report.html"} <= {p.name for p in (tmp_path / "run").iterdir()}
