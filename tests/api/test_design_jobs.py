"""A design job end to end through the API (offline agents, Docker sandbox), then the regression runs
built on it: re-score its stored predictions, replay it with its recorded LLM calls, run its test suite."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import docker
import httpx
import pytest

from service.client import InvalidRequestError, NotFoundError
from service.client.remote import run_design
from service.data import simulate
from service.jobs import compare_metrics

from .conftest import Tenant, tenant_id

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TASK = "Predict expression after CRISPR knockout of unseen genes"


class ContainerWatch:
    """The design sandboxes of one tenant seen while a job runs (they live seconds): labels and runtime."""

    def __init__(self, tenant: str) -> None:
        self.filters = {"label": ["cellforge.role=design", f"cellforge.tenant={tenant}"]}
        self.seen: dict[str, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        engine = docker.from_env()
        while not self.stop.wait(0.2):
            for c in engine.containers.list(all=True, filters=self.filters, ignore_removed=True):
                self.seen.setdefault(c.id, {"labels": c.labels, "runtime": c.attrs["HostConfig"].get("Runtime")})

    def __enter__(self) -> ContainerWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture(scope="module")
def design_job(server, alice, tmp_path_factory):
    """One design run the way `cellforge design --server` does it (upload, submit, follow, download)."""
    folder = tmp_path_factory.mktemp("design")
    simulate("knockout", 0, n_cells=3000, n_genes=100).write_h5ad(folder / "knockout.h5ad")
    events = []
    with ContainerWatch(tenant_id(server, "alice")) as watch:
        job = run_design(server.grpc_target, alice.key, folder / "knockout.h5ad", TASK, transport="grpc",
                         on_event=events.append, download_to=folder / "outputs", max_attempts=2, max_minutes=8,
                         max_nodes=0)
    return job, events, folder / "outputs", watch.seen


def test_design_job_streams_its_progress_and_succeeds(design_job):
    job, events, outputs, _ = design_job
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
    job, events, _, _ = design_job
    shown = json.dumps([events, job])
    assert events and str(server.data_dir) not in shown
    assert not re.search(r"\btn_[0-9a-f]{12}\b", shown)


def test_design_sandboxes_carry_the_tenant_label(design_job):
    """The pipeline's containers are labelled with the job's tenant (and run under its default runtime)."""
    _, _, _, seen = design_job
    assert seen, "no design sandbox labelled with the tenant was seen while the job ran"
    assert all(c["runtime"] == "runc" for c in seen.values())


def test_a_tenant_runtime_reaches_its_design_sandboxes(server, tmp_path):
    """A tenant whose sandboxes run under gVisor gets design jobs (no refusal): the runtime is in the job's
    parameters, cannot be weakened by an option, and the job's first sandbox runs under it."""
    out = json.loads(server.cli("tenants", "create", "strict-design", "--runtime", "runsc", "--json")
                     .stdout.splitlines()[-1])
    strict = Tenant("strict-design", out["api_key"])
    data = tmp_path / "small.h5ad"
    simulate("knockout", 2, n_cells=1500, n_genes=60).write_h5ad(data)
    with server.client(strict) as c, ContainerWatch(out["id"]) as watch:
        dataset = c.upload_dataset(data)
        with pytest.raises(InvalidRequestError, match="weaker"):
            c.submit_job(dataset.id, TASK, runtime="runc")
        job = c.submit_job(dataset.id, TASK, max_attempts=1, max_nodes=0)
        assert job.params["runtime"] == "runsc" and "runtime" not in job.params["options"]
        deadline = time.monotonic() + 180
        while not watch.seen and time.monotonic() < deadline and not c.get_job(job.id).final:
            time.sleep(0.5)
        c.cancel_job(job.id)
        c.wait(job.id, timeout=120)
    assert watch.seen, c.get_job(job.id)
    assert all(s["runtime"] == "runsc" and s["labels"]["cellforge.tenant"] == out["id"] for s in watch.seen.values())


