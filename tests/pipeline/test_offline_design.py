"""The whole offline pipeline on a simulated knockout screen, through real Docker sandboxes: a draft and
one improve step, validation on whole held-out genes, the competition with the baselines, the verdict."""

from __future__ import annotations

import json

import anndata as ad
import pytest
from typer.testing import CliRunner

from service.agents import Plan
from service.cli import app
from service.pipeline import RunDir
from service.pipeline.rundir import SANDBOX_FILES
from service.pipeline.selection import better


def _search(run) -> dict:
    return json.loads((run.run_dir / "search.json").read_text())


@pytest.mark.slow
def test_run_directory_holds_every_artefact(offline_run):
    rd = RunDir(offline_run.run_dir)
    assert offline_run.status == "validated"
    for path in (rd.task_analysis, rd.plan, rd.weights, rd.predictions, rd.val_predictions, rd.metrics, rd.llm_calls,
                 rd.report, rd.train_log, rd.run_json, rd.search):
        assert path.is_file(), path
    assert {"config.json", "model.py", "test_model.py", "train.py"} <= {p.name for p in rd.code.iterdir()}
    assert list((rd.discussion).glob("round_*.json"))
    first = rd.attempts / "01"
    assert (first / "code" / "train.py").is_file() and (first / "node.json").is_file()
    assert "passed" in (first / "runs" / "val" / "pytest.log").read_text()
    predictions = ad.read_h5ad(rd.predictions)
    assert predictions.n_obs == offline_run.metrics["n_test_conditions"]


@pytest.mark.slow
def test_no_truth_entered_any_sandbox(offline_run):
    rd = RunDir(offline_run.run_dir)
    assert sorted(p.name for p in rd.sandbox_data.iterdir()) == sorted(SANDBOX_FILES)
    listings = [json.loads(p.read_text())["data_listing"] for p in rd.root.rglob("outcome.json")]
    assert listings and all(seen == sorted(SANDBOX_FILES) for seen in listings)  # `ls /data` inside each container
    assert (rd.split / "val_truth.h5ad").is_file() and (rd.split / "test_truth.h5ad").is_file()


