"""The whole offline pipeline on a simulated knockout screen, through real Docker sandboxes."""

from __future__ import annotations

import json

import anndata as ad
import pytest
from typer.testing import CliRunner

from service.agents import Plan
from service.cli import app
from service.pipeline import RunDir
from service.pipeline.rundir import SANDBOX_FILES


@pytest.mark.slow
def test_run_directory_holds_every_artefact(offline_run):
    rd = RunDir(offline_run.run_dir)
    assert offline_run.status == "validated"
    for path in (rd.task_analysis, rd.plan, rd.weights, rd.predictions, rd.metrics, rd.llm_calls, rd.report,
                 rd.train_log, rd.run_json):
        assert path.is_file(), path
    assert sorted(p.name for p in rd.code.iterdir()) == ["config.json", "model.py", "test_model.py", "train.py"]
    assert list((rd.discussion).glob("round_*.json"))
    attempt = rd.attempts / "01"
    assert (attempt / "code" / "train.py").is_file() and (attempt / "pytest.log").is_file()
    assert "passed" in (attempt / "pytest.log").read_text()
    predictions = ad.read_h5ad(rd.predictions)
    assert predictions.n_obs == offline_run.metrics["n_test_conditions"]


@pytest.mark.slow
def test_test_truth_never_entered_the_sandbox(offline_run):
    rd = RunDir(offline_run.run_dir)
    assert sorted(p.name for p in rd.sandbox_data.iterdir()) == sorted(SANDBOX_FILES)
    seen = json.loads((rd.attempts / "01" / "outcome.json").read_text())["data_listing"]
    assert seen == sorted(SANDBOX_FILES)  # what `ls /data` printed inside the container
    assert (rd.split / "test_truth.h5ad").is_file()


@pytest.mark.slow
def test_metrics_hold_model_baselines_and_ceiling(offline_run):
    metrics = json.loads((offline_run.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "validated"
    assert {"mean_delta", "linear_pca_ridge", "control"} <= set(metrics["baselines"])
    for scores in (metrics["model"], *metrics["baselines"].values()):
        assert "pearson_delta_pert" in scores and "mse_top20_de" in scores
    assert "pearson_delta_pert" in metrics["ceiling"]
    assert metrics["val"]["score"] > metrics["val"]["mean_baseline"]  # validation beat the mean baseline


@pytest.mark.slow
def test_best_candidate_is_kept_by_validation_score(offline_run):
    metrics = json.loads((offline_run.run_dir / "metrics.json").read_text())
    candidates = json.loads((offline_run.run_dir / "candidates.json").read_text())
    assert [c["label"] for c in candidates] == ["discussion plan", "other gene embedding source"]
    scores = {c["candidate"]: c["val_scores"][-1] for c in candidates}
    assert metrics["chosen_candidate"] == max(scores, key=scores.get)  # pearson_delta_pert: higher is better
    assert metrics["val"]["score"] == scores[metrics["chosen_candidate"]]
    chosen = candidates[metrics["chosen_candidate"] - 1]
    assert json.loads((offline_run.run_dir / "plan.json").read_text())["architecture"] == \
        chosen["plan"]["architecture"]
    assert (offline_run.run_dir / "code" / "model.py").read_text() == \
        (offline_run.run_dir / "attempts" / f"{metrics['chosen_attempt']:02d}" / "code" / "model.py").read_text()


@pytest.mark.slow
def test_plan_shapes_the_generated_code(offline_run):
    rd = RunDir(offline_run.run_dir)
    plan = Plan.model_validate_json(rd.plan.read_text())
    config = json.loads((rd.code / "config.json").read_text())
    a = plan.architecture
    assert (config["perturbation_encoder"], config["hidden_width"], config["depth"], config["embedding_dim"]) == \
        (a.perturbation_encoder, a.hidden_width, a.depth, a.embedding_dim)
    assert (config["lr"], config["epochs"], config["loss"]["kind"]) == \
        (plan.training.lr, plan.training.epochs, plan.loss.kind)
    model_py = (rd.code / "model.py").read_text()
    assert f"{a.perturbation_encoder} encoder" in model_py
    assert f"learnt from training cells (source: {a.gene_embedding_source})" in model_py  # only the chosen encoder
    assert "drug" not in model_py.lower()


@pytest.mark.slow
def test_progress_reports_phases_rounds_attempts_and_epochs(offline_run):
    phases = {e.phase for e in offline_run.events}
    assert {"profile", "analysis", "discussion", "split", "codegen", "pytest", "train", "evaluate", "done"} <= phases
    assert any(e.round for e in offline_run.events if e.phase == "discussion")
    epochs = [e for e in offline_run.events if e.epoch is not None]
    assert epochs and epochs[0].attempt == 1 and epochs[0].val_loss is not None


@pytest.mark.slow
def test_report_embeds_plots_and_the_metrics_table(offline_run):
    page = (offline_run.run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # training curve + predicted vs true Δ
    assert "linear_pca_ridge" in page and "data ceiling" in page


@pytest.mark.slow
def test_cli_replay_reproduces_plan_and_code_exactly(offline_run, tmp_path):
    out = tmp_path / "replay"
    result = CliRunner().invoke(app, ["replay", str(offline_run.run_dir), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["status"] == "validated" and summary["run_dir"] == str(out)
    assert (out / "plan.json").read_bytes() == (offline_run.run_dir / "plan.json").read_bytes()
    for name in ("model.py", "train.py", "test_model.py", "config.json"):
        assert (out / "code" / name).read_bytes() == (offline_run.run_dir / "code" / name).read_bytes()
    recorded_calls = (offline_run.run_dir / "llm_calls.jsonl").read_text().splitlines()
    assert len((out / "llm_calls.jsonl").read_text().splitlines()) == len(recorded_calls)
    assert json.loads((out / "run.json").read_text())["replay_of"] == str(offline_run.run_dir)


def test_cli_replay_of_a_folder_that_is_no_run_says_so(tmp_path):
    result = CliRunner().invoke(app, ["replay", str(tmp_path), "--json"])
    assert result.exit_code == 1
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["error"] == "PipelineError" and "run.json" in last["message"]


@pytest.mark.slow
def test_local_backend_runs_the_same_pipeline(knockout_data, tmp_path):
    """Machines without Docker: the bundle sees its data where the local backend links it, not /data."""
    from service.pipeline import DesignSettings, run_design

    result = run_design(DesignSettings(data=knockout_data, task="Predict expression after knockout of unseen genes", out=tmp_path / "local", sandbox="local",
                                       max_minutes=8, max_attempts=2))
    assert result.status in ("validated", "below_baseline"), result.metrics
    seen = json.loads((RunDir(result.run_dir).attempts / "01" / "outcome.json").read_text())["data_listing"]
    assert seen == sorted(SANDBOX_FILES)
    assert "pearson_delta" in result.metrics["model"]