def test_job_params_reach_the_design_sandbox_spec(tmp_path):
    """What the server decided (runtime) and whose job it is (tenant) reach every sandbox of the run; a
    tenant's options cannot set either."""
    from service.jobs import design_settings

    params = {"dataset_path": str(tmp_path / "d.h5ad"), "task": TASK, "runtime": "runsc",
              "options": {"seed": 3, "runtime": "runc", "tenant": "tn_other", "sandbox": "local"}}
    settings = design_settings(params, tmp_path / "run", "tn_0123456789ab")
    assert (settings.seed, settings.runtime, settings.tenant, settings.sandbox) == (3, "runsc", "tn_0123456789ab",
                                                                                   "docker")
    spec = settings.sandbox_settings().spec(tmp_path, timeout=60)
    assert spec.runtime == "runsc" and spec.tenant == "tn_0123456789ab" and spec.labels["role"] == "design"
    assert design_settings({**params, "runtime": None}, tmp_path / "run").sandbox_settings().spec(
        tmp_path, timeout=60).labels == {"role": "design"}


def test_design_artifacts_download(server, alice, design_job, transport):
    job, _, _, _ = design_job
    assert {"code.zip", "model.pt", "predictions.h5ad", "report.html", "metrics.json"} <= set(job["artifacts"])
    with server.client(alice, transport) as c:
        bundle = zipfile.ZipFile(io.BytesIO(c.get_artifact(job["id"], "code.zip")))
        metrics = json.loads(c.get_artifact(job["id"], "metrics.json"))
    assert {"model.py", "train.py", "test_model.py", "config.json"} <= set(bundle.namelist())
    assert metrics["model"] == job["result"]["metrics"]["model"]


def test_the_report_opens_in_a_browser_and_other_files_download(server, alice, design_job):
    job, _, _, _ = design_job
    headers = {"Authorization": f"Bearer {alice.key}"}
    report = httpx.get(f"{server.url}/v1/jobs/{job['id']}/artifacts/report.html", headers=headers)
    assert report.headers["content-type"] == "text/html; charset=utf-8" and "<html" in report.text.lower()
    assert report.headers["content-disposition"].startswith("inline")
    policy = report.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "sandbox" in policy and "script-src" not in policy
    assert report.headers["x-content-type-options"] == "nosniff"
    kinds = {name: httpx.get(f"{server.url}/v1/jobs/{job['id']}/artifacts/{name}", headers=headers)
             for name in ("predictions.h5ad", "metrics.json", "code.zip", "model.pt")}
    assert {n: r.headers["content-type"] for n, r in kinds.items()} == {
        "predictions.h5ad": "application/x-hdf5", "metrics.json": "application/json", "code.zip": "application/zip",
        "model.pt": "application/octet-stream"}
    assert all(r.headers["content-disposition"].startswith("attachment") for r in kinds.values())


def test_attempt_logs_are_listed_and_downloadable(server, alice, bob, design_job, transport):
    job, _, _, _ = design_job
    with server.client(alice, transport) as c:
        logs = c.job_logs(job["id"])
        attempt_log = re.compile(r"attempts/\d+/runs/[\w.-]+/(train|pytest|pytest_extra)\.log")
        assert logs and all(attempt_log.fullmatch(p) for p in logs), logs
        text = c.job_log(job["id"], logs[0])
        with pytest.raises(NotFoundError):
            c.job_log(job["id"], "../metrics.json")
    assert text.strip(), "an attempt's training log is empty"
    r = httpx.get(f"{server.url}/v1/jobs/{job['id']}/logs/{logs[0]}", headers={"Authorization": f"Bearer {alice.key}"})
    assert r.headers["content-type"] == "text/plain; charset=utf-8" and r.text == text
    with server.client(bob, transport) as c, pytest.raises(NotFoundError):
        c.job_log(job["id"], logs[0])


def test_rescore_replay_and_pytest_regressions_pass_on_the_stored_run(server, alice, design_job):
    job, _, _, _ = design_job
    with server.client(alice) as c:
        runs = {kind: c.submit_regression(kind=kind, job_id=job["id"]) for kind in ("rescore", "replay", "pytest")}
        done = {kind: c.wait(run.id, timeout=300) for kind, run in runs.items()}
    for kind, run in done.items():
        assert run.status == "succeeded", (kind, run.error)
        assert run.result["passed"] is True, (kind, run.result)
    # predictions.h5ad is the delivered predictor's (designed model, baseline or stack): every metric recorded
    # for it is compared (the control baseline, for one, has no pearson_delta).
    compared = {d["metric"] for d in done["rescore"].result["differences"]}
    assert "mse" in compared and compared == set(job["result"]["metrics"]["delivered"]["test"])
    assert all(d["difference"] == 0 for d in done["rescore"].result["differences"] if d["difference"] is not None)
    assert done["replay"].result["failed_metrics"] == []
    assert done["pytest"].result["summary"]["failed"] == 0 and done["pytest"].result["summary"]["total"] > 0


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