@pytest.mark.slow
def test_metrics_hold_verdict_validation_and_every_candidate(offline_run):
    metrics = json.loads((offline_run.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "validated"
    assert {"mean_delta", "linear_pca_ridge", "control"} <= set(metrics["baselines"])
    for scores in (metrics["model"], *metrics["baselines"].values()):
        assert "pearson_delta_pert" in scores and "mse_top20_de" in scores
    assert "pearson_delta_pert" in metrics["ceiling"]
    val = metrics["val"]
    assert val["mode"] == "holdout" and val["group_by"] == "perturbation" and val["n_conditions"] >= 10
    assert {"designed", "baseline:mean_delta", "baseline:linear_pca_ridge", "stack"} <= set(val["candidates"])
    # The delivered predictor is the best candidate on validation: never worse than the best baseline.
    primary = metrics["primary_metric"]
    scores = {k: v[primary] for k, v in val["candidates"].items()}
    delivered = metrics["delivered"]["key"]
    assert not any(better(primary, s, scores[delivered]) for s in scores.values())
    verdict = metrics["verdict"]
    assert verdict["status"] == "validated" and verdict["delivered"] == delivered
    assert set(verdict["metrics"]) == {primary, "mse_top20_de"}
    p = verdict["metrics"][primary]
    assert p["model_val"] == val["score"] and p["model_test"] == metrics["model"][primary]
    assert verdict["beats_baselines"] == bool(p["beats_val"] and p["beats_test"])
    # cell-eval scored the designed model and the best test baseline beside ours; its per-condition values
    # join the delivered predictor's rows.
    cell = metrics["cell_eval"]
    assert "error" not in cell and cell["version"].startswith("0.8") and cell["seconds"] > 0
    assert {"designed model", p["best_baseline_test"]} <= set(cell["scores"])
    assert {"mae", "discrimination_score_l1", "overlap_at_N", "vcc_score"} <= set(cell["scores"]["designed model"])
    rows = metrics["delivered"]["per_condition"]
    assert len(rows) == metrics["n_test_conditions"] and all("cell-eval mae" in r for r in rows)


@pytest.mark.slow
def test_search_keeps_only_improving_nodes(offline_run):
    """A draft then one improve node; a node is kept only when its merit — the delivery rule's standing
    against the best baselines, saved with each node — beats every working node's before it."""
    tree = _search(offline_run)
    nodes = tree["nodes"]
    assert nodes[0]["kind"] == "draft" and any(n["kind"] == "improve" for n in nodes)
    best = None
    for node in nodes:
        if node["status"] in ("buggy", "rejected"):
            assert node["merit"] is None
            continue
        assert node["status"] == ("kept" if best is None or node["merit"] > best else "discarded")
        if node["status"] == "kept":
            best = node["merit"]
    improve = next(n for n in nodes if n["kind"] == "improve")
    assert improve["parent"] is not None and improve["change"]["label"] == improve["label"]
    folder = offline_run.run_dir / "attempts" / f"{improve['id']:02d}"
    assert (folder / "patch.diff").read_text().strip()  # one change, as a diff of the bundle
    assert tree["kept_path"][-1] == tree["best"] == offline_run.metrics["chosen_attempt"]
    # The 15-minute budget had room for more: the --max-nodes cap of 1 stopped it, and says so.
    assert tree["stopped"]["reason"] == "max_nodes" and tree["skipped"] == []
    assert offline_run.metrics["search"]["stopped"] == tree["stopped"]
    assert offline_run.metrics["val"]["score"] == next(n for n in nodes if n["id"] == tree["best"])["val"]["primary"]


@pytest.mark.slow
def test_plan_json_is_the_best_designed_nodes_plan(offline_run):
    rd = RunDir(offline_run.run_dir)
    best = offline_run.metrics["chosen_attempt"]
    plan = Plan.model_validate_json(rd.plan.read_text())
    assert plan == Plan.model_validate_json((rd.attempts / f"{best:02d}" / "plan.json").read_text())
    config = json.loads((rd.attempts / f"{best:02d}" / "code" / "config.json").read_text())
    a = plan.architecture
    assert (config["perturbation_encoder"], config["embedding_dim"]) == (a.perturbation_encoder, a.embedding_dim)
    model_py = (rd.attempts / f"{best:02d}" / "code" / "model.py").read_text()
    assert f"{a.perturbation_encoder} encoder" in model_py
    assert "drug" not in model_py.lower()


@pytest.mark.slow
def test_progress_reports_phases_rounds_nodes_and_epochs(offline_run):
    phases = {e.phase for e in offline_run.events}
    assert {"profile", "analysis", "discussion", "split", "codegen", "pytest", "train", "improve", "compete",
            "deliver", "evaluate", "done"} <= phases
    assert any(e.round for e in offline_run.events if e.phase == "discussion")
    epochs = [e for e in offline_run.events if e.epoch is not None]
    assert epochs and epochs[0].attempt == 1 and epochs[0].val_loss is not None


@pytest.mark.slow
def test_report_puts_the_verdict_first_and_draws_the_search(offline_run):
    page = (offline_run.run_dir / "report.html").read_text()
    assert page.index('class="verdict"') < page.index("Metrics on the test split")
    assert "beats_baselines" in page and offline_run.metrics["verdict"]["summary"][:40] in page
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in page and "kept path" in page
    assert page.count("data:image/png;base64,") >= 1
    assert "linear_pca_ridge" in page and "data ceiling" in page and "Validation: every candidate" in page
    assert "cell-eval (Virtual Cell Challenge metrics" in page and "Per test condition" in page


@pytest.mark.slow
def test_cli_replay_reproduces_plan_code_and_search(offline_run, tmp_path):
    out = tmp_path / "replay"
    result = CliRunner().invoke(app, ["replay", str(offline_run.run_dir), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["status"] == "validated" and summary["run_dir"] == str(out)
    assert "verdict" in summary and summary["verdict"]["delivered"] == summary["delivered"]["key"]
    assert (out / "plan.json").read_bytes() == (offline_run.run_dir / "plan.json").read_bytes()
    best = offline_run.metrics["chosen_attempt"]
    for name in ("model.py", "train.py", "test_model.py", "config.json"):
        replayed = (out / "attempts" / f"{best:02d}" / "code" / name).read_bytes()
        assert replayed == (offline_run.run_dir / "attempts" / f"{best:02d}" / "code" / name).read_bytes()
    recorded_calls = (offline_run.run_dir / "llm_calls.jsonl").read_text().splitlines()
    assert len((out / "llm_calls.jsonl").read_text().splitlines()) == len(recorded_calls)
    assert json.loads((out / "run.json").read_text())["replay_of"] == str(offline_run.run_dir)
    # The search tree: the same nodes, changes and parents.
    shape = lambda tree: [(n["id"], n["parent"], n["kind"], n["label"]) for n in tree["nodes"]]  # noqa: E731
    assert shape(json.loads((out / "search.json").read_text())) == shape(_search(offline_run))
    assert json.loads((out / "search.json").read_text())["stopped"]["reason"] == _search(offline_run)["stopped"]["reason"]


def test_cli_replay_of_a_folder_that_is_no_run_says_so(tmp_path):
    result = CliRunner().invoke(app, ["replay", str(tmp_path), "--json"])
    assert result.exit_code == 1
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["error"] == "PipelineError" and "run.json" in last["message"]


def test_one_stimulus_without_cell_types_stops_before_the_experts_say_why(tmp_path):
    """One stimulus and no cell-type column: nothing can be held out. The design stops after profiling, before
    any LLM call or split, and names the fix (a column of cell types) and the obs columns there are."""
    from tests.data.conftest import make_perturbation_adata

    adata = make_perturbation_adata(perturbations=("STIM",), perturbation_key="stim", control_label="CTRL")
    adata.obs = adata.obs.rename(columns={"batch": "donor_label"})
    adata.write_h5ad(tmp_path / "one.h5ad")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["design", "--data", str(tmp_path / "one.h5ad"), "--task",
                                      "Predict the interferon response of an unseen cell type", "--out", str(out),
                                      "--sandbox", "local", "--json"])
    assert result.exit_code == 1
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["error"] == "PipelineError"
    assert "no split can hold anything out" in last["message"] and "STIM" in last["message"]
    assert "--context-key" in last["message"] and "'donor_label'" in last["message"]
    assert not (out / "task_analysis.json").exists() and not (out / "split").exists()


@pytest.mark.slow
def test_local_backend_runs_the_same_pipeline(knockout_data, tmp_path, monkeypatch):
    """Machines without Docker: the bundle sees its data where the local backend links it, not /data. Every
    sandbox of the run comes from one backend, made for the run and closed at its end."""
    import sandbox.provider
    from sandbox.local_backend import LocalBackend
    from service.pipeline import DesignSettings, run_design

    made: list[dict[str, int]] = []

    class Counted(LocalBackend):
        async def create(self, spec):
            made[-1]["sandboxes"] += 1
            return await super().create(spec)

        async def close(self) -> None:
            made[-1]["closed"] += 1
            await super().close()

    def new_backend(kind):
        made.append({"sandboxes": 0, "closed": 0})
        return Counted()

    monkeypatch.setattr(sandbox.provider, "new_backend", new_backend)
    result = run_design(DesignSettings(data=knockout_data, task="Predict expression after knockout of unseen genes",
                                       out=tmp_path / "local", sandbox="local", max_minutes=8, max_attempts=2,
                                       max_nodes=1, val_fraction=0.25))
    assert result.status == "validated", result.metrics
    assert len(made) == 1 and made[0]["closed"] == 1
    assert made[0]["sandboxes"] >= 2  # the draft's run and the improve node's, at least, on the one backend
    seen = json.loads((RunDir(result.run_dir).attempts / "01" / "outcome.json").read_text())["data_listing"]
    assert seen == sorted(SANDBOX_FILES)
    assert "pearson_delta" in result.metrics["model"]


@pytest.mark.slow  # four local sandbox runs and the finish: ~40 s
def test_an_unseen_cell_type_run_validates_its_closed_form_model(tmp_path):
    """Unseen cell type, the offline plan, a local sandbox: no residual network is trained (every condition
    to predict lies in a cell type absent from training), and the closed-form model still validates — its
    train log holds the base's line — rather than every node coming back broken for an empty log."""
    from service.data import simulate
    from service.pipeline import DesignSettings, run_design

    simulate("stimulation", 0, n_cells=1600, n_genes=60).write_h5ad(tmp_path / "data.h5ad")
    result = run_design(DesignSettings(data=tmp_path / "data.h5ad", out=tmp_path / "run", sandbox="local",
                                       task="Predict stimulation responses in an unseen cell type",
                                       held_out_context="B_cell", max_minutes=8, max_nodes=0))
    assert result.status == "validated", result.metrics["verdict"]
    draft = _search(result)["nodes"][0]
    assert draft["status"] == "kept" and draft["failure"] is None
    log = result.run_dir / "attempts" / "01" / "runs" / "main" / "out" / "train_log.jsonl"
    assert [json.loads(line)["phase"] for line in log.read_text().splitlines()] == ["base"]
